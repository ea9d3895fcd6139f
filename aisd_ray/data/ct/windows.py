"""From Hounsfield units to the model's input: HU windows as channels, and the in-plane resampling
to the model size, recorded so that it can be inverted.

A CT value means the same tissue on every scanner (air -1000 HU, CSF 0..15, grey matter 35..45,
bone 700+), so the network sees HU through fixed windows (``data.windows``), never per-image
scaling: the AISD PNGs are one brain window (level 40, width 80) as grey RGB, which is the default.
A window (level L, width W) maps v HU to ``255 * clip((v - (L - W / 2)) / W, 0, 1)``, rounded to
uint8 (the DICOM standard's linear VOI LUT, PS3.3 C.11.2.1.2, up to its half-unit offsets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aisd_ray.data.sources import layout

Window = tuple[float, float]  # (level, width) in HU


def window(hu: np.ndarray, windows: Sequence[Window], channels: int) -> np.ndarray:
    """``hu`` (..., H, W) in HU (any integer or float dtype) -> (..., H, W, channels) uint8: one
    window replicated to every channel, or one window per channel. ValueError for another count."""
    if len(windows) not in (1, channels):
        raise ValueError(f"{len(windows)} windows for {channels} channels: give one, or one per channel")
    hu = np.asarray(hu, np.float32)
    planes = []
    for level, width in windows:
        low = level - width / 2
        planes.append(np.rint(np.clip((hu - low) / width, 0.0, 1.0) * 255).astype(np.uint8))
    if len(planes) == 1:
        planes = planes * channels
    return np.stack(planes, axis=-1)


@dataclass(frozen=True)
class InPlane:
    """How a canonical slice of ``height`` x ``width`` pixels at ``spacing`` (y, x) mm was resized
    to the model's ``model_height`` x ``model_width``: the model-size pixel spacing, and back."""

    height: int
    width: int
    spacing: tuple[float, float]
    model_height: int
    model_width: int

    @property
    def model_spacing(self) -> tuple[float, float]:
        """(y, x) mm of a model-size pixel: the same field of view in fewer or more pixels."""
        return (self.spacing[0] * self.height / self.model_height, self.spacing[1] * self.width / self.model_width)

    def to_model(self, hu_slice: np.ndarray, windows: Sequence[Window], channels: int) -> np.ndarray:
        """(H, W) HU -> (model_height, model_width, channels) uint8: windowed, then resized as every
        image is (``layout.resize_image``)."""
        return layout.resize_image(window(hu_slice, windows, channels), self.model_height, self.model_width)

    def labels_to_model(self, labels: np.ndarray) -> np.ndarray:
        """(H, W) class ids -> model size, nearest neighbour (``layout.resize_labels``)."""
        return layout.resize_labels(labels, self.model_height, self.model_width)

    def labels_back(self, probabilities: np.ndarray) -> np.ndarray:
        """(model_height, model_width, K) class probabilities -> (H, W) uint8 class ids at the slice's
        own size: probabilities resized bilinearly first, then the most likely class
        (``layout.labels_at``), so edges stay smooth."""
        return layout.labels_at(probabilities, self.height, self.width)

    def probabilities_back(self, probabilities: np.ndarray) -> np.ndarray:
        """(model_height, model_width, K) -> (H, W, K) float32 at the slice's own size (bilinear,
        ``layout.resize_probabilities``)."""
        return layout.resize_probabilities(probabilities, self.height, self.width)
