"""Canonical arrays back into a CT volume's own geometry, written as NIfTI: the masks and
probability maps ``infer`` gives for a patient, on the exact grid of the series or file it read.

SimpleITK writes (the reader's library: one notion of origin, spacing and direction), atomically,
with every metadata entry cleared and the header's description set to "aisd-ray": no header text of
the input reaches the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from aisd_ray.data.volume import Volume, VolumeError

HEADER_NOTE = "aisd-ray"  # what a written NIfTI's descrip field says


def to_input_geometry(volume: Volume, array: np.ndarray) -> sitk.Image:
    """A canonical (Z, Y, X) array (``volume.hu``'s shape; bool becomes uint8) as an image with the
    input's exact size, spacing, origin and direction. Raises VolumeError for another shape."""
    array = np.asarray(array)
    if array.shape != volume.hu.shape:
        raise VolumeError(f"case {volume.case_id}: array {array.shape} does not match the volume's "
                          f"{volume.hu.shape} (Z, Y, X)")
    image = volume.canonical_geometry.apply(sitk.GetImageFromArray(array.astype(np.uint8) if array.dtype == bool
                                                                  else array))
    image = sitk.DICOMOrient(image, volume.input_geometry.code)
    if image.GetSize() != volume.input_geometry.size:
        raise VolumeError(f"case {volume.case_id}: reorientation gave {image.GetSize()}, not the input's "
                          f"{volume.input_geometry.size}")
    return volume.input_geometry.apply(image)  # the input's values exactly, no rounding through reorientation


def write_image(image: sitk.Image, path: str | Path) -> Path:
    """Write an image atomically (a temporary name in the same folder, then ``os.replace``), with
    ``descrip`` set to "aisd-ray" and no other text. The suffix (``.nii.gz``) picks the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name[:-len(suffix)]}.{os.getpid()}.tmp{suffix}")
    clean = sitk.Image(image)
    for key in clean.GetMetaDataKeys():
        clean.EraseMetaData(key)
    clean.SetMetaData("ITK_FileNotes", HEADER_NOTE)
    try:
        sitk.WriteImage(clean, str(tmp), useCompression=suffix == ".nii.gz")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_nifti(volume: Volume, array: np.ndarray, path: str | Path) -> Path:
    """Write a canonical (Z, Y, X) array in ``volume``'s input geometry as ``.nii.gz`` (or ``.nii``),
    atomically. uint8 labels stay uint8, float32 stays float32 (float64 becomes float32, bool uint8).
    Raises VolumeError for another suffix or shape."""
    path = Path(path)
    if not path.name.lower().endswith((".nii.gz", ".nii")):
        raise VolumeError(f"{path}: a NIfTI name (.nii.gz) expected")
    array = np.asarray(array)
    array = array.astype(np.float32) if array.dtype == np.float64 else array
    return write_image(to_input_geometry(volume, array), path)


def write_model_grid(labels: np.ndarray, spacing_zyx, path: str | Path) -> Path:
    """Write a (Z, Y, X) uint8 label map at model resolution as NIfTI, atomically: voxel size
    ``spacing_zyx`` (mm, as a store's manifest records ``model_spacing_mm``), origin 0, identity
    direction. For label maps that are scored against each other (cross-validation's out-of-fold
    predictions beside their ground truth), not for a scan's geometry (``write_nifti``)."""
    image = sitk.GetImageFromArray(np.asarray(labels).astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in reversed(tuple(spacing_zyx))))
    return write_image(image, path)
