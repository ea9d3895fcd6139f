import json
import shutil

import numpy as np
import pytest

from aisd_ray.core import storage
from aisd_ray.data.sources import masks
from aisd_ray.data.sources.layout import DataError
from aisd_ray.data.store import shards
from aisd_ray.data.store.prepare import prepare
from tests.conftest import tiny_config


def _split(images_dir, masks_dir, height, width, channels, rule):
    """The number of pairs of a split and its samples, loaded lazily (as prepare reads them)."""
    refs = masks.original_refs(images_dir, masks_dir, height, width, channels, rule)
    return len(refs), (ref.load() for ref in refs)



def test_round_trip_is_bit_exact(shard_store, synthetic_root):
    cfg, out = shard_store
    manifest = shards.read_manifest(out)
    m = cfg.model
    n, samples = _split(synthetic_root / "valid" / "images", synthetic_root / "valid" / "masks",
                                   m.image_height, m.image_width, m.image_channels, cfg.data.rgb_map)
    expected = {s.name: s for s in samples}
    records = list(shards.iter_records(out, manifest, "valid"))
    assert [r["name"] for r in records] == sorted(expected) and len(records) == n
    for record in records:
        image, labels = shards.record_to_arrays(record)
        np.testing.assert_array_equal(image, expected[record["name"]].image)
        np.testing.assert_array_equal(labels, expected[record["name"]].labels)
        assert (record["height"], record["width"], record["channels"]) == image.shape
        assert record["lesion_pixels"] == np.count_nonzero(labels)
        assert shards.record_brain(record) is None  # PNG slices: no intracranial mask


def test_manifest_lists_every_shard_with_size_and_checksum(shard_store):
    cfg, out = shard_store
    manifest = shards.read_manifest(out)
    assert manifest["shard_format"] == cfg.data.shard_format
    for entry in manifest["splits"].values():
        assert len(entry["shards"]) >= cfg.data.min_shards  # every training worker gets a shard
        assert sum(s["records"] for s in entry["shards"]) == entry["records"]
        assert 0 < entry["lesion_fraction"] < 0.2
    shards.verify_shards(out, manifest, checksums=True)


def copy_store(src, dst):
    storage.upload_dir(src, str(dst))
    return str(dst)


def test_missing_or_changed_shard_is_named(parquet_store, tmp_path):
    _, src = parquet_store
    out = copy_store(src, tmp_path / "store")
    manifest = shards.read_manifest(out)
    victim = manifest["splits"]["train"]["shards"][0]["name"]
    path = tmp_path / "store" / victim
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(DataError, match=f"{victim}: shard checksum does not match"):
        shards.verify_shards(out, manifest, checksums=True)
    path.unlink()
    with pytest.raises(DataError, match=f"{victim}: shard listed in the manifest is missing"):
        shards.verify_shards(out, manifest)


def test_prepare_is_idempotent_and_manifest_comes_last(synthetic_root, tmp_path):
    cfg = tiny_config(f"data.source_dir='{synthetic_root}'")
    out = str(tmp_path / "store")
    first = prepare(cfg, out, progress=False)
    listing = sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*"))
    again = prepare(cfg, out, progress=False)
    assert again == first
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*")) == listing
    # a changed setting rewrites the store, with no stale shards left behind
    cfg.data.min_shards, cfg.train.num_workers = 1, 1
    cfg.data.shard_target_mb = 100
    third = prepare(cfg, out, progress=False)
    assert len(third["splits"]["train"]["shards"]) == 1
    assert sorted(p.name for p in (tmp_path / "store" / "train").iterdir()) == [
        f"train-00000-{third['fingerprint'][:8]}.parquet"]


def test_every_split_has_a_shard_per_training_worker(synthetic_root, tmp_path):
    cfg = tiny_config(f"data.source_dir='{synthetic_root}'", "data.min_shards=1", "train.num_workers=3")
    manifest = prepare(cfg, str(tmp_path), progress=False)
    assert {s: len(e["shards"]) for s, e in manifest["splits"].items()} == {"train": 3, "valid": 3, "test": 3}


def test_interrupted_prepare_leaves_no_manifest(synthetic_root, tmp_path, monkeypatch):
    cfg = tiny_config(f"data.source_dir='{synthetic_root}'")
    out = str(tmp_path / "store")
    calls = {"n": 0}
    real = shards.sample_to_record

    def failing(sample, encoding="png"):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk full")
        return real(sample, encoding)

    monkeypatch.setattr(shards, "sample_to_record", failing)
    with pytest.raises(OSError, match="disk full"):
        prepare(cfg, out, progress=False)
    with pytest.raises(DataError, match="no manifest; run `aisd-ray prepare` first"):
        shards.read_manifest(out)
    monkeypatch.undo()
    manifest = prepare(cfg, out, progress=False)  # a rerun completes the store
    assert manifest["splits"]["train"]["records"] == 32


def test_tfrecord_framing_is_readable_by_tensorflow(tmp_path):
    import tensorflow as tf

    record = {"name": "a", "case_id": "", "slice_index": 3, "height": 2, "width": 2, "channels": 1,
              "stored_channels": 1, "lesion_pixels": 1, "image": b"\x89PNG", "mask": b"xyz"}
    path = tmp_path / "x.tfrecord"
    path.write_bytes(shards.tfrecord_bytes([record, record]))
    raw = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
    assert len(raw) == 2
    example = tf.train.Example.FromString(raw[0])
    assert example.features.feature["slice_index"].int64_list.value[0] == 3
    with open(path, "rb") as f:
        assert list(shards.iter_tfrecord(f, str(path))) == [record, record]


def test_shard_plan_respects_target_and_minimum():
    plan = shards.ShardPlan(target_bytes=1000, min_shards=4)
    assert plan.records_per_shard(100, 10) == 25  # 4 shards although 100 records fit one
    assert plan.records_per_shard(100, 100) == 10  # 10 shards by size
    assert plan.records_per_shard(2, 10) == 1  # fewer records than workers: one each


@pytest.mark.parametrize("fmt", ["parquet", "tfrecord"])
def test_raw_rows_hold_the_same_pixels_as_png_rows(synthetic_root, tmp_path, fmt):
    """data.row_encoding = "raw": uint8 arrays (zstd), grey stored once; read back, through the
    numpy reader and the tf.data pipeline alike, they are the PNG rows' pixels exactly."""
    from aisd_ray.data.store import pipeline
    from aisd_ray.data.store.prepare import prepare
    from tests.conftest import tiny_config

    stores = {}
    for encoding in ("png", "raw"):
        cfg = tiny_config(f"data.source_dir='{synthetic_root}'", f"data.shard_format='{fmt}'",
                          f"data.row_encoding='{encoding}'")
        stores[encoding] = (prepare(cfg, str(tmp_path / encoding), progress=False), str(tmp_path / encoding))
    png, raw = ([r for r in shards.iter_records(uri, m, "valid")] for m, uri in (stores["png"], stores["raw"]))
    assert stores["raw"][0]["row_encoding"] == "raw"
    assert stores["png"][0]["fingerprint"] != stores["raw"][0]["fingerprint"]
    for a, b in zip(png, raw, strict=True):
        assert a["name"] == b["name"] and b["stored_channels"] == 1 and a["stored_channels"] == 3  # synthetic is grey
        for x, y in zip(shards.record_to_arrays(a), shards.record_to_arrays(b)):
            np.testing.assert_array_equal(x, y)
    batches = {}
    for encoding, (manifest, uri) in stores.items():
        rows = pipeline.ShardRows(uri, manifest, "valid")
        ds = pipeline.batches(rows, 3, 2, 4, encoding=encoding, height=64, width=64)
        batches[encoding] = [(x.numpy(), y.numpy()) for x, y in ds]
    for (xa, ya), (xb, yb) in zip(batches["png"], batches["raw"], strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("name", ["../other/train/train-00000.parquet", "train/../../other/train-00000.parquet",
                                  "/tmp/other/train/train-00000.parquet", "gs://other/train/train-00000.parquet",
                                  "train\\train-00000.parquet", "train//train-00000.parquet", "./train/x.parquet", ""])
def test_a_shard_name_outside_the_store_is_refused_naming_manifest_and_entry(parquet_store, tmp_path, name):
    _, src = parquet_store
    out = copy_store(src, tmp_path / "store")
    manifest = shards.read_manifest(out)
    manifest["splits"]["train"]["shards"][1]["name"] = name
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(manifest))
    expected = f"{out}/manifest.json: split 'train' lists shard {name!r}, which is not a name inside the store"
    with pytest.raises(DataError) as err:
        shards.read_manifest(out)
    assert str(err.value).startswith(expected)
    for check in (lambda: shards.shard_uris(out, manifest, "train"), lambda: shards.verify_shards(out, manifest)):
        with pytest.raises(DataError) as err:
            check()
        assert str(err.value).startswith(expected)


@pytest.mark.parametrize("fmt", ["parquet", "tfrecord"])
@pytest.mark.parametrize("damage", ["flipped byte", "deleted"])
def test_prepare_rewrites_a_store_whose_shard_is_damaged(synthetic_root, tmp_path, fmt, damage, caplog):
    cfg = tiny_config(f"data.source_dir='{synthetic_root}'", f"data.shard_format='{fmt}'")
    out = str(tmp_path / "store")
    first = prepare(cfg, out, progress=False)
    victim = tmp_path / "store" / first["splits"]["train"]["shards"][1]["name"]
    if damage == "deleted":
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    with pytest.raises(DataError):
        shards.ShardStore.open(out, cfg)
    again = prepare(cfg, out, progress=False)
    assert f"{victim}: shard" in caplog.text and "rewriting the store" in caplog.text
    store = shards.ShardStore.open(out, cfg)  # what train checks first: every shard's size and SHA-256
    assert again["fingerprint"] == first["fingerprint"]
    records = {s: e["records"] for s, e in first["splits"].items()}
    assert {s: e["records"] for s, e in again["splits"].items()} == records
    assert store.manifest == again
    listed = {s["name"] for e in again["splits"].values() for s in e["shards"]}
    assert {p.relative_to(tmp_path / "store").as_posix() for p in (tmp_path / "store").rglob("*.*")} == (
        listed | {"manifest.json"})  # the damaged generation is gone
    caplog.clear()
    assert prepare(cfg, out, progress=False) == again  # and now it is up to date


def test_a_failed_prepare_leaves_no_output_or_the_old_store_as_it_was(synthetic_root, tmp_path):
    source = tmp_path / "AISD"
    shutil.copytree(synthetic_root, source)
    cfg = tiny_config(f"data.source_dir='{source}'")
    bad = sorted((source / "test" / "images").iterdir())[-1]  # the last split written
    good = bad.read_bytes()
    bad.write_bytes(b"not a png")
    out = tmp_path / "new" / "store"
    with pytest.raises(DataError, match=str(bad)):
        prepare(cfg, str(out), progress=False)
    assert not (tmp_path / "new").exists()
    bad.write_bytes(good)
    prepare(cfg, str(out), progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad.write_bytes(b"not a png")  # a changed source: the store is rewritten, train and valid first
    with pytest.raises(DataError, match=str(bad)):
        prepare(cfg, str(out), progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("fmt", ["parquet", "tfrecord"])
@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_a_slices_intracranial_mask_round_trips_in_both_formats_and_encodings(tmp_path, fmt, encoding):
    """The optional ``brain`` feature: written for samples that carry it (slices of CT volumes), read
    back bit for bit; a split of samples without it has no such column or feature."""
    from aisd_ray.data.sources.layout import Sample

    rng = np.random.default_rng(5)
    with_brain = [Sample(f"c_{k}", rng.integers(0, 256, (32, 48, 3), dtype=np.uint8),
                         rng.integers(0, 2, (32, 48), dtype=np.uint8), "c", k, brain=rng.random((32, 48)) > 0.4)
                  for k in range(5)]
    plan = shards.ShardPlan(1 << 20, 2)
    for split, samples in (("valid", with_brain), ("test", [Sample(s.name, s.image, s.labels, "c", s.slice_index)
                                                              for s in with_brain])):
        entry = shards.write_split(iter(samples), len(samples), str(tmp_path), split, fmt, plan, encoding=encoding)
        manifest = {"shard_format": fmt, "splits": {split: entry}}
        records = list(shards.iter_records(str(tmp_path), manifest, split))
        assert [r["name"] for r in records] == [s.name for s in samples]
        for record, sample in zip(records, samples):
            brain = shards.record_brain(record)
            image, labels = shards.record_to_arrays(record)
            np.testing.assert_array_equal(image, sample.image)
            if sample.brain is None:
                assert brain is None and shards.BRAIN not in record
            else:
                assert brain.dtype == bool and np.array_equal(brain, sample.brain)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(tmp_path / entry["shards"][0]["name"]).names
            assert (shards.BRAIN in names) == (samples is with_brain)
