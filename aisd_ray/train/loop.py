"""The training loop every backend runs, read as its steps: ``build`` (model, optimizer, resume),
``compile_steps`` (the distributed step, ``steps.py``), ``train_epoch``, ``validate``, the epoch
policy (``policy.py``), then artifacts and the checkpoint report.

Keras 3 ``model.fit`` fails under MultiWorkerMirroredStrategy with 2+ workers, so the step is ours
(``steps.py``). BatchNormalization is synchronised across replicas. Validation counts are all-reduced once per
epoch, so every worker sees the same metrics and takes the same decisions (early stopping,
the divergence guard).

Every random stream is a function of (train.seed, epoch, rank): the data order (see
``data.order``), augmentation and dropout are re-keyed at the start of each epoch, so a run
resumed from an epoch's checkpoint continues exactly as the uninterrupted run would. No Ray
here: a ``Feed`` brings the rows and a ``Reporter`` receives metrics and checkpoints.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Protocol

import keras
import numpy as np
import tensorflow as tf

from aisd_ray.config import PRECISIONS, Config
from aisd_ray.core.progress import progress_bar
from aisd_ray.data.store import order, pipeline
from aisd_ray.data.store.augment import augment_fn
from aisd_ray.data.store.feed import Feed
from aisd_ray.model.flexunet import build_flexunet
from aisd_ray.model.losses import get_loss
from aisd_ray.scoring import metrics
from aisd_ray.train import checkpoint as ckpt
from aisd_ray.train import optim
from aisd_ray.train.artifacts import Artifacts
from aisd_ray.train.epoch_log import EpochLog
from aisd_ray.train.policy import (  # noqa: F401 (tests reach them here too)
    _after_epoch,
    _all_finite,
    _divergence,
    _on_divergence,
    _Snapshot,
    epoch_line,
)
from aisd_ray.train.steps import Steps, _counts, compile_steps, count_length, seed_dice  # noqa: F401

log = logging.getLogger(__name__)


class Reporter(Protocol):
    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...

    def resume(self, model: keras.Model, optimizer) -> tuple[str, ckpt.LoopState, list[str]] | None:
        """Restore the latest checkpoint that loads: (its uri, its state, why later ones were
        skipped), or None to start afresh (see ``checkpoint.restore_latest``)."""


def set_seed(seed: int, deterministic: bool) -> None:
    """Really set every seed (the original assigned ``np.random.seed = 137``, which sets nothing)."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    else:  # the switch is process-wide: undo an earlier run's choice (TF has no public disable)
        from tensorflow.python.framework import config as tf_config

        tf_config.disable_op_determinism()


def _all_reduce_sum(strategy: tf.distribute.Strategy, values: np.ndarray) -> np.ndarray:
    """Sum a vector across all workers (a single collective, the same on every worker)."""
    tensor = tf.constant(values, tf.float64)
    per_replica = strategy.run(lambda: tf.identity(tensor))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()


def _replica_spread(strategy: tf.distribute.Strategy, model: keras.Model, rank: int, world: int) -> float:
    """Largest difference between the workers' weight checksums: 0.0 when the all-reduce kept
    every replica identical, as synchronous data parallelism must."""
    checksum = sum(float(np.sum(np.asarray(w, np.float64))) for w in model.get_weights())
    slots = np.zeros(world)
    slots[rank] = checksum
    gathered = _all_reduce_sum(strategy, slots)
    return float(gathered.max() - gathered.min())


def _class_scores(train_counts: np.ndarray, val_counts: np.ndarray, names: list[str]) -> dict[str, float]:
    """The row's per-class figures from ``_counts``' summed vectors (with one foreground class its
    counts are the lesion's) and ``ckpt.SCORE``, ``metrics.selection_score`` of the val Dice."""
    train_classes, val_classes = ((c[3:] if len(c) > 3 else c[:3]).reshape(-1, 3) for c in (train_counts, val_counts))
    val_dice = [metrics.scores_from_counts(*c)["dice"] for c in val_classes]
    return {**metrics.class_figures(train_classes, val_classes, names), ckpt.SCORE: metrics.selection_score(val_dice)}


def _key_dropout(model: keras.Model, seed: int, epoch: int, rank: int) -> None:
    """Give every dropout layer a stream keyed by (seed, epoch, rank, layer): masks differ between
    workers and repeat exactly on a resumed run."""
    generators = [layer.seed_generator for layer in model.layers if hasattr(layer, "seed_generator")]
    for i, generator in enumerate(generators):
        key = int(order.rng(seed, epoch, rank, order.Salt.DROPOUT, i).integers(2**31))
        generator.state.assign(np.array([key, 0], dtype=generator.state.dtype))


@dataclass
class EpochTotals:
    """What one epoch's training pass leaves: the loss sum, the summed ``_counts``, the steps run,
    and its timing (seconds waiting for batches, seconds after the first step)."""

    loss_sum: float
    counts: np.ndarray
    done: int
    waited: float
    train_seconds: float


def build(cfg: Config, strategy: tf.distribute.Strategy, reporter: Reporter, chief: bool):
    """The model and optimizer under ``strategy``, and the loop state: resumed from the run's
    latest loadable checkpoint where there is one (``reporter.resume``), else fresh."""
    t, m = cfg.train, cfg.model
    with strategy.scope():
        model = build_flexunet(m, dtype=PRECISIONS[t.mixed_precision])
        optimizer = optim.build_optimizer(t)
        optimizer.build(model.trainable_variables)
    state = ckpt.LoopState(learning_rate=t.learning_rate, early_stop=ckpt.Plateau(t.patience),
                           reducer=ckpt.Plateau(t.reducer_patience if t.learning_rate_reducer else 0))
    resumed = reporter.resume(model, optimizer)
    if resumed:
        resume_uri, state, skipped = resumed
        state.resumes.append(state.epoch)
        if chief:
            for why in skipped:
                log.warning("%s; resuming from %s (epoch %d) instead", why, resume_uri, state.epoch)
            log.info("resumed from %s after epoch %d", resume_uri, state.epoch)
    return model, optimizer, state


def train_epoch(cfg: Config, steps: Steps, batches, rows, state: ckpt.LoopState, epoch: int, n_steps: int,
                chief: bool, lr_dtype) -> EpochTotals:
    """One pass over this worker's ``rows``: ``n_steps`` train steps at the scheduled learning rate,
    a progress bar on a terminal (or a line every ``train.log_every_seconds``), one device read."""
    t = cfg.train
    started = time.time()
    steps.reset()
    done = 0
    bar = progress_bar(total=n_steps, desc=f"epoch {epoch}/{t.epochs}", unit="step", enabled=chief, leave=False)
    # no bar where output is not a terminal: a line every log_every_seconds instead
    quiet_bar = chief and bar.disable and t.log_every_seconds > 0
    last_line = last_postfix = time.time()
    waited, fetch_started = 0.0, time.time()
    for x, y in batches(lambda: rows, t.batch_size, training=True, epoch=epoch):
        if done:  # time this step spent waiting for its batch
            waited += time.time() - fetch_started
        state.learning_rate = optim.learning_rate(t, (epoch - 1) * n_steps + done, n_steps, state.lr_scale)
        steps.train_step(x, y, tf.constant(state.learning_rate, lr_dtype))
        done += 1
        bar.update()
        now = time.time()
        if not bar.disable and now - last_postfix >= 1.0:  # reads the device: at most 1/s
            last_postfix = now
            bar.set_postfix(loss=f"{float(steps.totals[0]) / done:.4f}")
        if quiet_bar and now - last_line >= t.log_every_seconds and done < n_steps:
            last_line = now
            log.info("epoch %d/%d: step %d/%d, loss %.4f, %.2f steps/s", epoch, t.epochs, done, n_steps,
                     float(steps.totals[0]) / done, done / max(now - started, 1e-9))
        if done == 1:  # the first step of a process also traces and compiles: not timed
            steps.totals.numpy()  # wait for it (a GPU runs ahead of the host)
            first_step_done = time.time()
        fetch_started = time.time()
    bar.close()
    epoch_totals = steps.totals.numpy()  # the one read per epoch; waits for the last step
    train_seconds = time.time() - first_step_done if done > 1 else float("nan")
    return EpochTotals(float(epoch_totals[0]), epoch_totals[1:], done, waited, train_seconds)


def validate(cfg: Config, steps: Steps, batches, feed: Feed, strategy: tf.distribute.Strategy) -> np.ndarray:
    """(loss sum, seed-Dice sum, images, ``_counts``...) over the whole validation split: this
    worker's share (at most ``train.validation_steps`` batches), summed across workers."""
    t = cfg.train
    val = np.zeros(3 + count_length(cfg.model.num_classes))
    for step, (x, y) in enumerate(batches(feed.valid_rows, cfg.eval.batch_size, training=False)):
        if t.validation_steps and step >= t.validation_steps:  # the original's cap, per worker
            break
        loss, seed_sum, counts = steps.eval_step(x, y)
        val += np.concatenate([[loss.numpy(), seed_sum.numpy(), x.shape[0]], counts.numpy()])
    return _all_reduce_sum(strategy, val)


def epoch_row(epoch: int, trained: EpochTotals, val: np.ndarray, n_steps: int, global_batch: int,
              state: ckpt.LoopState, spread: float, finite: bool, started: float, foreground) -> dict[str, float]:
    """The epoch's history row: training and validation figures, per class, timing, health."""
    pooled = metrics.scores_from_counts(*val[3:6])
    return {"epoch": epoch, "loss": trained.loss_sum / n_steps,
            "lesion_dice": metrics.scores_from_counts(*trained.counts[:3])["dice"],
            "val_loss": float(val[0] / max(val[2], 1)),
            **{f"val_lesion_{k}": v for k, v in pooled.items()},
            "val_dice_coef_multiclass": float(val[1] / max(val[2], 1)),
            **_class_scores(trained.counts, val[3:], foreground),
            "learning_rate": state.learning_rate,
            "replica_weight_spread": spread,
            "train_images_per_second": (trained.done - 1) * global_batch / trained.train_seconds,
            "input_wait_fraction": trained.waited / trained.train_seconds,
            "epoch_seconds": time.time() - started,
            ckpt.FINITE: float(finite)}


def run_training(cfg: Config, strategy: tf.distribute.Strategy, feed: Feed, reporter: Reporter,
                 run_uri: str, rank: int, world: int) -> ckpt.LoopState:
    """Train until ``train.epochs`` or early stopping; return the final loop state. Each epoch:
    train (``train_epoch``), validate (``validate``), the epoch policy (``policy``: divergence guard,
    rollback, best epoch, early stop, reducer), artifacts and the checkpoint report."""
    t, m = cfg.train, cfg.model
    chief = rank == 0
    if t.deterministic and t.jit_compile:
        log.warning("train.jit_compile: XLA has no deterministic kernels for every op (MaxPool "
                    "gradients); running without TF op determinism")
    set_seed(t.seed, t.deterministic and not t.jit_compile)
    global_batch = t.batch_size * world
    n_steps = feed.train_count // t.batch_size
    if t.steps_per_epoch:
        n_steps = min(n_steps, t.steps_per_epoch)
    if n_steps < 1:
        raise ValueError(f"{feed.train_count} training rows per worker cannot fill one batch of "
                         f"{t.batch_size}; lower train.batch_size or train.num_workers")
    loss_fn = get_loss(t.loss)
    model, optimizer, state = build(cfg, strategy, reporter, chief)
    best = _Snapshot(model, optimizer, state.epoch)  # rollback point until an epoch scores better
    steps = compile_steps(model, optimizer, strategy, loss_fn, global_batch, m.num_classes, t.jit_compile)
    foreground = metrics.foreground_names(cfg.data.class_names, m.num_classes)
    lr_dtype = optimizer.learning_rate.dtype
    augment = augment_fn(cfg.augment, m.image_height, m.image_width) if cfg.augment.enabled else None
    guard = pipeline.InputGuard()  # a shard's own error, not TensorFlow's wrapping of it

    def batches(rows_fn, batch_size, training, epoch=0):
        return pipeline.batches(guard.wrap(rows_fn), m.image_channels, m.num_classes, batch_size,
                                drop_remainder=training, augment=augment if training else None,
                                encoding=feed.row_encoding, height=m.image_height, width=m.image_width,
                                augment_seed=int(order.rng(t.seed, epoch, rank, order.Salt.AUGMENT).integers(2**31)))

    artifacts = Artifacts(run_uri, foreground) if chief else None
    tracker = EpochLog.for_run(cfg, run_uri) if chief else None  # None unless run.mlflow_tracking_uri
    try:
        while state.epoch < t.epochs and not state.stop_reason:
            epoch = state.epoch + 1
            started = time.time()
            _key_dropout(model, t.seed, epoch, rank)
            rows = pipeline.take_rows(feed.train_rows(epoch), n_steps * t.batch_size)
            trained = train_epoch(cfg, steps, batches, rows, state, epoch, n_steps, chief, lr_dtype)
            if trained.done != n_steps:
                raise RuntimeError(f"worker {rank} ran {trained.done} of {n_steps} steps: its data share is short")
            val = validate(cfg, steps, batches, feed, strategy)
            spread = _replica_spread(strategy, model, rank, world)
            row = epoch_row(epoch, trained, val, n_steps, global_batch, state, spread,
                            _all_finite(model, optimizer), started, foreground)
            trouble = _divergence(state, row, trained.counts[:3], val[3:6], t)
            state = _after_epoch(state, row, t)
            if trouble:
                _on_divergence(state, trouble, best, model, optimizer, t)
            elif state.best_epoch == epoch:
                best = _Snapshot(model, optimizer, epoch)
            row["rollbacks"] = state.rollbacks
            if chief:
                artifacts.epoch_end(state.history, _panels(model, feed.preview))
                log.info("%s", epoch_line(row, state, t.epochs, foreground))
            with tempfile.TemporaryDirectory(prefix="aisd-ckpt-") as tmp:
                if chief:
                    ckpt.save(tmp, model, optimizer, state)
                done_reason = state.stop_reason or (f"reached {t.epochs} epochs" if epoch >= t.epochs else "")
                reporter.report({**row, "stop_reason": done_reason, ckpt.RANK: ckpt.rank(state)},
                                tmp if chief else None)
            if tracker:  # once its checkpoint is reported: a resumed run sends each epoch once
                tracker.log(row)
    except BaseException as exc:
        if artifacts:
            artifacts.close(strict=False)  # the error already on its way is the one to report
        if tracker:
            tracker.close(timeout=5)
        if isinstance(exc, tf.errors.OpError):
            guard.reraise()
        raise
    if artifacts:
        artifacts.close()
    if tracker:
        tracker.close()
    return state


def _panels(model: keras.Model, preview) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, image, truth, prediction) of the fixed preview images; a plain forward pass on the
    chief alone (Keras ``predict`` would start a collective the other workers never join)."""
    if not preview:
        return []
    images = np.stack([image for _, image, _ in preview]).astype(np.float32)
    predicted = np.argmax(model(images, training=False), axis=-1)
    return [(name, image, labels, pred) for (name, image, labels), pred in zip(preview, predicted)]
