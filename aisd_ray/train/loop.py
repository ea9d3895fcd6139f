"""The training loop every backend runs: a custom distributed step under a tf.distribute strategy.

Keras 3 ``model.fit`` fails under MultiWorkerMirroredStrategy with 2+ workers, so the step
is ours: ``strategy.run`` per replica, the loss scaled by the global batch with
``tf.nn.compute_average_loss``, the replicas' gradients all-reduced by the step, then clipped
and applied by the optimizer (see ``optim``): one update, the same at any worker count.
BatchNormalization is synchronised across replicas. Validation counts are all-reduced once per
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
from typing import Callable, Iterator, Protocol

import keras
import numpy as np
import tensorflow as tf

from aisd_ray import metrics
from aisd_ray.config import PRECISIONS, Config
from aisd_ray.data import order, pipeline
from aisd_ray.data.augment import augment_fn
from aisd_ray.losses import get_loss
from aisd_ray.model import build_flexunet
from aisd_ray.progress import progress_bar
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

log = logging.getLogger(__name__)


@dataclass
class Feed:
    """Where one worker's rows come from."""

    train_rows: Callable[[int], Iterator[tuple[bytes, bytes]]]  # epoch -> this worker's share, shuffled
    train_count: int  # rows this worker gets per epoch (equal on every worker)
    valid_rows: Callable[[], Iterator[tuple[bytes, bytes]]]  # this worker's share of validation
    preview: list[tuple[str, np.ndarray, np.ndarray]]  # fixed validation images for panels
    row_encoding: str = "png"  # the store's (manifest's): how the rows hold their pixels


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


def seed_dice(y_true: tf.Tensor, probs: tf.Tensor) -> tf.Tensor:
    """Per-image ``dice_coef_multiclass`` (see ``metrics``), in TF for the eval step."""
    axes = [1, 2, 3]
    inter = tf.reduce_sum(y_true * probs, axes)
    total = tf.reduce_sum(y_true, axes) + tf.reduce_sum(probs, axes)
    return tf.cast((2 * inter + 1) / (total + 1), tf.float64)


def _counts(y_true: tf.Tensor, probs: tf.Tensor, num_classes: int = 2) -> tf.Tensor:
    """tp, fp, fn lesion pixels of a batch (lesion = any non-background class), float64; with
    several foreground classes (``num_classes`` > 2), then tp, fp, fn of each class 1..num_classes-1:
    shape (3,), or (3 * num_classes,)."""
    t_labels, p_labels = tf.argmax(y_true, axis=-1), tf.argmax(probs, axis=-1)
    def n(mask):
        return tf.reduce_sum(tf.cast(mask, tf.float64))
    def tp_fp_fn(t, p):
        return [n(t & p), n(~t & p), n(t & ~p)]
    counts = tp_fp_fn(t_labels > 0, p_labels > 0)
    if num_classes > 2:
        for k in range(1, num_classes):
            counts += tp_fp_fn(tf.equal(t_labels, k), tf.equal(p_labels, k))
    return tf.stack(counts)


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


def run_training(cfg: Config, strategy: tf.distribute.Strategy, feed: Feed, reporter: Reporter,
                 run_uri: str, rank: int, world: int) -> ckpt.LoopState:
    """Train until ``train.epochs`` or early stopping; return the final loop state."""
    t, m = cfg.train, cfg.model
    chief = rank == 0
    if t.deterministic and t.jit_compile:
        log.warning("train.jit_compile: XLA has no deterministic kernels for every op (MaxPool "
                    "gradients); running without TF op determinism")
    set_seed(t.seed, t.deterministic and not t.jit_compile)
    global_batch = t.batch_size * world
    steps = feed.train_count // t.batch_size
    if t.steps_per_epoch:
        steps = min(steps, t.steps_per_epoch)
    if steps < 1:
        raise ValueError(f"{feed.train_count} training rows per worker cannot fill one batch of "
                         f"{t.batch_size}; lower train.batch_size or train.num_workers")
    loss_fn = get_loss(t.loss)

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
    best = _Snapshot(model, optimizer, state.epoch)  # rollback point until an epoch scores better

    def forward_backward(x, y):
        """Forward and backward pass of one replica: the part XLA may compile."""
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            loss = tf.nn.compute_average_loss(loss_fn(y, probs), global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss)  # identity unless fp16 loss scaling is on
        return loss, tape.gradient(scaled, model.trainable_variables), _counts(y, probs, m.num_classes)

    # A nested tf.function only for XLA: synchronised BatchNorm's all-reduce must be traced in the
    # step itself (MultiWorkerMirroredStrategy refuses a collective inside a nested function).
    gradients = tf.function(forward_backward, jit_compile=True) if t.jit_compile else forward_backward

    # The epoch's training loss sum and lesion (and per-class) tp, fp, fn, accumulated on the device
    # by the step and read by the host once per epoch (and at most once a second for the progress
    # line): no per-step device-to-host copy holds up the next step.
    n_counts = 3 * m.num_classes if m.num_classes > 2 else 3  # _counts' length
    n_totals = 1 + n_counts
    foreground = metrics.foreground_names(cfg.data.class_names, m.num_classes)
    totals = tf.Variable(tf.zeros(n_totals, tf.float64), trainable=False, name="epoch_totals")
    lr_dtype = optimizer.learning_rate.dtype

    @tf.function
    def train_step(x, y, learning_rate):
        def step(x, y):
            loss, grads, counts = gradients(x, y)
            # The global gradient first: the optimizer clips and applies it (optim.GlobalGradientAdam).
            grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss, counts

        optimizer.learning_rate.assign(learning_rate)
        loss, counts = strategy.run(step, args=(x, y))
        loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        counts = strategy.reduce(tf.distribute.ReduceOp.SUM, counts, axis=None)
        totals.assign_add(tf.concat([tf.cast(loss, tf.float64)[None], counts], axis=0))

    @tf.function
    def eval_step(x, y):
        probs = model(x, training=False)
        loss_sum = tf.reduce_sum(tf.cast(loss_fn(y, probs), tf.float64))
        return loss_sum, tf.reduce_sum(seed_dice(y, probs)), _counts(y, probs, m.num_classes)

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
            rows = pipeline.take_rows(feed.train_rows(epoch), steps * t.batch_size)
            totals.assign(tf.zeros(n_totals, tf.float64))
            done = 0
            bar = progress_bar(total=steps, desc=f"epoch {epoch}/{t.epochs}", unit="step", enabled=chief,
                               leave=False)
            # no bar where output is not a terminal: a line every log_every_seconds instead
            quiet_bar = chief and bar.disable and t.log_every_seconds > 0
            last_line = last_postfix = time.time()
            waited, fetch_started = 0.0, time.time()
            for x, y in batches(lambda: rows, t.batch_size, training=True, epoch=epoch):  # noqa: B023
                if done:  # time this step spent waiting for its batch
                    waited += time.time() - fetch_started
                state.learning_rate = optim.learning_rate(t, (epoch - 1) * steps + done, steps, state.lr_scale)
                train_step(x, y, tf.constant(state.learning_rate, lr_dtype))
                done += 1
                bar.update()
                now = time.time()
                if not bar.disable and now - last_postfix >= 1.0:  # reads the device: at most 1/s
                    last_postfix = now
                    bar.set_postfix(loss=f"{float(totals[0]) / done:.4f}")
                if quiet_bar and now - last_line >= t.log_every_seconds and done < steps:
                    last_line = now
                    log.info("epoch %d/%d: step %d/%d, loss %.4f, %.2f steps/s", epoch, t.epochs, done, steps,
                             float(totals[0]) / done, done / max(now - started, 1e-9))
                if done == 1:  # the first step of a process also traces and compiles: not timed
                    totals.numpy()  # wait for it (a GPU runs ahead of the host)
                    first_step_done = time.time()
                fetch_started = time.time()
            bar.close()
            epoch_totals = totals.numpy()  # the one read per epoch; waits for the last step
            train_seconds = time.time() - first_step_done if done > 1 else float("nan")
            loss_sum, train_counts = float(epoch_totals[0]), epoch_totals[1:]
            if done != steps:
                raise RuntimeError(f"worker {rank} ran {done} of {steps} steps: its data share is short")

            val = np.zeros(3 + n_counts)  # loss sum, seed dice sum, images, _counts
            for step, (x, y) in enumerate(batches(feed.valid_rows, cfg.eval.batch_size, training=False)):
                if t.validation_steps and step >= t.validation_steps:  # the original's cap, per worker
                    break
                loss, seed_sum, counts = eval_step(x, y)
                val += np.concatenate([[loss.numpy(), seed_sum.numpy(), x.shape[0]], counts.numpy()])
            val = _all_reduce_sum(strategy, val)
            spread = _replica_spread(strategy, model, rank, world)
            pooled = metrics.scores_from_counts(*val[3:6])
            per_class = _class_scores(train_counts, val[3:], foreground)
            row = {"epoch": epoch, "loss": loss_sum / steps,
                   "lesion_dice": metrics.scores_from_counts(*train_counts[:3])["dice"],
                   "val_loss": float(val[0] / max(val[2], 1)),
                   **{f"val_lesion_{k}": v for k, v in pooled.items()},
                   "val_dice_coef_multiclass": float(val[1] / max(val[2], 1)),
                   **per_class,
                   "learning_rate": state.learning_rate,
                   "replica_weight_spread": spread,
                   "train_images_per_second": (done - 1) * global_batch / train_seconds,
                   "input_wait_fraction": waited / train_seconds,
                   "epoch_seconds": time.time() - started,
                   ckpt.FINITE: float(_all_finite(model, optimizer))}
            trouble = _divergence(state, row, train_counts[:3], val[3:6], t)
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
