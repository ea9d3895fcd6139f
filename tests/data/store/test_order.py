"""The epoch order: disjoint equal shares, a fresh permutation every epoch, full coverage,
truncation after the shuffle, foreground oversampling; on plans and on real shards."""

import hashlib

import numpy as np
import pytest

from aisd_ray.data.store import order, pipeline, shards
from aisd_ray.data.store.order import ShardInfo

SHARDS = [ShardInfo(7, (0, 3)), ShardInfo(5, (1,)), ShardInfo(9, (2, 4, 8)), ShardInfo(3, ())]  # 24 rows


def global_rows(picks, infos):
    """Picks -> global row ids (shard offset + row), repeats included, in reading order."""
    offsets = np.cumsum([0] + [s.records for s in infos])
    return [int(offsets[p.shard]) + row for p in picks for row, times in zip(p.rows, p.times) for _ in range(times)]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shares_are_equal_disjoint_and_cover_all_but_the_remainder(world):
    shares = [global_rows(order.epoch_picks(SHARDS, 7, 1, r, world), SHARDS) for r in range(world)]
    n = 24 // world
    assert all(len(share) == n for share in shares)
    flat = [row for share in shares for row in share]
    assert len(set(flat)) == len(flat) == n * world  # disjoint, no repeats


def test_each_epoch_is_a_new_order_keyed_by_seed_and_epoch():
    plans = {e: order.epoch_picks(SHARDS, 7, e, 0, 2) for e in range(1, 6)}
    assert order.epoch_picks(SHARDS, 7, 3, 0, 2) == plans[3]  # reproducible
    assert len({tuple(global_rows(p, SHARDS)) for p in plans.values()}) > 1
    assert order.epoch_picks(SHARDS, 8, 3, 0, 2) != plans[3] or order.epoch_picks(SHARDS, 9, 3, 0, 2) != plans[3]


def test_every_row_is_trained_on_over_epochs_also_when_batches_truncate():
    """5 workers x 4 rows of 24 (4 left out per epoch), then batches of 3 truncate each share to 3."""
    seen = set()
    for epoch in range(1, 16):
        for rank in range(5):
            picks = order.epoch_picks(SHARDS, 11, epoch, rank, 5)
            rows = list(order.shuffled(global_rows(picks, SHARDS), 64, order.rng(11, epoch, rank)))
            seen.update(rows[:3])  # truncation after the shuffle
    assert seen == set(range(24))


def test_shuffled_is_a_permutation_and_streams_with_a_small_buffer():
    items = list(range(50))
    full = list(order.shuffled(items, 100, order.rng(1)))
    assert sorted(full) == items and full != items
    assert full == list(order.shuffled(items, 100, order.rng(1)))
    small = list(order.shuffled(iter(items), 4, order.rng(2)))
    assert sorted(small) == items and small != items


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_foreground_fraction_oversamples_lesion_rows_of_the_share(fraction):
    lesion_ids = {0, 3, 8, 12 + 2, 12 + 4, 12 + 8}  # global ids of SHARDS' lesion rows
    for rank in range(2):
        plain = global_rows(order.epoch_picks(SHARDS, 5, 1, rank, 2), SHARDS)
        rows = global_rows(order.epoch_picks(SHARDS, 5, 1, rank, 2, fraction), SHARDS)
        assert len(rows) == len(plain) == 12
        share_lesion = {r for r in plain if r in lesion_ids}
        if share_lesion:
            assert sum(r in lesion_ids for r in rows) >= int(np.ceil(fraction * 12))
            assert set(rows) <= set(plain)  # only the share's own rows, lesion ones repeated


def test_foreground_fraction_needs_the_lesion_flags():
    with pytest.raises(ValueError, match="re-run `aisd-ray prepare`"):
        order.epoch_picks([ShardInfo(4), ShardInfo(4)], 1, 1, 0, 1, 0.5)


def digest(row):
    return hashlib.sha256(row[0] + row[1]).hexdigest()


def test_real_shards_two_workers_disjoint_and_full_coverage(parquet_store):
    cfg, store = parquet_store
    manifest = shards.read_manifest(store)
    rows = pipeline.ShardRows(store, manifest, "train")
    everything = {digest(r) for r in rows()}
    seen, orders = set(), []
    for epoch in (1, 2, 3):
        a = [digest(r) for r in rows.epoch(3, epoch, 0, 2, 1024)]
        b = [digest(r) for r in rows.epoch(3, epoch, 1, 2, 1024)]
        assert len(a) == len(b) == rows.count // 2 and not set(a) & set(b)
        seen |= set(a) | set(b)
        orders.append(a)
    assert seen == everything
    assert orders[0] != orders[1]


def test_prepare_writes_train_shuffled_with_a_name_index(parquet_store):
    cfg, store = parquet_store
    manifest = shards.read_manifest(store)
    train = manifest["splits"]["train"]
    names = [r["name"] for r in shards.iter_records(store, manifest, "train")]
    assert names != sorted(names)  # mixed, not name (case) order
    for name, (shard, row) in train["index"].items():
        assert names[sum(s["records"] for s in train["shards"][:shard]) + row] == name
    lesion = [r["lesion_pixels"] > 0 for r in shards.iter_records(store, manifest, "train")]
    flags = [row in set(s["lesion_rows"]) for s in train["shards"] for row in range(s["records"])]
    assert flags == lesion
    valid = [r["name"] for r in shards.iter_records(store, manifest, "valid")]
    assert valid == sorted(valid)  # evaluation splits keep whole cases in name order
