"""DICOM series folders read into a ``Volume``.

SimpleITK reads the pixels (applying RescaleSlope/Intercept); pydicom reads the headers
(``stop_before_pixels``) for the checks ITK does not make: one series, CT, one orientation, axial, no
missing or duplicated slice, and the slice order, which comes from ImagePositionPatient along the
slice normal, never from file names or InstanceNumber.

Gantry tilt: a tilted series' slices are sheared, not rotated: each slice's pixels stay as scanned;
the z spacing is the distance between slices along their normal, so base area x perpendicular height
(``Volume.voxel_ml``) keeps volumes in mL right; ``gantry_tilt_deg`` records the angle.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from aisd_ray.data.layout import is_metadata
from aisd_ray.data.volume_base import Volume, VolumeError, as_hu, build_volume, one_line

log = logging.getLogger(__name__)
AXIAL_LIMIT_DEG = 45.0  # a slice normal farther than this from the patient's z axis is not axial
GAP_FACTOR = 1.5  # a step between neighbouring slices over this x the median step is a missing slice
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
    """A folder's files but OS metadata and a DICOMDIR (a CD's index, not an image)."""
    return [p for p in sorted(folder.iterdir()) if p.is_file() and not is_metadata(p.name) and p.name != "DICOMDIR"]


def dicom_files(folder: str | Path) -> list[Path]:
    """The DICOM files of a series folder (OS metadata, a DICOMDIR and other files aside): one per slice."""
    return [p for p in _files(Path(folder)) if _is_dicom_file(p)]


def is_dicom_series(path: str | Path) -> bool:
    """True for a folder holding at least one DICOM file (OS metadata files aside)."""
    path = Path(path)
    return path.is_dir() and any(_is_dicom_file(p) for p in _files(path))


def _vec(ds: pydicom.Dataset, keyword: str, path: Path) -> np.ndarray:
    if keyword not in ds or ds[keyword].value is None:
        raise VolumeError(f"{path}: no {keyword}; cannot place the slice")
    return np.asarray([float(v) for v in ds[keyword].value], np.float64)


def _dicom_headers(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    headers, other = [], []
    for path in _files(folder):
        if not _is_dicom_file(path):
            other.append(path.name)
            continue
        try:
            headers.append((path, pydicom.dcmread(path, stop_before_pixels=True, force=True)))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise VolumeError(f"{path}: cannot read the DICOM header: {exc}".replace("\n", " ")) from None
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
    first_path, first = headers[0]
    for keyword in ("ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        for path, ds in headers:
            if keyword not in ds:
                raise VolumeError(f"{path}: no {keyword}")
            if keyword in ("Rows", "Columns"):
                same = ds[keyword].value == first[keyword].value
            else:
                same = np.allclose(_vec(ds, keyword, path), _vec(first, keyword, first_path), atol=1e-4)
            if not same:
                raise VolumeError(f"{folder}: slices differ in {keyword} ({first_path.name}, {path.name})")


def _order(folder: Path, headers: list[tuple[Path, pydicom.Dataset]]):
    """Slices sorted along their normal: (paths, row, col, normal, first position, z step mm, tilt deg)."""
    iop = _vec(headers[0][1], "ImageOrientationPatient", headers[0][0])
    row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    off_axis = float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))
    if off_axis > AXIAL_LIMIT_DEG:
        raise VolumeError(f"{folder}: not an axial series (slice normal {off_axis:.0f} degrees from the patient's "
                          "z axis)")
    positions = np.stack([_vec(ds, "ImagePositionPatient", path) for path, ds in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    paths, positions, along = [headers[i][0] for i in order], positions[order], along[order]
    steps = np.diff(along)
    if len(steps) == 0:
        ds = headers[0][1]
        thickness = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
        return paths, row, col, normal, positions[0], thickness, 0.0
    median = float(np.median(steps))
    for k, step in enumerate(steps):
        if step < max(1e-3, 0.01 * median):
            raise VolumeError(f"{folder}: two slices at one position ({along[k]:.2f} mm along the slice normal: "
                              f"{paths[k].name}, {paths[k + 1].name})")
        if step > GAP_FACTOR * median:
            raise VolumeError(f"{folder}: missing slice(s): a gap of {step:.2f} mm between the slices at "
                              f"{along[k]:.2f} and {along[k + 1]:.2f} mm (median step {median:.2f} mm)")
    advance = positions[-1] - positions[0]
    cos_tilt = min(1.0, abs(float(advance @ normal)) / float(np.linalg.norm(advance)))
    return paths, row, col, normal, positions[0], median, float(np.degrees(np.arccos(cos_tilt)))


def read_dicom(folder: Path, case_id: str) -> Volume:
    headers = _dicom_headers(folder)
    _check_series(folder, headers)
    paths, row, col, normal, origin, z_step, tilt = _order(folder, headers)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(f"{folder}: cannot read the pixels: {one_line(exc)}") from None
    rows, cols = int(headers[0][1].Rows), int(headers[0][1].Columns)
    if image.GetDimension() != 3 or image.GetSize() != (cols, rows, len(paths)):
        raise VolumeError(f"{folder}: pixels read as {image.GetSize()}, expected {(cols, rows, len(paths))}")
    dy, dx = _vec(headers[0][1], "PixelSpacing", headers[0][0])
    image.SetSpacing((float(dx), float(dy), float(z_step)))  # ITK's z spacing differs under a tilt
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in np.stack([row, col, normal], axis=1).ravel()))
    by_path = dict(headers)  # the slices' positions, in order: the exact (sheared under a tilt) affine
    positions = np.stack([_vec(by_path[p], "ImagePositionPatient", p) for p in paths])
    return build_volume(image, as_hu(sitk.GetArrayFromImage(image), folder), case_id, folder, "dicom", tilt,
                        positions=positions)


