"""NIfTI files read into a ``Volume`` (CT in HU) or a ``LabelVolume`` (class ids), with SimpleITK."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from aisd_ray.data.volume_base import (CANONICAL, Geometry, Volume, VolumeError, as_hu, build_volume, is_nifti,
                                       one_line)


def read_nifti_image(path: Path) -> sitk.Image:
    """A 3-D scalar image from a NIfTI file; anything else is a VolumeError naming it."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise VolumeError(f"{path}: cannot read NIfTI: {one_line(exc)}") from None
    if image.GetDimension() != 3:
        raise VolumeError(f"{path}: a {image.GetDimension()}-D NIfTI: one CT volume expected")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{path}: {image.GetNumberOfComponentsPerPixel()} values per voxel: one CT volume expected")
    return image


def read_nifti(path: Path, case_id: str) -> Volume:
    image = read_nifti_image(path)
    values = sitk.GetArrayFromImage(image)
    return build_volume(image, as_hu(values, path), case_id, path, "nifti", 0.0)


@dataclass(frozen=True, eq=False)
class LabelVolume:
    """A label NIfTI in the canonical orientation: ``labels`` (Z, Y, X) uint8, ``spacing`` (z, y, x)
    mm, ``geometry`` its canonical grid."""

    labels: np.ndarray
    spacing: tuple[float, float, float]
    geometry: Geometry


def read_label_volume(path: str | Path) -> LabelVolume:
    """A label NIfTI (``.nii``/``.nii.gz``, any storage order) in the canonical orientation; whole
    numbers 0..255. Raises VolumeError naming the file otherwise."""
    path = Path(path)
    if not is_nifti(path):
        raise VolumeError(f"{path}: not a .nii/.nii.gz label file" if path.exists() else f"{path}: not found")
    canonical = sitk.DICOMOrient(read_nifti_image(path), CANONICAL)
    labels = sitk.GetArrayFromImage(canonical)
    if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
        raise VolumeError(f"{path}: non-integer label values (e.g. {labels[labels != np.round(labels)].flat[0]:g})")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise VolumeError(f"{path}: label values {labels.min():g}..{labels.max():g}; whole numbers 0..255 expected")
    return LabelVolume(labels.astype(np.uint8), tuple(float(v) for v in canonical.GetSpacing()[::-1]),
                       Geometry.of(canonical))


def check_same_grid(path: Path, found: LabelVolume, shape: tuple[int, ...], spacing, geometry: Geometry,
                    name: str) -> None:
    """VolumeError naming ``path`` unless ``found`` lies on the grid of ``name`` (shape, spacing to a
    relative 1e-3, direction to 1e-3, origin to 1% of a voxel)."""
    if found.labels.shape != tuple(shape):
        raise VolumeError(f"{path}: labels are {found.labels.shape} (Z, Y, X) but {name} is {tuple(shape)}")
    if not np.allclose(found.spacing, spacing, rtol=1e-3, atol=0):
        raise VolumeError(f"{path}: spacing {tuple(round(s, 4) for s in found.spacing)} mm differs from {name}'s "
                          f"{tuple(round(s, 4) for s in spacing)} mm")
    if not np.allclose(found.geometry.direction, geometry.direction, atol=1e-3):
        raise VolumeError(f"{path}: orientation differs from {name}'s")
    if not np.allclose(found.geometry.origin, geometry.origin, atol=0.01 * min(spacing)):
        raise VolumeError(f"{path}: origin {tuple(round(v, 2) for v in found.geometry.origin)} mm differs from "
                          f"{name}'s {tuple(round(v, 2) for v in geometry.origin)} mm")
