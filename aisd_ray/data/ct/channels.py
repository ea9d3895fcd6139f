"""The model's three input channels from a CT volume in HU (``data.channels``): one window as grey,
a slice with its neighbours, three windows, or a slice with its mirror image about the head's
midline and their difference.

Channels are built per case at the volume's own in-plane size, before any resize (as every image
then is: ``layout.resize_image``), so a neighbour or a mirror is taken at native resolution.
No TensorFlow here; numpy and scipy only.

Modes (``config.CHANNEL_MODES``), each giving uint8 (Z, Y, X, C):

- ``grey``: ``windows.window`` as it was: one window replicated to every channel, or one per channel;
- ``neighbours``: slices k-1, k, k+1 of the same case through the first window (2.5-D context);
  the first and last slice repeat themselves where a neighbour is missing;
- ``windows``: three windows, one per channel (``data.windows`` holds exactly three);
- ``symmetry``: the slice, its mirror about the head's midline (``midline``, ``mirror``), and
  their difference, all through the first window: ``128 + (w(slice) - w(mirror)) / 2`` with w the
  window's unrounded 0..255 value, rounded and clipped to 0..255, so 128 means "as the other
  hemisphere" and a hypodensity on one side reads below 128 there (and above 128 at its mirror
  place). The hemispheres are near mirror images, and an infarct is a one-sided hypodensity: the
  comparison radiologists make and the best published AISD methods build in (SEAN, asymmetry maps,
  bilateral difference modules).

The midline is estimated from the head, not the image centre: ``midline`` below states the method.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from aisd_ray.config.schema import CHANNEL_MODES
from aisd_ray.data.ct.windows import Window, window
from aisd_ray.data.sources.hu import AIR_HU
from aisd_ray.data.sources.hu import TISSUE_HU as HEAD_HU  # above it: the head (skin, brain, bone); below: air
from aisd_ray.data.sources.layout import resize_image

ESTIMATE_PX = 128  # the midline is estimated on a copy of a slice at most this large
MIN_HEAD_SHARE = 0.4  # a volume's midline: slices whose head is at least this share of the largest
MAX_SLICES = 9  # a volume's midline: the median over at most this many of those slices, evenly spread
# refinement, coarse then fine: (shifts in pixels of the estimate copy, turns in degrees) around the best
GRIDS = ((np.arange(-2.0, 2.01, 1.0), np.arange(-4.0, 4.01, 1.0)),
         (np.arange(-0.5, 0.51, 0.25), np.arange(-0.5, 0.51, 0.25)))


def build_channels(hu: np.ndarray, mode: str, windows: Sequence[Window], channels: int = 3,
                   line: tuple[float, float] | None = None) -> np.ndarray:
    """``hu`` (Z, Y, X) HU (int16 or any numeric dtype), canonical axial order (z inferior to
    superior) -> (Z, Y, X, channels) uint8 at the volume's own size. ``mode``: one of
    ``CHANNEL_MODES`` (module docstring); ``windows``: (level, width) HU; ``channels``: the model's
    input channels (1 or 3 for ``grey``, 3 for the others). ValueError for an unknown mode, a
    channel count the mode cannot fill, a ``windows`` mode without three windows, or ``hu`` not 3-D."""
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"a volume is (Z, Y, X); got shape {hu.shape}")
    if mode not in CHANNEL_MODES:
        raise ValueError(f"data.channels {mode!r}: must be one of {', '.join(CHANNEL_MODES)}")
    if mode == "grey":
        return window(hu, windows, channels)
    if channels != 3:
        raise ValueError(f"data.channels {mode!r} makes 3 channels; the model takes {channels}")
    if mode == "windows":
        if len(windows) != 3:
            raise ValueError(f"data.channels 'windows' takes three windows, one per channel; got {len(windows)}")
        return window(hu, windows, 3)
    first = [tuple(windows[0])]
    if mode == "neighbours":
        grey = window(hu, first, 1)[..., 0]
        below = np.concatenate([grey[:1], grey[:-1]])
        above = np.concatenate([grey[1:], grey[-1:]])
        return np.stack([below, grey, above], axis=-1)
    x0, angle = line or midline(hu)  # ``line``: the whole volume's, when ``hu`` is a slab of it
    mirrored = mirror(hu, x0, angle)
    level, width = first[0]
    here, there = _unrounded(hu, level, width), _unrounded(mirrored, level, width)
    difference = np.clip(np.rint(128.0 + (here - there) / 2.0), 0, 255).astype(np.uint8)
    return np.stack([window(hu, first, 1)[..., 0], window(mirrored, first, 1)[..., 0], difference], axis=-1)


def _unrounded(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    return np.clip((np.asarray(hu, np.float32) - (level - width / 2)) / width, 0.0, 1.0) * 255.0


def mirror(hu: np.ndarray, x0: float, angle: float) -> np.ndarray:
    """``hu`` (Y, X) or (Z, Y, X) reflected about the line through (x0, (Y-1)/2) leaning ``angle``
    degrees from the image's vertical (``midline``'s convention), every slice alike: float32, same
    shape, bilinear (scipy.ndimage.affine_transform, order 1), ``AIR_HU`` where the reflection
    falls outside the image. A reflection about the image's centre column (x0 = (X-1)/2, angle 0)
    is ``hu[..., ::-1]``."""
    hu = np.asarray(hu, np.float32)
    if hu.ndim == 3:
        return np.stack([mirror(s, x0, angle) for s in hu])
    a = np.radians(angle)
    # the line's unit direction in (y, x) is (cos a, sin a); reflection R = 2 d d^T - I, about p0
    reflect = np.array([[np.cos(2 * a), np.sin(2 * a)], [np.sin(2 * a), -np.cos(2 * a)]])
    p0 = np.array([(hu.shape[0] - 1) / 2.0, x0])
    return ndimage.affine_transform(hu, reflect, offset=p0 - reflect @ p0, order=1, mode="constant", cval=AIR_HU)


def midline(hu: np.ndarray) -> tuple[float, float]:
    """The head's midline in ``hu`` (Y, X) or (Z, Y, X) HU: ``(x0, angle)``, x0 the column (pixels,
    float) where it crosses the image's middle row (Y-1)/2, angle in degrees from the image's
    vertical (the line is x = x0 + (y - (Y-1)/2) * tan(angle): positive leans its lower part, larger
    y, towards larger x). Pixels are taken as square.

    Method, per slice, on a copy at most ``ESTIMATE_PX`` pixels across (bilinear): the head is the
    largest connected region above ``HEAD_HU`` after an opening (a head holder or a cable is cut
    off), holes filled; its centroid and its long principal axis (a head is longer front to back
    than side to side) give a first line; then the line is refined by the shift
    and rotation about the centroid that maximise the correlation of the brain window (level 40,
    width 80) with its mirror image over the head's box (``GRIDS``: 1 px and 1 degree steps, then
    quarter steps around the best). For a volume, the median x0 and angle over the slices whose head
    covers at least ``MIN_HEAD_SHARE`` of the largest head's area (at most ``MAX_SLICES`` of them,
    evenly spread): one midline for the whole case, as a head does not bend between slices.
    ValueError when no slice holds a head."""
    hu = np.asarray(hu)
    if hu.ndim == 2:
        found = _slice_midline(hu)
        if found is None:
            raise ValueError(f"no head (HU > {HEAD_HU:g}) in this slice")
        return found
    if hu.ndim != 3:
        raise ValueError(f"a slice is (Y, X) and a volume (Z, Y, X); got shape {hu.shape}")
    areas = (hu > HEAD_HU).sum(axis=(1, 2))
    if not areas.max(initial=0):
        raise ValueError(f"no head (HU > {HEAD_HU:g}) in any slice")
    usable = np.flatnonzero(areas >= MIN_HEAD_SHARE * areas.max())
    usable = usable[np.unique(np.linspace(0, len(usable) - 1, min(MAX_SLICES, len(usable))).round().astype(int))]
    found = [_slice_midline(hu[k]) for k in usable]
    found = [f for f in found if f is not None]
    if not found:
        raise ValueError(f"no head (HU > {HEAD_HU:g}) in any slice")
    return float(np.median([f[0] for f in found])), float(np.median([f[1] for f in found]))


def _slice_midline(hu: np.ndarray) -> tuple[float, float] | None:
    """(x0, angle) of one slice at its own size, or None without a head."""
    h, w = hu.shape
    scale = min(1.0, ESTIMATE_PX / max(h, w))
    small = np.asarray(hu, np.float32)
    if scale < 1:
        small = ndimage.zoom(small, scale, order=1)
    sh, sw = small.shape
    head = _head(small)
    if head is None:
        return None
    yy, xx = np.nonzero(head)
    cy, cx = yy.mean(), xx.mean()
    cov = np.cov(np.stack([yy - cy, xx - cx]))
    vals, vecs = np.linalg.eigh(cov)
    dy, dx = vecs[:, np.argmax(vals)]
    if abs(dx) > abs(dy):  # wider than long: take the other axis, a midline runs front to back
        dy, dx = vecs[:, np.argmin(vals)]
    angle = float(np.degrees(np.arctan2(dx, dy) if dy > 0 else np.arctan2(-dx, -dy)))
    x0, angle = _refine(small, head, cy, cx, angle)
    # back to the slice's own pixels: the zoom maps corner to corner, so the middle row stays the
    # middle row and only the scale of each axis changes
    fy, fx = ((h - 1) / (sh - 1) if sh > 1 else 1.0), ((w - 1) / (sw - 1) if sw > 1 else 1.0)
    a = np.radians(angle)
    return float(x0 * fx), float(np.degrees(np.arctan2(np.sin(a) * fx, np.cos(a) * fy)))


def _head(hu: np.ndarray) -> np.ndarray | None:
    """bool (Y, X): the largest region above HEAD_HU after a 3x3 opening, holes filled; None if empty."""
    mask = ndimage.binary_opening(hu > HEAD_HU, np.ones((3, 3), bool))
    labelled, count = ndimage.label(mask)
    if not count:
        return None
    sizes = ndimage.sum_labels(mask, labelled, index=np.arange(1, count + 1))
    head = labelled == 1 + int(np.argmax(sizes))
    return ndimage.binary_fill_holes(head) if head.sum() >= 16 else None


def _refine(small: np.ndarray, head: np.ndarray, cy: float, cx: float, angle: float) -> tuple[float, float]:
    """(x0, angle) of the line through (cy, cx + shift) at ``angle + turn`` (turned about the head's
    centroid), on the refinement grid, whose mirror correlates best with the slice's brain window
    over the head's bounding box grown by a few pixels."""
    middle = (small.shape[0] - 1) / 2
    image = _unrounded(small, 40.0, 80.0)
    ys, xs = np.nonzero(head)
    pad = 4
    box = (slice(max(ys.min() - pad, 0), ys.max() + pad + 1), slice(max(xs.min() - pad, 0), xs.max() + pad + 1))
    here = image[box] - image[box].mean()
    centre, best_score = (cx, angle), -np.inf
    for shifts, turns in GRIDS:
        around = centre
        for turn in turns:
            for shift in shifts:
                x, a = around[0] + shift, around[1] + turn
                there = _unrounded(mirror(small, x + (middle - cy) * np.tan(np.radians(a)), a), 40.0, 80.0)[box]
                there = there - there.mean()
                score = float((here * there).sum() / (np.sqrt((here**2).sum() * (there**2).sum()) + 1e-9))
                if score > best_score:
                    centre, best_score = (x, a), score
    return centre[0] + (middle - cy) * np.tan(np.radians(centre[1])), centre[1]


def model_input(hu: np.ndarray, mode: str, windows: Sequence[Window], channels: int, height: int,
                width: int, line: tuple[float, float] | None = None) -> np.ndarray:
    """What the model sees of a volume, the same in ``prepare`` and ``infer``: (Z, Y, X) HU ->
    (Z, height, width, channels) uint8, the channels built at the volume's own size
    (``build_channels``), then each slice resized (``layout.resize_image``). ValueError as
    ``build_channels``. ``line``: the symmetry mode's midline (``midline``) when ``hu`` is a slab of a
    volume, so that a volume built slab by slab gets the channels it gets whole."""
    return np.stack([resize_image(image, height, width)
                     for image in build_channels(hu, mode, windows, channels, line)])
