"""Online augmentation inside tf.data: flips, rotation, scale, shear, brightness and contrast.

One random affine map per example moves image and mask together (bilinear for the image,
nearest for the mask, so class ids stay class ids; uncovered corners become air and
background). Randomness is stateless and keyed by (seed, example index): the same seed
gives the same augmented batches on every run, whatever the thread timing.
"""

from __future__ import annotations

import math

import tensorflow as tf

from aisd_ray.config import AugmentConfig


def _uniform(seeds: tf.Tensor, i: int, low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform([], seeds[i], low, high)


def _warp(images: tf.Tensor, transform: tf.Tensor, interpolation: str) -> tf.Tensor:
    shape = tf.shape(images)[1:3]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transform[None], output_shape=shape, fill_value=0.0,
        interpolation=interpolation, fill_mode="CONSTANT")


def affine_transform(angle: tf.Tensor, scale: tf.Tensor, shear: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """The 8 projective coefficients mapping *output* pixels to input pixels for a rotation,
    isotropic scale and horizontal shear about the image centre (what ImageProjectiveTransform takes)."""
    c, s = tf.cos(angle), tf.sin(angle)
    rotate = tf.stack([[c, -s], [s, c]])
    shear_m = tf.stack([[1.0, tf.tan(shear)], [0.0, 1.0]])
    forward = tf.matmul(rotate, shear_m) * scale
    inverse = tf.linalg.inv(forward)
    centre = tf.constant([(width - 1) / 2, (height - 1) / 2])
    offset = centre - tf.linalg.matvec(inverse, centre)
    return tf.stack([inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1], 0.0, 0.0])


def augment_fn(cfg: AugmentConfig, height: int, width: int):
    """``(seed[2] int64, image float32 HxWxC 0..255, labels uint8 HxW) -> (image, labels)``."""

    def augment(seed: tf.Tensor, image: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        seeds = tf.random.experimental.stateless_split(seed, 7)
        labels = labels[..., None]
        for i, (enabled, axis) in enumerate(((cfg.hflip, 1), (cfg.vflip, 0))):
            if enabled:
                flip = _uniform(seeds, i, 0.0, 1.0) < 0.5
                image = tf.where(flip, tf.reverse(image, [axis]), image)
                labels = tf.where(flip, tf.reverse(labels, [axis]), labels)
        rotation, shear = math.radians(cfg.rotation_deg), math.radians(cfg.shear_deg)
        transform = affine_transform(_uniform(seeds, 2, -rotation, rotation), _uniform(seeds, 3, *cfg.scale),
                                     _uniform(seeds, 4, -shear, shear), height, width)
        image = _warp(image[None], transform, "BILINEAR")[0]
        labels = tf.cast(_warp(tf.cast(labels, tf.float32)[None], transform, "NEAREST")[0, ..., 0], tf.uint8)
        contrast = _uniform(seeds, 5, *cfg.contrast)
        brightness = _uniform(seeds, 6, -cfg.brightness, cfg.brightness) * 255.0
        mean = tf.reduce_mean(image)
        image = tf.clip_by_value((image - mean) * contrast + mean + brightness, 0.0, 255.0)
        return image, labels

    return augment
