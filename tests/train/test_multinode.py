"""More than one node: a head and two worker nodes started by ``ray.cluster_utils.Cluster`` on this
host (each its own raylet, object store and resources), shards and runs in the GCS emulator.

Covers what one node cannot: two Ray Train workers placed on two nodes (the same figures as on one
node), a whole node lost mid-epoch and replaced (the run waits for capacity and resumes from the
last checkpoint in the bucket), a Tune search across nodes with ASHA stopping a trial, and the
refusal of a local path on a multi-node cluster. What it cannot show (separate disks, a network
between nodes, an autoscaler) is listed in infra/README.md.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from aisd_ray import stages
from aisd_ray.core import storage
from aisd_ray.data.store.prepare import prepare
from aisd_ray.evaluation.evaluate import evaluate_export
from aisd_ray.inference.export import LoadedExport
from aisd_ray.train import checkpoint as ckpt
from tests.conftest import _free_port, kill_processes_under, start_local_ray, tiny_config
from tests.helpers import join_test_cluster, leave_test_cluster

pytestmark = pytest.mark.slow
ROOT = "gs://aisd/multinode"
# Worker nodes: 2 CPUs each, so two 1-CPU workers fit on one (STRICT_PACK) or one on each
# (STRICT_SPREAD); the head has none, so training never lands there and a lost node leaves
# too few nodes for STRICT_SPREAD until a replacement joins.
NODE_CPUS = 2
TRACKING = "RAY_TRAIN_ENABLE_STATE_TRACKING"  # Ray Train's state actor: each attempt's workers, rank and node


@dataclass
class MultiNode:
    cluster: object
    nodes: dict = field(default_factory=dict)  # custom resource name -> ray._private.node.Node

    def node_id(self, name: str) -> str:
        return self.nodes[name].node_id

    def add(self, name: str):
        self.nodes[name] = self.cluster.add_node(num_cpus=NODE_CPUS, resources={name: 1})
        return self.nodes[name]

    def remove(self, name: str) -> None:
        """Kill the node's raylet, object store and workers together (no graceful drain): a preempted VM."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)


def _start_cluster(temp: str):
    """The head and nodes "node_a", "node_b"; on a busy machine a raylet can miss Ray's fixed
    30 s start-up wait, so a cluster that did not come up is killed and started again (twice)."""
    from ray.cluster_utils import Cluster

    for attempt in range(3):
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
                "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                "dashboard_port": _free_port(), "gcs_server_port": _free_port(),
                # a lost node is noticed within seconds (defaults: about 30 s); a raylet waits for its
                # node's dashboard agent longer than its default 30 s (a busy 2-core machine needed 90)
                "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                                   "health_check_failure_threshold": 3, "agent_register_timeout_ms": 180000}})
            nodes = MultiNode(cluster)
            nodes.add("node_a")
            nodes.add("node_b")
            return cluster, nodes
        except Exception:  # noqa: BLE001 - "The current node timed out during startup"
            if attempt == 2:
                raise
            if cluster is not None:
                try:
                    cluster.shutdown()
                except Exception:  # noqa: BLE001
                    pass
            kill_processes_under(temp)


@pytest.fixture(scope="module")
def multinode(gcs_emulator):
    """A head (no CPUs) and worker nodes "node_a" and "node_b" (custom resources of those names),
    this process connected as the driver. Its own RAY_TMPDIR: Ray's "current cluster" file lives
    there, so no other ray.init on the host finds this cluster. Torn down node by node, then any
    process still under its temp dir killed by PID; an in-process Ray that was up before (the
    session's) is stopped first and started again after."""
    import ray

    had_ray = ray.is_initialized()
    if had_ray:
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths must fit
    old_env = {k: os.environ.get(k) for k in ("RAY_TMPDIR", TRACKING)}
    os.environ["RAY_TMPDIR"], os.environ[TRACKING] = temp, "1"
    cluster = None
    try:
        cluster, nodes = _start_cluster(temp)
        # one host: Ray Train's preemption watcher is off as for any local Ray (local_ray_env); no
        # test here drains a node, which is all it watches for
        join_test_cluster(cluster.address, **{TRACKING: "1"})
        yield nodes
    finally:
        leave_test_cluster(cluster, temp)
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if had_ray:
            start_local_ray()


@pytest.fixture(scope="module")
def gs_store(gcs_emulator, synthetic_root):
    cfg = tiny_config(f"data.source_dir='{synthetic_root}'")
    uri = f"{ROOT}/shards"
    prepare(cfg, uri, progress=False)
    return cfg, uri


def _config(base, name: str, strategy: str, epochs: int = 3):
    import copy

    cfg = copy.deepcopy(base)
    cfg.run.name = name
    cfg.train.backend, cfg.train.num_workers, cfg.train.epochs = "ray", 2, epochs
    cfg.train.placement_strategy = strategy
    cfg.train.epoch_change_infer = False  # no per-epoch gallery: nothing here looks at it
    return cfg


def train_attempts(run_name: str) -> list[dict]:
    """Each attempt of the Ray Train run ``run_name`` (in start order), from Ray Train's own state
    actor: {"status", "workers": {world rank: node id}, "strategy"}."""
    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    actor = get_state_actor()
    if actor is None:
        return []
    runs = ray.get(actor.get_train_runs.remote())
    attempts = ray.get(actor.get_train_run_attempts.remote())
    out = []
    for run_id, run in runs.items():
        if run.name != run_name:
            continue
        for attempt in sorted(attempts.get(run_id, {}).values(), key=lambda a: a.start_time_ns):
            out.append({"status": attempt.status.value, "workers": {w.world_rank: w.node_id for w in attempt.workers},
                        "strategy": run.run_settings.scaling_config.placement_strategy})
    return out


def _rows(run: str) -> list[dict]:
    """The run's history with the figures that must repeat exactly (no timings)."""
    history = ckpt.list_checkpoints(run)[-1][1].history
    return [{k: v for k, v in row.items() if "seconds" not in k and k != "learning_rate_wall"} for row in history]


def _same_figures(a: list[dict], b: list[dict]) -> None:
    import numpy as np

    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss", "val_lesion_dice", "val_score", "lesion_dice"):
            np.testing.assert_allclose(ra[key], rb[key], rtol=1e-6, atol=1e-7, err_msg=f"epoch {ra['epoch']}: {key}")


ONE_NODE: dict = {}  # the one-node run's figures, for the later tests


def test_two_workers_on_one_node_read_and_checkpoint_through_the_bucket(multinode, gs_store):
    """The reference run: both workers on one node (STRICT_PACK), shards read from and checkpoints
    written to the bucket; then exported into the bucket, reloaded and evaluated from there. The
    same run placed across two nodes is the next test's (its first attempt spans node_a and
    node_b), compared with these figures: one run fewer on 2 cores."""
    base, shards_uri = gs_store
    one = _config(base, "one-node", "STRICT_PACK")
    stages.train(one, shards_uri, f"{ROOT}/runs")

    (attempt_one,) = train_attempts("one-node")
    assert attempt_one["strategy"] == "STRICT_PACK"
    workers = {multinode.node_id("node_a"), multinode.node_id("node_b")}
    assert len(set(attempt_one["workers"].values())) == 1 and set(attempt_one["workers"].values()) <= workers
    run_one = stages.run_uri(one, f"{ROOT}/runs")
    found = ckpt.list_checkpoints(run_one)
    assert found[-1][0].startswith(f"{ROOT}/runs/one-node/checkpoint_") and found[-1][1].epoch == 3
    rows = _rows(run_one)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] < rows[0]["loss"]
    ONE_NODE["rows"] = rows
    assert storage.exists(f"{run_one}/history.csv") and storage.exists(f"{run_one}/train_losses.png")

    # the run's best checkpoint exported into the bucket, reloaded from there, evaluated there
    export_uri, _ = stages.export(run_one)
    assert export_uri == f"{ROOT}/runs/one-node/export" and storage.exists(f"{export_uri}/export.json")
    assert LoadedExport(export_uri).predict(np.zeros((2, 64, 64, 3), np.uint8))["labels"].shape == (2, 64, 64)
    report = evaluate_export(export_uri, shards_uri, f"{run_one}/eval", progress=False)
    saved = json.loads(storage.read_bytes(f"{run_one}/eval/metrics.json"))
    assert saved["images"] == report["images"] == 8


def test_a_lost_node_is_replaced_and_the_run_resumes_from_the_bucket(multinode, gs_store):
    """The node running the chief worker (rank 0, which writes each checkpoint in a local temp
    folder before it is uploaded) is killed mid-epoch with its raylet and workers. The run
    (train.max_failures) waits: STRICT_SPREAD needs two nodes and one is left. A replacement node
    joins; the run resumes from the last complete checkpoint in the bucket, and ends with every
    epoch once and the figures of the uninterrupted run."""
    base, shards_uri = gs_store
    cfg = _config(base, "node-loss", "STRICT_SPREAD")
    assert cfg.train.max_failures >= 1
    both_nodes = {multinode.node_id("node_a"), multinode.node_id("node_b")}
    run = stages.run_uri(cfg, f"{ROOT}/runs")
    events: dict = {}
    outcome: dict = {}

    def train():  # in a thread: adding a node registers signal handlers, which only the main thread may
        try:
            outcome["last"] = stages.train(cfg, shards_uri, f"{ROOT}/runs")
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            outcome["error"] = exc

    trainer = threading.Thread(target=train)
    trainer.start()
    deadline = time.time() + 400
    try:
        name = None
        while name is None and trainer.is_alive() and time.time() < deadline:  # the chief's node, ahead of time
            attempts = train_attempts("node-loss")
            chief = attempts[-1]["workers"].get(0) if attempts else None
            name = next((n for n in list(multinode.nodes) if multinode.node_id(n) == chief), None)
            time.sleep(0.2)
        while name and trainer.is_alive() and time.time() < deadline:
            done = [state.epoch for _, state in ckpt.list_checkpoints(run)]
            if done:  # the first epoch is in the bucket: the next one has begun
                multinode.remove(name)
                # the chief is gone: nothing more reaches the bucket (an epoch that ended meanwhile counts)
                events["lost"] = name
                events["complete_then"] = max(state.epoch for _, state in ckpt.list_checkpoints(run))
                break
            time.sleep(0.05)
        while "lost" in events and trainer.is_alive() and time.time() < deadline:
            attempts = train_attempts("node-loss")
            if len(attempts) > 1 and attempts[-1]["status"] == "PENDING":  # noticed, and waits for a node
                time.sleep(3)
                events["still_pending"] = train_attempts("node-loss")[-1]["status"] == "PENDING"
                break
            time.sleep(0.2)
    finally:  # whatever happened, give the run its second node back
        if "node_c" not in multinode.nodes:
            events["replacement"] = multinode.add("node_c").node_id
    trainer.join(timeout=max(deadline - time.time(), 60))
    assert not trainer.is_alive(), "the run did not finish after the replacement node joined"
    if "error" in outcome:
        raise outcome["error"]
    last = outcome["last"]
    assert "lost" in events and events.get("still_pending"), f"the node was not lost inside the run: {events}"
    assert events["complete_then"] < 3
    attempts = train_attempts("node-loss")
    assert [a["status"] for a in attempts][-1] == "FINISHED" and len(attempts) >= 2
    assert attempts[0]["strategy"] == "STRICT_SPREAD"  # the first attempt: one worker on each node
    assert set(attempts[0]["workers"].values()) == both_nodes
    assert events["replacement"] in attempts[-1]["workers"].values()
    state = ckpt.list_checkpoints(run)[-1][1]
    assert [row["epoch"] for row in state.history] == [1, 2, 3] and last["epoch"] == 3
    # resumed from the checkpoint that was complete in the bucket when the node went (the chief's
    # local copy went with the node), redoing at most the epoch in progress
    assert state.resumes == [events["complete_then"]]
    rows = _rows(run)
    assert all(r["replica_weight_spread"] == 0.0 for r in rows)  # identical weights on both nodes
    if ONE_NODE:  # across two nodes, lost and resumed: the one-node run's figures
        _same_figures(rows, ONE_NODE["rows"])


def test_a_search_runs_its_trials_across_nodes_and_asha_stops_one(multinode, gs_store):
    """Two trials of two workers, each worker on its own node (STRICT_SPREAD), one after the other
    (as tests/studies/test_tune.py: at lr 1e-7 a trial keeps a small non-zero Dice; lr 0.05 collapses to 0
    after one epoch, below the rung's cutoff, so ASHA stops it after epoch 1 of 2)."""
    from aisd_ray.studies.tune import search

    base, shards_uri = gs_store
    cfg = _config(base, "unused", "STRICT_SPREAD", epochs=2)
    cfg.tune.name, cfg.tune.num_samples, cfg.tune.max_concurrent_trials = "cross-node", 1, 1
    cfg.tune.grace_period, cfg.tune.reduction_factor = 1, 2
    cfg.tune.space = {"learning_rate": {"grid": (1e-7, 0.05)}}
    cfg.tune.min_score, cfg.tune.include_default = 0.0, False  # as tests/studies/test_tune.py: tiny trials count
    result = search(cfg, shards_uri, f"{ROOT}/search")

    rows = {row["learning_rate"]: row for row in result.rows}
    assert rows[1e-7]["epochs_run"] == 2 and rows[1e-7]["stop_reason"] == "reached 2 epochs"
    assert rows[0.05]["epochs_run"] == 1 and rows[0.05]["stop_reason"] == "stopped by ASHA after epoch 1"
    alive = {node.node_id for node in multinode.nodes.values()}
    for row in result.rows:
        (attempt,) = train_attempts(row["trial_id"])
        assert len(set(attempt["workers"].values())) == 2 and set(attempt["workers"].values()) <= alive, row
    assert result.outputs["leaderboard"] == f"{ROOT}/search/leaderboard.csv"


@pytest.mark.parametrize("command", ["train", "tune", "pipeline"])
def test_a_local_path_on_a_multinode_cluster_is_refused_before_anything_runs(
        multinode, gs_store, synthetic_root, parquet_store, tmp_path, capsys, command):
    """Each node of a real cluster has its own disk: a local output folder or shard store would be
    split across them. Refused (exit 2, one line) before anything is written, by node count:
    these simulated nodes do share this host's disk, which is what --shared-fs declares."""
    import ray

    from aisd_ray.cli import main

    local_shards, out = parquet_store[1], tmp_path / "out"
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    assert nodes >= 3
    args = {"train": ["--data", local_shards, "--output", str(out)],
            "tune": ["--data", local_shards, "--output", str(out)],
            "pipeline": ["--source", str(synthetic_root), "--output", str(out)]}[command]
    code = main([command, "--config", "tiny", *args, "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    what = "the search folder" if command == "tune" else "the output root"
    assert err[0] == (f"aisd-ray {command}: error: {out}: {what} is a local path, and this Ray cluster has "
                      f"{nodes} nodes, each with its own disk; use gs://BUCKET/PREFIX, or a folder mounted at this "
                      "path on every node (NFS) declared with run.shared_filesystem = true (--shared-fs)")
    assert not out.exists()  # nothing written: no run folder, no shards, no config

    if command == "train":  # a local shard store with the output in the bucket: named too
        assert main([command, "--config", "tiny", "--data", local_shards, "--output", f"{ROOT}/refused", "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"aisd-ray train: error: {local_shards}: the shard store is a local path")
        from aisd_ray.core import storage

        assert not storage.exists(f"{ROOT}/refused")


def test_a_local_path_declared_shared_passes_the_check(multinode, gs_store, parquet_store, tmp_path):
    """run.shared_filesystem (--shared-fs) declares a local path mounted on every node (NFS): the
    same check on the same cluster lets it through; a single-node Ray never asks (every other Ray
    test of the suite trains into a local folder)."""
    from aisd_ray.config import load_config
    from aisd_ray.core.storage import StorageError
    from aisd_ray.train.ray_session import require_shared_storage

    paths = {"the output root": str(tmp_path / "out"), "the shard store": parquet_store[1]}
    with pytest.raises(StorageError, match="is a local path, and this Ray cluster has"):
        require_shared_storage(gs_store[0], paths)
    from aisd_ray.cli import build_parser
    from aisd_ray.cli.flags import flag_overrides

    args = build_parser().parse_args(["train", "--data", parquet_store[1], "--shared-fs"])
    shared = load_config(None, [item for item, _ in flag_overrides(args)])
    assert shared.run.shared_filesystem is True
    require_shared_storage(shared, paths)  # no error
