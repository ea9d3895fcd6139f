"""The optimiser and the learning-rate schedule of the training loop.

The step all-reduces the replicas' gradients itself and hands the optimiser the global
gradient; the optimiser then clips it (by value or global norm) and applies it. So the update
is the one a single worker would make on the global batch, at any worker count, and an fp16
loss-scale optimiser decides on finiteness from the same global gradient on every worker.
"""

from __future__ import annotations

import math

import keras

from aisd_ray.config import TrainConfig


class GlobalGradientAdam(keras.optimizers.Adam):
    """Adam that applies gradients the caller has already all-reduced across replicas.

    Keras' TensorFlow optimiser sums gradients across replicas after clipping them, i.e. it
    clips each worker's local gradient; here that sum is done before, by the training step.
    """

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


def build_optimizer(t: TrainConfig) -> keras.optimizers.Optimizer:
    optimizer = GlobalGradientAdam(learning_rate=t.learning_rate, epsilon=t.adam_epsilon,
                                   clipvalue=t.clipvalue or None, global_clipnorm=t.clipnorm or None)
    if t.mixed_precision == "fp16":  # float16 gradients underflow without loss scaling
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def learning_rate(t: TrainConfig, step: int, steps_per_epoch: int, scale: float = 1.0) -> float:
    """The learning rate of global step ``step`` (0-based): linear warm-up over
    ``warmup_epochs``, then constant, cosine decay to ``min_learning_rate`` over the remaining
    epochs, or constant for the plateau schedule (whose reductions, like the divergence
    guard's, come in as ``scale``)."""
    base = t.learning_rate * scale
    warmup = t.warmup_epochs * steps_per_epoch
    if step < warmup:
        return base * (step + 1) / warmup
    if t.lr_schedule == "cosine":
        total = max(t.epochs * steps_per_epoch - warmup, 1)
        progress = min((step - warmup) / total, 1.0)
        return t.min_learning_rate + (base - t.min_learning_rate) * 0.5 * (1 + math.cos(math.pi * progress))
    return max(base, t.min_learning_rate)
