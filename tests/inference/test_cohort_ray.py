"""infer on a cohort over a Ray cluster of two worker nodes (two raylets on this host, started by
``ray.cluster_utils.Cluster``, one CPU each, so the pool's two actors sit one on each): 8 synthetic
patients, the command killed once some cases are complete, rerun: only the missing cases are done,
on both nodes, one cases.csv; a third run skips them all. An actor the cluster cannot place (one
node's CPU held) holds no case; an actor killed mid-case is replaced and its case done."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time

import pytest

from aisd_ray import stages
from tests.conftest import start_local_ray, tiny_config
from tests.helpers import join_test_cluster, kill_when_cases_done, leave_test_cluster, ray_worker_pids
from tests.inference.test_cohort import stamps, write_patients

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    """A head without CPUs and two worker nodes of one CPU each, this process its driver; its own
    RAY_TMPDIR (torn down as tests/train/test_multinode.py does); the session's Ray restarted after."""
    import ray
    from ray.cluster_utils import Cluster

    had_ray = ray.is_initialized()
    if had_ray:
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must fit
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
            "num_cpus": 0, "_system_config": {"agent_register_timeout_ms": 180000}})
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        join_test_cluster(cluster.address)
        yield cluster.address, temp, {n.node_id for n in nodes}
    finally:
        leave_test_cluster(cluster, temp)
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        if had_ray:
            start_local_ray()


def test_a_cohort_on_two_nodes_killed_and_rerun_does_only_the_missing_cases(two_nodes, tmp_path):
    from aisd_ray.config import builtin_config, load_config
    from aisd_ray.inference.export import export_model
    from aisd_ray.model.flexunet import build_flexunet

    address, temp, node_ids = two_nodes
    cfg = tiny_config("run.shared_filesystem=true", "train.backend='ray'", "infer.workers=2")
    export = export_model(load_config(builtin_config("tiny")), build_flexunet(cfg.model), str(tmp_path / "export"))
    names = [f"34000{i:02d}" for i in range(1, 9)]
    write_patients(tmp_path / "in", names, size=64, slices=6)
    out = tmp_path / "out"
    # the command as a driver of its own on the cluster, killed once two cases are complete
    cmd = [sys.executable, "-m", "aisd_ray.cli", "infer", "--model", export, "--input", str(tmp_path / "in"),
           "--output", str(out), "--workers", "2", "--batch-size", "1", "--set", "run.shared_filesystem=true"]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "RAY_ADDRESS": address, "RAY_TMPDIR": temp}
    kept = kill_when_cases_done(cmd, env, out, 2, 400)
    assert 2 <= len(kept) < len(names), f"not killed half-way: {len(kept)} complete"
    assert not (out / "cases.csv").exists()
    before = stamps(out, kept)

    cfg.infer.images_dir, cfg.infer.output_dir = str(tmp_path / "in"), str(out)
    done = stages.infer(cfg, export, progress=False)
    assert [c["case_id"] for c in done.cases] == names
    assert stamps(out, kept) == before  # the complete cases kept, not done again
    cohort = json.loads((out / "cohort.json").read_text())
    assert cohort["done"] == len(names) and cohort["skipped"] == len(kept) and cohort["refused"] == 0
    new = [c for c in done.cases if c["case_id"] not in kept]
    assert {c["node"] for c in new} == node_ids  # the rerun's cases on both nodes
    assert {c["node"] for c in done.cases} <= node_ids
    rows = list(csv.DictReader((out / "cases.csv").open()))
    assert [r["case_id"] for r in rows] == names and {r["status"] for r in rows} == {"done"}

    all_done = stamps(out, names)
    again = stages.infer(cfg, export, progress=False)
    assert stamps(out, names) == all_done and len(again.cases) == len(names)
    assert json.loads((out / "cohort.json").read_text())["skipped"] == len(names)


def _cohort(tmp_path, names):
    """(config, export) for ``names`` written as patients into tmp_path/in, inferred into tmp_path/out."""
    from aisd_ray.config import builtin_config, load_config
    from aisd_ray.inference.export import export_model
    from aisd_ray.model.flexunet import build_flexunet

    cfg = tiny_config("run.shared_filesystem=true", "train.backend='ray'", "infer.workers=2")
    export = export_model(load_config(builtin_config("tiny")), build_flexunet(cfg.model), str(tmp_path / "export"))
    write_patients(tmp_path / "in", names, size=64, slices=6)
    cfg.infer.images_dir, cfg.infer.output_dir = str(tmp_path / "in"), str(tmp_path / "out")
    return cfg, export


def test_an_actor_the_cluster_cannot_place_holds_no_case(two_nodes, tmp_path, caplog):
    """One node's CPU held by other work: the pool's second actor can never start; its case goes to
    the first once the queue is empty, instead of waiting for it for ever."""
    import ray

    names = [f"35000{i:02d}" for i in range(1, 4)]
    cfg, export = _cohort(tmp_path, names)

    @ray.remote(num_cpus=1)
    class Blocker:
        def ping(self):
            return True

    blocker = Blocker.remote()
    ray.get(blocker.ping.remote())  # placed: one node's only CPU is taken
    try:
        with caplog.at_level(logging.INFO, logger="aisd_ray"):
            done = stages.infer(cfg, export, progress=False)
    finally:
        ray.kill(blocker)
    assert [c["case_id"] for c in done.cases] == names and all(c["lesion_ml"] >= 0 for c in done.cases)
    assert len({c["node"] for c in done.cases}) == 1  # all on the actor that could be placed
    assert "moved to a Ray actor that is up" in caplog.text
    assert "1 of 2 Ray actors never started" in caplog.text


def test_an_actor_killed_mid_case_is_replaced_and_its_case_done(two_nodes, tmp_path, caplog):
    """The process of an actor running a case is killed (as the OOM killer would): a new actor
    takes the case, every case is done, cases.csv has them all."""
    _, temp, _ = two_nodes
    names = [f"36000{i:02d}" for i in range(1, 9)]
    cfg, export = _cohort(tmp_path, names)
    result, killed = {}, []

    def run():
        try:
            result["done"] = stages.infer(cfg, export, progress=False)
        except BaseException as exc:  # noqa: BLE001 - raised again below
            result["error"] = exc

    with caplog.at_level(logging.INFO, logger="aisd_ray"):
        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.time() + 300
        while thread.is_alive() and not killed and time.time() < deadline:
            for pid in ray_worker_pids("ray::CaseWorker.run", temp)[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.02)
        thread.join(600)
    assert killed, "no actor was seen running a case"
    assert "error" not in result, result.get("error")
    assert [c["case_id"] for c in result["done"].cases] == names
    assert "the Ray actor segmenting it died" in caplog.text and "a new actor tries it again" in caplog.text
    rows = list(csv.DictReader((tmp_path / "out" / "cases.csv").open()))
    assert [r["case_id"] for r in rows] == names and {r["status"] for r in rows} == {"done"}
