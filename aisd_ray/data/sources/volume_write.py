"""Canonical arrays back into a CT volume's own geometry, written as NIfTI: the masks and
probability maps ``infer`` gives for a patient, on the exact grid of the series or file it read.

nibabel writes them (``write_nifti``), in the input's storage order, atomically, from a fresh header:
``descrip`` "aisd-ray" and no other text (aux_file, intent_name, db_name empty), no scaling (the
input's scl_slope/scl_inter are not copied; nibabel stores NaN, the standard's "none"), uint8 for
labels and float32 for probabilities, and the geometry:

- a NIfTI input's own qform and sform, both codes, pixdim (with qfac) and units, as stored, so the
  mask lies on its image in every viewer, whichever transform it uses (nibabel, FSL and SPM the
  sform when its code is > 0; ITK the qform unless the sform's code is 1);
- a DICOM series: sform = the series' exact voxel -> patient affine (``Volume.affine``: the steps
  between its ImagePositionPatient, sheared under a gantry tilt) converted LPS -> RAS, code 1
  (scanner); qform = the nearest rigid grid (row, column and slice normal directions, the spacing
  along the normal: what ITK wrote before), code 1. Viewers that use the sform (nibabel, FSL, SPM)
  overlay a tilted series' mask exactly; ITK-based ones, which drop a sheared sform for the qform,
  see the rigid grid, as they see the series itself. Untilted, the two are equal.

SimpleITK still writes the grids that are no scan's (``write_image``, ``write_model_grid``).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from aisd_ray.data.sources.volume import Volume, VolumeError
from aisd_ray.data.sources.volume_base import LPS_TO_RAS, grid_affine

HEADER_NOTE = "aisd-ray"  # what a written NIfTI's descrip field says
SCANNER = 1  # NIFTI_XFORM_SCANNER_ANAT: DICOM's patient coordinates


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


def _atomic(path: str | Path, write) -> Path:
    """``write(tmp)`` to a temporary name in ``path``'s folder, then ``os.replace``; nothing left on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name[:-len(suffix)]}.{os.getpid()}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_image(image: sitk.Image, path: str | Path) -> Path:
    """Write an image with SimpleITK atomically (a temporary name in the same folder, then
    ``os.replace``), with ``descrip`` set to "aisd-ray" and no other text. The suffix (``.nii.gz``)
    picks the format."""
    clean = sitk.Image(image)
    for key in clean.GetMetaDataKeys():
        clean.EraseMetaData(key)
    clean.SetMetaData("ITK_FileNotes", HEADER_NOTE)
    return _atomic(path, lambda tmp: sitk.WriteImage(clean, str(tmp), useCompression=tmp.name.endswith(".gz")))


def nifti_header(volume: Volume, shape: tuple[int, ...], dtype: np.dtype) -> nib.Nifti1Header:
    """A fresh NIfTI-1 header for an array of ``shape`` (I, J, K) and ``dtype`` in ``volume``'s input
    grid (module docstring: the input's own qform and sform, or a DICOM series' exact sform and rigid
    qform); descrip "aisd-ray", no other text, no scaling."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    if volume.nifti is not None:
        for key, value in volume.nifti.fields.items():
            header[key] = value
    else:
        exact = grid_affine(volume.input_geometry) if volume.affine is None else np.asarray(volume.affine, np.float64)
        header.set_sform(LPS_TO_RAS @ exact, code=SCANNER)
        header.set_qform(LPS_TO_RAS @ grid_affine(volume.input_geometry), code=SCANNER)
        header.set_xyzt_units("mm", "sec")
    header.set_slope_inter(1.0, 0.0)
    header["descrip"] = HEADER_NOTE
    return header


def write_nifti(volume: Volume, array: np.ndarray, path: str | Path) -> Path:
    """Write a canonical (Z, Y, X) array in ``volume``'s input geometry and storage order as
    ``.nii.gz`` (or ``.nii``) with nibabel, atomically (module docstring: the header). Labels (bool, or
    integers 0..255) are written uint8, probabilities (floats) float32; other integers (an image in HU)
    keep their type.
    Raises VolumeError for another suffix or shape."""
    path = Path(path)
    if not path.name.lower().endswith((".nii.gz", ".nii")):
        raise VolumeError(f"{path}: a NIfTI name (.nii.gz) expected")
    array = np.asarray(array)
    if array.dtype.kind == "f":
        array = array.astype(np.float32)
    elif array.dtype == bool or not array.size or (array.dtype.kind in "iu" and 0 <= array.min() <= array.max() <= 255):
        array = array.astype(np.uint8)
    stored = sitk.GetArrayFromImage(to_input_geometry(volume, array)).transpose(2, 1, 0)
    header = nifti_header(volume, stored.shape, stored.dtype)
    image = nib.Nifti1Image(np.ascontiguousarray(stored), None, header)
    return _atomic(path, lambda tmp: nib.save(image, str(tmp)))


def write_model_grid(labels: np.ndarray, spacing_zyx, path: str | Path) -> Path:
    """Write a (Z, Y, X) uint8 label map at model resolution as NIfTI, atomically: voxel size
    ``spacing_zyx`` (mm, as a store's manifest records ``model_spacing_mm``), origin 0, identity
    direction. For label maps that are scored against each other (cross-validation's out-of-fold
    predictions beside their ground truth), not for a scan's geometry (``write_nifti``)."""
    image = sitk.GetImageFromArray(np.asarray(labels).astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in reversed(tuple(spacing_zyx))))
    return write_image(image, path)
