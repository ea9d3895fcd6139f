"""DICOM series folders read into a ``Volume``.

SimpleITK reads the pixels (applying RescaleSlope/Intercept); pydicom reads the headers
(``stop_before_pixels``) for the checks ITK does not make: one series, CT, one orientation and size,
and the grid of ``dicom_geometry`` (axial, ordered by ImagePositionPatient along the slice normal,
one slice spacing: no missing slice, no varying spacing, no two slices at one position). The values
go through the one HU check of every reader (``volume_base.as_hu``), told when the headers lack
RescaleIntercept. An enhanced CT (one multi-frame file) is read by ``dicom_multiframe``.

A file is DICOM when it reads as DICOM, whatever its name (``.CT..0003.0001...IMA``, no extension);
only known OS metadata names (``._*``, ``.DS_Store``, ``Thumbs.db``: ``layout.is_metadata`` with
``dot_files=False``) and a DICOMDIR (a CD's index) are skipped by name.

Gantry tilt: recorded as ``gantry_tilt_deg`` and as a ``Finding("gantry_tilt", ...)``, and logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from aisd_ray.data.sources.dicom_geometry import contrast_findings, odd_ones, slice_grid, tilt_findings
from aisd_ray.data.sources.dicom_multiframe import is_multiframe, read_multiframe
from aisd_ray.data.sources.layout import is_metadata
from aisd_ray.data.sources.volume_base import Volume, VolumeError, as_hu, build_volume, grid_only, one_line

log = logging.getLogger(__name__)
NON_DICOM_SUFFIXES = (".nii", ".gz", ".json", ".png", ".jpg", ".txt", ".csv", ".zip", ".md", ".xml")


def _is_dicom_file(path: Path) -> bool:
    """A DICOM file: the ``DICM`` marker after the 128-byte preamble, or (older files without one) a
    data set pydicom can parse that holds a SOP Class UID."""
    try:
        with open(path, "rb") as fh:
            if fh.read(132)[128:] == b"DICM":
                return True
        if path.name.lower().endswith(NON_DICOM_SUFFIXES):
            return False
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SOPClassUID"])
        return "SOPClassUID" in ds
    except Exception:  # anything unparseable is not DICOM
        return False


def _files(folder: Path) -> list[Path]:
    """A folder's files but known OS metadata names and a DICOMDIR (a CD's index, not an image)."""
    return [p for p in sorted(folder.iterdir())
            if p.is_file() and not is_metadata(p.name, dot_files=False) and p.name.upper() != "DICOMDIR"]


def dicom_files(folder: str | Path) -> list[Path]:
    """The DICOM files of a series folder (OS metadata, a DICOMDIR and other files aside): one per slice."""
    return [p for p in _files(Path(folder)) if _is_dicom_file(p)]


def is_dicom_series(path: str | Path) -> bool:
    """True for a folder holding at least one DICOM file (OS metadata files aside)."""
    path = Path(path)
    return path.is_dir() and any(_is_dicom_file(p) for p in _files(path))


def dicom_below(folder: str | Path, depth: int = 4, tries: int = 200) -> Path | None:
    """A DICOM file in ``folder`` or its sub-folders down to ``depth`` levels (OS metadata aside),
    found within ``tries`` files read; None when there is none: how a refusal of a folder without
    images knows to speak of DICOM (a patient/study/series tree given where a series is expected)."""
    folder, left = Path(folder), tries
    level = [folder] if folder.is_dir() else []
    for _ in range(depth + 1):
        below = []
        for where in level:
            for path in sorted(where.iterdir()):
                if is_metadata(path.name, dot_files=path.is_dir()) or path.name.upper() == "DICOMDIR":
                    continue  # dot-folders aside, dot-files read; a DICOMDIR is an index, not an image
                if path.is_dir():
                    below.append(path)
                elif left > 0:
                    left -= 1
                    if _is_dicom_file(path):
                        return path
        level = below
    return None


def _vec(ds: pydicom.Dataset, keyword: str, path: Path) -> np.ndarray:
    if keyword not in ds or ds[keyword].value is None:
        raise VolumeError(f"{path}: no {keyword}; cannot place the slice")
    return np.asarray([float(v) for v in ds[keyword].value], np.float64)


def _header(path: Path) -> pydicom.Dataset:
    """One file's DICOM header (no pixels); VolumeError naming it when it cannot be read."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise VolumeError(f"{path}: cannot read the DICOM header: {exc}".replace("\n", " ")) from None


def _dicom_headers(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    headers, other = [], []
    for path in _files(folder):
        if not _is_dicom_file(path):
            other.append(path.name)
            continue
        headers.append((path, _header(path)))
    if not headers:
        raise VolumeError(f"{folder}: no DICOM files ({len(other)} other file(s)); a DICOM series folder expected")
    if other:
        log.info("%s: %d non-DICOM file(s) skipped (e.g. %s)", folder, len(other), ", ".join(other[:3]))
    return headers


def _check_series(folder: Path, headers: list[tuple[Path, pydicom.Dataset]]) -> None:
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
    if len(series) > 1:
        raise VolumeError(f"{folder}: {len(series)} DICOM series in one folder; one series per case folder expected")
    modalities = sorted({str(ds.get("Modality", "none")) for _, ds in headers})
    if modalities != ["CT"]:
        raise VolumeError(f"{folder}: Modality {', '.join(modalities)}, not CT")
    stripped = [path.name for path, ds in headers if "RescaleIntercept" not in ds]
    if 0 < len(stripped) < len(headers):
        raise VolumeError(f"{folder}: {len(stripped)} of {len(headers)} file(s) without RescaleIntercept (e.g. "
                          f"{stripped[0]}): their stored values are not Hounsfield units; restore "
                          "RescaleSlope/RescaleIntercept")
    for keyword in ("ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        for path, ds in headers:
            if keyword not in ds:
                raise VolumeError(f"{path}: no {keyword}")
        values = [_vec(ds, keyword, path) if keyword in ("ImageOrientationPatient", "PixelSpacing")
                  else [float(ds[keyword].value)] for path, ds in headers]
        odd = [headers[i][0].name for i in odd_ones(values)]
        if odd:
            raise VolumeError(f"{folder}: {len(odd)} of {len(headers)} file(s) differ from the others in {keyword} "
                              f"(e.g. {odd[0]}): a localizer (scout) or another image under the same series? one "
                              "orientation and size per series expected")


def _order(folder: Path, headers: list[tuple[Path, pydicom.Dataset]]):
    """The slices' grid (``dicom_geometry.slice_grid``), their files and ImagePositionPatient ((n, 3)
    LPS mm) in its order."""
    first_path, first = headers[0]
    positions = np.stack([_vec(ds, "ImagePositionPatient", path) for path, ds in headers])
    thickness = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    grid = slice_grid(folder, _vec(first, "ImageOrientationPatient", first_path), positions,
                      [path.name for path, _ in headers], thickness)
    return grid, [headers[i][0] for i in grid.order], positions[grid.order]


def _rescale_cause(headers: list[tuple[Path, pydicom.Dataset]]) -> str:
    """The likely cause of stored values that are not HU, for ``as_hu``'s message."""
    if any("RescaleIntercept" not in ds for _, ds in headers):
        return ("no RescaleIntercept in the DICOM headers: stored values without their rescale, e.g. stripped "
                "by an anonymiser; restore RescaleSlope/RescaleIntercept")
    return "the series' RescaleSlope/RescaleIntercept do not give Hounsfield units"


def read_dicom(folder: Path, case_id: str) -> Volume:
    """One DICOM series folder (or one enhanced CT file in it) as a ``Volume``; VolumeError naming
    the folder or file for anything ``read_volume`` refuses."""
    headers = _dicom_headers(folder)
    if any(is_multiframe(ds) for _, ds in headers):
        return read_multiframe(folder, headers, case_id)
    _check_series(folder, headers)
    grid, paths, positions = _order(folder, headers)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    reader.SetSpacingWarningRelThreshold(1.0)  # the spacing is checked above, ITK's warning would only leak
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(f"{folder}: cannot read the pixels: {one_line(exc)}") from None
    rows, cols = int(headers[0][1].Rows), int(headers[0][1].Columns)
    if image.GetDimension() != 3 or image.GetSize() != (cols, rows, len(paths)):
        raise VolumeError(f"{folder}: pixels read as {image.GetSize()}, expected {(cols, rows, len(paths))}")
    dy, dx = _vec(headers[0][1], "PixelSpacing", headers[0][0])
    image.SetSpacing((float(dx), float(dy), grid.step))  # ITK's z spacing differs under a tilt
    image.SetOrigin(tuple(float(v) for v in grid.origin))
    image.SetDirection(grid.direction)
    # a view of ITK's buffer (often int32), not a copy; the image then reduced to its grid before the
    # Volume is built: the pixels are held once as read and once as int16 HU, never more
    hu = as_hu(sitk.GetArrayViewFromImage(image), folder, _rescale_cause(headers))
    image = grid_only(image)
    findings = tilt_findings(folder, grid.tilt_deg) + contrast_findings(ds for _, ds in headers)
    return build_volume(image, hu, case_id, folder, "dicom", grid.tilt_deg, findings,
                        positions=positions)  # the exact (sheared under a tilt) affine


def is_dicom_file(path: str | Path) -> bool:
    """True for an existing file that reads as DICOM (``_is_dicom_file``), whatever its name."""
    path = Path(path)
    return path.is_file() and _is_dicom_file(path)


def read_dicom_file(path: Path, case_id: str) -> Volume:
    """One DICOM file given on its own: an enhanced CT file (all its frames) as a ``Volume``;
    VolumeError naming it for a single image (a series is read from its folder) or a file that does
    not read as DICOM."""
    ds = _header(path)
    if not is_multiframe(ds):
        raise VolumeError(f"{path}: one DICOM image, not a series: give the folder that holds the series' files")
    return read_multiframe(path, [(path, ds)], case_id)
