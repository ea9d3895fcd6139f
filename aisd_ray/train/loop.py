"""The training loop every backend runs: a custom distributed step under a tf.distribute strategy.

Keras 3 ``model.fit`` fails under MultiWorkerMirroredStrategy with 2+ workers (FACTS
section 7), so the step is ours: ``strategy.run`` per replica, the loss scaled by the
global batch with ``tf.nn.compute_average_loss``, gradients summed across replicas by the
Keras optimizer. Validation counts are all-reduced once per epoch, so every worker sees the
same metrics and takes the same early-stopping decision. No Ray here: a ``Feed`` brings the
rows and a ``Reporter`` receives metrics and checkpoints.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import keras
import numpy as np
import tensorflow as tf

from aisd_ray import metrics, render
from aisd_ray.config import PRECISIONS, Config
from aisd_ray.data import pipeline
from aisd_ray.data.augment import augment_fn
from aisd_ray.losses import get_loss
from aisd_ray.model import build_flexunet
from aisd_ray.progress import progress_bar
from aisd_ray.train import checkpoint as ckpt
from aisd_ray.train.artifacts import Artifacts

log = logging.getLogger(__name__)


@dataclass
class Feed:
    """Where one worker's rows come from."""

    train_rows: Callable[[int], Iterator[tuple[bytes, bytes]]]  # epoch -> this worker's share
    train_count: int  # rows this worker gets per epoch (equal on every worker)
    valid_rows: Callable[[], Iterator[tuple[bytes, bytes]]]  # this worker's share of validation
    preview: list[tuple[str, np.ndarray, np.ndarray]]  # fixed validation images for panels


class Reporter(Protocol):
    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint(self) -> str | None: ...


def set_seed(seed: int, deterministic: bool) -> None:
    """Really set every seed (the seed assigned ``np.random.seed = 137``, which sets nothing)."""
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


def _counts(y_true: tf.Tensor, probs: tf.Tensor) -> tf.Tensor:
    """tp, fp, fn lesion pixels of a batch (lesion = any non-background class)."""
    t = tf.argmax(y_true, axis=-1) > 0
    p = tf.argmax(probs, axis=-1) > 0
    def n(mask):
        return tf.reduce_sum(tf.cast(mask, tf.float64))
    return tf.stack([n(t & p), n(~t & p), n(t & ~p)])


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
        optimizer = keras.optimizers.Adam(learning_rate=t.learning_rate, clipvalue=t.clipvalue)
        if t.mixed_precision == "fp16":  # float16 gradients underflow without loss scaling
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
    state = ckpt.LoopState(learning_rate=t.learning_rate, early_stop=ckpt.Plateau(t.patience),
                           reducer=ckpt.Plateau(t.reducer_patience if t.learning_rate_reducer else 0))
    resume_dir = reporter.latest_checkpoint()
    if resume_dir:
        state = ckpt.restore(resume_dir, model, optimizer)
        optimizer.learning_rate.assign(state.learning_rate)
        log.info("resumed from %s after epoch %d", resume_dir, state.epoch)

    @tf.function(jit_compile=t.jit_compile)
    def gradients(x, y):
        """Forward and backward pass of one replica: the part XLA may compile. The gradient
        all-reduce happens outside it, in the optimizer."""
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            loss = tf.nn.compute_average_loss(loss_fn(y, probs), global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss)  # identity unless fp16 loss scaling is on
        return loss, tape.gradient(scaled, model.trainable_variables), _counts(y, probs)

    @tf.function
    def train_step(x, y):
        def step(x, y):
            loss, grads, counts = gradients(x, y)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss, counts

        loss, counts = strategy.run(step, args=(x, y))
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, counts, axis=None))

    @tf.function
    def eval_step(x, y):
        probs = model(x, training=False)
        loss_sum = tf.reduce_sum(tf.cast(loss_fn(y, probs), tf.float64))
        return loss_sum, tf.reduce_sum(seed_dice(y, probs)), _counts(y, probs)

    augment = augment_fn(cfg.augment, m.image_height, m.image_width) if cfg.augment.enabled else None

    def batches(rows_fn, batch_size, training):
        return pipeline.batches(rows_fn, m.image_channels, m.num_classes, batch_size,
                                shuffle_buffer=t.shuffle_buffer if training else 0,
                                seed=t.seed + state.epoch, drop_remainder=training,
                                augment=augment if training else None,
                                augment_seed=(t.seed + state.epoch) * 1009 + rank)

    artifacts = Artifacts(run_uri) if chief else None
    try:
        while state.epoch < t.epochs and not state.stop_reason:
            epoch = state.epoch + 1
            started = time.time()
            limited = functools.partial(pipeline.take_rows, feed.train_rows(epoch), steps * t.batch_size)
            loss_sum, train_counts, done = 0.0, np.zeros(3), 0
            bar = progress_bar(total=steps, desc=f"epoch {epoch}/{t.epochs}", unit="step", enabled=chief,
                               leave=False)
            waited, fetch_started = 0.0, time.time()
            for x, y in batches(limited, t.batch_size, training=True):
                if done:  # time this step spent waiting for its batch
                    waited += time.time() - fetch_started
                loss, counts = train_step(x, y)
                loss_sum += float(loss)
                train_counts += counts.numpy()
                done += 1
                bar.update()
                bar.set_postfix(loss=f"{loss_sum / done:.4f}")
                fetch_started = time.time()
                if done == 1:  # the first step of a process also traces and compiles: not timed
                    first_step_done = fetch_started
            bar.close()
            train_seconds = time.time() - first_step_done if done > 1 else float("nan")
            if done != steps:
                raise RuntimeError(f"worker {rank} ran {done} of {steps} steps: its data share is short")

            val = np.zeros(6)  # loss sum, seed dice sum, images, tp, fp, fn
            for step, (x, y) in enumerate(batches(feed.valid_rows, cfg.eval.batch_size, training=False)):
                if t.validation_steps and step >= t.validation_steps:  # the seed's cap, per worker
                    break
                loss, seed_sum, counts = eval_step(x, y)
                val += np.concatenate([[loss.numpy(), seed_sum.numpy(), x.shape[0]], counts.numpy()])
            val = _all_reduce_sum(strategy, val)
            spread = _replica_spread(strategy, model, rank, world)
            pooled = metrics.scores_from_counts(*val[3:])
            row = {"epoch": epoch, "loss": loss_sum / steps,
                   "lesion_dice": metrics.scores_from_counts(*train_counts)["dice"],
                   "val_loss": float(val[0] / max(val[2], 1)),
                   **{f"val_lesion_{k}": v for k, v in pooled.items()},
                   "val_dice_coef_multiclass": float(val[1] / max(val[2], 1)),
                   "learning_rate": float(optimizer.learning_rate.numpy()),
                   "replica_weight_spread": spread,
                   "train_images_per_second": (done - 1) * global_batch / train_seconds,
                   "input_wait_fraction": waited / train_seconds,
                   "epoch_seconds": time.time() - started}
            state = _after_epoch(state, row, t, optimizer)
            if chief:
                artifacts.epoch_end(state.history, _panels(model, feed.preview, cfg.data.rgb_map))
                log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
            with tempfile.TemporaryDirectory(prefix="aisd-ckpt-") as tmp:
                if chief:
                    ckpt.save(tmp, model, optimizer, state)
                done_reason = state.stop_reason or (f"reached {t.epochs} epochs" if epoch >= t.epochs else "")
                reporter.report({**row, "stop_reason": done_reason}, tmp if chief else None)
    finally:
        if artifacts:
            artifacts.close()
    return state


def _after_epoch(state: ckpt.LoopState, row: dict, t, optimizer) -> ckpt.LoopState:
    """Best-model bookkeeping, reduce-LR-on-plateau and early stopping on validation loss."""
    state.epoch = int(row["epoch"])
    state.history.append(row)
    score = row["val_lesion_dice"]
    if not math.isnan(score) and score > state.best_score:
        state.best_score, state.best_epoch = score, state.epoch
    if state.reducer.update(row["val_loss"]):
        new_lr = max(state.learning_rate * t.reducer_factor, t.min_learning_rate)
        log.info("val_loss has not improved for %d epochs: learning rate %.3g -> %.3g",
                 t.reducer_patience, state.learning_rate, new_lr)
        state.learning_rate = new_lr
        optimizer.learning_rate.assign(new_lr)
    if state.early_stop.update(row["val_loss"]):  # final: a rerun with more epochs stays stopped
        state.stop_reason = f"early stop: val_loss did not improve for {t.patience} epochs"
    return state


def _panels(model: keras.Model, preview, rgb_map) -> list[tuple[str, tuple[np.ndarray, ...]]]:
    """(image | truth | prediction) of the fixed preview images; a plain forward pass on the
    chief alone (Keras ``predict`` would start a collective the other workers never join)."""
    if not preview:
        return []
    images = np.stack([image for _, image, _ in preview]).astype(np.float32)
    predicted = np.argmax(model(images, training=False), axis=-1)

    def colour(labels):
        return np.asarray(render.palette_png(labels, rgb_map).convert("RGB"))

    return [(name, (image, colour(labels), colour(pred)))
            for (name, image, labels), pred in zip(preview, predicted)]
