"""Which training rows each worker reads in an epoch, and in what order: a pure function of
(seed, epoch, rank, world), so that runs repeat, resumed runs carry on exactly, and the
backends agree.

An epoch's order is built in three steps:

1. the split's shards are permuted, keyed by (seed, epoch); their rows, in stored order,
   form the epoch's sequence (prepare writes the training split in a shuffled order, so one
   shard already mixes cases);
2. the sequence is cut into ``world`` equal, contiguous, disjoint shares (the last
   ``N mod world`` rows sit out this epoch, different ones every epoch); each worker reads
   only the shards its share touches;
3. each worker shuffles its share through a buffer keyed by (seed, epoch, rank): with a
   buffer at least as large as the share this is a uniform permutation of it. Truncation to
   whole batches happens after this shuffle, so the rows left out differ every epoch.

With ``foreground_fraction`` > 0, lesion-free rows of a share are replaced by lesion rows of
the same share (drawn with replacement) until that fraction of the share has lesion.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Iterable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")


class Salt(IntEnum):
    """What a random stream is for, as one part of its key: every seeded stream of the training run
    in one table, so that no two share a key by accident (the values are the ones runs have always
    used: same seed, same run)."""

    SHARD_ORDER = 0x5EED  # the epoch's shard permutation
    OVERSAMPLE = 0xF06  # foreground oversampling (data.foreground_fraction)
    SHARE_SHUFFLE = 0x5F1  # a worker's rows in its shuffle buffer
    DROPOUT = 0xD0  # each dropout layer's masks
    AUGMENT = 0xA6  # an epoch's augmentation draws
    RAY_DATA_FILES = 0xB10C  # the Ray Data reader's file order


def rng(*key: int) -> np.random.Generator:
    """A NumPy generator keyed by non-negative integers (seed, epoch, rank, a ``Salt``, ...)."""
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


@dataclass(frozen=True)
class ShardInfo:
    records: int
    lesion_rows: tuple[int, ...] | None = None  # row indices with lesion pixels (None: unknown)


@dataclass(frozen=True)
class Pick:
    """Rows to read from one shard: ``rows[i]`` is read ``times[i]`` times."""

    shard: int
    rows: tuple[int, ...]
    times: tuple[int, ...]


def share_size(total: int, world: int) -> int:
    """Rows each worker trains on per epoch (equal on every worker, as synchronous steps need)."""
    return total // world


def epoch_picks(shards: list[ShardInfo], seed: int, epoch: int, rank: int, world: int,
                foreground_fraction: float = 0.0) -> list[Pick]:
    """The rows worker ``rank`` of ``world`` reads in ``epoch``, shard by shard in reading order."""
    order = rng(seed, epoch, Salt.SHARD_ORDER).permutation(len(shards))
    n = share_size(sum(s.records for s in shards), world)
    start, stop = rank * n, (rank + 1) * n
    picks: list[tuple[int, list[int]]] = []
    offset = 0
    for index in order:
        records = shards[index].records
        lo, hi = max(start - offset, 0), min(stop - offset, records)
        if lo < hi:
            picks.append((int(index), list(range(lo, hi))))
        offset += records
    counts = [dict.fromkeys(rows, 1) for _, rows in picks]
    if foreground_fraction > 0:
        _oversample(shards, picks, counts, foreground_fraction, rng(seed, epoch, rank, Salt.OVERSAMPLE))
    return [Pick(index, tuple(c), tuple(c.values())) for (index, _), c in zip(picks, counts) if c]


def _oversample(shards, picks, counts, fraction: float, gen: np.random.Generator) -> None:
    """Replace lesion-free rows by repeats of lesion rows until ``fraction`` of the share has lesion."""
    lesion, empty = [], []
    for k, (index, rows) in enumerate(picks):
        known = shards[index].lesion_rows
        if known is None:
            raise ValueError("data.foreground_fraction needs per-row lesion flags in the manifest: "
                             "re-run `aisd-ray prepare`")
        flags = set(known)
        for row in rows:
            (lesion if row in flags else empty).append((k, row))
    total = len(lesion) + len(empty)
    wanted = min(int(np.ceil(fraction * total)), total)
    if not lesion or len(lesion) >= wanted:
        return
    dropped = gen.choice(len(empty), size=wanted - len(lesion), replace=False)
    drawn = gen.integers(0, len(lesion), size=len(dropped))
    for gone, repeat in zip(dropped, drawn):
        k, row = empty[gone]
        del counts[k][row]
        k2, row2 = lesion[repeat]
        counts[k2][row2] += 1


def shuffled_share(rows: Iterable[T], seed: int, epoch: int, rank: int, buffer: int) -> Iterator[T]:
    """Step 3: worker ``rank``'s rows of ``epoch`` through its keyed shuffle buffer (whatever reads them)."""
    return shuffled(rows, buffer, rng(seed, epoch, rank, Salt.SHARE_SHUFFLE))


def shuffled(items: Iterable[T], buffer: int, gen: np.random.Generator) -> Iterator[T]:
    """A buffered shuffle (as tf.data's), driven by ``gen``: streaming, at most ``buffer`` items held."""
    held: list[T] = []
    for item in items:
        if len(held) < max(buffer, 1):
            held.append(item)
            continue
        k = int(gen.integers(len(held)))
        yield held[k]
        held[k] = item
    gen.shuffle(held)
    yield from held
