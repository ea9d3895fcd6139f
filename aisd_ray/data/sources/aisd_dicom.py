"""The AISD release's DICOM archives beside its ``mask.zip``: each case's CT series with the
release's per-slice mask PNGs.

Layout: ``dicom.zip`` (or an extracted ``dicom/``) holding one folder per case named by its 7-digit
ID (at any depth), each a DICOM series; ``mask.zip`` (or ``mask/``) with the raw release's
per-case mask slices (labels 0..5, read as ``raw.py`` reads them). A zip of series is extracted
to ``prepare``'s temporary folder first (SimpleITK reads files).

Pairing: the mask slices of a case, in their index order (the number at the end of the file name),
are paired with the series' slices in position order along the slice normal, inferior first (the
canonical order of ``volume.py``); each mask slice must have the series' in-plane size. A case
whose mask slice count differs from its series' slice count (some AISD cases have more mask
slices than images) cannot be paired safely: it is reported by name with both counts and left
out, as is a case with a series and no masks or masks and no series.
"""

from __future__ import annotations

import logging
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from aisd_ray.config import DataConfig
from aisd_ray.data.sources import volume
from aisd_ray.data.sources.layout import DataError, is_metadata
from aisd_ray.data.sources.masks import RAW_RELEASE_ORDER, SplitMasks
from aisd_ray.data.sources.raw import CASE_ID, _Side, _slice_index

log = logging.getLogger(__name__)


def is_aisd_dicom(root: str | Path) -> bool:
    """True for a folder with ``dicom.zip`` or ``dicom/`` beside ``mask.zip`` or ``mask/``."""
    root = Path(root)
    series = (root / "dicom.zip").is_file() or (root / "dicom").is_dir()
    return series and ((root / "mask.zip").is_file() or (root / "mask").is_dir())


def _series_folder(root: Path, workdir: Path) -> Path:
    if not (root / "dicom.zip").is_file():
        return root / "dicom"
    out = workdir / "dicom"
    try:
        with zipfile.ZipFile(root / "dicom.zip") as archive:
            for member in archive.infolist():
                if not member.is_dir() and not is_metadata(member.filename, dot_files=False):
                    archive.extract(member, out)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{root / 'dicom.zip'}: not a readable zip file: {exc}") from None
    return out


def _series_cases(folder: Path) -> dict[str, Path]:
    """{case ID: its series folder}: every folder named by a 7-digit ID that holds DICOM files."""
    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_dir() and CASE_ID.match(p.name)):
        if is_metadata(str(path.relative_to(folder))) or not volume.is_dicom_series(path):
            continue
        if path.name in found:
            raise DataError(f"{found[path.name]} and {path} are both case {path.name}; keep one")
        found[path.name] = path
    return found


def mask_volume(masks: _Side, members: list[str], reading: SplitMasks, vol: volume.Volume) -> np.ndarray:
    """(Z, Y, X) uint8 class ids of a case: its mask slices in index order on the series' slices in
    position order. DataError naming the mask file for a slice of another size."""
    if len(members) != vol.hu.shape[0]:
        raise DataError(f"{masks.where}: case {vol.case_id} has {len(members)} mask slices for "
                        f"{vol.hu.shape[0]} series slices")
    slices = []
    for member in members:
        labels = reading.labels(masks.open(member), masks.name(member))
        if labels.shape != vol.hu.shape[1:]:
            raise DataError(f"{masks.name(member)}: mask is {labels.shape[1]}x{labels.shape[0]} but case "
                            f"{vol.case_id}'s slices are {vol.hu.shape[2]}x{vol.hu.shape[1]}")
        slices.append(labels)
    return np.stack(slices).astype(np.uint8)


def aisd_dicom_cases(root: str | Path, data: DataConfig, workdir: Path) -> tuple[list[tuple[str, Path, Any, str]],
                                                                                   dict[str, Any]]:
    """The release's pairable cases as (case ID, series folder, a function of the case's Volume
    giving its class ids, a stamp of its files), and what the manifest says of what was left out."""
    root = Path(root)
    series = _series_cases(_series_folder(root, workdir))
    masks = _Side(root, "mask")
    ordered = {case: [stems[s] for _, s in sorted((_slice_index(s, i), s) for i, s in enumerate(sorted(stems)))]
               for case, stems in masks.cases.items()}
    reading = SplitMasks(data, [(masks.name(m), partial(masks.open, m)) for ms in ordered.values() for m in ms],
                         f"the masks ({masks.where})", RAW_RELEASE_ORDER)
    cases, unpaired = [], []
    for case in sorted(series.keys() | ordered.keys()):
        if case not in ordered or case not in series:
            unpaired.append(f"{case} ({'no mask slices' if case not in ordered else 'no DICOM series'})")
            continue
        count = len(volume.dicom_files(series[case]))
        if count != len(ordered[case]):
            unpaired.append(f"{case} ({count} series slices, {len(ordered[case])} mask slices)")
            continue
        stamp = ";".join(masks.stamps[m] for m in ordered[case]) + "/" + ";".join(
            f"{p.name}:{p.stat().st_size}" for p in volume.dicom_files(series[case]))
        cases.append((case, series[case], partial(mask_volume, masks, ordered[case], reading), stamp))
    if unpaired:
        log.warning("%d case(s) left out: their series and mask slices cannot be paired: %s", len(unpaired),
                    ", ".join(unpaired[:5]) + (f" and {len(unpaired) - 5} more" if len(unpaired) > 5 else ""))
    if not cases:
        raise DataError(f"{root}: no case has both a DICOM series and as many mask slices")
    return cases, {"unpaired_skipped": unpaired, "mask_values": reading.reading}
