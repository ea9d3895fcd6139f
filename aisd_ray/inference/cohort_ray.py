"""A cohort's cases spread over a pool of Ray actors (``infer --input FOLDER`` on a Ray cluster, and
``pipeline``'s last stage): each actor loads the export once and keeps it, each case goes to a free
actor, which writes that case's outputs whole (``cohort.case_output``) to the output folder (a
path every node sees: ``run.shared_filesystem``, or ``gs://``) and returns its summary row; the
driver takes the rows as they finish (``ray.wait``), updates the progress bar and writes
``cases.csv`` and ``cohort.json`` at the end (``infer_volumes.infer_volumes``).

Why actors rather than Ray Data: the export (a SavedModel, seconds to load, hundreds of MB) is
loaded once per actor and kept across cases, where Ray Data's ``map_batches`` would tie it to a
dataset of rows; cases are of unequal size (8 to 1,000 slices), so one case at a time to whichever
actor is free balances the load without a batch or block size to tune; and each case's result (a
small summary, the volumes written by the actor itself) is streamed back as it finishes, so a
killed run keeps every finished case.

Resources: one GPU per actor (``num_gpus=1``) when the cluster has GPUs, and as many actors as
GPUs by default; else, by default, half the cluster's CPUs in actors (at least one), the CPUs
shared out among them (``num_cpus``: Ray holds an actor's OpenMP threads to it). Never more actors
than cases. Each forward pass takes
``eval.batch_size`` slices.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path
from typing import Any

import ray

from aisd_ray.train.ray_session import storage_env, user_error

log = logging.getLogger(__name__)


def default_workers(cases: int) -> int:
    """The pool's size on the cluster Ray is connected to: its GPUs, else half its CPUs (at least
    one), at most ``cases``."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    return max(1, min(cases, gpus or int(resources.get("CPU", 2)) // 2))


@ray.remote
class CaseWorker:
    """One actor of the pool: the export loaded once (``infer_volumes.Segmenter``) and kept."""

    def __init__(self, env: dict[str, str], export_uri: str, tta: bool | None, input_path: str, out_uri: str,
                 export_id: str, settings: dict[str, Any]):
        from aisd_ray.inference.infer_volumes import Segmenter

        os.environ.update(env)  # where gs:// points, as the driver saw it
        logging.getLogger("aisd_ray").setLevel(logging.INFO)
        self.seg = Segmenter(export_uri, tta, input_path=input_path)
        self.out_uri, self.export_id, self.settings = out_uri, export_id, settings
        self.node = ray.get_runtime_context().get_node_id()

    def run(self, case_id: str, path: str) -> dict[str, Any]:
        from aisd_ray.inference.infer_volumes import infer_case

        return infer_case(self.seg, case_id, Path(path), self.out_uri, self.export_id, node=self.node,
                          **self.settings)


def run_pool(workers: int, todo: dict[str, Path], export_uri: str, out_uri: str, export_id: str,
             tta: bool | None, input_path: str, settings: dict[str, Any], bar) -> dict[str, dict[str, Any]]:
    """{case ID: summary or refused row} of every case of ``todo`` ({case ID: path}), run on a pool
    of ``workers`` actors (-1: ``default_workers``) of the cluster Ray is connected to. Paths must be
    absolute or gs://. A user error in an actor (the export missing, storage gone) is raised here
    as locally (``ray_session.user_error``); the actors are ended when the pool is done."""
    n = min(workers if workers > 0 else default_workers(len(todo)), len(todo))
    resources = ray.cluster_resources()
    gpus = 1 if resources.get("GPU", 0) >= 1 else 0
    # CPU actors: the cluster's CPUs shared out (Ray would hold a 1-CPU actor's numpy, SciPy and ITK
    # threads to one: OMP_NUM_THREADS); a GPU actor takes one CPU beside its GPU
    cpus = 1 if gpus else max(1, int(resources.get("CPU", 1)) // n)
    log.info("infer: %d case(s) on %d Ray actor%s (%s each)", len(todo), n, "s" if n > 1 else "",
             "1 GPU" if gpus else f"{cpus} CPU{'s' if cpus > 1 else ''}")
    actors = [CaseWorker.options(num_cpus=cpus, num_gpus=gpus).remote(
        storage_env(), export_uri, tta, input_path, out_uri, export_id, settings) for _ in range(n)]
    queue = deque(todo.items())
    running: dict[Any, tuple[str, Any]] = {}
    found: dict[str, dict[str, Any]] = {}

    def give(actor) -> None:
        if queue:
            case_id, path = queue.popleft()
            running[actor.run.remote(case_id, str(path))] = (case_id, actor)

    try:
        for actor in actors:
            give(actor)
        while running:
            [ready], _ = ray.wait(list(running), num_returns=1)
            case_id, actor = running.pop(ready)
            try:
                found[case_id] = ray.get(ready)
            except ray.exceptions.RayTaskError as exc:
                ours = user_error(exc.cause)
                if ours is not None:
                    raise ours from None
                raise
            bar.update()
            give(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
    return found
