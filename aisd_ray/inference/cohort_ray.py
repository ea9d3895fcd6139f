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
shared out among them (``actor_cpus``: Ray holds an actor's OpenMP threads to it). Never more actors
than cases. An actor the cluster cannot place never holds a case for good (``run_pool``). Each forward pass takes
``eval.batch_size`` slices.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path
from typing import Any

import ray

from aisd_ray.inference import cohort
from aisd_ray.train.ray_session import get_as_local, storage_env

log = logging.getLogger(__name__)
WAIT_LOG_S = 60.0  # how often a pool with no actor up says it is waiting for the cluster


def default_workers(cases: int) -> int:
    """The pool's size on the cluster Ray is connected to: its GPUs, else half its CPUs (at least
    one), at most ``cases``."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    return max(1, min(cases, gpus or int(resources.get("CPU", 2)) // 2))


def actor_cpus(actors: int) -> int:
    """CPUs for each of ``actors`` CPU actors: the cluster's CPUs shared out (Ray would hold a
    1-CPU actor's numpy, SciPy and ITK threads to one: OMP_NUM_THREADS), at most the CPUs of its
    largest node and at most the CPUs free now (where any are), so that an actor can be placed
    while other work holds some."""
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    free = int(ray.available_resources().get("CPU", 0))
    return max(1, min(int(ray.cluster_resources().get("CPU", 1)) // actors, int(largest), free or int(largest)))


@ray.remote
class CaseWorker:
    """One actor of the pool: the export loaded once (``infer_volumes.Segmenter``) and kept. An
    error while loading is kept and raised by ``ready`` and ``run`` (a task's error reaches the
    driver as itself, where one raised in ``__init__`` would only say that the actor died)."""

    def __init__(self, env: dict[str, str], export_uri: str, tta: bool | None, input_path: str, out_uri: str,
                 export_id: str, settings: dict[str, Any]):
        from aisd_ray.inference.infer_volumes import Segmenter

        os.environ.update(env)  # where gs:// points, as the driver saw it
        logging.getLogger("aisd_ray").setLevel(logging.INFO)
        self.error: Exception | None = None
        try:
            self.seg = Segmenter(export_uri, tta, input_path=input_path)
        except Exception as exc:  # noqa: BLE001 - raised again by ready() and run()
            self.error = exc
        self.out_uri, self.export_id, self.settings = out_uri, export_id, settings
        self.node = ray.get_runtime_context().get_node_id()

    def ready(self) -> bool:
        """True once the actor is placed and its export loaded; the loading error if it was not."""
        if self.error is not None:
            raise self.error
        return True

    def run(self, case_id: str, path: str) -> dict[str, Any]:
        from aisd_ray.inference.infer_volumes import infer_case

        self.ready()
        return infer_case(self.seg, case_id, Path(path), self.out_uri, self.export_id, node=self.node,
                          **self.settings)


def run_pool(workers: int, todo: dict[str, Path], export_uri: str, out_uri: str, export_id: str,
             tta: bool | None, input_path: str, settings: dict[str, Any], bar) -> dict[str, dict[str, Any]]:
    """{case ID: summary or refused row} of every case of ``todo`` ({case ID: path}), run on a pool
    of ``workers`` actors (-1: ``default_workers``) of the cluster Ray is connected to. Paths must be
    absolute or gs://. A user error in an actor (the export missing, storage gone) is raised here
    as locally (``ray_session.get_as_local``); the actors are ended when the pool is done.

    Each actor is given one case up front and the next when it returns one. An actor the cluster
    cannot place (its CPUs held by other work) never holds a case for good: once the queue is
    empty, an idle actor that is up takes over the case of one that is not, and that one is ended;
    while no actor is up, a line says so every ``WAIT_LOG_S`` seconds. An actor that dies (killed
    for memory, its node lost) is replaced and its case tried again once; a case whose actor died
    twice is refused by name (its row), so the others still get theirs."""
    n = min(workers if workers > 0 else default_workers(len(todo)), len(todo))
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    cpus = 1 if gpus else actor_cpus(n)  # a GPU actor takes one CPU beside its GPU
    each = "1 GPU" if gpus else f"{cpus} CPU{'s' if cpus > 1 else ''}"
    log.info("infer: %d case(s) on %d Ray actor%s (%s each)", len(todo), n, "s" if n > 1 else "", each)
    actors: list[Any] = []
    queue = deque(todo.items())
    starting: dict[Any, int] = {}  # ready() of the actors not up yet: actor index
    running: dict[Any, tuple[str, Path, int]] = {}  # run(): (case ID, path, actor index)
    died: dict[str, int] = {}  # how many actors died on a case
    never: set[int] = set()  # the actors ended before they were up
    found: dict[str, dict[str, Any]] = {}

    def start() -> int:
        actors.append(CaseWorker.options(num_cpus=cpus, num_gpus=gpus).remote(
            storage_env(), export_uri, tta, input_path, out_uri, export_id, settings))
        starting[actors[-1].ready.remote()] = len(actors) - 1
        return len(actors) - 1

    def give(i: int, case_id: str, path: Path) -> None:
        running[actors[i].run.remote(case_id, str(path))] = (case_id, path, i)

    def forget(i: int) -> None:
        """Actor ``i`` is no longer waited for to start."""
        for ref in [r for r, j in starting.items() if j == i]:
            del starting[ref]

    def come_up(refs: list[Any]) -> None:
        for ref in refs:
            i = starting.pop(ref)
            try:
                get_as_local(ref)  # an actor that could not load the export fails here with its error
            except ray.exceptions.RayActorError:
                ray.kill(actors[i])  # died before it was up: its case is retried when its run() fails

    def take_over(i: int) -> None:
        """Give actor ``i`` (up, idle) the case of an actor that is not up, and end that one."""
        come_up(ray.wait(list(starting), num_returns=len(starting), timeout=0)[0] if starting else [])
        waiting = set(starting.values())
        for ref, (case_id, path, other) in list(running.items()):
            if other in waiting:
                del running[ref]
                forget(other)
                ray.kill(actors[other])
                never.add(other)
                log.info("infer: case %s moved to a Ray actor that is up (its own had not started)", case_id)
                give(i, case_id, path)
                return

    def actor_died(case_id: str, path: Path, i: int, exc: Exception) -> None:
        ray.kill(actors[i])
        forget(i)
        died[case_id] = died.get(case_id, 0) + 1
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if died[case_id] >= 2:
            log.warning("infer: %s: a Ray actor died on it twice; refused (%s)", case_id, reason)
            found[case_id] = cohort.refused(case_id, f"{path}: the Ray actor segmenting it died twice (killed "
                                                     f"for memory, or its node lost?): {reason}")
            bar.update()
        else:
            log.warning("infer: %s: the Ray actor segmenting it died (%s); a new actor tries it again", case_id, reason)
            queue.appendleft((case_id, path))
        if queue:
            give(start(), *queue.popleft())

    try:
        for _ in range(n):  # n <= cases: one each
            give(start(), *queue.popleft())
        waited = 0.0
        while running:
            done, _ = ray.wait(list(running) + list(starting), num_returns=1, timeout=WAIT_LOG_S)
            if not done:
                waited += WAIT_LOG_S
                if len(starting) == len(running):
                    log.warning("infer: waiting %.0f s for the cluster to place %d Ray actor(s) of %s each "
                                "(free now: %s)", waited, len(starting), each, ray.available_resources())
                continue
            if done[0] in starting:
                come_up(done)
                continue
            case_id, path, i = running.pop(done[0])
            try:
                found[case_id] = get_as_local(done[0])
            except ray.exceptions.RayActorError as exc:
                actor_died(case_id, path, i, exc)
                continue
            bar.update()
            if queue:
                give(i, *queue.popleft())
            else:
                take_over(i)
    finally:
        for actor in actors:
            ray.kill(actor)
    never |= set(starting.values())
    if never:
        log.info("infer: %d of %d Ray actors never started (no room on the cluster for %s each); the cases ran "
                 "on the others", len(never), len(actors), each)
    return found
