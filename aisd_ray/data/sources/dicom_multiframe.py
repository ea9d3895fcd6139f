"""Multi-frame DICOM: an enhanced CT (one file, every slice a frame) read into a ``Volume``; any
other multi-frame object refused by name.

An Enhanced CT Image Storage or Legacy Converted Enhanced CT Image Storage file keeps each frame's
geometry in its functional groups (per-frame, else shared): PlaneOrientationSequence
(ImageOrientationPatient), PlanePositionSequence (ImagePositionPatient), PixelMeasuresSequence
(PixelSpacing, SliceThickness) and PixelValueTransformationSequence (RescaleSlope/Intercept). The
frames are ordered by position along their normal and checked as a series' slices are
(``dicom_geometry``: axial, one spacing, no two at one position), the values by ``as_hu``. pydicom
decodes the pixels (uncompressed and RLE here; JPEG needs a pydicom pixel plugin installed).

Other multi-frame objects (a multi-frame secondary capture, an enhanced MR, a cine) are refused
with one line naming the file and its kind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from aisd_ray.data.sources.dicom_geometry import contrast_findings, odd_ones, slice_grid, tilt_findings
from aisd_ray.data.sources.volume_base import Volume, VolumeError, as_hu, build_volume

ENHANCED_CT = frozenset({"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"})
MULTIFRAME_HINT = ("export the series as single-frame CT images (one file per slice), or convert it to "
                   "NIfTI (e.g. dcm2niix)")


def is_multiframe(ds: pydicom.Dataset) -> bool:
    """True for a multi-frame object: more than one frame, per-frame functional groups, or an
    enhanced CT SOP class."""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    return frames > 1 or "PerFrameFunctionalGroupsSequence" in ds or str(ds.get("SOPClassUID", "")) in ENHANCED_CT


def _kind(ds: pydicom.Dataset) -> str:
    uid = ds.get("SOPClassUID")
    return f"{pydicom.uid.UID(str(uid)).name}" if uid else "multi-frame object without SOPClassUID"


def _item(ds: pydicom.Dataset, frame: int, sequence: str, keyword: str):
    """``keyword``'s value in frame ``frame``'s ``sequence`` (per-frame groups first, then shared);
    None where neither holds it."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items is None or len(items) <= index or sequence not in items[index]:
            continue
        inner = items[index][sequence].value
        if inner and keyword in inner[0] and inner[0][keyword].value is not None:
            return inner[0][keyword].value
    return None


def _frames_vec(path: Path, ds: pydicom.Dataset, n: int, sequence: str, keyword: str) -> np.ndarray:
    values = [_item(ds, k, sequence, keyword) for k in range(n)]
    missing = [k + 1 for k, v in enumerate(values) if v is None]
    if missing:
        raise VolumeError(f"{path}: no {keyword} in the functional groups ({sequence}) of frame {missing[0]} "
                          f"({len(missing)} of {n} frames); cannot place the frames")
    return np.asarray([[float(x) for x in v] for v in values], np.float64)


def read_multiframe(folder: Path, headers: list[tuple[Path, pydicom.Dataset]], case_id: str) -> Volume:
    """The one enhanced CT file of ``folder`` as a ``Volume``: frames ordered by position along
    their normal, per-frame rescale applied. Raises VolumeError naming the file (or the folder) for
    another multi-frame kind, a multi-frame file beside other DICOM files, missing geometry, not CT,
    and for anything a series is refused for."""
    multi = [(p, ds) for p, ds in headers if is_multiframe(ds)]
    path, head = multi[0]
    if str(head.get("SOPClassUID", "")) not in ENHANCED_CT:
        raise VolumeError(f"{path}: a multi-frame {_kind(head)} ({int(head.get('NumberOfFrames') or 1)} frames): "
                          f"not a CT series; only single-frame CT series and enhanced CT files are read: "
                          f"{MULTIFRAME_HINT}")
    if len(headers) > 1:
        raise VolumeError(f"{folder}: an enhanced CT file ({path.name}) beside {len(headers) - 1} other DICOM "
                          "file(s); one enhanced CT file or one single-frame series per case folder expected")
    if str(head.get("Modality", "none")) != "CT":
        raise VolumeError(f"{folder}: Modality {head.get('Modality', 'none')}, not CT")
    n = int(head.get("NumberOfFrames") or 1)
    orientation = _frames_vec(path, head, n, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = _frames_vec(path, head, n, "PixelMeasuresSequence", "PixelSpacing")
    positions = _frames_vec(path, head, n, "PlanePositionSequence", "ImagePositionPatient")
    for name, values in (("ImageOrientationPatient", orientation), ("PixelSpacing", spacing)):
        odd = odd_ones(values)
        if odd:
            raise VolumeError(f"{path}: {len(odd)} of {n} frame(s) differ from the others in {name} (e.g. frame "
                              f"{odd[0] + 1}); one orientation and pixel spacing expected")
    thickness = _item(head, 0, "PixelMeasuresSequence", "SliceThickness")
    grid = slice_grid(path, orientation[0], positions, [f"frame {k + 1}" for k in range(n)],
                      float(thickness) if thickness else 1.0)
    slope = [_item(head, k, "PixelValueTransformationSequence", "RescaleSlope") for k in range(n)]
    intercept = [_item(head, k, "PixelValueTransformationSequence", "RescaleIntercept") for k in range(n)]
    try:
        stored = pydicom.dcmread(path, force=True).pixel_array
    except Exception as exc:  # a missing decoder, a truncated file: pydicom's many kinds
        syntax = head.file_meta.get("TransferSyntaxUID", "unknown transfer syntax") if "file_meta" in head else "?"
        reason = " ".join(str(exc).split())[:200]
        raise VolumeError(f"{path}: cannot decode the frames ({pydicom.uid.UID(str(syntax)).name}): {reason}") from None
    stored = stored.reshape((n,) + stored.shape[-2:]) if stored.ndim == 2 and n == 1 else stored
    if stored.ndim != 3 or stored.shape[0] != n:
        raise VolumeError(f"{path}: pixels read as {stored.shape}, expected {n} grey frames")
    values = stored.astype(np.float64) * np.asarray([float(s) if s is not None else 1.0 for s in slope])[:, None, None]
    values += np.asarray([float(b) if b is not None else 0.0 for b in intercept])[:, None, None]
    cause = ("no RescaleIntercept in the functional groups (PixelValueTransformationSequence): stored values "
             "without their rescale" if any(b is None for b in intercept)
             else "the frames' RescaleSlope/RescaleIntercept do not give Hounsfield units")
    hu = as_hu(values[grid.order], path, cause)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((float(spacing[0][1]), float(spacing[0][0]), grid.step))
    image.SetOrigin(tuple(float(v) for v in grid.origin))
    image.SetDirection(grid.direction)
    findings = tilt_findings(folder, grid.tilt_deg) + contrast_findings([head])
    return build_volume(image, hu, case_id, folder, "dicom", grid.tilt_deg, findings,
                        positions=positions[grid.order])  # the exact (sheared under a tilt) affine
