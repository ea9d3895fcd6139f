"""Mixed precision and XLA switches: they must at least train correctly on the CPU."""

import numpy as np
import pytest
import tensorflow as tf

from aisd_ray import stages
from aisd_ray.inference.export import LoadedExport
from aisd_ray.train import checkpoint as ckpt


@pytest.mark.parametrize("precision, jit", [("bf16", False), ("fp16", False), ("none", True)])
def test_switches_train_to_finite_decreasing_loss(parquet_store, tmp_path, precision, jit):
    cfg, shards = parquet_store
    cfg.train.backend, cfg.train.epochs = "local", 2
    cfg.train.mixed_precision, cfg.train.jit_compile = precision, jit
    stages.train(cfg, shards, str(tmp_path))
    history = ckpt.list_checkpoints(stages.run_uri(cfg, str(tmp_path)))[-1][1].history
    losses = [row["loss"] for row in history]
    assert all(np.isfinite(losses)) and losses[1] < losses[0]
    if precision == "bf16":
        export_uri, _ = stages.export(stages.run_uri(cfg, str(tmp_path)))
        out = LoadedExport(export_uri).predict(np.zeros((1, 64, 64, 3), np.uint8))
        assert out["probabilities"].dtype == tf.float32
        floats = LoadedExport(export_uri).predict_float(np.zeros((1, 64, 64, 3), np.float32))
        assert floats["probabilities"].dtype == tf.float32
