"""Per-example segmentation losses, shaped for ``tf.nn.compute_average_loss``.

Each takes one-hot targets and softmax probabilities of shape (B, H, W, C) and returns a
(B,) vector, so the distributed step can divide by the *global* batch size.
"""

from __future__ import annotations

import tensorflow as tf

_EPS = 1e-7


def categorical_crossentropy(y_true: tf.Tensor, y_prob: tf.Tensor) -> tf.Tensor:
    """Pixel-mean categorical cross-entropy per example."""
    y_prob = tf.clip_by_value(tf.cast(y_prob, tf.float32), _EPS, 1.0 - _EPS)
    per_pixel = -tf.reduce_sum(tf.cast(y_true, tf.float32) * tf.math.log(y_prob), axis=-1)
    return tf.reduce_mean(per_pixel, axis=[1, 2])


def soft_dice_loss(y_true: tf.Tensor, y_prob: tf.Tensor, smooth: float = 1.0) -> tf.Tensor:
    """1 - mean soft Dice over the foreground classes, per example (background excluded)."""
    y_true = tf.cast(y_true, tf.float32)[..., 1:]
    y_prob = tf.cast(y_prob, tf.float32)[..., 1:]
    inter = tf.reduce_sum(y_true * y_prob, axis=[1, 2])
    denom = tf.reduce_sum(y_true, axis=[1, 2]) + tf.reduce_sum(y_prob, axis=[1, 2])
    dice = (2.0 * inter + smooth) / (denom + smooth)
    return 1.0 - tf.reduce_mean(dice, axis=-1)


def ce_dice_loss(y_true: tf.Tensor, y_prob: tf.Tensor) -> tf.Tensor:
    return categorical_crossentropy(y_true, y_prob) + soft_dice_loss(y_true, y_prob)


LOSSES = {"ce": categorical_crossentropy, "dice": soft_dice_loss, "ce_dice": ce_dice_loss}


def get_loss(name: str):
    return LOSSES[name]
