"""CT volumes in Hounsfield units: a DICOM series folder or a NIfTI file in, one canonical array out.

The door to the readers (``dicom_series``, ``nifti_volume``; their common types in ``volume_base``).

Libraries: SimpleITK reads DICOM series (applying RescaleSlope/Intercept) and reorients
(``DICOMOrient``) with one notion of geometry (origin, spacing, direction in LPS mm), the one nnU-Net
and TotalSegmentator use; nibabel reads and writes NIfTI (its qform and sform with their codes, NaN
kept), so a mask written here lies where those tools and FSL/SPM expect it.
pydicom reads the headers for the checks ITK does not make.

Canonical orientation: ``Volume.hu`` is (Z, Y, X) with z running inferior to superior, y anterior to
posterior, x patient right to left. Privacy: header values other than geometry, Modality and UIDs are
never kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aisd_ray.data.sources.dicom_series import (dicom_below, dicom_files, is_dicom_file, is_dicom_series,
                                                read_dicom, read_dicom_file)
from aisd_ray.data.sources.layout import is_metadata
from aisd_ray.data.sources.nifti_volume import LabelVolume, check_same_grid, read_label_volume, read_nifti
from aisd_ray.data.sources.volume_base import (CANONICAL, Geometry, Volume, VolumeError, case_id_of, is_nifti,
                                               nifti_named, nifti_stem)

__all__ = ["CANONICAL", "Geometry", "LabelVolume", "Volume", "VolumeError", "case_id_of", "check_same_grid",
           "dicom_below", "dicom_files", "is_dicom_file", "is_dicom_series", "is_nifti", "list_cases", "nifti_named",
           "nifti_stem", "read_label_volume", "read_labels", "read_volume"]


def read_volume(path: str | Path, case_id: str | None = None) -> Volume:
    """Read one CT volume: a DICOM series folder (files read as DICOM by content, any name; known OS
    metadata names skipped; or one enhanced CT file, in a folder or given itself) or a
    ``.nii``/``.nii.gz`` file. ``case_id``
    defaults to ``case_id_of(path)``.

    DICOM: one series, Modality CT, one orientation and size, axial (normal within 45 degrees of the
    patient's z axis), ordered by ImagePositionPatient along the slice normal, one slice spacing (no
    missing slice, no varying spacing: ``dicom_geometry``) and no two at one position. NIfTI: 3-D,
    one value per voxel. Every reader: values in HU (``volume_base.as_hu``: air present, float
    values rounded to whole HU, fitting int16).
    Raises VolumeError (one line naming the file or folder) for anything else."""
    path = Path(path)
    case_id = case_id or case_id_of(path)
    if path.is_dir():
        return read_dicom(path, case_id)
    if is_nifti(path):
        return read_nifti(path, case_id)
    if not path.exists():
        raise VolumeError(f"{path}: not found")
    if is_dicom_file(path):
        return read_dicom_file(path, case_id)
    raise VolumeError(f"{path}: neither a DICOM series folder, an enhanced CT file nor a .nii/.nii.gz file")


def read_labels(path: str | Path, like: Volume) -> np.ndarray:
    """A label NIfTI as (Z, Y, X) uint8 in ``like``'s canonical orientation (it may be stored in
    another). Its grid in space must be ``like``'s (``check_same_grid``); labels whole numbers
    0..255. Raises VolumeError naming the file otherwise."""
    found = read_label_volume(path)
    check_same_grid(Path(path), found, like.hu.shape, like.spacing, like.canonical_geometry, f"case {like.case_id}",
                    affine=like.canonical_affine)
    return found.labels


def list_cases(folder: str | Path) -> dict[str, Path]:
    """The cases of a folder by case ID, sorted: each ``.nii``/``.nii.gz`` file and each sub-folder
    holding DICOM files is one case; a folder that is itself a DICOM series is one case. Other
    entries (a ``labels`` folder, ``dataset.json``, OS metadata) are skipped. Raises VolumeError for
    a missing folder or two entries with one case ID."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(f"{folder}: folder not found")
    if is_dicom_series(folder):
        return {folder.name: folder}
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if is_metadata(entry.name) or not (is_nifti(entry) or is_dicom_series(entry)):
            continue
        case = case_id_of(entry)
        if case in found:
            raise VolumeError(f"{folder}: two cases named {case!r}: {found[case].name} and {entry.name}")
        found[case] = entry
    return dict(sorted(found.items()))
