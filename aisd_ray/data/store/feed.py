"""Where one training worker's rows come from (``Feed``), built the same way for both backends.

The loop reads a ``Feed``: its share of each epoch's training rows, how many that is, its share of
validation, and the fixed preview images. The reader of the training rows is an argument: the
shards read directly (the default) or the Ray backend's Ray Data stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from aisd_ray.config import Config
from aisd_ray.data.store import order, pipeline, shards


@dataclass
class Feed:
    """Where one worker's rows come from."""

    train_rows: Callable[[int], Iterator[tuple[bytes, bytes]]]  # epoch -> this worker's share, shuffled
    train_count: int  # rows this worker gets per epoch (equal on every worker)
    valid_rows: Callable[[], Iterator[tuple[bytes, bytes]]]  # this worker's share of validation
    preview: list[tuple[str, np.ndarray, np.ndarray]]  # fixed validation images for panels
    row_encoding: str = "png"  # the store's (manifest's): how the rows hold their pixels


def shard_feed(cfg: Config, shards_uri: str, manifest: dict, rank: int = 0, world: int = 1,
               train_rows: Callable[[int], Iterator[tuple[bytes, bytes]]] | None = None) -> Feed:
    """Worker ``rank`` of ``world``: its share of each epoch from ``train_rows`` (epoch -> rows; the
    Ray backend's Ray Data stream), else read straight from the shards (see ``data.order``), and
    every world-th validation shard. Both backends build their feed here."""
    t = cfg.train
    train = pipeline.ShardRows(shards_uri, manifest, "train")
    return Feed(
        train_rows=train_rows or (lambda epoch: train.epoch(t.seed, epoch, rank, world, t.shuffle_buffer,
                                                            cfg.data.foreground_fraction)),
        train_count=order.share_size(train.count, world),
        valid_rows=pipeline.ShardRows(shards_uri, manifest, "valid", rank, world),
        preview=preview(cfg, shards_uri, manifest) if rank == 0 else [],
        row_encoding=manifest.get("row_encoding", "png"),
    )


def preview(cfg: Config, shards_uri: str, manifest: dict):
    """The original's epoch-change images: the first N validation slices, fixed for the run."""
    if not cfg.train.epoch_change_infer:
        return []
    return pipeline.first_records(shards.iter_records(shards_uri, manifest, "valid"), cfg.train.num_infer_images)
