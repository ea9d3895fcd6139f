"""Ray Train backend: ``TensorflowTrainer`` workers running the shared loop under
MultiWorkerMirroredStrategy, fed from the shards (read directly, or streamed by Ray Data:
``data/ray_data.py``).

Each worker reads its share of every epoch straight from the shards in a (seed, epoch)-keyed
order (``train.reader = "shards"``, see ``data.order``): equal, disjoint shares, the same order
as the local backend, reproducible. With ``train.reader = "ray_data"`` Ray Data streams the
split in equal shares instead (``get_dataset_shard``; shard order fixed by train.seed, rows
shuffled per epoch by the worker, the next epoch read ahead while the loop validates).
Validation must score every slice exactly once, so each worker reads every world-th validation
shard directly.
"""

from __future__ import annotations

import logging
import os

import ray
import ray.data
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.tensorflow import TensorflowTrainer

from aisd_ray.config import Config, config_from_dict
from aisd_ray.core import storage
from aisd_ray.core.quiet import LOG_DATEFMT, LOG_FORMAT
from aisd_ray.data.store import order, shards
from aisd_ray.data.store.feed import shard_feed
from aisd_ray.data.store.ray_data import RayEpochs, train_dataset
from aisd_ray.train import TrainingFailed
from aisd_ray.train import checkpoint as ckpt
from aisd_ray.train.ray_session import ensure_ray, storage_env, user_error

log = logging.getLogger(__name__)


class RayReporter:
    def __init__(self, run_uri: str):
        self.run_uri = run_uri

    def resume(self, model, optimizer):
        """The run's latest complete checkpoint that loads, not only the latest Ray recorded: a
        worker killed right after uploading one can take the group down before the controller
        records it, and Ray's own ``get_checkpoint()`` would then restart the run from an older
        one, or from scratch."""
        return ckpt.restore_latest(self.run_uri, model, optimizer)

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
        handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
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
    epochs, t = None, cfg.train
    if t.reader == "ray_data":  # Ray Data's stream of this worker's share, shuffled by the worker
        epochs = RayEpochs(ray.train.get_dataset_shard("train"))
        reader = lambda epoch: order.shuffled_share(epochs.epoch(), t.seed, epoch, rank, t.shuffle_buffer)  # noqa: E731
    else:
        reader = None  # the shards read directly
    feed = shard_feed(cfg, loop_config["shards"], loop_config["manifest"], rank, world, reader)
    try:
        run_training(cfg, strategy, feed, RayReporter(loop_config["run"]), loop_config["run"], rank, world)
    finally:
        if epochs is not None:
            epochs.close()


def train_ray(cfg: Config, store: shards.ShardStore, output_root: str, run: str,
              callbacks: tuple = ()) -> ray.train.Result:
    """Run (or resume: same output root and run name) a distributed training run into the run
    folder ``run`` (``output_root/run.name``, as the caller computed it); ``callbacks`` are Ray
    Train callbacks (a Tune trial passes the one that reports each epoch to Tune)."""
    shards_uri, manifest = store.uri, store.manifest
    ensure_ray(cfg.train.num_workers + 2)
    fs, root = storage.resolve(output_root)
    datasets = {"train": train_dataset(cfg, shards_uri, manifest)} if cfg.train.reader == "ray_data" else {}
    trainer = TensorflowTrainer(
        _worker,
        train_loop_config={"config": cfg.to_dict(), "shards": shards_uri, "manifest": manifest,
                           "verbose": log.isEnabledFor(logging.DEBUG),
                           "run": run,
                           "env": storage_env()},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     placement_strategy=cfg.train.placement_strategy),
        datasets=datasets,
        run_config=RunConfig(
            name=cfg.run.name, storage_path=root, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=ckpt.RANK,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks),
        ),
    )
    try:
        return trainer.fit()
    except ray.train.WorkerGroupError as exc:
        raise _worker_failure(exc, cfg.train.max_failures) from None


def _worker_failure(exc: ray.train.WorkerGroupError, max_failures: int) -> Exception:
    """One line for a run that failed on its workers after its retries; an error of ours keeps its
    type (``ray_session.user_error``)."""
    rank, first = min(exc.worker_failures.items(), key=lambda item: item[0]) if exc.worker_failures else (0, exc)
    cause = getattr(first, "cause", None) or first  # Ray wraps a worker's exception; this is the original
    ours = user_error(cause)
    if ours is not None:
        return ours
    text = " ".join((str(cause.args[0]) if cause.args else str(cause)).split())[:300]
    return TrainingFailed(f"training failed: worker {rank}: {type(cause).__name__}: {text} (after "
                          f"{max_failures} restart{'s' if max_failures != 1 else ''}, train.max_failures); rerun the "
                          "same command to resume from the last checkpoint")
