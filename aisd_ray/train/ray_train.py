"""Ray Train backend: ``TensorflowTrainer`` workers running the shared loop under
MultiWorkerMirroredStrategy, fed from the shards (read directly, or streamed by Ray Data).

Each worker reads its share of every epoch straight from the shards in a (seed, epoch)-keyed
order (``train.reader = "shards"``, see ``data.order``): equal, disjoint shares, the same order
as the local backend, reproducible. With ``train.reader = "ray_data"`` Ray Data streams the
split in equal shares instead (``get_dataset_shard``; block order fixed by train.seed, rows
shuffled per epoch by the worker). Validation must score every slice exactly once, so each
worker reads every world-th validation shard directly.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.tensorflow import TensorflowTrainer

from aisd_ray import storage
from aisd_ray.config import Config, config_from_dict
from aisd_ray.data import order, shards
from aisd_ray.quiet import VERBOSE_ENV
from aisd_ray.train import TrainingFailed
from aisd_ray.train import checkpoint as ckpt
from aisd_ray.train.local import shard_feed

log = logging.getLogger(__name__)
COLUMNS = ["image", "mask", "height", "width", "stored_channels"]


def ensure_ray(num_cpus_wanted: int) -> None:
    """Join the cluster in RAY_ADDRESS (as ``ray job submit`` sets it) or start a local one.

    A local cluster gets spare logical CPUs beyond the training workers so Ray Data's read
    tasks can always be scheduled next to them, and a dashboard (127.0.0.1:8265): besides
    showing the run, its state API is how Ray Train notices a controller that a Tune
    scheduler stopped, and frees that trial's workers for the next one. Its own processes are
    told its address: with other Ray instances on the host, Ray's address auto-detection fails
    there, and a stopped trial's workers would then never be freed.
    """
    if ray.is_initialized():
        return
    if not sys.stderr.isatty():  # Ray's own driver lines carry colour codes even into files and job logs
        for handler in logging.getLogger("ray").handlers:
            handler.addFilter(_strip_colour)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by the local head Ray starts
    env = {"RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}",
           # TensorFlow's C++ start-up chatter: as the CLI set it (-v shows it)
           **{k: os.environ[k] for k in ("TF_CPP_MIN_LOG_LEVEL", VERBOSE_ENV) if k in os.environ}}
    try:
        ray.init(num_cpus=max(num_cpus_wanted, os.cpu_count() or 1), include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=True,
                 runtime_env={"env_vars": env, "worker_process_setup_hook": "aisd_ray.quiet.quiet_worker"})
    finally:
        del os.environ["RAY_GCS_SERVER_PORT"]
    gcs = ray.get_runtime_context().gcs_address
    if not gcs.endswith(f":{port}"):
        raise RuntimeError(f"local Ray started its GCS at {gcs}, not on port {port}")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _strip_colour(record: logging.LogRecord) -> bool:
    record.msg, record.args = _ANSI.sub("", record.getMessage()), ()
    return True


def quiet_ray_data() -> ray.data.DataContext:
    """Ray Data without its progress bars and per-operator progress lines (shown with -v)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    return context


def _parquet_shard_rows(batch: pa.Table) -> pa.Table:
    """The rows of whole Parquet shard files (``read_binary_files`` blocks), parsed in the read task."""
    return pa.concat_tables([pq.read_table(pa.BufferReader(data), columns=COLUMNS)
                             for data in batch.column("bytes").to_pylist()])


def read_split(shards_uri: str, manifest: dict, split: str) -> ray.data.Dataset:
    """A split's rows as a Ray Data dataset, one block per shard file.

    Parquet shards are read as files and parsed in the read tasks: measured on 96 slices at
    512 px (2 shards, 2 cores), Ray Data's own ``read_parquet`` streamed 24..54 rows/s with a first
    batch after 1.8..4 s, files-and-parse 409..433 rows/s with a first batch after 0.2 s."""
    uris = shards.shard_uris(shards_uri, manifest, split)
    fs, _ = storage.resolve(uris[0])
    paths = [storage.resolve(u)[1] for u in uris]
    if manifest["shard_format"] == "parquet":
        return ray.data.read_binary_files(paths, filesystem=fs).map_batches(
            _parquet_shard_rows, batch_size=1, batch_format="pyarrow")
    return ray.data.read_tfrecords(paths, filesystem=fs).select_columns(COLUMNS)


def ray_rows(iterator):
    """(image, mask) byte rows of a Ray Data iterator (a worker's shard or a Dataset), as the input
    pipeline decodes them (``shards.tensor_bytes``)."""
    for batch in iterator.iter_batches(batch_size=32, batch_format="numpy", prefetch_batches=2):
        for i in range(len(batch["image"])):
            yield shards.tensor_bytes({k: (bytes(v[i]) if k in ("image", "mask") else int(v[i]))
                                       for k, v in batch.items()})


class RayReporter:
    def __init__(self, run_uri: str):
        self.run_uri = run_uri

    def resume_checkpoint(self):
        """The run's latest complete checkpoint, not only the latest Ray recorded: a worker killed
        right after uploading one can take the group down before the controller records it, and
        Ray's own ``get_checkpoint()`` would then restart the run from an older one, or from scratch."""
        return ckpt.latest_local(self.run_uri)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report (its whole metrics dict) and every checkpoint at INFO on each
    worker; the loop's own epoch line says it once. Shown again with -v."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # this module's logger is named by its file path, not its dotted name
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def _worker(loop_config: dict) -> None:
    import tensorflow as tf

    from aisd_ray.train.loop import run_training

    package_log = logging.getLogger("aisd_ray")  # Ray workers log at WARNING by default
    package_log.setLevel(logging.DEBUG if loop_config.get("verbose") else logging.INFO)
    package_log.propagate = False  # once, through this handler (Ray's root handler would repeat it)
    if not package_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        package_log.addHandler(handler)
    if not loop_config.get("verbose"):
        _quiet_ray_train_reports()
        tf.get_logger().setLevel(logging.ERROR)  # per-epoch collective notices and eager-collective warnings
    os.environ.update(loop_config["env"])  # where gs:// points, as the driver saw it
    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.train.use_gpu:  # share the host's cores between the workers on it
        threads = max(1, (os.cpu_count() or 1) // ctx.get_local_world_size())
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    feed = shard_feed(cfg, loop_config["shards"], loop_config["manifest"], rank, world)  # read once, by the driver
    if cfg.train.reader == "ray_data":
        train_shard, t = ray.train.get_dataset_shard("train"), cfg.train
        feed.train_rows = lambda epoch: order.shuffled_share(ray_rows(train_shard), t.seed, epoch, rank,
                                                             t.shuffle_buffer)
    run_training(cfg, strategy, feed, RayReporter(loop_config["run"]), loop_config["run"], rank, world)


def train_ray(cfg: Config, store: shards.ShardStore, output_root: str, callbacks: tuple = ()) -> ray.train.Result:
    """Run (or resume: same output root and run name) a distributed training run; ``callbacks``
    are Ray Train callbacks (a Tune trial passes the one that reports each epoch to Tune)."""
    shards_uri, manifest = store.uri, store.manifest
    ensure_ray(cfg.train.num_workers + 2)
    fs, root = storage.resolve(output_root)
    datasets = {}
    if cfg.train.reader == "ray_data":
        context = quiet_ray_data()
        context.execution_options.preserve_order = True  # same rows in the same order for a seed
        train_data = read_split(shards_uri, manifest, "train").randomize_block_order(seed=cfg.train.seed)
        datasets["train"] = train_data.materialize() if cfg.train.cache_train_split else train_data
    trainer = TensorflowTrainer(
        _worker,
        train_loop_config={"config": cfg.to_dict(), "shards": shards_uri, "manifest": manifest,
                           "verbose": log.isEnabledFor(logging.DEBUG),
                           "run": storage.join(output_root, cfg.run.name),
                           "env": _storage_env()},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu),
        datasets=datasets,
        run_config=RunConfig(
            name=cfg.run.name, storage_path=root, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=ckpt.SCORE,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks),
        ),
    )
    try:
        return trainer.fit()
    except ray.train.WorkerGroupError as exc:
        raise _worker_failure(exc, cfg.train.max_failures) from None


def _user_error(cause: BaseException) -> Exception | None:
    """A worker's or task's exception that is one of our one-line errors (a bad shard, storage
    gone, a bad setting, a missing file), rebuilt with its message so the command exits as it
    would locally; None for anything else."""
    from aisd_ray.config import ConfigError
    from aisd_ray.data.layout import DataError

    for kind in (DataError, storage.StorageError, ConfigError, FileNotFoundError):
        if isinstance(cause, kind):
            return kind(str(cause.args[0]) if cause.args else str(cause))
    return None


def _worker_failure(exc: ray.train.WorkerGroupError, max_failures: int) -> Exception:
    """One line for a run that failed on its workers after its retries; an error of ours keeps its
    type (``_user_error``)."""
    rank, first = min(exc.worker_failures.items(), key=lambda item: item[0]) if exc.worker_failures else (0, exc)
    cause = getattr(first, "cause", None) or first  # Ray wraps a worker's exception; this is the original
    ours = _user_error(cause)
    if ours is not None:
        return ours
    text = " ".join((str(cause.args[0]) if cause.args else str(cause)).split())[:300]
    return TrainingFailed(f"training failed: worker {rank}: {type(cause).__name__}: {text} (after "
                          f"{max_failures} restart{'s' if max_failures != 1 else ''}, train.max_failures); rerun the "
                          "same command to resume from the last checkpoint")


def _storage_env() -> dict[str, str]:
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
    try:
        return ray.get(remote.remote(_storage_env(), fn, *args, **kwargs))
    except ray.exceptions.RayTaskError as exc:
        ours = _user_error(exc.cause)
        if ours is not None:
            raise ours from None
        raise

