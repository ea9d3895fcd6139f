"""Ray Train with 2 workers under MultiWorkerMirroredStrategy, on a real local Ray cluster."""

import copy
import json
import os

import h5py
import numpy as np
import pytest

from aisd_ray import stages
from aisd_ray.cli import main
from aisd_ray.data.store.prepare import prepare
from aisd_ray.data.synthetic.slices import write_synthetic_aisd
from aisd_ray.train import checkpoint as ckpt
from tests.conftest import tiny_config, volume_config

pytestmark = pytest.mark.slow


TRAIN_WORKERS = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]


def ray_address() -> str:
    """The connected cluster's address, for Ray's state API: without one it asks the cluster
    named in /tmp/ray (the host's last started), which may be another test process's."""
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def ct_source(tmp_path_factory):
    """Six synthetic CT patients in HU (nnU-Net layout, 64 px, 4 slices): 4 train, 1 valid, 1 test."""
    cfg = volume_config("nnunet", 6, 1, 64, 4)
    return cfg, stages.synthesize(cfg, str(tmp_path_factory.mktemp("ct")), progress=False)


@pytest.mark.parametrize("channels, fmt", [("neighbours", "tfrecord"), ("symmetry", "parquet")])
def test_two_workers_train_in_sync_and_evaluate_with_ct_channels(ray_cluster, ct_source, channels, fmt, tmp_path,
                                                                  monkeypatch, capsys):
    """CT volumes made into neighbours (TFRecord, raw rows, read by the workers directly: the default
    reader) or symmetry channels (Parquet, PNG rows); Parquet through Ray Data, with fp16, is the
    killed-worker test's run below. Paths are given relative to the caller's directory, as users
    type them; workers run elsewhere. The export records its channel mode and evaluate scores it."""
    cfg, root = ct_source
    cfg = copy.deepcopy(cfg)
    cfg.data.channels, cfg.data.shard_format = channels, fmt
    cfg.data.row_encoding = "raw" if fmt == "tfrecord" else "png"
    cfg.data.source_dir = str(root)
    assert cfg.train.reader == "shards"
    cfg.train.backend, cfg.train.num_workers, cfg.train.epochs = "ray", 2, 2
    monkeypatch.chdir(tmp_path)
    prepare(cfg, "shards", progress=False)
    last = stages.train(cfg, "shards", "runs")
    run = stages.run_uri(cfg, "runs")
    history = ckpt.list_checkpoints(run)[-1][1].history
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[1]["loss"] < history[0]["loss"]
    # the all-reduce kept both workers' weights identical after every epoch
    assert all(row["replica_weight_spread"] == 0.0 for row in history)
    assert last["epoch"] == 2

    export, _ = stages.export(run)
    assert json.loads(open(os.path.join(export, "export.json")).read())["channels"] == channels
    assert main(["evaluate", "--model", export, "--data", "shards", "--output", "eval", "--no-overlays"]) == 0
    report = json.loads(open("eval/metrics.json").read())
    assert report["cases"]["cases"] == 1 and "case_hd95_mm_median" in report["cases"]
    assert report["images"] == 4 and "over 4 images" in capsys.readouterr().out  # the test patient's 4 slices


@pytest.fixture(scope="module")
def eight_rows(tmp_path_factory):
    """A store whose train split is exactly 8 slices: one global batch of 8."""
    cfg = tiny_config("synthetic.num_train=8", "synthetic.num_valid=4", "synthetic.num_test=2")
    cfg.data.source_dir = str(write_synthetic_aisd(tmp_path_factory.mktemp("src8"), cfg.synthetic, progress=False))
    store = str(tmp_path_factory.mktemp("shards8"))
    prepare(cfg, store, progress=False)
    return cfg, store


def weights(run: str) -> dict[str, np.ndarray]:
    uri = ckpt.list_checkpoints(run)[-1][0]
    out = {}
    with h5py.File(os.path.join(uri, ckpt.WEIGHTS)) as f:
        f.visititems(lambda name, obj: out.__setitem__(name, np.array(obj)) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_one_worker_batch_8_and_two_workers_batch_4_make_the_same_update(ray_cluster, eight_rows, tmp_path):
    """The same 8 rows, one step: the gradient is all-reduced before it is clipped (a clip that
    binds), and BatchNorm is synchronised, so weights and moving statistics agree. Adam's epsilon
    is set far above the gradients, which makes its first step proportional to the gradient (with
    the default epsilon it moves every weight by about +-lr, hiding how large the gradient was)."""
    cfg, store = eight_rows
    cfg.model.normalization = True
    cfg.train.epochs, cfg.train.epoch_change_infer = 1, False
    cfg.train.learning_rate, cfg.train.adam_epsilon, cfg.train.clipvalue = 1.0, 1.0, 1e-3
    cfg.train.backend, cfg.train.batch_size = "local", 8
    stages.train(cfg, store, str(tmp_path / "one"))
    cfg.train.backend, cfg.train.batch_size, cfg.train.num_workers = "ray", 4, 2
    stages.train(cfg, store, str(tmp_path / "two"))
    one, two = weights(stages.run_uri(cfg, str(tmp_path / "one"))), weights(stages.run_uri(cfg, str(tmp_path / "two")))
    assert one.keys() == two.keys() and any("batch_normalization" in k for k in one)
    for key in one:  # a clipped update is 1e-3 here: clipping each worker's gradient would differ by that
        np.testing.assert_allclose(one[key], two[key], rtol=0, atol=2e-5, err_msg=key)
    history = ckpt.list_checkpoints(stages.run_uri(cfg, str(tmp_path / "two")))[-1][1].history
    assert history[0]["replica_weight_spread"] == 0.0
    import keras

    from aisd_ray.model.flexunet import build_flexunet

    keras.utils.set_random_seed(cfg.train.seed)  # the weights before the step: it really moved them
    initial = sum(float(np.abs(w).sum()) for w in build_flexunet(cfg.model).get_weights())
    assert abs(sum(float(np.abs(w).sum()) for w in one.values()) - initial) > 1e-3


def test_a_killed_worker_is_replaced_and_the_run_finishes_then_a_rerun_resumes(ray_cluster, parquet_store, tmp_path,
                                                                                monkeypatch):
    """Two workers read Parquet shards (PNG rows) through Ray Data, with fp16 loss scaling (its
    finiteness check sees the all-reduced gradient, so both workers take the same decision). One
    worker is SIGKILLed mid-run (train.max_failures at its default): Ray starts a new worker group,
    which resumes from the last checkpoint; every epoch is in the history once, at most the epoch
    in progress is run again, and the workers' weights stay identical. The same command with more
    epochs (same name and storage) then resumes from the latest checkpoint.
    Paths are given relative to the caller's directory, as users type them; workers run elsewhere."""
    import signal
    import threading
    import time

    from ray.util.state import list_actors

    cfg, shards = parquet_store
    cfg.train.backend, cfg.train.num_workers, cfg.train.epochs = "ray", 2, 8
    cfg.train.reader, cfg.train.mixed_precision = "ray_data", "fp16"
    assert cfg.train.max_failures >= 2
    monkeypatch.chdir(tmp_path)
    shards, root = os.path.relpath(shards), "runs"
    run = stages.run_uri(cfg, root)
    killed: list[int] = []

    def kill_a_worker():
        deadline, pids = time.time() + 300, []
        while time.time() < deadline:
            if len(pids) < 2:  # found once, ahead of time: asking Ray takes longer than an epoch here
                workers = list_actors(address=ray_address(), filters=TRAIN_WORKERS)
                pids = [w.pid for w in workers]
            done = [state.epoch for _, state in ckpt.list_checkpoints(run)] if os.path.isdir(run) else []
            if len(pids) == 2 and done and max(done) >= 2:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(max(done))
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    last = stages.train(cfg, shards, root)
    killer.join()
    assert killed and killed[0] < 8, "the kill did not land inside the run"
    state = ckpt.list_checkpoints(run)[-1][1]
    assert [row["epoch"] for row in state.history] == list(range(1, 9)) and last["epoch"] == 8
    assert len(state.resumes) == 1 and state.resumes[0] >= killed[0]  # at most the epoch in progress redone
    assert state.history[-1]["loss"] < state.history[0]["loss"]
    assert all(row["replica_weight_spread"] == 0.0 for row in state.history)

    cfg.train.epochs = 9  # the same command, more epochs: Ray resumes from the latest checkpoint
    stages.train(cfg, shards, root)
    resumed = ckpt.list_checkpoints(run)[-1][1]
    assert [row["epoch"] for row in resumed.history] == list(range(1, 10))
    assert resumed.history[:8] == state.history


def test_workers_lost_past_max_failures_end_in_one_line(ray_cluster, parquet_store, tmp_path, capsys):
    import signal
    import threading
    import time

    from ray.util.state import list_actors

    from aisd_ray.cli import main

    shards = parquet_store[1]
    out = tmp_path / "runs"

    def kill_a_worker():
        deadline = time.time() + 300
        while time.time() < deadline:
            if os.path.isdir(out / "tiny") and ckpt.list_checkpoints(str(out / "tiny")):
                workers = list_actors(address=ray_address(), filters=TRAIN_WORKERS)
                if workers:
                    os.kill(workers[0].pid, signal.SIGKILL)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    code = main(["train", "--config", "tiny", "--data", shards, "--output", str(out), "-q",
                 "--set", "train.max_failures=0", "--set", "train.epochs=30"])
    killer.join()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("aisd-ray train: error: training failed: worker ") and "train.max_failures" in err[0]
    assert ckpt.list_checkpoints(str(out / "tiny"))  # what was done is kept for a rerun


def test_ray_data_epochs_read_every_row_once_and_start_the_next_pass_early(ray_cluster, shard_store):
    """The Ray Data reader (files parsed in the read tasks by our TFRecord and Parquet readers, in
    blocks of a few rows) gives exactly the direct reader's rows, every epoch, in a shard order
    fixed by its seed; the next epoch's pass begins as soon as one ends, before the loop asks."""
    import time

    from aisd_ray.data.store import pipeline
    from aisd_ray.data.store import shards as shard_format
    from aisd_ray.data.store.ray_data import RayEpochs, read_split, train_dataset

    cfg, store = shard_store
    manifest = shard_format.read_manifest(store)
    direct = list(pipeline.ShardRows(store, manifest, "train")())
    assert len(manifest["splits"]["train"]["shards"]) > 1 and len(direct) > 10

    def stream(seed, lookahead=64):
        split = read_split(store, manifest, "train", order_seed=seed, rows_per_block=5)
        return RayEpochs(split.streaming_split(1, equal=True)[0], lookahead=lookahead)

    epochs = stream(cfg.train.seed, lookahead=4)
    try:
        first = list(epochs.epoch())
        assert sorted(first) == sorted(direct)
        deadline = time.time() + 30
        while epochs.passes_started < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert epochs.passes_started == 2  # the second pass began without being asked
        assert list(epochs.epoch()) == first  # the same shard order every epoch (rows are shuffled later)
    finally:
        epochs.close()
    orders = set()
    # the shard order is a function of the seed: whole shards, permuted (two shards here: seed 4
    # swaps them, the config's seed 137 keeps them, by order.rng)
    for seed in (cfg.train.seed, 4):
        epochs = stream(seed)
        rows = list(epochs.epoch())
        epochs.close()
        orders.add(tuple(rows))
        assert sorted(rows) == sorted(direct)
        if seed == cfg.train.seed:
            assert rows == first
    assert len(orders) > 1
    cfg.train.reader = "ray_data"
    epochs = RayEpochs(train_dataset(cfg, store, manifest))
    assert sorted(epochs.epoch()) == sorted(direct)
    epochs.close()


def test_a_diverged_ray_run_exits_1_and_ray_keeps_the_loops_best(ray_cluster, parquet_store, tmp_path, capsys):
    """Issue 22, case 6 on the Ray backend: the same exit and line as the local backend; Ray keeps
    checkpoints by ``checkpoint_rank``, so nothing diverged is a candidate and export refuses."""
    from aisd_ray.cli import main

    out = tmp_path / "runs"
    code = main(["train", "--config", "tiny", "--data", parquet_store[1], "--output", str(out), "-q",
                 "--backend", "ray", "--set", "train.num_workers=1", "--set", "train.epochs=3",
                 "--set", "train.learning_rate=1e9", "--set", "train.clipvalue=0", "--set", "train.on_collapse='stop'",
                 "--set", "train.epoch_change_infer=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"aisd-ray train: error: {out / 'tiny'}: training stopped: diverged at epoch 1: "
                             "non-finite loss")
    assert ckpt.ranked(ckpt.list_checkpoints(str(out / "tiny"))) == []
    assert main(["export", "--run", str(out / "tiny")]) == 2
    assert f"{out / 'tiny'}: no checkpoint to export" in capsys.readouterr().err
