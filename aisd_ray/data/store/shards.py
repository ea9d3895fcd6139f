"""The shard format: TFRecord or Parquet files of PNG-encoded samples, and ``manifest.json``.

Each record holds the image and its class-id mask as PNG bytes at model size, plus the
metadata a later stage needs (source name, case id, slice index, shape, lesion pixels). A record
of a store prepared from CT volumes also holds ``brain``: the slice's intracranial mask (0/1 uint8
at model size, ``data/ct/head.py`` ``brain_mask``), in the row's encoding (a PNG, or zstd of the
H*W bytes; ``rows.py``: the row encodings); ``record_brain`` reads it, None for a record without it
(PNG slices, or a volume store prepared before it was kept: its manifest's ``source`` has no
``brain_mask``). An optional feature, not a new ``FORMAT_VERSION``: the stores of PNG slices stay as
they are, and a volume store gets a new fingerprint (``volume_source.SLICE_FEATURES``), so
``prepare`` rewrites it.

Shards are written first and the manifest last, so a store with a manifest is complete;
the manifest lists every shard with its record count, byte size, SHA-256 and the rows that
hold lesion pixels, and each split's ``index`` maps a slice name to its (shard, row).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import struct
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import crc32c
import pyarrow as pa
import pyarrow.parquet as pq

from aisd_ray.core import storage
from aisd_ray.data.sources.layout import DataError, Sample
from aisd_ray.data.store import rows
from aisd_ray.data.store.rows import BRAIN

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT_VERSION = 3  # 2: shuffled training order, per-row lesion flags, name index; 3: row encodings
EXTENSIONS = {"parquet": "parquet", "tfrecord": "tfrecord"}
SCHEMA = pa.schema([
    ("name", pa.string()), ("case_id", pa.string()), ("slice_index", pa.int64()),
    ("height", pa.int64()), ("width", pa.int64()), ("channels", pa.int64()), ("stored_channels", pa.int64()),
    ("lesion_pixels", pa.int64()), ("image", pa.binary()), ("mask", pa.binary()),
])
BRAIN_SCHEMA = SCHEMA.append(pa.field(BRAIN, pa.binary()))  # a store prepared from CT volumes
# the row encodings (rows.py), under the names every caller knows them by here
PNG_MAGIC, encode_png, decode_png, tensor_bytes = rows.PNG_MAGIC, rows.encode_png, rows.decode_png, rows.tensor_bytes
sample_to_record, record_to_arrays, record_brain = rows.sample_to_record, rows.record_to_arrays, rows.record_brain
# A shard's name in the manifest is a relative path of plain names inside the store ("train/train-00000-
# 1a2b3c4d.parquet"): no "..", no absolute path, no URI scheme, no backslash, no empty part.
SHARD_NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------- TFRecord framing


def _masked_crc(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _example_bytes(record: dict[str, Any]) -> bytes:
    from tensorflow.core.example import example_pb2, feature_pb2

    feature = {}
    for key, value in record.items():
        if isinstance(value, bytes):
            feature[key] = feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[value]))
        elif isinstance(value, str):
            feature[key] = feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[value.encode()]))
        else:
            feature[key] = feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[int(value)]))
    return example_pb2.Example(features=feature_pb2.Features(feature=feature)).SerializeToString()


def _record_from_example(data: bytes) -> dict[str, Any]:
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example.FromString(data)
    out: dict[str, Any] = {}
    for field in SCHEMA:
        feat = example.features.feature[field.name]
        if pa.types.is_integer(field.type):
            out[field.name] = int(feat.int64_list.value[0])
        else:
            raw = feat.bytes_list.value[0]
            out[field.name] = raw.decode() if pa.types.is_string(field.type) else raw
    if BRAIN in example.features.feature:  # the optional feature
        out[BRAIN] = example.features.feature[BRAIN].bytes_list.value[0]
    return out


def tfrecord_bytes(records: Iterable[dict[str, Any]]) -> bytes:
    out = io.BytesIO()
    for record in records:
        data = _example_bytes(record)
        header = struct.pack("<Q", len(data))
        out.write(header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data)))
    return out.getvalue()


def iter_tfrecord(stream, where: str) -> Iterator[dict[str, Any]]:
    """Records of a TFRecord stream, checking both CRCs of every record."""
    while True:
        header = stream.read(8)
        if not header:
            return
        if len(header) < 8:
            raise DataError(f"{where}: truncated TFRecord header")
        (length,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", stream.read(4))
        data = stream.read(length)
        (dcrc,) = struct.unpack("<I", stream.read(4) or b"\0\0\0\0")
        if hcrc != _masked_crc(header) or len(data) != length or dcrc != _masked_crc(data):
            raise DataError(f"{where}: corrupt TFRecord (CRC mismatch)")
        yield _record_from_example(data)


def parquet_bytes(records: list[dict[str, Any]]) -> bytes:
    sink = pa.BufferOutputStream()
    schema = BRAIN_SCHEMA if records and BRAIN in records[0] else SCHEMA  # the column only where it is written
    pq.write_table(pa.Table.from_pylist(records, schema=schema), sink, compression="none")
    return sink.getvalue().to_pybytes()


# --------------------------------------------------------------------------- writing


@dataclass
class ShardPlan:
    """How many records go into each shard of a split."""

    target_bytes: int
    min_shards: int

    def records_per_shard(self, total: int, bytes_per_record: float) -> int:
        by_size = max(1, int(self.target_bytes // max(bytes_per_record, 1)))
        by_count = max(1, math.ceil(total / self.min_shards))  # at least min_shards shards
        return min(by_size, by_count) if total >= self.min_shards else 1


def write_split(samples: Iterable[Sample], total: int, out_uri: str, split: str, fmt: str,
                plan: ShardPlan, progress=None, generation: str = "", encoding: str = "png") -> dict[str, Any]:
    """Write one split's shards under ``out_uri/split/``; return its manifest entry. ``generation``
    goes into the file names, so a rewrite never overwrites the shards a current manifest lists."""
    ext = EXTENSIONS[fmt]
    tag = f"-{generation}" if generation else ""
    shards: list[dict[str, Any]] = []
    buffer: list[dict[str, Any]] = []
    index: dict[str, list[int]] = {}
    per_shard = 0
    lesion_pixels = pixels = 0

    def flush() -> None:
        name = f"{split}/{split}-{len(shards):05d}{tag}.{ext}"
        data = parquet_bytes(buffer) if fmt == "parquet" else tfrecord_bytes(buffer)
        with storage.open_output(storage.join(out_uri, name)) as f:
            f.write(data)
        shards.append({"name": name, "records": len(buffer), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest(),
                       "lesion_rows": [i for i, r in enumerate(buffer) if r["lesion_pixels"]]})
        buffer.clear()

    for sample in samples:
        record = sample_to_record(sample, encoding)
        if not per_shard:
            size = len(record["image"]) + len(record["mask"])
            per_shard = plan.records_per_shard(total, size)
        index[record["name"]] = [len(shards), len(buffer)]
        buffer.append(record)
        lesion_pixels += record["lesion_pixels"]
        pixels += record["height"] * record["width"]
        if len(buffer) >= per_shard:
            flush()
        if progress is not None:
            progress.update()
    if buffer:
        flush()
    count = sum(s["records"] for s in shards)
    return {"records": count, "lesion_fraction": lesion_pixels / pixels if pixels else 0.0,
            "shards": shards, "index": index}


def write_manifest(out_uri: str, splits: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    manifest = {"format_version": FORMAT_VERSION, "created": storage.utc_now(),
                **info, "splits": splits}
    storage.write_text(storage.join(out_uri, MANIFEST), json.dumps(manifest, indent=2))
    return manifest


# --------------------------------------------------------------------------- reading


def read_manifest(shards_uri: str) -> dict[str, Any]:
    uri = storage.join(shards_uri, MANIFEST)
    if not storage.exists(uri):
        raise DataError(f"{uri}: no manifest; run `aisd-ray prepare` first (or it did not finish)")
    try:
        manifest = json.loads(storage.read_bytes(uri))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
            raise ValueError("no splits")
    except ValueError:  # json's errors are ValueErrors too
        raise DataError(f"{uri}: unreadable manifest (truncated or not JSON); re-run `aisd-ray prepare` "
                        "to rebuild the store") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{uri}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}; "
                        "re-run `aisd-ray prepare` to rewrite the store")
    for split in manifest["splits"]:  # every entry checked once, before any command reads a shard
        shard_uris(shards_uri, manifest, split)
    return manifest


def shard_uri(shards_uri: str, split: str, shard: Any) -> str:
    """The URI of one manifest shard entry inside the store. A name that is not a relative path of
    plain names (``..``, an absolute path, ``gs://other/x``, a backslash) would read a file outside
    the store: a DataError naming the manifest and the entry, on local folders and gs:// alike."""
    name = shard.get("name") if isinstance(shard, dict) else None
    if not isinstance(name, str) or not all(SHARD_NAME_PART.match(part) for part in name.split("/")):
        raise DataError(f"{storage.join(shards_uri, MANIFEST)}: split {split!r} lists shard {name!r}, which is not a "
                        "name inside the store (no '..', absolute path, URI or backslash); re-run `aisd-ray prepare`")
    return storage.join(shards_uri, name)


def shard_uris(shards_uri: str, manifest: dict[str, Any], split: str) -> list[str]:
    if split not in manifest["splits"]:
        raise DataError(f"{storage.join(shards_uri, MANIFEST)}: no split {split!r} "
                        f"(has {sorted(manifest['splits'])})")
    return [shard_uri(shards_uri, split, s) for s in manifest["splits"][split]["shards"]]


def _check_shard(shards_uri: str, split: str, shard: dict[str, Any], checksums: bool) -> None:
    uri = shard_uri(shards_uri, split, shard)
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.size is None:
        raise DataError(f"{uri}: shard listed in the manifest is missing")
    if info.size != shard["bytes"]:
        raise DataError(f"{uri}: shard is {info.size} bytes, manifest says {shard['bytes']}")
    if checksums and hashlib.sha256(storage.read_bytes(uri)).hexdigest() != shard["sha256"]:
        raise DataError(f"{uri}: shard checksum does not match the manifest (corrupt or changed); "
                        "re-run `aisd-ray prepare`")


def verify_shards(shards_uri: str, manifest: dict[str, Any], checksums: bool = False, threads: int = 8) -> None:
    """Every shard the manifest lists exists with its size (and SHA-256 when asked), checked in
    parallel; the first bad shard is named."""
    from concurrent.futures import ThreadPoolExecutor

    listed = [(split, shard) for split, entry in manifest["splits"].items() for shard in entry["shards"]]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(lambda item: _check_shard(shards_uri, *item, checksums), listed):
            pass


def check_input(shards_uri: str, manifest: dict[str, Any], size: tuple[int, int, int], windows, channels: str,
                size_is: str, windows_is: str, channels_is: str, advice: str) -> None:
    """The one check that a store's rows are the input a model takes: (height, width, channels)
    ``size`` and, for a store prepared from CT volumes, the HU ``windows`` and the channel mode
    (``data.channels``) its slices were made with. DataError naming the manifest, what differs
    (``*_is``: who says otherwise, e.g. "the export E takes") and ``advice``."""
    where = storage.join(shards_uri, MANIFEST)
    image = manifest.get("image", {})
    have = (image.get("height"), image.get("width"), image.get("channels"))
    if have != tuple(size):
        raise DataError(f"{where}: the shards hold {have[0]}x{have[1]}x{have[2]} images but {size_is} "
                        f"{size[0]}x{size[1]}x{size[2]}; {advice}")
    source = manifest.get("source") or {}
    wanted = [[float(v) for v in w] for w in windows]
    if "windows" in source and [[float(v) for v in w] for w in source["windows"]] != wanted:
        raise DataError(f"{where}: the shards were windowed with {source['windows']} HU but {windows_is} {wanted}; "
                        f"{advice}")
    if source.get("channels", "grey") != channels and "windows" in source:
        raise DataError(f"{where}: the shards' channels are {source.get('channels', 'grey')!r} but {channels_is} "
                        f"{channels!r}; {advice}")


def check_matches_config(shards_uri: str, manifest: dict[str, Any], cfg) -> None:
    """The shards were made for this config's input: size, channels, classes and mask colours; and
    they can be trained on: the train and valid splits hold lesion pixels (unless
    ``data.allow_lesion_free_splits``). DataError naming the manifest otherwise."""
    m, where = cfg.model, storage.join(shards_uri, MANIFEST)
    check_input(shards_uri, manifest, (m.image_height, m.image_width, m.image_channels), cfg.data.windows,
                cfg.data.channels, "[model] image_height x image_width x image_channels is", "[data] windows is",
                "[data] channels is", "prepare the shards with this config, or train with the one they were made with")
    if manifest.get("num_classes") != m.num_classes:
        raise DataError(f"{where}: the shards have {manifest.get('num_classes')} classes but [model] num_classes "
                        f"is {m.num_classes}")
    colours = [list(c) for c in cfg.data.rgb_map]
    if manifest.get("rgb_map") is not None and manifest["rgb_map"] != colours:
        raise DataError(f"{where}: the shards were categorised with rgb_map {manifest['rgb_map']} but "
                        f"[data] rgb_map is {colours}")
    if not cfg.data.allow_lesion_free_splits:
        for split in ("train", "valid"):
            entry = manifest["splits"].get(split) or {}
            if entry.get("records") and entry.get("lesion_fraction") == 0:
                reading = f", masks read as {entry['mask_values']}" if entry.get("mask_values") else ""
                raise DataError(f"{where}: the {split} split has no lesion pixel in its {entry['records']} slices"
                                f"{reading}; a model cannot learn or be selected without one: check the masks and "
                                "re-run `aisd-ray prepare`, or set data.allow_lesion_free_splits = true if this "
                                "is intended")


@dataclass
class ShardStore:
    """A shard store opened once per command: manifest read and checked against the config,
    every shard's presence, size and (by default) SHA-256 verified. Later stages of the same
    command are handed the store (or its manifest) instead of reading it again."""

    uri: str
    manifest: dict[str, Any]

    @classmethod
    def open(cls, uri: str, cfg=None, checksums: bool = True) -> "ShardStore":
        manifest = read_manifest(uri)
        if cfg is not None:
            check_matches_config(uri, manifest, cfg)
        started = time.time()
        verify_shards(uri, manifest, checksums=checksums)
        if checksums:
            total = sum(s["bytes"] for e in manifest["splits"].values() for s in e["shards"])
            log.info("verified %s: %.1f MB of shards, SHA-256 in %.1f s", uri, total / 2**20,
                     time.time() - started)
        return cls(uri, manifest)

    def records(self, split: str) -> int:
        return self.manifest["splits"][split]["records"] if split in self.manifest["splits"] else 0


def iter_shard(uri: str, fmt: str) -> Iterator[dict[str, Any]]:
    """Records of one shard, streamed (a Parquet shard one row group at a time). A shard that
    cannot be read is a DataError naming it, or a StorageError when its storage stopped answering."""
    try:
        with storage.open_input(uri) as f:
            if fmt == "parquet":
                for batch in pq.ParquetFile(f).iter_batches(batch_size=64):
                    yield from batch.to_pylist()
            else:
                yield from iter_tfrecord(f, uri)
    except DataError:
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:
        storage.check_reachable(uri)
        raise DataError(f"{uri}: cannot read this shard ({str(exc)[:200]}); run `aisd-ray prepare` again") from None


def iter_records(shards_uri: str, manifest: dict[str, Any], split: str) -> Iterator[dict[str, Any]]:
    for uri in shard_uris(shards_uri, manifest, split):
        yield from iter_shard(uri, manifest["shard_format"])
