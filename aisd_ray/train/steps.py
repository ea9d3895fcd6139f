"""The compiled steps of the training loop, built once per run: a distributed train step that
accumulates the epoch's loss and lesion counts on the device, and an eval step.

Keras 3 ``model.fit`` fails under MultiWorkerMirroredStrategy with 2+ workers, so the step is ours:
``strategy.run`` per replica, the loss scaled by the global batch with
``tf.nn.compute_average_loss``, the replicas' gradients all-reduced in the step, then clipped and
applied by the optimizer (``optim.GlobalGradientAdam``): one update, the same at any worker count.
The benchmark's bare step times this same factory's train step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import keras
import tensorflow as tf


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


def count_length(num_classes: int) -> int:
    """Length of ``_counts``' vector: lesion tp, fp, fn, and each class's with more than one."""
    return 3 * num_classes if num_classes > 2 else 3


@dataclass
class Steps:
    """``train_step(x, y, learning_rate)``: one synchronous update, adding (loss sum, counts) to
    ``totals`` on the device; ``eval_step(x, y)`` -> (loss sum, seed-Dice sum, counts) of a batch;
    ``totals``: float64 (1 + ``count_length``), reset by the caller each epoch."""

    train_step: Callable
    eval_step: Callable
    totals: tf.Variable

    def reset(self) -> None:
        self.totals.assign(tf.zeros(self.totals.shape, tf.float64))


def compile_steps(model: keras.Model, optimizer, strategy: tf.distribute.Strategy, loss_fn, global_batch: int,
                  num_classes: int, jit_compile: bool) -> Steps:
    """The train and eval steps of ``model`` under ``strategy`` (see the module docstring)."""

    def forward_backward(x, y):
        """Forward and backward pass of one replica: the part XLA may compile."""
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            loss = tf.nn.compute_average_loss(loss_fn(y, probs), global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss)  # identity unless fp16 loss scaling is on
        return loss, tape.gradient(scaled, model.trainable_variables), _counts(y, probs, num_classes)

    # A nested tf.function only for XLA: synchronised BatchNorm's all-reduce must be traced in the
    # step itself (MultiWorkerMirroredStrategy refuses a collective inside a nested function).
    gradients = tf.function(forward_backward, jit_compile=True) if jit_compile else forward_backward

    # The epoch's training loss sum and lesion (and per-class) tp, fp, fn, accumulated on the device
    # by the step and read by the host once per epoch (and at most once a second for the progress
    # line): no per-step device-to-host copy holds up the next step.
    totals = tf.Variable(tf.zeros(1 + count_length(num_classes), tf.float64), trainable=False, name="epoch_totals")

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
        return loss_sum, tf.reduce_sum(seed_dice(y, probs)), _counts(y, probs, num_classes)

    return Steps(train_step, eval_step, totals)
