"""Ray Train with 2 workers under MultiWorkerMirroredStrategy, on a real local Ray cluster."""

import os

import pytest

from aisd_ray import stages
from aisd_ray.train import checkpoint as ckpt

pytestmark = pytest.mark.slow


def test_two_workers_train_in_sync_and_resume(ray_cluster, shard_store, tmp_path, monkeypatch):
    """Runs once per shard format: Ray Data reads Parquet and TFRecord shards alike. Paths are
    given relative to the caller's directory, as users type them; workers run elsewhere."""
    cfg, shards = shard_store
    cfg.train.backend, cfg.train.num_workers, cfg.train.epochs = "ray", 2, 2
    monkeypatch.chdir(tmp_path)
    shards, root = os.path.relpath(shards), "runs"
    last = stages.train(cfg, shards, root)
    history = ckpt.list_checkpoints(stages.run_uri(cfg, root))[-1][1].history
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[1]["loss"] < history[0]["loss"]
    # the all-reduce kept both workers' weights identical after every epoch
    assert all(row["replica_weight_spread"] == 0.0 for row in history)
    assert last["epoch"] == 2

    cfg.train.epochs = 3  # same name and storage: Ray resumes from the latest checkpoint
    stages.train(cfg, shards, root)
    resumed = ckpt.list_checkpoints(stages.run_uri(cfg, root))[-1][1].history
    assert [row["epoch"] for row in resumed] == [1, 2, 3]
    assert resumed[:2] == history
