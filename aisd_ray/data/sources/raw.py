"""Reading the raw AISD release: per-case folders of slices, in zip files or extracted.

The release ships ``image.zip`` and ``mask.zip``, each with one folder per
case named by its 7-digit ID; image slices are windowed 8-bit PNGs, mask slices hold labels
0..5 (read by the rule of ``aisd_ray.data.sources.masks``: raw labels first, one reading per split).
Slices pair by file name within a case; a slice without a partner (some cases have more mask
slices than images) is reported and skipped. The official 52 test cases form the
test split; the other cases are split into train and validation by patient, never by slice.
OS metadata (``__MACOSX/``, ``._*``, ``.DS_Store``: ``layout.is_metadata``) is never a slice; a
case folder whose ID lost its leading zeros is read as its ID, with a warning; any other folder
of slices that is not a case is an error naming it, since its patient would otherwise vanish.
"""

from __future__ import annotations

import io
import logging
import random
import re
import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np

from aisd_ray.config import DataConfig
from aisd_ray.data.sources.layout import (
    IMAGE_SUFFIXES,
    DataError,
    Sample,
    SliceRef,
    is_metadata,
    read_image,
    resize_image,
    resize_labels,
)
from aisd_ray.data.sources.layout import (
    report_metadata as layout_report_metadata,
)
from aisd_ray.data.sources.masks import RAW_RELEASE_ORDER, SplitMasks

log = logging.getLogger(__name__)
CASE_ID = re.compile(r"^\d{7}$")
SHORT_ID = re.compile(r"^\d{1,6}$")  # a case ID whose leading zeros were lost
SIDES = ("image", "mask")


class _Side:
    """One side of the release (images or masks): a zip file or a folder, as {case: {stem: member}}.

    A slice's case is the nearest enclosing folder named by a 7-digit ID. A slice folder named by
    1..6 digits is taken as its zero-padded ID (a spreadsheet drops leading zeros: ``072723`` is
    ``0072723``) and listed in ``padded``; any other folder holding slices is listed in ``strays``,
    and OS metadata (``layout.is_metadata``: ``__MACOSX/``, ``._*``, ``.DS_Store``...) in ``skipped``."""

    def __init__(self, root: Path, side: str):
        self.zip_path = root / f"{side}.zip" if (root / f"{side}.zip").is_file() else None
        self.folder = root / side
        self._zip: zipfile.ZipFile | None = None
        self.where = str(self.zip_path or self.folder)
        self.cases: dict[str, dict[str, str]] = {}
        self.stamps: dict[str, str] = {}
        self.skipped: list[str] = []
        self.padded: dict[str, str] = {}  # folder -> the 7-digit ID it was taken as
        self.strays: dict[str, int] = {}  # folder -> slices in it, not taken as a case
        folders: dict[str, str] = {}  # case -> the folder it was read from
        for member, stamp in self._members():
            path = PurePosixPath(member)
            if is_metadata(member):
                self.skipped.append(member)
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            case, folder = _case_of(path)
            if case is None:
                self.strays[folder] = self.strays.get(folder, 0) + 1
                continue
            if folders.setdefault(case, folder) != folder:
                raise DataError(f"{self.name(min(folder, folders[case]))} and {self.name(max(folder, folders[case]))} "
                                f"are both case {case} (a folder named by fewer than 7 digits is read as the "
                                "zero-padded ID); keep one")
            if folder.rsplit("/", 1)[-1] != case:
                self.padded[folder] = case
            stem = path.stem
            slices = self.cases.setdefault(case, {})
            if stem in slices:
                raise DataError(f"{self.where}: case {case} has two {side} slices named {stem!r}")
            slices[stem], self.stamps[member] = member, stamp

    def _members(self):
        if self.zip_path is not None:
            try:
                self._zip = zipfile.ZipFile(self.zip_path)
            except zipfile.BadZipFile as exc:
                raise DataError(f"{self.zip_path}: not a readable zip file: {exc}") from None
            for info in self._zip.infolist():
                if not info.is_dir():
                    yield info.filename, f"{info.file_size}:{info.CRC}"
        else:
            for path in sorted(self.folder.rglob("*")):
                if path.is_file():
                    st = path.stat()
                    yield path.relative_to(self.folder).as_posix(), f"{st.st_size}:{st.st_mtime_ns}"

    def open(self, member: str):
        if self._zip is not None:
            return io.BytesIO(self._zip.read(member))
        return self.folder / member

    def name(self, member: str) -> str:
        return f"{self.where}:{member}" if self._zip is not None else str(self.folder / member)


def _case_of(path: PurePosixPath) -> tuple[str | None, str]:
    """(case ID, the folder it came from) of a slice member; (None, its folder) when no enclosing
    folder is a case: neither a 7-digit ID nor, as the slice's own folder, 1..6 digits (zero-padded)."""
    folders = path.parts[:-1]
    for depth in range(len(folders), 0, -1):
        if CASE_ID.match(folders[depth - 1]):
            return folders[depth - 1], "/".join(folders[:depth])
    folder = "/".join(folders)
    if folders and SHORT_ID.match(folders[-1]):
        return folders[-1].zfill(7), folder
    return None, folder


def is_raw_release(root: str | Path) -> bool:
    root = Path(root)
    return all((root / f"{s}.zip").is_file() or (root / s).is_dir() for s in SIDES)


def _slice_index(stem: str, position: int) -> int:
    digits = re.search(r"(\d+)$", stem)
    return int(digits.group(1)) if digits else position


@dataclass
class RawSplits:
    """The release cut into splits: slice refs per split, and what was skipped and why:
    unpaired slices, OS metadata entries (a count), case folders taken as their zero-padded IDs
    ({folder: ID}), and the official test cases (``data.test_cases``) the release lacks."""

    refs: dict[str, list[SliceRef]]
    cases: dict[str, list[str]]
    unpaired: list[str] = field(default_factory=list)
    metadata_skipped: int = 0
    padded_ids: dict[str, str] = field(default_factory=dict)
    test_cases_missing: list[str] = field(default_factory=list)


def _shown(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _check_folders(sides: tuple[_Side, ...]) -> dict[str, str]:
    """Report what the listing did not take as data: OS metadata (counted, logged), folders taken as
    zero-padded IDs (a warning naming each); a folder of slices that is no case is a DataError naming it
    (its patient would otherwise vanish from every split without a word). Returns {folder: ID}."""
    for side in sides:
        layout_report_metadata(side.where, side.skipped)
    strays = [f"{side.name(folder) if folder else side.where + ' (top level)'} ({n} slices)"
              for side in sides for folder, n in sorted(side.strays.items())]
    if strays:
        raise DataError(f"{len(strays)} folder(s) hold slices but are not named by a 7-digit case ID: "
                        f"{_shown(strays)}; rename each to its case's ID, or move it out of the release")
    padded = {side.name(folder): case for side in sides for folder, case in sorted(side.padded.items())}
    if padded:
        log.warning("%d case folder(s) named with fewer than 7 digits (leading zeros lost) read as their 7-digit "
                    "IDs: %s", len(padded), _shown([f"{f} -> {c}" for f, c in padded.items()]))
    return padded


def split_masks(side: _Side, members: list[str], data: DataConfig, split: str) -> SplitMasks:
    """One split's mask slices, read one way (``aisd_ray.data.sources.masks``; raw labels first, as the
    release holds them)."""
    return SplitMasks(data, [(side.name(m), partial(side.open, m)) for m in members],
                      f"the {split} split ({side.where})", RAW_RELEASE_ORDER)


def read_labels(side: _Side, member: str, masks: SplitMasks) -> np.ndarray:
    """(H, W) uint8 class ids of a mask slice, read as its split's masks are (raw labels 0..5 ->
    ``raw_label_map`` in the release; 1-bit, 16-bit, class-id and colour slices by the same rule)."""
    return masks.labels(side.open(member), side.name(member))


def _load(images: _Side, masks: _Side, name: str, case: str, index: int, image_member: str,
          mask_member: str, height: int, width: int, channels: int, reading: SplitMasks) -> Sample:
    image = read_image(images.open(image_member), channels, images.name(image_member))
    labels = read_labels(masks, mask_member, reading)
    if image.shape[:2] != labels.shape:
        raise DataError(f"{masks.name(mask_member)}: mask is {labels.shape[1]}x{labels.shape[0]} but its image "
                        f"is {image.shape[1]}x{image.shape[0]}")
    return Sample(name, resize_image(image, height, width), resize_labels(labels, height, width), case, index)


def _load_labels(masks: _Side, member: str, height: int, width: int, reading: SplitMasks) -> np.ndarray:
    return resize_labels(read_labels(masks, member, reading), height, width)


def split_cases(case_ids: list[str], data: DataConfig) -> dict[str, list[str]]:
    """Official test cases -> test; the rest shuffled by ``split_seed`` and cut by ``valid_fraction``,
    or, with ``data.folds`` K >= 2, dealt into K folds (the i-th shuffled case to fold i mod K, so
    fold sizes differ by at most one; nnU-Net's shuffled KFold in spirit) of which ``data.fold`` is
    valid. DataError when there are fewer non-test cases than folds."""
    test = sorted(c for c in case_ids if c in set(data.test_cases))
    rest = sorted(c for c in case_ids if c not in set(data.test_cases))
    random.Random(data.split_seed).shuffle(rest)
    if data.folds >= 2:
        if len(rest) < data.folds:
            raise DataError(f"data.folds = {data.folds}: only {len(rest)} non-test case(s) to divide into folds")
        valid = rest[data.fold::data.folds]
        return {"train": sorted(set(rest) - set(valid)), "valid": sorted(valid), "test": test}
    n_valid = round(len(rest) * data.valid_fraction)
    if data.valid_fraction > 0 and len(rest) > 1:
        n_valid = min(max(n_valid, 1), len(rest) - 1)
    return {"train": sorted(rest[n_valid:]), "valid": sorted(rest[:n_valid]), "test": test}


def read_release(root: str | Path, data: DataConfig, height: int, width: int, channels: int) -> RawSplits:
    """Slice refs of the raw release under ``root``, split by patient. Warns (and records in the
    result) what it did not take as given: unpaired slices, case folders read as zero-padded IDs,
    official test cases the release lacks; OS metadata is skipped and counted. A DataError names a
    folder of slices that is no case, two folders of one case, an unreadable zip."""
    root = Path(root)
    images, masks = _Side(root, "image"), _Side(root, "mask")
    padded = _check_folders((images, masks))
    unpaired: list[str] = []
    pairs: dict[str, list[tuple[str, str, str, int]]] = {}
    for case in sorted(images.cases.keys() | masks.cases.keys()):
        image_slices, mask_slices = images.cases.get(case, {}), masks.cases.get(case, {})
        unpaired += [f"{case}/{s} (image only)" for s in sorted(image_slices.keys() - mask_slices.keys())]
        unpaired += [f"{case}/{s} (mask only)" for s in sorted(mask_slices.keys() - image_slices.keys())]
        stems = sorted(image_slices.keys() & mask_slices.keys())
        indexed = sorted((_slice_index(s, i), s) for i, s in enumerate(stems))
        if indexed:
            pairs[case] = [(s, image_slices[s], mask_slices[s], k) for k, s in indexed]
    if not pairs:
        raise DataError(f"{root}: no case folders (7-digit IDs) with paired image and mask slices "
                        f"in {images.where} and {masks.where}")
    if unpaired:
        log.warning("%d unpaired slice(s) skipped: %s", len(unpaired), _shown(unpaired))
    missing = [c for c in data.test_cases if c not in pairs]
    if data.test_cases and len(missing) == len(data.test_cases):
        log.warning("%s: none of the %d official test cases (data.test_cases) is in this release: the store gets "
                    "no test split", root, len(data.test_cases))
    elif missing:  # a release with some official test cases but not all: a partial or damaged copy
        log.warning("%d of the %d official test cases (data.test_cases) are not in this release (as paired "
                    "slices), so the test split has %d: %s (recorded in the manifest; if the release is meant to "
                    "hold only these, say so in data.test_cases)", len(missing), len(data.test_cases),
                    len(data.test_cases) - len(missing), _shown(missing))
    cases = split_cases(sorted(pairs), data)
    refs: dict[str, list[SliceRef]] = {}
    for split, split_cases_ in cases.items():
        reading = split_masks(masks, [mk for case in split_cases_ for _, _, mk, _ in pairs[case]], data, split)
        refs[split] = [
            SliceRef(f"{case}_{stem}", f"{images.stamps[im]}/{masks.stamps[mk]}",
                     partial(_load, images, masks, f"{case}_{stem}", case, k, im, mk, height, width, channels,
                             reading),
                     partial(_load_labels, masks, mk, height, width, reading), reading)
            for case in split_cases_ for stem, im, mk, k in pairs[case]]
    return RawSplits({s: r for s, r in refs.items() if r}, cases, unpaired,
                     len(images.skipped) + len(masks.skipped), padded, missing)
