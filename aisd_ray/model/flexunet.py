"""FlexUNet: the original's configurable multiclass U-Net, rebuilt in Keras 3.

Faithful to the original's layer recipe so that the original's AISD config
builds the same 124,996,866-parameter network: kernel size and dilation taper with depth,
dropout grows with depth, a transpose-conv decoder concatenates the encoder skips.
"""

from __future__ import annotations

import keras
from keras import layers

from aisd_ray.config import ModelConfig


def level_kernels(cfg: ModelConfig) -> list[tuple[int, int]]:
    """Kernel per level: max(3, k - 2*i) per axis (a 1 or 2 base kernel is kept as given)."""
    return [tuple(max(min(3, k), k - 2 * i) for k in cfg.base_kernels) for i in range(cfg.num_layers)]


def level_dilations(cfg: ModelConfig) -> list[tuple[int, int]]:
    """Dilation per level: max(1, d - i) per axis."""
    return [tuple(max(1, d - i) for d in cfg.dilation) for i in range(cfg.num_layers)]


def build_flexunet(cfg: ModelConfig, name: str = "flexunet", dtype: str = "float32") -> keras.Model:
    """The FlexUNet as a functional Keras model taking raw pixel values (0..255).

    ``dtype`` is a Keras dtype policy such as ``"mixed_bfloat16"``; the head is always float32.
    """
    kernels, dilations = level_kernels(cfg), level_dilations(cfg)
    inputs = keras.Input((cfg.image_height, cfg.image_width, cfg.image_channels), name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale", dtype=dtype)(inputs) if cfg.input_normalize else inputs

    def block(x, filters: int, level: int, dropout: float, prefix: str):
        for j in range(2):
            x = layers.Conv2D(filters, kernels[level], dilation_rate=dilations[level], padding="same",
                              activation=cfg.activation, kernel_initializer="he_normal",
                              name=f"{prefix}_conv{j}", dtype=dtype)(x)
            if cfg.normalization:
                # synchronized: batch statistics over the global batch, so every replica's moving
                # statistics stay identical (a no-op without a distribution strategy)
                x = layers.BatchNormalization(momentum=cfg.bn_momentum, synchronized=True,
                                              name=f"{prefix}_bn{j}", dtype=dtype)(x)
            if j == 0 and dropout > 0:
                x = layers.Dropout(dropout, name=f"{prefix}_dropout", dtype=dtype)(x)
        return x

    skips = []
    for i in range(cfg.num_layers):
        x = block(x, cfg.base_filters * 2**i, i, cfg.dropout_rate * i, f"enc{i}")
        if i < cfg.num_layers - 1:
            skips.append(x)
            x = layers.MaxPooling2D(2, name=f"enc{i}_pool", dtype=dtype)(x)
    for i in reversed(range(cfg.num_layers - 1)):
        filters = cfg.base_filters * 2**i
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"dec{i}_up", dtype=dtype)(x)
        x = layers.Concatenate(name=f"dec{i}_concat", dtype=dtype)([x, skips[i]])
        x = block(x, filters, i, cfg.dropout_rate * i, f"dec{i}")
    head_activation = "softmax" if cfg.num_classes > 1 else cfg.final_activation
    # The head stays float32 under mixed precision so probabilities are well-formed.
    outputs = layers.Conv2D(cfg.num_classes, 1, activation=head_activation, dtype="float32",
                            name="head")(x)
    return keras.Model(inputs, outputs, name=name)
