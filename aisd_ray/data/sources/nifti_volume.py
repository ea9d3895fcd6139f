"""NIfTI files read into a ``Volume`` (CT in HU) or a ``LabelVolume`` (class ids), with nibabel.

nibabel is the library for NIfTI headers: it reads the qform and the sform with their codes as the
standard defines them, keeps NaN as NaN and applies ``scl_slope``/``scl_inter``. SimpleITK is not
used to read NIfTI: it reads the sform only when its code is 1 (a coregistered sform, code 2, 3 or
4, is dropped for the qform) and turns NaN into 0 (water).

Geometry: the one nibabel uses (``img.affine``): the sform when ``sform_code`` > 0, else the qform
(else pixdim alone), converted RAS -> LPS. Axes of any length are read as they are (the spacing is
each axis' length). A sheared affine is read as a gantry-tilted series is: the two axes of a slice
must be orthogonal; the third, the most head-to-foot one, may lean out of their normal (its angle
is recorded as ``gantry_tilt_deg``, the z spacing is its step along the normal, so mL stay right).
Any other shear is refused by name. Images and label files follow the same rule, so a label file
beside its image lies on the same grid.

Non-finite voxels (NaN, +-inf: what a resampler or registration leaves outside the field of view)
are air: set to -1024 HU, recorded as the finding ``non_finite_voxels`` (warn) on the Volume and
logged. The rule: they must lie outside the field of view, i.e. every 2-D region of them in a slice
reaches the slice's edge. A non-finite region enclosed by finite voxels (a hole inside the image,
which air would turn into a dark, lesion-like spot) and an image with no finite voxel are refused.
Never 0 HU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from aisd_ray.data.sources.dicom_geometry import tilt_findings
from aisd_ray.data.sources.hu import AIR_HU
from aisd_ray.data.sources.volume_base import (CANONICAL, LPS_TO_RAS, NIFTI_GEOMETRY_FIELDS, Finding, Geometry,
                                               NiftiGeometry, Volume, VolumeError, as_hu, build_volume,
                                               canonical_affine, is_nifti)

log = logging.getLogger(__name__)
ORTHOGONAL_COS = 1e-3  # two axes whose directions' cosine is below this are orthogonal (0.06 degrees: rounded
# ImageOrientationPatient values in a converted series stay within it)


@dataclass(frozen=True, eq=False)
class NiftiFile:
    """One NIfTI file as read: ``values`` (I, J, K) in storage order, scaling applied (float or
    int); ``affine`` (4, 4) LPS mm, nibabel's; ``image`` an ITK image of ``values`` on the rigid
    grid; ``slice_axis`` the storage axis across the slices; ``tilt_deg`` its lean (0: none);
    ``header`` the geometry fields as stored."""

    values: np.ndarray
    affine: np.ndarray
    image: sitk.Image
    slice_axis: int
    tilt_deg: float
    header: NiftiGeometry


def rigid_grid(affine: np.ndarray, path: Path) -> tuple[tuple, tuple, tuple, int, float]:
    """ITK's rigid view of an LPS ``affine``: (spacing, origin, direction (9, row-major), slice axis,
    tilt degrees). Slice axis: the most head-to-foot axis, whose two others must be orthogonal;
    its direction becomes the slices' normal and its spacing the step along it (the exact affine is
    kept beside this view: ``Volume.affine``). VolumeError naming
    ``path`` for a degenerate affine or a shear within the slices."""
    columns = np.asarray(affine, np.float64)[:3, :3]
    lengths = np.linalg.norm(columns, axis=0)
    if not np.all(np.isfinite(affine)) or np.any(lengths < 1e-6):
        raise VolumeError(f"{path}: the affine is degenerate (a voxel axis of length 0 or not finite)")
    units = columns / lengths
    cosines = units.T @ units
    others = {a: [b for b in range(3) if b != a] for a in range(3)}
    candidates = [a for a in range(3) if abs(cosines[others[a][0], others[a][1]]) < ORTHOGONAL_COS]
    if not candidates:
        angle = float(np.degrees(np.arccos(np.clip(abs(cosines[0, 1]), 0, 1))))
        raise VolumeError(f"{path}: a sheared affine (voxel axes 0 and 1 {angle:.2f} degrees apart; no two axes "
                          "orthogonal): not supported, resample it to a rigid grid")
    axis = max(range(3), key=lambda a: (abs(units[2, a]), -a))  # the most head-to-foot axis: across the slices
    if axis not in candidates:  # the slices' own two axes are not at right angles: a skewed plane, not a tilt
        b, c = others[axis]
        angle = float(np.degrees(np.arccos(np.clip(abs(cosines[b, c]), 0, 1))))
        raise VolumeError(f"{path}: a sheared affine (the slices' voxel axes {b} and {c} {angle:.2f} degrees apart, "
                          "not 90): not supported, resample it to a rigid grid")
    b, c = others[axis]
    units[:, c] -= (units[:, b] @ units[:, c]) * units[:, b]  # exactly orthogonal in the rigid view
    units[:, c] /= np.linalg.norm(units[:, c])
    normal = np.cross(units[:, b], units[:, c])
    normal /= np.linalg.norm(normal)
    step = float(normal @ columns[:, axis])
    if step < 0:
        normal, step = -normal, -step
    lean = float(np.linalg.norm(columns[:, axis] - step * normal)) / lengths[axis]
    tilt = float(np.degrees(np.arcsin(min(1.0, lean)))) if lean > 1e-6 else 0.0
    if tilt >= 45.0:
        raise VolumeError(f"{path}: a sheared affine (slices lean {tilt:.1f} degrees): not supported")
    direction = units.copy()
    direction[:, axis] = normal
    spacing = lengths.copy()
    spacing[axis] = step
    return (tuple(float(s) for s in spacing), tuple(float(v) for v in affine[:3, 3]),
            tuple(float(v) for v in direction.ravel()), axis, tilt)


def _load(path: Path):
    """nibabel's image of ``path``; a ``.nii.gz`` that is not gzip-compressed (some tools write them,
    ITK reads them) is read as the plain ``.nii`` it is."""
    with open(path, "rb") as fh:
        plain_gz = path.name.lower().endswith(".gz") and fh.read(2) != b"\x1f\x8b"
    if not plain_gz:
        return nib.load(str(path), mmap=False)
    data = path.read_bytes()
    try:
        return nib.Nifti1Image.from_bytes(data)
    except Exception:  # not NIfTI-1: NIfTI-2, or the error nibabel gives for neither
        return nib.Nifti2Image.from_bytes(data)


def read_nifti_file(path: Path) -> NiftiFile:
    """A 3-D scalar NIfTI (trailing dimensions of size 1 dropped) read with nibabel; anything else is a
    VolumeError naming it."""
    try:
        img = _load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise VolumeError(f"{path}: not a NIfTI-1 or NIfTI-2 file")
        values = np.asanyarray(img.dataobj)
    except VolumeError:
        raise
    except Exception as exc:  # nibabel's, numpy's and gzip's errors for a broken file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VolumeError(f"{path}: cannot read NIfTI: {reason[:300]}") from None
    shape = values.shape
    if values.dtype.names or values.ndim == 5 and shape[3] == 1 and shape[4] > 1:
        count = len(values.dtype.names) if values.dtype.names else shape[4]
        raise VolumeError(f"{path}: {count} values per voxel: one CT volume expected")
    while values.ndim > 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise VolumeError(f"{path}: a {values.ndim}-D NIfTI: one CT volume expected")
    if values.dtype.kind not in "biuf":
        raise VolumeError(f"{path}: voxel type {values.dtype}: a real-valued volume expected")
    affine = LPS_TO_RAS @ np.asarray(img.affine, np.float64)  # RAS -> LPS: the same sign flip
    spacing, origin, direction, axis, tilt = rigid_grid(affine, path)
    image = sitk.GetImageFromArray(np.zeros(values.shape[::-1], np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    header = NiftiGeometry({key: np.array(img.header[key]) for key in NIFTI_GEOMETRY_FIELDS})
    return NiftiFile(np.asarray(values), affine, image, axis, tilt, header)


def _enclosed(bad: np.ndarray, slice_axis: int) -> int:
    """How many of the ``bad`` voxels lie in 2-D regions (within one slice, 8-connected) that do not
    reach the slice's edge."""
    structure = np.zeros((3, 3, 3), bool)
    structure[tuple(1 if a == slice_axis else slice(None) for a in range(3))] = True
    regions, _ = ndimage.label(bad, structure)
    edge = np.zeros(bad.shape, bool)
    for a in range(3):
        if a != slice_axis:
            edge[tuple(slice(None) if b != a else [0, -1] for b in range(3))] = True
    outside = np.unique(regions[edge & bad])
    return int(np.sum(bad & ~np.isin(regions, outside)))


def read_nifti(path: Path, case_id: str) -> Volume:
    """One CT NIfTI as a ``Volume`` (module docstring: geometry, non-finite voxels). VolumeError
    naming the file for values that are not HU, an enclosed non-finite region, an unusable file."""
    found = read_nifti_file(path)
    values = found.values
    bad = ~np.isfinite(values) if values.dtype.kind == "f" else np.zeros(values.shape, bool)
    count = int(bad.sum())
    findings = ()
    if count:
        if count == bad.size:
            raise VolumeError(f"{path}: every voxel is NaN or infinite; not a CT in Hounsfield units")
        as_hu(values[~bad], path)  # the HU check of every reader on the real values, before non-finite ones are air
        enclosed = _enclosed(bad, found.slice_axis)
        if enclosed:
            raise VolumeError(f"{path}: {enclosed} NaN or infinite voxels enclosed by the image (a hole inside the "
                              "field of view); only non-finite voxels reaching a slice's edge are taken as air")
        message = f"{count} non-finite voxels (NaN/inf) set to {AIR_HU:g} HU (air)"  # logged by the QA gate
        findings = (Finding("non_finite_voxels", "warn", value=count, message=message),)
        values = np.where(bad, AIR_HU, values)
    hu = as_hu(values.transpose(2, 1, 0), path)
    findings += tilt_findings(path, found.tilt_deg)  # a sheared sform: read as a gantry-tilted series is
    return build_volume(found.image, hu, case_id, path, "nifti", found.tilt_deg, affine=found.affine,
                        nifti=found.header, findings=findings)


@dataclass(frozen=True, eq=False)
class LabelVolume:
    """A label NIfTI in the canonical orientation: ``labels`` (Z, Y, X) uint8, ``spacing`` (z, y, x)
    mm, ``geometry`` its canonical (rigid) grid, ``affine`` (4, 4) its exact canonical voxel -> LPS
    mm map (sheared where the file's sform is)."""

    labels: np.ndarray
    spacing: tuple[float, float, float]
    geometry: Geometry
    affine: np.ndarray | None = None


def read_label_volume(path: str | Path) -> LabelVolume:
    """A label NIfTI (``.nii``/``.nii.gz``, any storage order, geometry as ``read_nifti``: nibabel's
    affine) in the canonical orientation; whole numbers 0..255 (after scl_slope/scl_inter). Raises
    VolumeError naming the file otherwise."""
    path = Path(path)
    if not is_nifti(path):
        raise VolumeError(f"{path}: not a .nii/.nii.gz label file" if path.exists() else f"{path}: not found")
    found = read_nifti_file(path)
    image = sitk.GetImageFromArray(np.ascontiguousarray(found.values.transpose(2, 1, 0)))
    image.CopyInformation(found.image)
    canonical = sitk.DICOMOrient(image, CANONICAL)
    labels = sitk.GetArrayFromImage(canonical)
    if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
        raise VolumeError(f"{path}: non-integer label values (e.g. {labels[labels != np.round(labels)].flat[0]:g})")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise VolumeError(f"{path}: label values {labels.min():g}..{labels.max():g}; whole numbers 0..255 expected")
    affine = canonical_affine(found.affine, Geometry.of(image), Geometry.of(canonical))
    return LabelVolume(labels.astype(np.uint8), tuple(float(v) for v in canonical.GetSpacing()[::-1]),
                       Geometry.of(canonical), affine)


def check_same_grid(path: Path, found: LabelVolume, shape: tuple[int, ...], spacing, geometry: Geometry,
                    name: str, affine: np.ndarray | None = None) -> None:
    """VolumeError naming ``path`` unless ``found`` lies on the grid of ``name`` (shape, spacing to a
    relative 1e-3, direction to 1e-3, origin to 1% of a voxel; with ``affine``, ``name``'s exact
    canonical map, each voxel axis to a relative 1e-3, so a sheared grid must match its shear)."""
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
    if affine is not None and found.affine is not None:
        axes, theirs = np.asarray(found.affine)[:3, :3], np.asarray(affine)[:3, :3]
        if np.any(np.linalg.norm(axes - theirs, axis=0) > 1e-3 * np.linalg.norm(theirs, axis=0)):
            raise VolumeError(f"{path}: voxel axes differ from {name}'s (a different shear: gantry tilt)")
