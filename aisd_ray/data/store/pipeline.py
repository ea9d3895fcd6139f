"""From streamed shard rows to batched TF tensors, the same for Ray workers and local runs.

Rows arrive as (image, mask) byte pairs (PNG files, or a raw row's uint8 arrays) from any
iterator (a Ray Data shard or the direct shard reader); decoding runs in parallel inside
tf.data, so only a shuffle buffer and a few batches are ever in memory, however large the split.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator

import numpy as np
import tensorflow as tf

from aisd_ray.data.store import order, shards

Rows = Iterator[tuple[bytes, bytes]]


def decode_fn(channels: int, num_classes: int, augment=None, seed: int = 0, encoding: str = "png",
              height: int = 0, width: int = 0):
    """(index, image bytes, mask bytes) -> (image float32, one-hot); ``augment`` (see
    data.augment) is keyed by (seed, index), so each example's transform is reproducible.
    ``encoding``: the store's row encoding; "raw" rows arrive as uint8 arrays (see
    ``shards.tensor_bytes``) of ``height`` x ``width`` (an image with one stored channel is
    expanded to ``channels``)."""

    def decode(index: tf.Tensor, image_bytes: tf.Tensor, mask_bytes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if encoding == "raw":
            image = tf.reshape(tf.io.decode_raw(image_bytes, tf.uint8), [height, width, -1])
            image = tf.cast(tf.broadcast_to(image, [height, width, channels]), tf.float32)
            labels = tf.reshape(tf.io.decode_raw(mask_bytes, tf.uint8), [height, width])
        else:
            image = tf.cast(tf.io.decode_png(image_bytes, channels=channels), tf.float32)
            labels = tf.io.decode_png(mask_bytes, channels=1)[..., 0]
        if augment is not None:
            image, labels = augment(tf.stack([tf.constant(seed, tf.int64), index]), image, labels)
        return image, tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)

    return decode


def batches(rows: Callable[[], Rows], channels: int, num_classes: int, batch_size: int,
            drop_remainder: bool = False, augment=None, augment_seed: int = 0, encoding: str = "png",
            height: int = 0, width: int = 0) -> tf.data.Dataset:
    """A dataset of (image float32 0..255, one-hot float32) batches of ``rows`` in the order given
    (training rows arrive already shuffled, see ``data.order``). Training drops a partial last
    batch so that every worker runs the same number of synchronised steps; ``augment_seed``
    keys the augmentation; ``encoding``, ``height`` and ``width`` describe the rows (see
    ``decode_fn``)."""
    spec = (tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.string))
    ds = tf.data.Dataset.from_generator(rows, output_signature=spec)
    decode = decode_fn(channels, num_classes, augment, augment_seed, encoding, height, width)
    ds = ds.enumerate().map(lambda i, row: decode(i, *row), num_parallel_calls=DECODE_THREADS,
                            deterministic=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(2).with_options(_OPTIONS)


# Decoding in parallel on every core, with tf.data's autotuner off. Measured at 512 px on 2 cores
# (the original's 5-level model, batch 2, 24 slices): with the autotuner on, about half the
# processes trained at 1.10 images/s instead of 1.45 (the same CPU time, cores idle a quarter of
# each step) whenever any tf.data pipeline was live beside the step, even one holding no Python;
# the same step fed from a list of ready batches never did. With it off: 1.36..1.49 every time.
DECODE_THREADS = max(1, min(os.cpu_count() or 1, 8))
_OPTIONS = tf.data.Options()
_OPTIONS.autotune.enabled = False


class InputGuard:
    """A row iterator's exception reaches the consumer of a tf.data pipeline only as a TensorFlow
    error, its type and message buried in a traceback string. The guard keeps the original
    (``wrap`` the row function); ``reraise`` raises it in place of the TensorFlow error, so a
    DataError naming a shard stays a DataError."""

    def __init__(self):
        self.error: BaseException | None = None

    def wrap(self, rows: Callable[[], Rows]) -> Callable[[], Rows]:
        def guarded() -> Rows:
            try:
                yield from rows()
            except Exception as exc:
                self.error = exc
                raise
        return guarded

    def reraise(self) -> None:
        """Call while handling a TensorFlow error: raise the row iterator's own error, if any."""
        if self.error is not None:
            raise self.error from None


def take_rows(rows: Iterable, limit: int) -> Rows:
    """The first ``limit`` rows, then drain the rest unread so a streaming split stays in step."""
    for i, row in enumerate(rows):
        if i < limit:
            yield row


class ShardRows:
    """(image, mask) byte rows read straight from the shards: every backend's training input
    (``epoch``) and validation input (``__call__``), no Ray."""

    def __init__(self, shards_uri: str, manifest: dict, split: str, rank: int = 0, world: int = 1):
        """``rank``/``world`` give ``__call__`` every world-th shard: for evaluation splits, where
        each row must be scored exactly once but shares need not be equal."""
        entry = manifest["splits"][split]
        self.all_uris = shards.shard_uris(shards_uri, manifest, split)
        self.uris = self.all_uris[rank::world]
        self.fmt = manifest["shard_format"]
        self.count = entry["records"]
        self.infos = [order.ShardInfo(s["records"], tuple(s["lesion_rows"]) if "lesion_rows" in s else None)
                      for s in entry["shards"]]

    def __call__(self) -> Rows:
        for uri in self.uris:
            for record in shards.iter_shard(uri, self.fmt):
                yield shards.tensor_bytes(record)

    def epoch(self, seed: int, epoch: int, rank: int, world: int, buffer: int,
              foreground_fraction: float = 0.0) -> Rows:
        """Worker ``rank``'s share of the training split in ``epoch``, shuffled (see ``data.order``)."""
        picks = order.epoch_picks(self.infos, seed, epoch, rank, world, foreground_fraction)
        return order.shuffled_share(self._read(picks), seed, epoch, rank, buffer)

    def _read(self, picks: list[order.Pick]) -> Rows:
        for pick in picks:
            wanted = dict(zip(pick.rows, pick.times))
            last = max(pick.rows)
            for row, record in enumerate(shards.iter_shard(self.all_uris[pick.shard], self.fmt)):
                for _ in range(wanted.get(row, 0)):
                    yield shards.tensor_bytes(record)
                if row == last:
                    break


def first_records(records: Iterator[dict], n: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, labels) of the first ``n`` records by name order of the stream."""
    out = []
    for record in records:
        if len(out) == n:
            break
        image, labels = shards.record_to_arrays(record)
        out.append((record["name"], image, labels))
    return out
