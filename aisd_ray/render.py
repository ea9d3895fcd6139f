"""Pictures people look at: palette masks, outlines over the image, side-by-side panels."""

from __future__ import annotations

import numpy as np
from PIL import Image

OUTLINE = (255, 64, 64)


def palette_png(labels: np.ndarray, rgb_map) -> Image.Image:
    """A palette ("P") image whose indices are class ids and whose palette is ``rgb_map``."""
    im = Image.fromarray(labels.astype(np.uint8), "P")
    palette = [c for colour in rgb_map for c in colour]
    im.putpalette(palette + [0] * (768 - len(palette)))
    return im


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def outline(labels: np.ndarray) -> np.ndarray:
    """Boolean map of lesion pixels that touch a non-lesion pixel (4-neighbourhood)."""
    fg = labels > 0
    padded = np.pad(fg, 1, mode="edge")
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return fg & ~inner


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = _rgb(image).copy()
    out[outline(labels)] = OUTLINE
    return out


def side_by_side(*panels: np.ndarray, gap: int = 4) -> Image.Image:
    """Panels of equal height joined left to right with a black gap."""
    rgb = [_rgb(p) for p in panels]
    h = rgb[0].shape[0]
    spacer = np.zeros((h, gap, 3), np.uint8)
    parts = []
    for i, p in enumerate(rgb):
        parts += ([spacer] if i else []) + [p]
    return Image.fromarray(np.concatenate(parts, axis=1))
