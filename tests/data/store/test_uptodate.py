"""A no-op prepare decided from file stamps: the demo's 44 patients prepared, then prepared again
reading no volume, no source file and no shard byte (the reads counted by wrapping the real
readers, which still run); a shard whose stamp changed read whole, alone; --verify reading every
shard; the same on gs:// against the emulator, where the source is not even downloaded."""

import builtins
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from aisd_ray.config import builtin_config, load_config
from aisd_ray.core import storage
from aisd_ray.data.sources import volume
from aisd_ray.data.store import shards
from aisd_ray.data.store.prepare import prepare
from aisd_ray.stages.data import synthetic_source
from tests.conftest import volume_config


class Reads:
    """Counts of real reads: volumes and label volumes read, files opened under the source, and
    files other than the manifest read through storage (the shards)."""

    def __init__(self, monkeypatch, source: Path):
        self.counts: Counter = Counter()
        self.shards: list[str] = []
        source = str(source)
        real_volume, real_labels, real_open = volume.read_volume, volume.read_labels, builtins.open
        real_bytes, real_input = storage.read_bytes, storage.open_input

        def counted(kind, fn):
            def wrapper(*args, **kwargs):
                self.counts[kind] += 1
                return fn(*args, **kwargs)
            return wrapper

        def opened(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(source):
                self.counts["source file opened"] += 1
            return real_open(file, *args, **kwargs)

        def store_read(fn):
            def wrapper(uri, *args, **kwargs):
                if not uri.endswith(shards.MANIFEST):
                    self.shards.append(uri)
                return fn(uri, *args, **kwargs)
            return wrapper

        monkeypatch.setattr(volume, "read_volume", counted("volume", real_volume))
        monkeypatch.setattr(volume, "read_labels", counted("labels", real_labels))
        monkeypatch.setattr(builtins, "open", opened)
        monkeypatch.setattr(storage, "read_bytes", store_read(real_bytes))
        monkeypatch.setattr(storage, "open_input", store_read(real_input))

    def clear(self) -> None:
        self.counts.clear()
        self.shards.clear()


def _shard_names(manifest) -> list[str]:
    return [s["name"] for e in manifest["splits"].values() for s in e["shards"]]


@pytest.fixture(scope="module")
def demo_source(tmp_path_factory):
    """The demo's synthetic source (44 patients as an nnU-Net dataset), at 128 px volumes and a 64 px
    model to stay fast; read in this process (one worker), so that every read is counted."""
    cfg = load_config(builtin_config("demo"), ["synthetic.size=128", "model.image_width=64", "model.image_height=64",
                                                "data.prepare_workers=1", "train.backend='local'"])
    source, _ = synthetic_source(cfg, str(tmp_path_factory.mktemp("demo")), progress=False)
    cfg.data.source_dir = str(source)
    return cfg, source


def test_a_noop_prepare_of_the_demos_44_patients_reads_no_volume_and_no_shard_byte(demo_source, tmp_path,
                                                                                    monkeypatch):
    cfg, source = demo_source
    patients = len([p for folder in ("imagesTr", "imagesTs") for p in (source / folder).iterdir()])
    assert patients == cfg.synthetic.num_cases == 44
    out = str(tmp_path / "store")
    reads = Reads(monkeypatch, source)
    full = prepare(cfg, out, progress=False)
    assert reads.counts["volume"] == reads.counts["labels"] == patients  # the counters see the real reads
    assert reads.counts["source file opened"] >= patients
    reads.clear()
    again = prepare(cfg, out, progress=False)
    assert again == full == json.loads((tmp_path / "store" / shards.MANIFEST).read_text())
    assert reads.counts == Counter() and reads.shards == []  # no volume, no source file, no shard

    # a shard whose modification time changed (same bytes) is read whole, alone; then recorded again
    names = _shard_names(full)
    victim = tmp_path / "store" / names[1]
    earlier = victim.stat().st_mtime_ns - 2_000_000_000
    os.utime(victim, ns=(earlier, earlier))
    assert prepare(cfg, out, progress=False)["splits"] == full["splits"]
    assert reads.shards == [str(victim)] and reads.counts == Counter()
    reads.clear()
    prepare(cfg, out, progress=False)
    assert reads.shards == [] and reads.counts == Counter()

    # --verify reads every shard, and still no volume
    assert prepare(cfg, out, progress=False, verify=True)["splits"] == full["splits"]
    assert sorted(reads.shards) == sorted(str(tmp_path / "store" / n) for n in names)
    assert reads.counts == Counter()


def test_a_shard_changed_in_place_after_the_manifest_is_found_and_the_store_rewritten(demo_source, tmp_path, caplog):
    """The same size, a flipped byte: the shard's stamp changed, so it is read and found damaged."""
    cfg, _ = demo_source
    out = tmp_path / "store"
    full = prepare(cfg, str(out), progress=False)
    victim = out / full["splits"]["valid"]["shards"][0]["name"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    again = prepare(cfg, str(out), progress=False)
    assert f"{victim}: shard checksum does not match" in caplog.text and "rewriting the store" in caplog.text
    assert {s: e["records"] for s, e in again["splits"].items()} == {s: e["records"] for s, e in full["splits"].items()}
    shards.verify_shards(str(out), again, checksums=True)


def test_a_changed_source_file_is_noticed_without_reading_a_volume_to_list(demo_source, tmp_path, monkeypatch):
    """A touched label volume changes the source's stamps: its case is read again (all cases are,
    the store being rewritten), and listing itself read no volume."""
    cfg, source = demo_source
    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    cfg = load_config(builtin_config("demo"), ["synthetic.size=128", "model.image_width=64", "model.image_height=64",
                                                "data.prepare_workers=1", f"data.source_dir='{copy}'"])
    out = str(tmp_path / "store")
    first = prepare(cfg, out, progress=False)
    label = sorted((copy / "labelsTr").iterdir())[0]
    os.utime(label, ns=(label.stat().st_mtime_ns + 10**9,) * 2)
    reads = Reads(monkeypatch, copy)
    second = prepare(cfg, out, progress=False)
    assert second["fingerprint"] != first["fingerprint"]
    assert reads.counts["volume"] == 44


@pytest.mark.slow
def test_a_noop_prepare_from_and_into_a_bucket_downloads_nothing(gcs_emulator, tmp_path, monkeypatch):
    """gs:// source and store: the no-op compares generations and CRC32C from the bucket's listing;
    a shard uploaded again (a new generation, the same bytes) is read alone."""
    from google.cloud import storage as gcs

    from aisd_ray.data.synthetic.layouts import write_synthetic

    cfg = volume_config("nnunet", 6, 2, 96, 4, "data.prepare_workers=1")
    local = write_synthetic(tmp_path / "src", cfg.synthetic, progress=False)
    storage.upload_dir(local, "gs://aisd/noop/source")
    cfg.data.source_dir = "gs://aisd/noop/source"
    out = "gs://aisd/noop/store"
    full = prepare(cfg, out, progress=False)
    downloads = []
    real = storage.download_tree
    monkeypatch.setattr(storage, "download_tree", lambda *a, **k: downloads.append(a) or real(*a, **k))
    reads = Reads(monkeypatch, tmp_path / "no such folder")
    assert prepare(cfg, out, progress=False) == full
    assert downloads == [] and reads.shards == [] and reads.counts == Counter()
    name = full["splits"]["train"]["shards"][0]["name"]
    blob = gcs.Client(project="aisd-ray-test").bucket("aisd").blob(f"noop/store/{name}")
    blob.upload_from_string(blob.download_as_bytes())  # a new generation
    assert prepare(cfg, out, progress=False)["splits"] == full["splits"]
    assert reads.shards == [f"{out}/{name}"] and downloads == [] and reads.counts["volume"] == 0


def test_a_store_written_before_stamps_is_verified_once_then_recorded(tmp_path, monkeypatch):
    """A manifest without stamps (an older prepare's): the rerun reads every shard (as prepare did
    before stamps), records their stamps, and the next rerun reads none."""
    from aisd_ray.data.synthetic.layouts import write_synthetic

    cfg = volume_config("nnunet", 6, 2, 96, 4, "data.prepare_workers=1")
    cfg.data.source_dir = str(write_synthetic(tmp_path / "src", cfg.synthetic, progress=False))
    out = tmp_path / "store"
    full = prepare(cfg, str(out), progress=False)
    older = {k: v for k, v in full.items() if k != "stamps"}
    (out / shards.MANIFEST).write_text(json.dumps(older, indent=2))
    reads = Reads(monkeypatch, tmp_path / "src")
    assert prepare(cfg, str(out), progress=False) == full
    assert sorted(reads.shards) == sorted(str(out / n) for n in _shard_names(full)) and reads.counts["volume"] == 0
    reads.clear()
    assert prepare(cfg, str(out), progress=False) == full
    assert reads.shards == [] and reads.counts == Counter()
