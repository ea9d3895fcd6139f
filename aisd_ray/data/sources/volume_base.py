"""The common ground of the CT volume readers: ``Volume`` (one CT in Hounsfield units in the canonical
orientation), its grids (``Geometry``), ``VolumeError``, the one check that values are Hounsfield units
(``as_hu``), and the names of NIfTI files and cases. ``dicom_series`` and ``nifti_volume`` read into it;
``volume`` is the door the rest of the package uses.

Canonical orientation: ``Volume.hu`` is (Z, Y, X) with z running inferior to superior, y anterior to
posterior, x patient right to left (``DICOMOrient(image, "LPS")``: the radiological display of an
axial slice). ``volume_write`` puts a canonical array back into the input's exact grid, so a mask
written for a case overlays its original series.

Geometry, exactly: ``Volume.affine`` is the input grid's own voxel -> patient map (LPS mm, input
storage order), sheared where the grid is (a gantry-tilted series: its column 2 is the step between
consecutive ImagePositionPatient); ``Geometry`` is ITK's rigid view of the same grid (slice normal,
spacing along it), which the reorientation and the model use. A NIfTI input's own qform and sform
(``NiftiGeometry``) travel with it, so its masks are written with them.

Privacy: header values other than geometry, Modality and UIDs are never kept; a ``Volume``, its
messages and what ``volume_write`` writes carry only the case ID and the geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from aisd_ray.data.sources.hu import TISSUE_HU
from aisd_ray.data.sources.layout import DataError

CANONICAL = "LPS"


class VolumeError(DataError):
    """A volume or label file that cannot be used; the one-line message names the file or folder."""


NIFTI_GEOMETRY_FIELDS = ("pixdim", "xyzt_units", "qform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x",
                         "qoffset_y", "qoffset_z", "sform_code", "srow_x", "srow_y", "srow_z")


@dataclass(frozen=True, eq=False)
class NiftiGeometry:
    """A NIfTI input's geometry as stored in its header (``NIFTI_GEOMETRY_FIELDS``: the qform's
    quaternion, offset and code, the sform's rows and code, pixdim with qfac, the units): nothing
    else of the header, no free text. ``fields`` maps each name to its stored value (numpy)."""

    fields: dict = field(repr=False)


@dataclass(frozen=True)
class Geometry:
    """An ITK image grid: ``size`` (x, y, z) voxels, ``spacing`` (x, y, z) mm, ``origin`` (x, y, z)
    mm in LPS, ``direction`` 9 floats row-major (column j: axis j's direction), orientation ``code``."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    code: str

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()),
                   sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()))

    def apply(self, image: sitk.Image) -> sitk.Image:
        """Give ``image`` (of this size) this spacing, origin and direction; returns it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


@dataclass(frozen=True)
class Finding:
    """One QA observation about a case: ``check`` a snake_case name, ``status`` one of "pass",
    "warn", "fail", "skipped"; ``value`` and ``expected`` JSON-able (numbers, strings, lists or
    None); ``message`` one line without patient data."""
    check: str
    status: str
    value: object = None
    expected: object = None
    message: str = ""


@dataclass(frozen=True, eq=False)
class Volume:
    """One CT volume. ``hu``: (Z, Y, X) int16 Hounsfield units in the canonical orientation (module
    docstring); ``spacing``: (z, y, x) mm, z the distance between slice centres along their normal;
    ``kind``: "dicom" or "nifti"; ``source``: the path read; ``gantry_tilt_deg``: 0 for none.
    ``input_geometry``/``canonical_geometry``: ITK's rigid grids before and after reorientation.
    ``affine``: (4, 4) float64, the input grid's exact voxel (i, j, k, 1) -> patient (LPS mm) map, in
    the input's storage order (sheared under a gantry tilt; ``canonical_affine`` for ``hu``'s order).
    ``nifti``: a NIfTI input's own header geometry (None for DICOM).
    ``findings``: what the reader noticed (gantry tilt, ...), ``Finding`` records."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    case_id: str
    source: str
    kind: str
    gantry_tilt_deg: float
    input_geometry: Geometry = field(repr=False)
    canonical_geometry: Geometry = field(repr=False)
    affine: np.ndarray = field(default=None, repr=False)
    nifti: NiftiGeometry | None = field(default=None, repr=False)
    findings: tuple[Finding, ...] = ()

    @property
    def canonical_affine(self) -> np.ndarray:
        """(4, 4) float64: ``hu``'s voxel (z, y, x reversed: i=x, j=y, k=z) -> patient (LPS mm) map,
        exact (sheared where the input grid is): ``affine`` composed with the reorientation."""
        return canonical_affine(self.affine, self.input_geometry, self.canonical_geometry)

    @property
    def voxel_ml(self) -> float:
        """One voxel's volume in mL (spacing product in mm^3 / 1000)."""
        return float(np.prod(self.spacing)) / 1000.0

    def __repr__(self) -> str:
        return (f"Volume(case_id={self.case_id!r}, kind={self.kind!r}, shape={self.hu.shape}, "
                f"spacing={tuple(round(s, 4) for s in self.spacing)}, gantry_tilt_deg={self.gantry_tilt_deg:.2f}, "
                f"source={self.source!r})")


NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: str | Path) -> bool:
    """True for an existing ``.nii`` or ``.nii.gz`` file."""
    path = Path(path)
    return path.name.lower().endswith(NIFTI_SUFFIXES) and path.is_file()


def nifti_stem(name: str) -> str:
    """A file name without ``.nii.gz`` or ``.nii`` (any case); other names as they are."""
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


def nifti_named(folder: str | Path, stem: str) -> Path | None:
    """``folder/<stem>.nii.gz`` or ``.nii``, whichever exists (None if neither)."""
    return next((p for p in (Path(folder) / f"{stem}{s}" for s in NIFTI_SUFFIXES) if p.is_file()), None)


def case_id_of(path: str | Path) -> str:
    """A case's ID from its path: a folder's name, a file's name without ``.nii(.gz)`` and without
    nnU-Net's ``_0000`` channel suffix, or an enhanced CT file's without ``.dcm``."""
    path = Path(path)
    name = path.name
    stem = nifti_stem(name)
    if stem == name:
        return path.stem if name.lower().endswith(".dcm") and path.is_file() else name
    return stem[:-5] if stem.endswith("_0000") else stem


def one_line(exc: BaseException) -> str:
    """ITK's multi-line exception text reduced to its last line, the reason."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    return reason.removeprefix("sitk::ERROR:").strip()[:300]


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # NIfTI is RAS+, DICOM and ITK LPS+: x and y change sign (its own inverse)


def as_hu(values: np.ndarray, where: Path, cause: str = "") -> np.ndarray:
    """``values`` (any shape, any numeric dtype) as whole Hounsfield units, int16, after the one
    check every reader makes that they are HU. ``where``: the file or folder named in the error;
    ``cause``: the reader's likely cause when they are not (e.g. "no RescaleIntercept in the DICOM
    headers"), added to the message.

    Raises VolumeError for NaN or infinite values, values beyond int16, and values that are not HU:
    none below 0 (no air: a 0..1 normalised, 8-bit windowed, or unscaled image, such as DICOM
    stored values HU + 1024 without their intercept), or a lowest value above ``hu.TISSUE_HU`` (no air
    at all: a z-scored, windowed or brain-only image)."""
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):  # integers always are
        raise VolumeError(f"{where}: NaN or infinite values; not a CT in Hounsfield units")
    rounded = np.rint(values) if values.dtype.kind == "f" else values
    if not rounded.size:
        raise VolumeError(f"{where}: no voxels; not a CT volume")
    lo, hi = float(rounded.min()), float(rounded.max())
    if lo < -32768 or hi > 32767:
        raise VolumeError(f"{where}: values {lo:g}..{hi:g} HU do not fit 16 bits; not a CT in Hounsfield units")
    shown = f"{float(values.min()):g}..{float(values.max()):g}"
    if float(values.min()) >= 0:
        raise VolumeError(f"{where}: values {shown} are not Hounsfield units (no air below 0 HU: "
                          f"{cause or 'a normalised, windowed or unscaled image?'})")
    if lo > TISSUE_HU:  # a head CT holds air (about -1000 HU) around the head or in its sinuses
        raise VolumeError(f"{where}: values {shown} are not Hounsfield units (no air: nothing below {TISSUE_HU:g} HU, "
                          f"where a head CT's air lies at about -1000 HU: "
                          f"{cause or 'a normalised, windowed or brain-only image?'})")
    return rounded.astype(np.int16)  # a copy, also of int16 input (a reader may pass a view of its buffer)


def grid_affine(geometry: Geometry) -> np.ndarray:
    """(4, 4) float64: an ITK grid's voxel (i, j, k, 1) -> LPS mm map (direction x spacing, origin)."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(geometry.direction, np.float64).reshape(3, 3) * np.asarray(geometry.spacing)
    affine[:3, 3] = geometry.origin
    return affine


def canonical_affine(affine: np.ndarray | None, given: Geometry, canonical: Geometry) -> np.ndarray:
    """``affine`` (the input grid's exact map, input storage order) in the canonical storage order:
    composed with the axis permutation and flips that take canonical voxels to input voxels (from
    the two rigid grids, exact whole numbers). ``affine`` None: the canonical grid's rigid map."""
    if affine is None:
        return grid_affine(canonical)
    to_input = np.linalg.solve(grid_affine(given), grid_affine(canonical))  # canonical voxel -> input voxel
    return np.asarray(affine, np.float64) @ np.rint(to_input)


def positions_affine(image: sitk.Image, positions: np.ndarray) -> np.ndarray:
    """(4, 4) float64: a DICOM series' exact voxel -> LPS mm map: columns 0 and 1 the row and column
    directions x their pixel spacing (``image``'s), column 2 the mean step between consecutive
    ImagePositionPatient ((N, 3) LPS mm, in slice order; sheared under a gantry tilt), column 3 the
    first slice's position. One slice: column 2 is ``image``'s slice normal x its z spacing."""
    affine = grid_affine(Geometry.of(image))
    positions = np.asarray(positions, np.float64).reshape(-1, 3)
    if len(positions) > 1:
        affine[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
    affine[:3, 3] = positions[0]
    return affine


def grid_only(image: sitk.Image) -> sitk.Image:
    """A 1 x 1 x 1 image with ``image``'s origin, spacing and direction: its grid for ``build_volume``
    without its pixels (a reader frees them before the Volume is built)."""
    out = sitk.Image([1] * image.GetDimension(), sitk.sitkInt8)
    out.SetOrigin(image.GetOrigin())
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(image.GetDirection())
    return out


def build_volume(image: sitk.Image, hu: np.ndarray, case_id: str, source: Path, kind: str, tilt: float,
                 findings: tuple[Finding, ...] = (), positions: np.ndarray | None = None,
                 affine: np.ndarray | None = None, nifti: NiftiGeometry | None = None) -> Volume:
    """A ``Volume`` of ``hu`` ((Z, Y, X) in ``image``'s storage order, on ``image``'s rigid grid),
    reoriented to the canonical orientation. The exact ``affine`` (LPS, input order) is ``affine`` when
    given, else from a DICOM series' slice ``positions`` ((N, 3) LPS mm, ``positions_affine``), else
    ``image``'s rigid grid."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(hu))
    out.SetOrigin(image.GetOrigin())  # ``image``'s grid (it may be ``grid_only``: its pixels dropped)
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(image.GetDirection())
    canonical = sitk.DICOMOrient(out, CANONICAL)
    given = Geometry.of(out)
    if affine is None:
        affine = positions_affine(out, positions) if positions is not None else grid_affine(given)
    affine = np.array(affine, np.float64)
    affine.flags.writeable = False
    return Volume(sitk.GetArrayFromImage(canonical), tuple(float(s) for s in canonical.GetSpacing()[::-1]),
                  case_id, str(source), kind, tilt, given, Geometry.of(canonical), affine, nifti, tuple(findings))


