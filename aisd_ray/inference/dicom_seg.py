"""A case's lesion mask as a DICOM Segmentation (SEG) instance on its source series' own slices:
what ``infer --dicom-seg`` writes as ``cases/<case>/seg.dcm`` for a DICOM series input, so the mask
can be filed beside the series in a PACS or opened over it in a viewer.

highdicom writes it (``highdicom.seg.Segmentation``): the well-kept library for DICOM SEG, which
builds the Segmentation IOD's modules, its per-frame functional groups (each frame's plane position
and the source image it is derived from) and the bit-packed BINARY pixel data to the standard; its
``segread`` reads one back.

The SEG:

- BINARY, one segment per lesion class of the export (``class_names[1:]``, the label the class's
  name), segment ``n`` holding the voxels of class id ``n``; each segment coded SegmentedProperty
  Category SCT 49755003 "Morphologically Abnormal Structure" and Type SCT 52988006 "Lesion"
  (pydicom's code dictionary, ``codes.SCT``), anatomic region SCT 12738006 "Brain"; algorithm type
  AUTOMATIC, AlgorithmIdentificationSequence name "aisd-ray", version the package's, family DCM
  123110 "Artificial Intelligence" (``codes.cid7162``);
- one frame per source slice and segment that holds lesion (all slices when none does), each on its
  source image's own pixel grid (its rows, columns, ImagePositionPatient and orientation) and
  referencing that image's SOPInstanceUID: the mask is put back into the series' storage order
  (``volume_write.to_input_geometry``, the inverse of the reader's reorientation) and each file
  placed on that grid by its ImagePositionPatient (``source_frames``: never by file name or
  InstanceNumber). A gantry-tilted series is read as a sheared grid, not resampled
  (``dicom_geometry``): its slices are the files' own, so its SEG frames lie on them exactly.

Privacy: a SEG must carry its source's patient and study identity to be filed beside it, so it is
written only on request (``--dicom-seg``). highdicom copies from the source image what it is given;
it is given a header built here (``_source_header``) of the identity in ``IDENTITY`` (the Patient
and General Study modules' Type 2 attributes highdicom fills), the UIDs and the geometry, nothing
else: no institution, station, operator, device serial number or acquisition equipment (which
highdicom would otherwise copy as ContributingEquipment), no dates but the study's. Manufacturer
is "aisd-ray", the software that made it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from aisd_ray.core.provenance import package_version
from aisd_ray.data.sources import volume_write
from aisd_ray.data.sources.dicom_geometry import SPACING_TOL
from aisd_ray.data.sources.dicom_multiframe import is_multiframe
from aisd_ray.data.sources.volume import Volume, VolumeError, dicom_files

log = logging.getLogger(__name__)
# highdicom logs each attribute group it copies, naming the source instance's UID: not for our log
logging.getLogger("highdicom").setLevel(logging.WARNING)

FILE = "seg.dcm"  # cases/<case>/seg.dcm
IDENTITY = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
            "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")  # present, empty when the source lacks them
REFERENCE = ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
             "Modality", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
             "SpacingBetweenSlices", "Rows", "Columns")
SERIES_NUMBER = 9001  # the SEG's own series, beside the source's
DEFAULT_CLASSES = ("background", "lesion")


def _source_header(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of ``ds`` holding only ``IDENTITY`` and ``REFERENCE`` (module docstring), the Type 2
    identity attributes it lacks present and empty."""
    out = pydicom.Dataset()
    for keyword in IDENTITY + REFERENCE:
        if keyword in ds:
            out.add(ds[keyword])
        elif keyword in TYPE_2:
            setattr(out, keyword, "")
    return out


def series_headers(vol: Volume) -> list[tuple[Path, pydicom.Dataset]] | None:
    """(file, header) of each image of ``vol``'s source series, in file name order; None when the
    source is not a series of single-frame DICOM images (a NIfTI file, an enhanced CT file)."""
    source = Path(vol.source)
    if vol.kind != "dicom" or not source.is_dir():
        return None
    headers = [(path, pydicom.dcmread(path, stop_before_pixels=True, force=True)) for path in dicom_files(source)]
    return None if not headers or any(is_multiframe(ds) for _, ds in headers) else headers


def source_frames(vol: Volume, labels: np.ndarray, headers: list[tuple[Path, pydicom.Dataset]]) -> np.ndarray:
    """``labels`` ((Z, Y, X) class ids, canonical order, ``vol``'s grid) on each source image's own
    pixel grid: (len(headers), Rows, Columns) uint8, frame ``n`` for ``headers[n]``'s image, its
    pixel (r, c) the voxel at that image's row r, column c.

    The mask goes back into the series' storage order (slice k at ``vol.affine`` (0, 0, k): the
    k-th ImagePositionPatient along the slice normal; rows and columns as the files store them);
    each file takes the slice whose position is nearest its ImagePositionPatient. Raises VolumeError
    naming the file when one is not on that grid (another orientation or size, no slice within the
    reader's tolerance, ``dicom_geometry.SPACING_TOL`` x the step; a slice taken twice)."""
    stored = sitk.GetArrayFromImage(volume_write.to_input_geometry(vol, np.asarray(labels, np.uint8)))
    affine = np.asarray(vol.affine, np.float64)
    origin, step = affine[:3, 3], affine[:3, 2]
    tol = SPACING_TOL * float(np.linalg.norm(step))  # the reader's own tolerance of a slice off its grid
    row, col = affine[:3, 0] / np.linalg.norm(affine[:3, 0]), affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    frames = np.empty((len(headers), *stored.shape[1:]), np.uint8)
    taken: dict[int, str] = {}
    for n, (path, ds) in enumerate(headers):
        position = np.asarray([float(v) for v in ds.ImagePositionPatient], np.float64)
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], np.float64)
        k = int(np.rint((position - origin) @ step / (step @ step)))
        off = float(np.linalg.norm(position - origin - k * step))
        why = ("another orientation" if not (np.allclose(orientation[:3], row, atol=1e-4)
                                              and np.allclose(orientation[3:], col, atol=1e-4))
               else f"{ds.Rows} x {ds.Columns} pixels, not {stored.shape[1]} x {stored.shape[2]}"
               if (int(ds.Rows), int(ds.Columns)) != stored.shape[1:]
               else f"no slice within {tol:.2f} mm ({off:.2f} mm from the nearest)" if not 0 <= k < len(stored)
               or off > tol
               else f"the slice of {taken[k]} too" if k in taken else "")
        if why:
            raise VolumeError(f"{path}: not on the series' grid for a DICOM SEG: {why}")
        taken[k] = path.name
        frames[n] = stored[k]
    return frames


def segment_descriptions(class_names) -> list:
    """One ``highdicom.seg.SegmentDescription`` per lesion class (``class_names[1:]``; class 0 is
    background), numbered from 1, coded and with the algorithm identified (module docstring)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="aisd-ray", family=codes.cid7162.ArtificialIntelligence,
                                                   version=package_version()[:64])
    return [hd.seg.SegmentDescription(
        segment_number=n, segment_label=str(name)[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, anatomic_regions=[codes.SCT.Brain])
        for n, name in enumerate(class_names[1:], start=1)]


def write_seg(vol: Volume, labels: np.ndarray, class_names, path: str | Path) -> Path | None:
    """Write ``labels`` ((Z, Y, X) class ids 0..len(class_names)-1, canonical order, ``vol``'s grid)
    as a DICOM SEG at ``path`` (atomically: a temporary name, then a rename), on ``vol``'s source
    series (module docstring). ``class_names``: the export's, background first (None: "background",
    "lesion"). Returns ``path``, or None, with one log line, when the source is not a series of
    single-frame DICOM images. Raises VolumeError naming the file for a source image off the grid
    or a class id without a class name."""
    import highdicom as hd

    class_names = tuple(class_names or DEFAULT_CLASSES)
    headers = series_headers(vol)
    if headers is None:
        log.info("case %s: no DICOM SEG: a SEG needs a DICOM series of single-frame images as the source, "
                 "and this case's input is %s", vol.case_id, "a NIfTI file" if vol.kind == "nifti"
                 else "one enhanced (multi-frame) CT file")
        return None
    labels = np.asarray(labels)
    if labels.size and int(labels.max()) >= len(class_names):
        raise VolumeError(f"case {vol.case_id}: class id {int(labels.max())} but {len(class_names)} class names "
                          f"({', '.join(class_names)}); no DICOM SEG")
    frames = source_frames(vol, labels, headers)
    seg = hd.seg.Segmentation(
        source_images=[_source_header(ds) for _, ds in headers], pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(class_names), series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="aisd-ray",
        manufacturer_model_name="aisd-ray FlexUNet", software_versions=package_version()[:64],
        device_serial_number="none", content_label="LESION", content_description="aisd-ray lesion segmentation",
        series_description="aisd-ray lesion SEG", omit_empty_frames=bool(frames.any()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        seg.save_as(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
