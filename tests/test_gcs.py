"""gs:// end to end against a real GCS emulator, driven by the real google-cloud-storage and pyarrow
clients: shards written and verified, a 2-worker Ray Train run reading from and checkpointing to
the bucket, the export written there and reloaded."""

import json

import numpy as np
import pytest

from aisd_ray.data.sources.layout import DataError
from aisd_ray.data.store import shards
from aisd_ray.data.store.prepare import prepare
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bucket(gcs_emulator):
    from google.cloud import storage as gcs

    return gcs.Client(project="aisd-ray-test").bucket("aisd")


@pytest.fixture(scope="module")
def gs_shards(gcs_emulator, synthetic_root):
    cfg = tiny_config(f"data.source_dir='{synthetic_root}'")
    uri = "gs://aisd/data/tiny"
    prepare(cfg, uri, progress=False)
    return cfg, uri


def test_prepare_writes_shards_and_manifest_to_the_bucket(gs_shards, bucket):
    cfg, uri = gs_shards
    # (pyarrow also leaves empty "folder/" marker objects; they are not files)
    names = {b.name: b.size for b in bucket.list_blobs(prefix="data/tiny/") if not b.name.endswith("/")}
    manifest = json.loads(bucket.blob("data/tiny/manifest.json").download_as_bytes())
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            assert names[f"data/tiny/{shard['name']}"] == shard["bytes"]
    assert len(names) == 1 + sum(len(e["shards"]) for e in manifest["splits"].values())  # no temp files
    shards.verify_shards(uri, shards.read_manifest(uri), checksums=True)
    again = prepare(cfg, uri, progress=False)  # idempotent: nothing rewritten
    assert again == manifest


def test_missing_or_corrupt_shard_in_the_bucket_is_named(gcs_emulator, synthetic_root, bucket):
    cfg = tiny_config(f"data.source_dir='{synthetic_root}'", "data.shard_format='tfrecord'")
    uri = "gs://aisd/data/broken"
    manifest = prepare(cfg, uri, progress=False)
    victim = manifest["splits"]["valid"]["shards"][0]["name"]
    blob = bucket.blob(f"data/broken/{victim}")
    data = blob.download_as_bytes()
    blob.upload_from_string(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DataError, match=f"gs://aisd/data/broken/{victim}: shard checksum does not match"):
        shards.verify_shards(uri, manifest, checksums=True)
    blob.delete()
    with pytest.raises(DataError, match=f"gs://aisd/data/broken/{victim}: shard listed in the manifest is missing"):
        shards.verify_shards(uri, manifest)


def test_unreachable_endpoint_missing_bucket_and_unknown_scheme_fail_fast_with_one_line(
        gcs_emulator, synthetic_root, tmp_path, monkeypatch, capsys):
    from aisd_ray.cli import main
    from tests.conftest import _free_port

    tiny = ["--config", "tiny", "--source", str(synthetic_root)]
    monkeypatch.setenv("AISD_STORAGE_RETRY_SECONDS", "2")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_free_port()}")  # nothing listens
    assert main(["prepare", *tiny, "--output", "gs://aisd/data/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("aisd-ray prepare: error: gs://aisd: cannot reach the emulator at http://127.0.0.1:")
    assert "within 2 s" in err

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    assert main(["prepare", *tiny, "--output", "gs://no-such-bucket/data"]) == 2
    assert "gs://no-such-bucket: no such bucket in the emulator at" in capsys.readouterr().err
    from google.cloud import storage as gcs

    assert "no-such-bucket" not in [b.name for b in gcs.Client(project="aisd-ray-test").list_buckets()]

    assert main(["prepare", *tiny, "--output", "s3://bucket/data"]) == 2
    assert "s3://bucket/data/manifest.json: storage scheme s3:// is not supported" in capsys.readouterr().err


def test_artifacts_reach_the_bucket_incrementally(gcs_emulator, bucket):
    """Each epoch sends only what is new or changed (not the whole folder again), from a
    background thread; after close the bucket holds exactly the local files."""
    from aisd_ray.train.artifacts import Artifacts

    artifacts = Artifacts("gs://aisd/artifacts/run")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    truth = np.zeros((32, 32), np.uint8)
    truth[8:16, 8:16] = 1
    history, sent = [], []
    for epoch in (1, 2, 3):
        history.append({"epoch": epoch, "loss": 1.0 / epoch, "val_loss": 1.2 / epoch, "val_lesion_dice": 0.2 * epoch,
                        "lesion_dice": 0.1 * epoch, "val_dice_coef_multiclass": 0.9, "learning_rate": 1e-3})
        artifacts.epoch_end(history, [("slice", image, truth, truth)])
        artifacts._wait()
        sent.append(artifacts.uploaded_files)
    local = {p.relative_to(artifacts.folder).as_posix(): p.read_bytes() for p in artifacts.folder.rglob("*")
             if p.is_file()}
    per_epoch = sent[2] - sent[1]
    assert per_epoch <= 5 < len(local)  # history, 2 plots, the new gallery, the event file: not the whole folder
    artifacts.close()
    remote = {b.name.removeprefix("artifacts/run/"): b.download_as_bytes()
              for b in bucket.client.list_blobs("aisd", prefix="artifacts/run/") if not b.name.endswith("/")}
    assert set(remote) >= set(local) and all(remote[k] == v for k, v in local.items() if "tensorboard" not in k)
    assert sorted(k for k in remote if k.startswith("epoch_change_infer/")) == [
        f"epoch_change_infer/Epoch_{e}.png" for e in (1, 2, 3)]


@pytest.mark.parametrize("as_zip", [True, False])
def test_prepare_reads_a_raw_release_from_the_bucket(gcs_emulator, bucket, tmp_path, as_zip):
    """The raw release in a bucket (zips or folders) gives the same shards as read locally, and an
    unchanged source is recognised on the next run (file times survive the copy)."""
    from aisd_ray.config import AISD_TEST_CASES
    from aisd_ray.data.synthetic.slices import write_synthetic_raw

    release = tmp_path / "release"
    write_synthetic_raw(release, tiny_config().synthetic, [AISD_TEST_CASES[0], "1000001", "1000002", "1000003"],
                        slices=3, as_zip=as_zip, progress=False)
    prefix = f"sources/release-{'zip' if as_zip else 'dir'}"
    for path in release.rglob("*"):
        if path.is_file():
            bucket.blob(f"{prefix}/{path.relative_to(release).as_posix()}").upload_from_filename(str(path))
    local = prepare(tiny_config(f"data.source_dir='{release}'"), str(tmp_path / "local"), progress=False)
    cfg = tiny_config(f"data.source_dir='gs://aisd/{prefix}'")
    remote = prepare(cfg, f"gs://aisd/data/{prefix}", progress=False)
    assert remote["source"]["root"] == f"gs://aisd/{prefix}" and remote["source"]["cases"] == local["source"]["cases"]
    for split in ("train", "valid", "test"):
        assert (list(shards.iter_records(f"gs://aisd/data/{prefix}", remote, split))
                == list(shards.iter_records(str(tmp_path / "local"), local, split)))
    assert prepare(cfg, f"gs://aisd/data/{prefix}", progress=False)["fingerprint"] == remote["fingerprint"]


def test_a_manifest_in_the_bucket_pointing_outside_its_store_is_refused(gs_shards, bucket):
    """A shard name is a name inside the store on gs:// too: '..' into another store, another bucket."""
    _, uri = gs_shards
    manifest = json.loads(bucket.blob("data/tiny/manifest.json").download_as_bytes())
    shard = manifest["splits"]["valid"]["shards"][0]["name"]
    for name in (f"../tiny/{shard}", "gs://other-bucket/data/tiny/" + shard):
        manifest["splits"]["valid"]["shards"][0]["name"] = name
        bucket.blob("data/evil/manifest.json").upload_from_string(json.dumps(manifest))
        with pytest.raises(DataError) as err:
            shards.read_manifest("gs://aisd/data/evil")
        assert str(err.value).startswith(f"gs://aisd/data/evil/manifest.json: split 'valid' lists shard {name!r}, "
                                         "which is not a name inside the store")


def test_prepare_in_the_bucket_repairs_a_damaged_store_and_a_failed_one_leaves_nothing(
        gcs_emulator, synthetic_root, bucket, tmp_path):
    import shutil

    cfg = tiny_config(f"data.source_dir='{synthetic_root}'")
    uri = "gs://aisd/data/repair"
    manifest = prepare(cfg, uri, progress=False)
    victim = manifest["splits"]["train"]["shards"][0]["name"]
    bucket.blob(f"data/repair/{victim}").delete()
    again = prepare(cfg, uri, progress=False)  # names the missing shard and rewrites the store
    shards.verify_shards(uri, shards.read_manifest(uri), checksums=True)
    assert again["splits"]["train"]["records"] == manifest["splits"]["train"]["records"]
    assert victim not in {s["name"] for s in again["splits"]["train"]["shards"]}

    source = tmp_path / "AISD"
    shutil.copytree(synthetic_root, source)
    bad = sorted((source / "test" / "images").iterdir())[-1]
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=str(bad)):
        prepare(tiny_config(f"data.source_dir='{source}'"), "gs://aisd/data/failed", progress=False)
    assert [b.name for b in bucket.list_blobs(prefix="data/failed/") if not b.name.endswith("/")] == []
