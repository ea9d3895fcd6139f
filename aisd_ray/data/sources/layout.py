"""Reading the original's ``{split}/{images,masks}`` PNG tree into model-sized samples.

Images and masks are paired by file stem (the original paired two unsorted listings, which
worked by luck); a file without a partner, or one that cannot be decoded, is an error
that names it. Masks become class ids by the rule of ``aisd_ray.data.sources.masks`` (one reading per
split: rgb_map colours as the original's "categorized" masks, where near-white lesion pixels
252..255 map to the lesion class; class ids; or raw AISD labels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Files and folders an operating system writes beside data, never data themselves: macOS Finder's
# "Compress" adds __MACOSX/ with an AppleDouble "._<name>" per file, and .DS_Store; Windows
# Explorer writes Thumbs.db and desktop.ini; macOS also writes the dot-names below on a volume. Any
# other dot-file or dot-folder counts as metadata too, except where a caller reads files by content
# (``dot_files=False``: a workstation's DICOM export names its files ``.CT..0003.0001...IMA``).
METADATA_NAMES = frozenset({"__macosx", "thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r", ".ds_store",
                            ".localized", ".apdisk", ".spotlight-v100", ".trashes", ".fseventsd", ".temporaryitems",
                            ".documentrevisions-v100"})


class DataError(ValueError):
    """Input data that cannot be used; the message names the file."""


@dataclass(frozen=True)
class SliceRef:
    """One slice of a source, not read yet: what ``prepare`` fingerprints, filters and shards."""

    name: str
    stamp: str  # changes whenever the source files change (size and mtime, or a zip member's CRC)
    load: Callable[[], "Sample"]
    load_labels: Callable[[], np.ndarray]
    masks: Any = None  # the split's masks.SplitMasks: how its masks are read (None where unknown)


@dataclass(frozen=True)
class Sample:
    name: str
    image: np.ndarray  # (H, W, C) uint8, model size
    labels: np.ndarray  # (H, W) uint8 class ids, model size
    case_id: str = ""
    slice_index: int = -1
    # (H, W) bool, model size: the intracranial space (data/ct/head.py brain_mask), only where the
    # slice comes from a CT volume; None for PNG slices
    brain: np.ndarray | None = None


def is_metadata(path: str | Path, dot_files: bool = True) -> bool:
    """True for an entry that is operating-system metadata, never data: anything under ``__MACOSX/``,
    an AppleDouble ``._*`` file, ``.DS_Store``, ``Thumbs.db``, ``desktop.ini`` (``METADATA_NAMES``)
    and, with ``dot_files`` (the default), any other dot-file or dot-folder. ``path`` is a relative
    POSIX path (a zip member) or a path; every part counts. The one rule shared by the original
    tree's listing (``list_images``), the raw release's, and (``dot_files=False``, where a file is
    data when its content says so) the DICOM series listing."""
    parts = PurePosixPath(Path(path).as_posix() if isinstance(path, Path) else str(path).replace("\\", "/")).parts
    return any(p.lower() in METADATA_NAMES or p.startswith("._")
               or dot_files and p.startswith(".") and p not in (".", "..") for p in parts)


def report_metadata(where: str | Path, skipped: list[str]) -> None:
    """One log line saying how many metadata entries of ``where`` were skipped, with examples."""
    if skipped:
        log.info("%s: %d OS metadata file(s) skipped, never read as slices (e.g. %s)", where, len(skipped),
                 ", ".join(skipped[:3]))


def list_images(folder: str | Path) -> dict[str, Path]:
    """Image files of a folder keyed by stem; two files with one stem are an error. OS metadata
    (``is_metadata``: ``._1.png``, ``.DS_Store``, ``Thumbs.db``...) is skipped and counted in the log."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    found: dict[str, Path] = {}
    skipped: list[str] = []
    for path in sorted(folder.iterdir()):
        if is_metadata(path.name):
            skipped.append(path.name)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in found:
                raise DataError(f"{path}: two images share the name {path.stem!r} ({found[path.stem].name})")
            found[path.stem] = path
    report_metadata(folder, skipped)
    return found


def pair_by_name(images_dir: str | Path, masks_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """(name, image, mask) triples sorted by name; any unpaired file is an error naming it."""
    images, masks = list_images(images_dir), list_images(masks_dir)
    lonely = [str(images[k]) for k in sorted(images.keys() - masks.keys())]
    lonely += [str(masks[k]) for k in sorted(masks.keys() - images.keys())]
    if lonely:
        shown = ", ".join(lonely[:5]) + (f" and {len(lonely) - 5} more" if len(lonely) > 5 else "")
        raise DataError(f"{len(lonely)} file(s) without a partner of the same name: {shown}")
    if not images:
        raise DataError(f"{images_dir}: no images found")
    return [(k, images[k], masks[k]) for k in sorted(images)]


def open_image(source: Path | IO[bytes], where: str | Path) -> Image.Image:
    """A decoded image; an unreadable one is a DataError naming ``where`` (a file, or a zip's
    ``archive.zip:member``), never the stream object Pillow was handed."""
    try:
        with Image.open(source) as im:
            im.load()
            return im
    except UnidentifiedImageError:
        raise DataError(f"{where}: cannot read image: not an image format Pillow can identify") from None
    except OSError as exc:
        reason = str(exc) if isinstance(source, (str, Path)) else str(exc).replace(repr(source), "a stream")
        raise DataError(f"{where}: cannot read image: {reason}") from None


def read_image(source: Path | IO[bytes], channels: int, where: str | Path | None = None) -> np.ndarray:
    """An image (file or stream) as (H, W, channels) uint8; grey is replicated to 3 channels if asked.
    A 16-bit (or 32-bit) image is refused: converting it would clip every value above 255."""
    where = where if where is not None else source if isinstance(source, (str, Path)) else "an image stream"
    image = open_image(source, where)
    if image.mode.startswith("I") or image.mode == "F":
        raise DataError(f"{where}: {image.mode} image with more than 8 bits per pixel; window it to "
                        "8 bits first (the AISD images are 8-bit, already windowed)")
    array = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    return array if array.ndim == 3 else array[..., None]


# How far (Euclidean, in RGB units) a mask pixel may lie from its nearest rgb_map colour.
MASK_COLOUR_TOLERANCE = 64.0


def categorize(rgb: np.ndarray, rgb_map: tuple[tuple[int, int, int], ...], where: str | Path | None = None,
               tolerance: float | None = MASK_COLOUR_TOLERANCE) -> np.ndarray:
    """Class id of the nearest ``rgb_map`` colour (squared distance) for each pixel. A pixel
    farther than ``tolerance`` from every colour is an error naming ``where`` and the colours
    (a mask drawn in another palette would otherwise turn silently into background)."""
    colours = np.asarray(rgb_map, np.int32)
    pixels = rgb.reshape(-1, 1, 3).astype(np.int32)
    dist = np.sum((pixels - colours[None]) ** 2, axis=-1)
    nearest = np.argmin(dist, axis=1)
    if tolerance is not None:
        far = dist[np.arange(len(nearest)), nearest] > tolerance**2
        if far.any():
            found, counts = np.unique(pixels[far, 0], axis=0, return_counts=True)
            shown = ", ".join(f"{tuple(int(v) for v in c)} x{n}" for c, n in
                              sorted(zip(found, counts), key=lambda item: -item[1])[:3])
            raise DataError(f"{where or 'mask'}: {int(far.sum())} pixels are farther than {tolerance:g} from every "
                            f"rgb_map colour {[tuple(c) for c in rgb_map]} (most common: {shown}); fix data.rgb_map "
                            "or raise data.mask_colour_tolerance")
    return nearest.astype(np.uint8).reshape(rgb.shape[:2])


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    mode = "RGB" if image.shape[-1] == 3 else "L"
    out = np.asarray(Image.fromarray(image.squeeze(-1) if mode == "L" else image, mode)
                     .resize((width, height), Image.BILINEAR))
    return out if out.ndim == 3 else out[..., None]


def resize_probabilities(probabilities: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w, classes) probabilities at (height, width, classes) float32: each class map resized
    bilinearly (unchanged when already that size)."""
    if probabilities.shape[:2] == (height, width):
        return np.asarray(probabilities, np.float32)
    maps = [np.asarray(Image.fromarray(probabilities[..., c].astype(np.float32), "F")
                       .resize((width, height), Image.BILINEAR)) for c in range(probabilities.shape[-1])]
    return np.stack(maps, axis=-1)


def labels_at(probabilities: np.ndarray, height: int, width: int) -> np.ndarray:
    """Class ids at (height, width) from (h, w, classes) probabilities: each class map resized
    bilinearly, then the most likely class per pixel, so an upscaled mask has smooth edges rather
    than the model grid's staircase."""
    return np.argmax(resize_probabilities(probabilities, height, width), axis=-1).astype(np.uint8)


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    if labels.shape == (height, width):
        return labels
    return np.asarray(Image.fromarray(labels).resize((width, height), Image.NEAREST))


def load_pair(name: str, image_path: Path, mask_path: Path, height: int, width: int, channels: int,
              masks: Any) -> Sample:
    """One slice at model size; ``masks``: the split's ``masks.SplitMasks``."""
    image = read_image(image_path, channels)
    labels = masks.labels(mask_path, mask_path)
    if image.shape[:2] != labels.shape:
        raise DataError(f"{mask_path}: mask is {labels.shape[1]}x{labels.shape[0]} but its image "
                        f"{image_path.name} is {image.shape[1]}x{image.shape[0]}")
    return Sample(name, resize_image(image, height, width), resize_labels(labels, height, width))
