"""How mask files become class ids: the one rule, shared by ``prepare`` (the original's tree and the
raw AISD release) and ``evaluate --predictions/--masks``.

Mask files come in three conventions, the *readings* of ``data.mask_values``:

- ``"colours"``: each pixel is the nearest ``data.rgb_map`` colour (the original FlexUNet's
  "categorized" masks: black background, near-white lesion); a pixel farther than
  ``data.mask_colour_tolerance`` from every colour is an error.
- ``"class_ids"``: a grey mask whose values are the class ids 0..num_classes-1 (nnU-Net's and most
  tools' convention: 0/1 for one lesion class).
- ``"raw_labels"``: a grey mask of the raw AISD release's labels 0..5, mapped to class ids by
  ``data.raw_label_map`` (AISD's own masks hold e.g. 2 for a clear acute infarct and look black).

What a file holds: a 1-bit mask is 0/1; grey (L, LA, or RGB with three equal channels) and 16- or
32-bit integer masks are their values; palette masks are their palette's colours. A file *fits*
a reading when:

- class ids: it is grey and every value is below num_classes;
- raw labels: it is grey and every value is below ``len(raw_label_map)``;
- colours: every pixel lies within the tolerance of an rgb_map colour, and it is not a grey mask
  whose distinct values would all become one class (0/2 or 0/1 "look black": read as colours,
  their lesion would silently become background; a mask with one value, e.g. all 0, fits).

The reading is chosen **per split** (per folder in ``evaluate``), once, from all its masks: with
``"auto"`` the first reading in the source's order of preference that every mask of the split
fits: class ids, raw labels, colours for the original's tree and for folders; raw labels first
for the raw release, whose masks are documented to hold them (so a split of 0/1 masks is read as
raw labels there and as class ids elsewhere; set ``data.mask_values`` where that matters). An
all-zero mask fits every reading (background under each, rgb_map's background being black), so a
split's lesion-free masks never decide its reading. ``prepare`` judges every split this way before
it writes anything. A mask that fits no reading is an error naming the file and its values;
so are masks of one split that fit no common reading (e.g. 0/1 masks among 0/255 ones), naming
the odd file and one that disagrees with it. An explicit ``data.mask_values`` is held to the same
test: a mask that does not fit it is an error naming the file, its values and what they fit.

Cost: ``prepare`` decodes every mask twice (once to choose, once to write); a mask is a small
file beside its image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import numpy as np

from aisd_ray.config import DataConfig
from aisd_ray.data.sources.layout import (DataError, SliceRef, categorize, load_pair, open_image, pair_by_name,
                                          resize_labels)

log = logging.getLogger(__name__)

READINGS = ("colours", "class_ids", "raw_labels")
# The order "auto" tries readings in, per source.
FOLDER_ORDER = ("class_ids", "raw_labels", "colours")  # the original's tree, evaluate's folders
RAW_RELEASE_ORDER = ("raw_labels", "class_ids", "colours")  # the raw AISD release
DESCRIBED = {"colours": "rgb_map colours", "class_ids": "class ids", "raw_labels": "raw AISD labels"}


def describe(reading: str | None) -> str:
    """A reading for a log line, e.g. "raw_labels (raw AISD labels)"."""
    return f"{reading} ({DESCRIBED[reading]})" if reading in DESCRIBED else "unknown"

Source = Path | str | IO[bytes]


@dataclass(frozen=True)
class MaskRule:
    """The config keys that say how masks are read (``data.rgb_map``, ``data.raw_label_map``,
    ``data.mask_colour_tolerance``, ``data.mask_values``); ``num_classes`` is ``len(rgb_map)``."""

    rgb_map: tuple[tuple[int, int, int], ...] = DataConfig.rgb_map
    raw_label_map: tuple[int, ...] = DataConfig.raw_label_map
    tolerance: float = DataConfig.mask_colour_tolerance
    mask_values: str = DataConfig.mask_values

    @property
    def num_classes(self) -> int:
        return len(self.rgb_map)

    @classmethod
    def of(cls, value: "MaskRule | DataConfig | Sequence[Sequence[int]]") -> "MaskRule":
        """A rule from a rule, a ``DataConfig``, or a bare rgb_map (the other keys at their defaults)."""
        if isinstance(value, MaskRule):
            return value
        if isinstance(value, DataConfig):
            return cls(tuple(tuple(c) for c in value.rgb_map), tuple(value.raw_label_map),
                       value.mask_colour_tolerance, value.mask_values)
        return cls(tuple(tuple(int(v) for v in c) for c in value))


@dataclass
class MaskPixels:
    """A decoded mask file: ``values`` is (H, W) integers (grey) or (H, W, 3) uint8 (colour)."""

    where: str
    mode: str
    values: np.ndarray

    @property
    def grey(self) -> bool:
        return self.values.ndim == 2

    @property
    def top(self) -> int:
        return int(self.values.max()) if self.values.size else 0

    def shown(self) -> str:
        """The values seen, for a message: grey values in order, or the three commonest colours."""
        if self.grey:
            found = [int(v) for v in np.unique(self.values)]
            text = ", ".join(map(str, found)) if len(found) <= 8 else \
                ", ".join(map(str, found[:6])) + f", ..., {found[-1]} ({len(found)} values)"
            return text + (f" ({self.mode})" if self.mode not in ("L", "RGB", "RGBA", "LA", "P", "1") else "")
        colours, counts = np.unique(self.values.reshape(-1, 3), axis=0, return_counts=True)
        top = sorted(zip(counts, map(tuple, colours)), key=lambda item: -item[0])[:3]
        return ", ".join(f"{tuple(int(v) for v in c)} x{n}" for n, c in top) + \
            (f" and {len(colours) - 3} more colours" if len(colours) > 3 else "")


def read_pixels(source: Source, where: str | Path) -> MaskPixels:
    """A mask file's values, as the rule sees them (see the module docstring). Errors: unreadable
    file, negative or non-integer values (DataError naming ``where``)."""
    image = open_image(source, where)
    mode = image.mode
    if mode == "1":
        values = np.asarray(image).astype(np.uint8)
    elif mode in ("L", "LA"):
        values = np.asarray(image.getchannel(0))
    elif mode.startswith("I") or mode == "F":
        values = np.asarray(image)
        if values.dtype.kind == "f":
            if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
                raise DataError(f"{where}: mask holds non-integer values ({mode}); a mask holds class ids, "
                                "raw labels or rgb_map colours")
        if values.size and values.min() < 0:
            raise DataError(f"{where}: mask holds negative values ({int(values.min())}); a mask holds class ids, "
                            "raw labels or rgb_map colours")
        values = values.astype(np.int64)
    else:
        rgb = np.asarray(image.convert("RGB"))
        values = rgb[..., 0] if (rgb == rgb[..., :1]).all() else rgb
    return MaskPixels(str(where), mode, values)


def why_not(pixels: MaskPixels, reading: str, rule: MaskRule) -> str | None:
    """Why ``pixels`` do not fit ``reading`` (a phrase without the file name), or None if they fit."""
    if reading == "class_ids":
        if not pixels.grey:
            return "it holds colours, not grey class ids"
        if pixels.top >= rule.num_classes:
            return f"value {pixels.top} is not a class id 0..{rule.num_classes - 1} (model.num_classes)"
        return None
    if reading == "raw_labels":
        if not pixels.grey:
            return "it holds colours, not grey raw labels"
        if pixels.top >= len(rule.raw_label_map):
            return f"label value {pixels.top} is outside 0..{len(rule.raw_label_map) - 1} (data.raw_label_map)"
        return None
    if pixels.grey and pixels.top > 255:
        return f"values above 255 ({pixels.mode}) are not 8-bit rgb_map colours"
    try:
        categorize(_rgb(pixels), rule.rgb_map, pixels.where, rule.tolerance)
    except DataError as exc:
        return str(exc).removeprefix(f"{pixels.where}: ")
    if pixels.grey:
        found = np.unique(pixels.values).astype(np.uint8)
        classes = categorize(np.repeat(found[None, :, None], 3, axis=-1), rule.rgb_map, tolerance=None)
        if len(found) > 1 and len(set(classes.ravel().tolist())) == 1:
            return f"as rgb_map colours its values would all be class {int(classes.ravel()[0])}"
    return None


def _rgb(pixels: MaskPixels) -> np.ndarray:
    if pixels.grey:
        return np.repeat(pixels.values.astype(np.uint8)[..., None], 3, axis=-1)
    return pixels.values


def class_ids(pixels: MaskPixels, reading: str, rule: MaskRule) -> np.ndarray:
    """(H, W) uint8 class ids of ``pixels`` read as ``reading``; a file that does not fit it is a
    DataError naming the file."""
    reason = why_not(pixels, reading, rule)
    if reason is not None:
        raise DataError(f"{pixels.where}: {reason} (masks of this split are read as {DESCRIBED[reading]})")
    if reading == "class_ids":
        return pixels.values.astype(np.uint8)
    if reading == "raw_labels":
        return np.asarray(rule.raw_label_map, np.uint8)[pixels.values]
    return categorize(_rgb(pixels), rule.rgb_map, pixels.where, rule.tolerance)


def _fits(pixels: MaskPixels, rule: MaskRule, order: Sequence[str]) -> tuple[str, ...]:
    return tuple(r for r in order if why_not(pixels, r, rule) is None)


def _fits_none(pixels: MaskPixels, rule: MaskRule) -> str:
    if not pixels.grey:  # only colours could have read it: the colour check's own message
        return f"{pixels.where}: {why_not(pixels, 'colours', rule)}"
    labels = max(rule.num_classes, len(rule.raw_label_map))
    return (f"{pixels.where}: label value {pixels.top} is outside 0..{labels - 1} (class ids 0..{rule.num_classes - 1} "
            f"by model.num_classes, raw labels 0..{len(rule.raw_label_map) - 1} by data.raw_label_map), and "
            f"{why_not(pixels, 'colours', rule)}; values seen: {pixels.shown()}. A mask holds class ids, raw labels "
            "or 8-bit rgb_map colours (data.mask_values)")


def choose_reading(files: Sequence[tuple[str, Callable[[], Source]]], rule: MaskRule, name: str,
                   order: Sequence[str] = FOLDER_ORDER) -> str:
    """The reading of one split's masks: ``files`` is (name, opener) per mask, ``name`` says which
    split or folder for messages. Every file is read once. Errors (DataError naming a file and its
    values): a file that fits no reading, or the chosen one when ``rule.mask_values`` names it;
    files that fit no common reading."""
    candidates = tuple(order) if rule.mask_values == "auto" else (rule.mask_values,)
    fits: list[tuple[str, tuple[str, ...]]] = []
    for where, opener in files:
        pixels = read_pixels(opener(), where)
        found = _fits(pixels, rule, order)
        if not found:
            raise DataError(_fits_none(pixels, rule))
        if rule.mask_values != "auto" and rule.mask_values not in found:
            raise DataError(f"{where}: data.mask_values is '{rule.mask_values}' but "
                            f"{why_not(pixels, rule.mask_values, rule)}; its values {pixels.shown()} fit "
                            f"{' or '.join(DESCRIBED[r] for r in found)} (data.mask_values = '{found[0]}' or 'auto')")
        fits.append((where, found))
    for reading in candidates:
        if all(reading in found for _, found in fits):
            return reading
    most = max(candidates, key=lambda r: (sum(r in found for _, found in fits), -candidates.index(r)))
    odd, odd_fits = next((w, f) for w, f in fits if most not in f)
    example = next((w for w, f in fits if most in f and not set(f) & set(odd_fits)), None) or \
        next(w for w, f in fits if most in f)
    count = sum(most in found for _, found in fits)
    odd_pixels = read_pixels(_opener(files, odd)(), odd)
    shown = read_pixels(_opener(files, example)(), example).shown()
    raise DataError(f"{odd}: {why_not(odd_pixels, most, rule)}, and {count} of the {len(fits)} masks of {name} are "
                    f"{DESCRIBED[most]} (e.g. {example}: {shown}); its values {odd_pixels.shown()} fit "
                    f"{' or '.join(DESCRIBED[r] for r in odd_fits)} only. The masks of one split are read one way: "
                    "make them agree, or set data.mask_values")


def _opener(files: Sequence[tuple[str, Callable[[], Source]]], where: str) -> Callable[[], Source]:
    return next(o for w, o in files if w == where)


class SplitMasks:
    """The masks of one split (or one folder), all read one way. The reading is chosen from every
    mask of it at first use (``reading``), so a split is judged whole before any of it is written."""

    def __init__(self, rule: MaskRule | DataConfig | Sequence[Sequence[int]],
                 files: Sequence[tuple[str, Callable[[], Source]]], name: str,
                 order: Sequence[str] = FOLDER_ORDER):
        self.rule, self.files, self.name, self.order = MaskRule.of(rule), list(files), name, tuple(order)
        self._reading: str | None = None

    @classmethod
    def of_paths(cls, rule: Any, paths: Sequence[Path], name: str,
                 order: Sequence[str] = FOLDER_ORDER) -> "SplitMasks":
        return cls(rule, [(str(p), (lambda p=p: p)) for p in paths], name, order)

    @property
    def reading(self) -> str:
        """"colours", "class_ids" or "raw_labels" (see the module docstring)."""
        if self._reading is None:
            self._reading = choose_reading(self.files, self.rule, self.name, self.order)
            log.debug("%s: masks read as %s", self.name, DESCRIBED[self._reading])
        return self._reading

    def labels(self, source: Source, where: str | Path) -> np.ndarray:
        """(H, W) uint8 class ids of one mask of this split, at its own size."""
        return class_ids(read_pixels(source, where), self.reading, self.rule)


def _stamp(*paths: Path) -> str:
    return "/".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)


def _load_labels(mask_path: Path, height: int, width: int, masks: Any) -> np.ndarray:
    return resize_labels(masks.labels(mask_path, mask_path), height, width)


def original_refs(images_dir: str | Path, masks_dir: str | Path, height: int, width: int, channels: int,
                  rule: Any, split: str = "") -> list[SliceRef]:
    """The slices of one split of the original's tree, paired by name. ``rule``: a
    ``masks.MaskRule`` (or the config's ``DataConfig``, or a bare rgb_map); the split's masks are
    read one way, chosen from all of them at the first load (this module; here, not in ``layout.py``,
    which ``masks`` stands on)."""
    pairs = pair_by_name(images_dir, masks_dir)
    name = f"the {split} split ({masks_dir})" if split else str(masks_dir)
    masks = SplitMasks.of_paths(rule, [mask for _, _, mask in pairs], name, FOLDER_ORDER)
    return [SliceRef(name, _stamp(image, mask), partial(load_pair, name, image, mask, height, width, channels, masks),
                     partial(_load_labels, mask, height, width, masks), masks)
            for name, image, mask in pairs]
