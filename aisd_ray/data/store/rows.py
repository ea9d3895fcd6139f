"""How a shard row holds its pixels (``data.row_encoding``): "png" (PNG files, decoded on read) or
"raw" (the uint8 arrays, zstd-compressed: a grey image whose three channels are equal is stored once
and expanded on read; labels as class ids). Each row says which by its first bytes. A row of a store
prepared from CT volumes also holds ``brain``, the slice's intracranial mask (0/1 uint8 at model
size, ``data/ct/head.py`` ``brain_mask``), in the same encoding; ``record_brain`` reads it, None for
a row without one. ``shards.py`` frames these rows as TFRecord or Parquet (and gives these functions
under its own name too).
"""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from aisd_ray.data.sources.layout import Sample

BRAIN = "brain"  # the optional feature: the slice's intracranial mask
PNG_MAGIC = b"\x89PNG"


@functools.lru_cache(maxsize=1)
def _zstd() -> pa.Codec:
    return pa.Codec("zstd", compression_level=3)


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array).save(
        buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def sample_to_record(sample: Sample, encoding: str = "png") -> dict[str, Any]:
    h, w, c = sample.image.shape
    image = sample.image
    if encoding == "raw":
        if c > 1 and (image == image[..., :1]).all():
            image = image[..., :1]  # grey: one channel stored, expanded on read
        image_bytes = _zstd().compress(np.ascontiguousarray(image).tobytes(), asbytes=True)
        mask_bytes = _zstd().compress(np.ascontiguousarray(sample.labels, np.uint8).tobytes(), asbytes=True)
    else:
        image_bytes, mask_bytes = encode_png(image), encode_png(sample.labels)
    record = {
        "name": sample.name, "case_id": sample.case_id, "slice_index": sample.slice_index,
        "height": h, "width": w, "channels": c, "stored_channels": image.shape[-1],
        "lesion_pixels": int(np.count_nonzero(sample.labels)), "image": image_bytes, "mask": mask_bytes,
    }
    if getattr(sample, BRAIN, None) is not None:  # a slice of a CT volume: its intracranial mask, 0/1
        inside = np.ascontiguousarray(np.asarray(sample.brain) > 0, np.uint8)
        record[BRAIN] = _zstd().compress(inside.tobytes(), asbytes=True) if encoding == "raw" else encode_png(inside)
    return record


def record_brain(record: dict[str, Any]) -> np.ndarray | None:
    """The record's intracranial mask, (H, W) bool at model size; None for a record without one."""
    data = record.get(BRAIN)
    if not data:
        return None
    if data[:4] == PNG_MAGIC:
        return decode_png(data) > 0
    h, w = record["height"], record["width"]
    return np.frombuffer(_zstd().decompress(data, decompressed_size=h * w, asbytes=True), np.uint8).reshape(h, w) > 0


def tensor_bytes(record: dict[str, Any]) -> tuple[bytes, bytes]:
    """A row's (image, mask) bytes as the input pipeline decodes them: PNG files as stored, raw rows
    decompressed to their uint8 arrays (H*W*stored_channels and H*W bytes)."""
    image, mask = record["image"], record["mask"]
    if image[:4] == PNG_MAGIC:
        return image, mask
    h, w = record["height"], record["width"]
    return (_zstd().decompress(image, decompressed_size=h * w * record["stored_channels"], asbytes=True),
            _zstd().decompress(mask, decompressed_size=h * w, asbytes=True))


def record_to_arrays(record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, C) uint8, labels (H, W) uint8) of a record, in either row encoding."""
    if record["image"][:4] == PNG_MAGIC:
        image = decode_png(record["image"])
        return (image if image.ndim == 3 else image[..., None]), decode_png(record["mask"])
    h, w, c = record["height"], record["width"], record["channels"]
    image_bytes, mask_bytes = tensor_bytes(record)
    image = np.frombuffer(image_bytes, np.uint8).reshape(h, w, record["stored_channels"])
    return np.broadcast_to(image, (h, w, c)).copy(), np.frombuffer(mask_bytes, np.uint8).reshape(h, w).copy()
