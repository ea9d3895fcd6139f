"""Exact resume (every random stream keyed by seed, epoch and rank) and the divergence guard."""

import math

import numpy as np
import pytest

from aisd_ray import stages
from aisd_ray.config import TrainConfig
from aisd_ray.train import TrainingFailed, loop
from aisd_ray.train import checkpoint as ckpt


def run(cfg, shards, root, diverges=False, **train):
    cfg.train.backend = "local"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    if diverges:  # a run the divergence guard stops fails (the CLI exits 1), with the reason
        with pytest.raises(TrainingFailed, match="training stopped: diverged at epoch"):
            stages.train(cfg, shards, root)
    else:
        stages.train(cfg, shards, root)
    return ckpt.list_checkpoints(stages.run_uri(cfg, root))[-1]


def final_weights(uri):
    import h5py

    out = []
    with h5py.File(f"{uri}/{ckpt.WEIGHTS}") as f:
        f.visititems(lambda n, o: out.append((n, np.array(o))) if isinstance(o, h5py.Dataset) else None)
    return out


@pytest.fixture
def noisy(parquet_store):
    """Dropout, augmentation and BatchNorm on: every random stream is in play."""
    cfg, shards = parquet_store
    cfg.model.dropout_rate, cfg.model.normalization, cfg.augment.enabled = 0.2, True, True
    cfg.train.epoch_change_infer = False
    return cfg, shards


def test_one_epoch_plus_resume_is_bit_identical_to_two_epochs(noisy, tmp_path, monkeypatch):
    cfg, shards = noisy
    straight = final_weights(run(cfg, shards, str(tmp_path / "straight"), epochs=2)[0])
    run(cfg, shards, str(tmp_path / "resumed"), epochs=1)
    uri, state = run(cfg, shards, str(tmp_path / "resumed"), epochs=2)
    assert [row["epoch"] for row in state.history] == [1, 2]
    resumed = final_weights(uri)
    assert [n for n, _ in resumed] == [n for n, _ in straight]
    for (name, a), (_, b) in zip(straight, resumed):
        assert np.array_equal(a, b), name

    # the comparison is sharp: a restore that skips the optimizer state, or the weights, differs
    real_restore = ckpt.restore

    def without_optimizer(folder, model, optimizer, *uri):
        fresh = [np.array(v.numpy()) for v in optimizer.variables]
        state = real_restore(folder, model, optimizer, *uri)
        for var, value in zip(optimizer.variables, fresh):
            var.assign(value)
        return state

    def without_weights(folder, model, optimizer, *uri):
        fresh = model.get_weights()
        state = real_restore(folder, model, optimizer, *uri)
        model.set_weights(fresh)
        return state

    for name, broken in (("optimizer", without_optimizer), ("weights", without_weights)):
        monkeypatch.setattr(ckpt, "restore", broken)
        root = str(tmp_path / f"skip-{name}")
        run(cfg, shards, root, epochs=1)
        other = final_weights(run(cfg, shards, root, epochs=2)[0])
        assert any(not np.array_equal(a, b) for (_, a), (_, b) in zip(straight, other)), name
    monkeypatch.setattr(ckpt, "restore", real_restore)


def test_absurd_learning_rate_rolls_back_then_stops(parquet_store, tmp_path):
    cfg, shards = parquet_store
    cfg.train.epoch_change_infer = False
    _, state = run(cfg, shards, str(tmp_path / "r"), True, epochs=6, learning_rate=1e30, max_rollbacks=2)
    rows = state.history
    assert [r["rollbacks"] for r in rows] == [1, 2, 2]
    assert state.stop_reason.startswith("diverged at epoch 3 after 2 rollbacks: non-finite loss")
    assert all(not math.isfinite(r["loss"]) or not math.isfinite(r["val_loss"]) for r in rows)


def test_rollback_with_a_lower_learning_rate_recovers(parquet_store, tmp_path):
    cfg, shards = parquet_store
    cfg.train.epoch_change_infer = False
    uri, state = run(cfg, shards, str(tmp_path / "r"), epochs=3, learning_rate=1e30, rollback_factor=3e-33)
    assert [r["rollbacks"] for r in state.history] == [1, 1, 1] and not state.stop_reason
    assert all(math.isfinite(r["loss"]) for r in state.history[1:])
    assert all(np.isfinite(w).all() for _, w in final_weights(uri))


def test_stop_policy_ends_the_run_with_the_reason(parquet_store, tmp_path):
    cfg, shards = parquet_store
    cfg.train.epoch_change_infer = False
    _, state = run(cfg, shards, str(tmp_path / "s"), True, epochs=4, learning_rate=1e30, on_collapse="stop")
    assert len(state.history) == 1 and state.stop_reason.startswith("diverged at epoch 1: non-finite loss")


def row(loss=0.5, val_loss=0.5):
    return {"loss": loss, "val_loss": val_loss}


@pytest.mark.parametrize("case, counts, expect", [
    ("finite, predicting lesions", ([5, 1, 1], [3, 0, 2]), ""),
    ("collapsed", ([0, 0, 9], [0, 0, 4]), "collapsed"),
    ("validation without lesions", ([0, 0, 9], [0, 0, 0]), ""),
])
def test_collapse_needs_patience_and_a_better_epoch(case, counts, expect):
    t = TrainConfig(collapse_patience=2)
    train, val = (np.array(c, float) for c in counts)
    fresh = ckpt.LoopState()  # no epoch has found lesions yet: nothing to collapse from
    assert loop._divergence(fresh, row(), train, val, t) == ""
    state = ckpt.LoopState(best_score=0.4, best_epoch=2)
    assert loop._divergence(state, row(), train, val, t) == ""  # patience 2: not yet
    third = loop._divergence(state, row(), train, val, t)
    assert (expect in third) if expect else third == ""
    assert "non-finite" in loop._divergence(state, row(loss=float("nan")), train, val, t)
