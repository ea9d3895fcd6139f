"""Shared fixtures: tiny configs, synthetic data sharded in both formats, one local Ray cluster."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from aisd_ray.config import builtin_config, load_config  # noqa: E402
from aisd_ray.data.prepare import prepare  # noqa: E402
from aisd_ray.data.synthetic import write_synthetic_aisd  # noqa: E402


def tiny_config(*overrides: str):
    return load_config(builtin_config("tiny"), list(overrides))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A tiny synthetic AISD tree (64 px): 32 train, 8 valid, 8 test slices."""
    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_aisd(out, tiny_config().synthetic, progress=False)


@pytest.fixture(scope="session", params=["parquet", "tfrecord"])
def _shard_store(request, synthetic_root, tmp_path_factory):
    cfg = tiny_config(f"data.source_dir='{synthetic_root}'", f"data.shard_format='{request.param}'")
    out = str(tmp_path_factory.mktemp(f"shards-{request.param}"))
    prepare(cfg, out, progress=False)
    return cfg, out


@pytest.fixture
def shard_store(_shard_store):
    """(config, shards folder) for each shard format; the config is the test's own copy."""
    return copy.deepcopy(_shard_store[0]), _shard_store[1]


@pytest.fixture(scope="session")
def _parquet_store(synthetic_root, tmp_path_factory):
    cfg = tiny_config(f"data.source_dir='{synthetic_root}'")
    out = str(tmp_path_factory.mktemp("shards-parquet-main"))
    prepare(cfg, out, progress=False)
    return cfg, out


@pytest.fixture
def parquet_store(_parquet_store):
    return copy.deepcopy(_parquet_store[0]), _parquet_store[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One in-process local Ray cluster for the session (stopped with ray.shutdown, never `ray stop`)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def trained_run(_parquet_store, tmp_path_factory):
    """A 2-epoch local training run of the tiny config and its export."""
    from aisd_ray import stages

    cfg, shards = copy.deepcopy(_parquet_store[0]), _parquet_store[1]
    cfg.train.backend = "local"
    root = str(tmp_path_factory.mktemp("runs"))
    stages.train(cfg, shards, root)
    run = stages.run_uri(cfg, root)
    export_uri, _ = stages.export(run)
    return cfg, shards, run, export_uri
