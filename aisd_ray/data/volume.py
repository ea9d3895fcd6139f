"""CT volumes in Hounsfield units: a DICOM series folder or a NIfTI file in, one canonical array out.

Libraries: SimpleITK reads DICOM series (applying RescaleSlope/Intercept) and NIfTI, writes NIfTI,
and reorients (``DICOMOrient``) with one notion of geometry (origin, spacing, direction in LPS mm),
the one nnU-Net and TotalSegmentator use, so a mask written here lies where those tools expect it.
pydicom reads the headers (``stop_before_pixels``) for the checks ITK does not make: one series, CT,
one orientation, axial, no missing or duplicated slice, and the slice order, which comes from
ImagePositionPatient along the slice normal, never from file names or InstanceNumber.

Canonical orientation: ``Volume.hu`` is (Z, Y, X) with z running inferior to superior, y anterior to
posterior, x patient right to left (``DICOMOrient(image, "LPS")``: the radiological display of an
axial slice). ``volume_write`` puts a canonical array back into the input's exact grid, so a mask
written for a case overlays its original series.

Gantry tilt: a tilted series' slices are sheared, not rotated: each slice's pixels stay as scanned;
the z spacing is the distance between slices along their normal, so base area x perpendicular height
(``Volume.voxel_ml``) keeps volumes in mL right; ``gantry_tilt_deg`` records the angle.

Privacy: header values other than geometry, Modality and UIDs are never kept; a ``Volume``, its
messages and what ``volume_write`` writes carry only the case ID and the geometry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from aisd_ray.data.layout import DataError, is_metadata

log = logging.getLogger(__name__)
CANONICAL = "LPS"
AXIAL_LIMIT_DEG = 45.0  # a slice normal farther than this from the patient's z axis is not axial
GAP_FACTOR = 1.5  # a step between neighbouring slices over this x the median step is a missing slice
NON_DICOM_SUFFIXES = (".nii", ".gz", ".json", ".png", ".jpg", ".txt", ".csv", ".zip", ".md", ".xml")


class VolumeError(DataError):
    """A volume or label file that cannot be used; the one-line message names the file or folder."""


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


@dataclass(frozen=True, eq=False)
class Volume:
    """One CT volume. ``hu``: (Z, Y, X) int16 Hounsfield units in the canonical orientation (module
    docstring); ``spacing``: (z, y, x) mm, z the distance between slice centres along their normal;
    ``kind``: "dicom" or "nifti"; ``source``: the path read; ``gantry_tilt_deg``: 0 for none.
    ``input_geometry``/``canonical_geometry``: the grids before and after reorientation."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    case_id: str
    source: str
    kind: str
    gantry_tilt_deg: float
    input_geometry: Geometry = field(repr=False)
    canonical_geometry: Geometry = field(repr=False)

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
    """A case's ID from its path: a folder's name, or a file's name without ``.nii(.gz)`` and without
    nnU-Net's ``_0000`` channel suffix."""
    name = Path(path).name
    stem = nifti_stem(name)
    if stem == name:
        return name
    return stem[:-5] if stem.endswith("_0000") else stem


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


def _one_line(exc: BaseException) -> str:
    """ITK's multi-line exception text reduced to its last line, the reason."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    return reason.removeprefix("sitk::ERROR:").strip()[:300]


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


def _as_hu(values: np.ndarray, where: Path) -> np.ndarray:
    """Values rounded to whole HU as int16; NaN or values beyond int16 are a VolumeError."""
    if not np.all(np.isfinite(values)):
        raise VolumeError(f"{where}: NaN or infinite values; not a CT in Hounsfield units")
    rounded = np.rint(values) if values.dtype.kind == "f" else values
    lo, hi = float(rounded.min()), float(rounded.max())
    if lo < -32768 or hi > 32767:
        raise VolumeError(f"{where}: values {lo:g}..{hi:g} HU do not fit 16 bits; not a CT in Hounsfield units")
    return rounded.astype(np.int16)


def _volume(image: sitk.Image, hu: np.ndarray, case_id: str, source: Path, kind: str, tilt: float) -> Volume:
    out = sitk.GetImageFromArray(hu)
    out.CopyInformation(image)
    canonical = sitk.DICOMOrient(out, CANONICAL)
    return Volume(sitk.GetArrayFromImage(canonical), tuple(float(s) for s in canonical.GetSpacing()[::-1]),
                  case_id, str(source), kind, tilt, Geometry.of(out), Geometry.of(canonical))


def _read_dicom(folder: Path, case_id: str) -> Volume:
    headers = _dicom_headers(folder)
    _check_series(folder, headers)
    paths, row, col, normal, origin, z_step, tilt = _order(folder, headers)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(f"{folder}: cannot read the pixels: {_one_line(exc)}") from None
    rows, cols = int(headers[0][1].Rows), int(headers[0][1].Columns)
    if image.GetDimension() != 3 or image.GetSize() != (cols, rows, len(paths)):
        raise VolumeError(f"{folder}: pixels read as {image.GetSize()}, expected {(cols, rows, len(paths))}")
    dy, dx = _vec(headers[0][1], "PixelSpacing", headers[0][0])
    image.SetSpacing((float(dx), float(dy), float(z_step)))  # ITK's z spacing differs under a tilt
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in np.stack([row, col, normal], axis=1).ravel()))
    return _volume(image, _as_hu(sitk.GetArrayFromImage(image), folder), case_id, folder, "dicom", tilt)


def _read_nifti_image(path: Path) -> sitk.Image:
    """A 3-D scalar image from a NIfTI file; anything else is a VolumeError naming it."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise VolumeError(f"{path}: cannot read NIfTI: {_one_line(exc)}") from None
    if image.GetDimension() != 3:
        raise VolumeError(f"{path}: a {image.GetDimension()}-D NIfTI: one CT volume expected")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{path}: {image.GetNumberOfComponentsPerPixel()} values per voxel: one CT volume expected")
    return image


def _read_nifti(path: Path, case_id: str) -> Volume:
    image = _read_nifti_image(path)
    values = sitk.GetArrayFromImage(image)
    if values.size and np.all(np.isfinite(values)) and float(values.min()) >= 0:
        # A head CT in HU holds air (about -1000 HU) around the head: no negative value at all means
        # another scale (0..1 normalised, 8-bit windowed, or stored values without their intercept).
        raise VolumeError(f"{path}: values {float(values.min()):g}..{float(values.max()):g} are not Hounsfield "
                          "units (no air below 0 HU: a normalised, windowed or unscaled image?)")
    return _volume(image, _as_hu(values, path), case_id, path, "nifti", 0.0)


def read_volume(path: str | Path, case_id: str | None = None) -> Volume:
    """Read one CT volume: a DICOM series folder (files with or without ``.dcm``; OS metadata is
    skipped) or a ``.nii``/``.nii.gz`` file. ``case_id`` defaults to ``case_id_of(path)``.

    DICOM: one series, Modality CT, one orientation and size, axial (normal within 45 degrees of the
    patient's z axis), ordered by ImagePositionPatient along the slice normal, no missing slice (a
    step over 1.5x the median) and no two at one position. NIfTI: 3-D, one value per voxel, some
    value below 0 (air), float values rounded to whole HU. Values must fit int16.
    Raises VolumeError (one line naming the file or folder) for anything else."""
    path = Path(path)
    case_id = case_id or case_id_of(path)
    if path.is_dir():
        return _read_dicom(path, case_id)
    if is_nifti(path):
        return _read_nifti(path, case_id)
    if not path.exists():
        raise VolumeError(f"{path}: not found")
    raise VolumeError(f"{path}: neither a DICOM series folder nor a .nii/.nii.gz file")


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
    canonical = sitk.DICOMOrient(_read_nifti_image(path), CANONICAL)
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


def read_labels(path: str | Path, like: Volume) -> np.ndarray:
    """A label NIfTI as (Z, Y, X) uint8 in ``like``'s canonical orientation (it may be stored in
    another). Its grid in space must be ``like``'s (``check_same_grid``); labels whole numbers
    0..255. Raises VolumeError naming the file otherwise."""
    found = read_label_volume(path)
    check_same_grid(Path(path), found, like.hu.shape, like.spacing, like.canonical_geometry, f"case {like.case_id}")
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
