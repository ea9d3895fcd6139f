"""Which Ray a command runs on: the cluster in RAY_ADDRESS (``ray job submit`` sets it) or a Ray
started on this machine alone, what a cluster of more than one node requires of storage, and
running one function as a Ray task on a training node (``run_on_worker``: evaluate, infer).

Imports Ray but not TensorFlow: ``stages`` checks storage before any training code loads.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from typing import Any

import ray

from aisd_ray.config import Config
from aisd_ray.core import storage
from aisd_ray.core.quiet import VERBOSE_ENV

# Ray Train's preemption watcher (an extra actor per run that turns a node drain notice into an
# early checkpoint) has nothing to watch on one machine; there a two-worker tiny `train` took 65 s
# with it and 48 s without (2 cores, Nov 2026). A local Ray started here turns it off unless the
# environment says otherwise; on a cluster (RAY_ADDRESS) Ray's default stands.
LOCAL_ONLY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def local_ray_env() -> dict[str, str]:
    """Environment for the processes of a Ray instance started on this machine alone:
    ``LOCAL_ONLY_ENV``, each value overridden by the caller's environment when set there."""
    return {key: os.environ.get(key, value) for key, value in LOCAL_ONLY_ENV.items()}


def ensure_ray(num_cpus_wanted: int) -> None:
    """Join the cluster in RAY_ADDRESS (as ``ray job submit`` sets it) or start a local one
    (``start_local_ray``) with spare logical CPUs beyond the training workers, so Ray Data's read
    tasks can always be scheduled next to them."""
    if ray.is_initialized():
        return
    if not sys.stderr.isatty():  # Ray's own driver lines carry colour codes even into files and job logs
        for handler in logging.getLogger("ray").handlers:
            handler.addFilter(_strip_colour)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    start_local_ray(max(num_cpus_wanted, os.cpu_count() or 1))


def start_local_ray(num_cpus: int, log_to_driver: bool = True) -> None:
    """Start a Ray instance on this machine alone and connect to it, with a dashboard
    (127.0.0.1:8265 or the next free port): besides showing the run, its state API is how Ray
    Train notices a controller that a Tune scheduler stopped, and frees that trial's workers for
    the next one. Its own processes are told its address (RAY_ADDRESS): with other Ray instances
    on the host, Ray's address auto-detection (the last-started cluster's file in /tmp/ray) would
    find another cluster, and a stopped trial's workers would then never be freed. They also get
    ``local_ray_env()`` and the quiet TensorFlow import (``quiet.quiet_worker``). RuntimeError if
    the GCS did not start on the port chosen for it."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by the local head Ray starts
    env = {"RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}", **local_ray_env(),
           # TensorFlow's C++ start-up chatter: as the CLI set it (-v shows it)
           **{k: os.environ[k] for k in ("TF_CPP_MIN_LOG_LEVEL", VERBOSE_ENV) if k in os.environ}}
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=log_to_driver,
                 runtime_env={"env_vars": env, "worker_process_setup_hook": "aisd_ray.core.quiet.quiet_worker"})
    finally:
        del os.environ["RAY_GCS_SERVER_PORT"]
    gcs = ray.get_runtime_context().gcs_address
    if not gcs.endswith(f":{port}"):
        raise RuntimeError(f"local Ray started its GCS at {gcs}, not on port {port}")


def require_shared_storage(cfg: Config, paths: dict[str, str]) -> None:
    """Refuse a local path (``paths``: what it is -> path or URI) on a Ray cluster of more than
    one alive node, before anything is written: every node would read and write its own disk (the
    driver's config and history on one, checkpoints and shards on others), and a run resumed on
    another node would not find them. gs:// passes; so does a local path when the config declares
    it mounted on every node (``run.shared_filesystem``, ``--shared-fs``). Connects to (or
    starts) Ray first. StorageError naming the first local path."""
    local = [(what, uri) for what, uri in paths.items() if uri and storage.is_local(uri)]
    if not local or cfg.run.shared_filesystem:
        return
    ensure_ray(cfg.train.num_workers + 2)
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes > 1:
        what, uri = local[0]
        raise storage.StorageError(
            f"{uri}: {what} is a local path, and this Ray cluster has {nodes} nodes, each with its own disk; "
            "use gs://BUCKET/PREFIX, or a folder mounted at this path on every node (NFS) declared with "
            "run.shared_filesystem = true (--shared-fs)")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _strip_colour(record: logging.LogRecord) -> bool:
    record.msg, record.args = _ANSI.sub("", record.getMessage()), ()
    return True


def user_error(cause: BaseException) -> Exception | None:
    """A worker's or task's exception that is one of our one-line errors (a bad shard, storage
    gone, a bad setting, a missing file), rebuilt with its message so the command exits as it
    would locally; None for anything else."""
    from aisd_ray.config import ConfigError
    from aisd_ray.data.sources.layout import DataError

    for kind in (DataError, storage.StorageError, ConfigError, FileNotFoundError):
        if isinstance(cause, kind):
            return kind(str(cause.args[0]) if cause.args else str(cause))
    return None


def storage_env() -> dict[str, str]:
    """Where gs:// points, as the driver sees it: for workers and tasks."""
    return {k: os.environ[k] for k in storage.GCS_ENV if k in os.environ}


def _task(env: dict[str, str], fn, *args, **kwargs):
    os.environ.update(env)  # where gs:// points, as the driver saw it
    logging.getLogger("aisd_ray").setLevel(logging.INFO)
    return fn(*args, **kwargs)


def run_on_worker(cfg: Config, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` as a Ray task on a training node (a GPU one when train.use_gpu), not
    in the driver: on a cluster the driver runs on the CPU-only head. Paths must be absolute or
    gs:// (the task runs in another directory, maybe on another machine)."""
    ensure_ray(cfg.train.num_workers + 2)
    remote = ray.remote(num_cpus=1, num_gpus=1 if cfg.train.use_gpu else 0, max_retries=1)(_task)
    return get_as_local(remote.remote(storage_env(), fn, *args, **kwargs))


def get_as_local(ref) -> Any:
    """``ray.get(ref)``, with a task's user error (``user_error``: a bad file, storage gone, a bad
    setting) raised as it would be in this process, one line; anything else as Ray raises it."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        ours = user_error(exc.cause)
        if ours is not None:
            raise ours from None
        raise
