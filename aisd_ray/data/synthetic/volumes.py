"""Synthetic patients in Hounsfield units, written as NIfTI, DICOM series or an nnU-Net raw dataset.

No patient's CT can ship, so the volume readers (``aisd_ray.data.sources.volume``) are tested on heads drawn
here with the head and lesion geometry of ``aisd_ray.data.synthetic.slices`` (whose PNG slices are left as
they are) and the tissue values of non-contrast CT: air -1000 HU, skull 700..1200, white matter
about 25, grey matter about 35, CSF 0..12, a head holder about 200. The acute lesion is a faint
hypodensity, by default 5 HU below the parenchyma around it: early ischaemic change lowers
attenuation by only a few HU, which is why stroke windows are narrow. Image noise: SD 3 HU.

Arrays are (Z, Y, X) in ``volume``'s canonical orientation: z inferior to superior, y anterior to
posterior, x patient right to left. The DICOM writer uses pydicom (the reader's header library);
NIfTI goes through SimpleITK, as the readers do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageFilter
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian,
                         generate_uid)
from pydicom.valuerep import DS

from aisd_ray.config import SyntheticConfig
from aisd_ray.core.progress import progress_bar
from aisd_ray.data.sources.volume import read_volume
from aisd_ray.data.sources.volume_write import write_image, write_nifti
from aisd_ray.data.synthetic.heads import case_key as _case_key
from aisd_ray.data.synthetic.heads import synth_head
from aisd_ray.data.synthetic.slices import Head, Lesion, _smooth_noise

FIELD_OF_VIEW_MM = 230.0  # 512 px at 0.45 mm, as AISD's series
SLICE_MM = 5.0
LESION_HU = 5.0
NOISE_HU = 3.0
ANATOMIES = ("realistic", "simple")


@dataclass(frozen=True)
class Tissue:
    """One patient's tissue values (HU) and ventricles (head coordinates)."""

    white: float
    grey: float
    csf: float
    skull: float
    vent_w: float
    vent_off: tuple[float, float]
    vent_dv: tuple[float, float]
    holder_hu: float | None  # None: no head holder

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Tissue:
        white = float(rng.uniform(24, 29))
        return cls(white, white + float(rng.uniform(7, 10)), float(rng.uniform(3, 10)), float(rng.uniform(950, 1100)),
                   float(rng.uniform(0.06, 0.12)), tuple(rng.uniform(0.08, 0.14, 2)), tuple(rng.uniform(-0.1, 0.1, 2)),
                   float(rng.uniform(180, 230)) if rng.random() < 0.4 else None)


def synth_hu_slice(rng: np.random.Generator, size: int, head: Head, tissue: Tissue, lesion: Lesion | None,
                   z: float = 0.0, lesion_hu: float = LESION_HU, noise_hu: float = NOISE_HU
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One axial slice: (HU int16 (size, size), lesion mask bool). ``z`` in -1..1 (bottom..top) sizes
    the ventricles; ``lesion`` None draws none; texture and noise come from ``rng``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    c, s = np.cos(head.angle), np.sin(head.angle)
    u = ((xx - head.cx) * c + (yy - head.cy) * s) / head.ax
    v = (-(xx - head.cx) * s + (yy - head.cy) * c) / head.ay
    r = np.sqrt(u**2 + v**2)
    inner = 1.0 - head.skull_t
    brain = r < inner
    hu = np.full((size, size), -1000.0, np.float32)
    bone = (r < 1.0) & ~brain
    depth = np.clip((1.0 - r) / head.skull_t, 0, 1)  # 0 outer table .. 1 inner table
    skull = tissue.skull + 100 * _smooth_noise(rng, size, 32) - 300 * np.sin(np.pi * depth)  # diploe darker
    hu[bone] = np.clip(skull, 700, 1200)[bone]
    cortex = np.clip((r / inner - 0.6) / 0.3, 0, 1)  # 0 deep white matter .. 1 cortical ribbon
    texture = 0.6 * _smooth_noise(rng, size, 24) + 0.4 * _smooth_noise(rng, size, 64)
    hu[brain] = (tissue.white + (tissue.grey - tissue.white) * cortex + 1.5 * texture)[brain]

    csf = (np.abs(_smooth_noise(rng, size, 16)) < 0.05) & (r > 0.7) & brain  # sulci
    vent_w = tissue.vent_w * float(np.sqrt(max(0.0, 1 - (z / 0.7) ** 2)))
    if vent_w > 0.01:
        for k, side in enumerate((-1, 1)):
            vu, vv = (u - side * tissue.vent_off[k]) / vent_w, (v + tissue.vent_dv[k]) / (2.2 * vent_w)
            csf |= (vu**2 + vv**2 < 1) & brain
    hu[csf] = tissue.csf
    parenchyma = brain & ~csf

    mask = np.zeros((size, size), bool)
    if lesion is not None:
        theta = np.arctan2(v, u)
        dtheta = np.angle(np.exp(1j * (theta - lesion.theta0)))
        edge = 0.1 * _smooth_noise(rng, size, 12)
        mask = ((np.abs(dtheta) < lesion.width / 2 + edge) & (r > lesion.r_in + edge) & (r < inner - lesion.gap)
                & parenchyma)
        blurred = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(
            ImageFilter.GaussianBlur(max(1, size // 128))), np.float32) / 255.0
        hu -= lesion_hu * np.maximum(mask, blurred) * parenchyma  # full contrast inside, a soft rim outside
    if tissue.holder_hu is not None:  # head-holder arc behind (below, in the image) the skull
        arc = np.abs(np.sqrt((xx - head.cx) ** 2 + (yy - head.cy - 0.15) ** 2) - 0.55) < 0.008
        hu[arc & (yy > head.cy + 0.35) & (r >= 1.0)] = tissue.holder_hu
    hu += rng.normal(0, noise_hu, hu.shape).astype(np.float32)
    return np.rint(hu).astype(np.int16), mask


def synth_volume(seed: int, case: str, size: int, slices: int, lesion_hu: float = LESION_HU,
                 noise_hu: float = NOISE_HU, slice_mm: float = SLICE_MM, fov_mm: float = FIELD_OF_VIEW_MM,
                 anatomy: str = "realistic") -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One patient: (HU int16 (Z, Y, X), labels uint8 (Z, Y, X) 0/1, spacing (z, y, x) mm), canonical
    orientation, the same for the same (seed, case). Spacing: ``slice_mm`` (5) between slices,
    ``fov_mm / size`` in plane (230 mm: 0.45 mm at 512 px, so a small volume still spans a head).

    As ``synthetic.synth_case``: the head shrinks towards the top and bottom slice, one 3-D lesion
    runs through neighbouring slices and leaves the first and last slice free. ``lesion_hu``: how
    far below the surrounding parenchyma the lesion lies; ``noise_hu``: the noise SD. ``anatomy``:
    "realistic" (``heads.synth_head``: skull base, ventricles, cisterns, mimics, the lesion in a
    vascular territory) or "simple" (the ellipse heads below, as before issue 31, bit for bit).
    Raises ValueError for another ``anatomy``."""
    if anatomy == "realistic":
        return synth_head(seed, case, size, slices, lesion_hu, noise_hu, slice_mm, fov_mm)
    if anatomy != "simple":
        raise ValueError(f"synthetic anatomy {anatomy!r}: choose one of {', '.join(ANATOMIES)}")
    rng = np.random.default_rng([seed, _case_key(case)])
    head, lesion, tissue = Head.draw(rng), Lesion.draw(rng), Tissue.draw(rng)
    inner = max(slices - 2, 0)
    run = int(rng.integers(max(1, (inner + 1) // 2), inner + 1)) if inner else 0
    first = 1 + int(rng.integers(0, inner - run + 1)) if run else 0
    hu = np.empty((slices, size, size), np.int16)
    labels = np.zeros((slices, size, size), np.uint8)
    for k in range(slices):
        z = (k + 0.5) / slices * 2 - 1
        shrink = float(np.sqrt(1 - (0.55 * z) ** 2))
        slice_head = replace(head, ax=head.ax * shrink, ay=head.ay * shrink)
        t = (k - first + 0.5) / run if run else 0.0
        slice_lesion = (replace(lesion, width=lesion.width * (0.55 + 0.45 * np.sin(np.pi * t)))
                        if run and first <= k < first + run else None)
        hu[k], mask = synth_hu_slice(np.random.default_rng([seed, _case_key(case), k]), size, slice_head, tissue,
                                     slice_lesion, z, lesion_hu, noise_hu)
        labels[k] = mask
    return hu, labels, (float(slice_mm), fov_mm / size, fov_mm / size)


def _centred_origin(shape: tuple[int, ...], spacing: tuple[float, float, float], z0: float) -> tuple[float, ...]:
    """LPS origin (x, y, z) mm that centres the slice on the scanner axis; z0: the first slice's z."""
    return (-(shape[2] - 1) / 2 * spacing[2], -(shape[1] - 1) / 2 * spacing[1], z0)


def write_nifti_case(array: np.ndarray, spacing: tuple[float, float, float], path: str | Path,
                     orientation: str = "RPI", z0: float = -37.5) -> Path:
    """Write a canonical (Z, Y, X) array (HU or labels) as NIfTI, atomically, stored in
    ``orientation`` (a DICOM orientation code; default "RPI": x and z flipped from canonical, so a
    reader that ignores the affine gets a mirrored, upside-down head) with the first slice at
    ``z0`` mm and the slice centred in x and y: a non-identity affine with an offset origin."""
    image = sitk.GetImageFromArray(np.asarray(array))
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    image.SetOrigin(_centred_origin(array.shape, spacing, z0))
    return write_image(sitk.DICOMOrient(image, orientation), path)


def _stored(hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """DICOM stored values (HU - intercept) / slope as uint16 (or int16); ValueError if not whole."""
    stored = (hu.astype(np.float64) - intercept) / slope
    if not np.allclose(stored, np.rint(stored), atol=1e-6):
        raise ValueError(f"HU values are not whole multiples of RescaleSlope {slope} from intercept {intercept}")
    stored = np.rint(stored)
    for dtype in (np.uint16, np.int16):
        info = np.iinfo(dtype)
        if stored.min() >= info.min and stored.max() <= info.max:
            return stored.astype(dtype)
    raise ValueError(f"stored values {stored.min():g}..{stored.max():g} do not fit 16 bits")


def _save_atomic(ds: Dataset, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_dicom_series(hu: np.ndarray, spacing: tuple[float, float, float], folder: str | Path, case_id: str,
                       patient_name: str | None = None, birth_date: str | None = None, slope: float = 1,
                       intercept: float = -1024, shuffle: bool = True, tilt_deg: float = 0.0, seed: int = 0,
                       patient_id: str | None = None, z_mm: list[float] | None = None, names: list[str] | None = None,
                       rescale_tags: bool = True, syntax: str = ExplicitVRLittleEndian,
                       contrast_agent: str | None = None) -> list[Path]:
    """Write a canonical (Z, Y, X) HU int16 array as a CT series of one file per slice (Explicit VR
    Little Endian, new UIDs, stored = (HU - intercept) / slope as uint16 or int16). Returns the files
    in position order (inferior first).

    InstanceNumber is deliberately a shuffle of the position order; ``shuffle`` also names the
    files with random hex (half with ``.dcm``, half without), else ``0001.dcm``... in position order.
    ``tilt_deg``: a gantry tilt: ImageOrientationPatient [1,0,0, 0,cos,-sin], positions advancing
    along patient z by ``spacing[0]`` (the table step), so slices lie ``spacing[0] * cos(tilt)``
    apart along their normal. ``patient_name``, ``birth_date``, ``patient_id`` are written only when
    given (the tests use them to show nothing leaks); ``case_id`` is written as a pseudonymous
    PatientID otherwise. ``z_mm``: each slice's table position (mm from the first; default
    ``k * spacing[0]``: a varying spacing, a gap); ``names``: the files' names in position order;
    ``rescale_tags`` False leaves RescaleSlope/Intercept out (as an anonymiser that strips them:
    the stored values stay HU - intercept); ``syntax``: the transfer syntax (RLE Lossless is
    encoded by pydicom); ``contrast_agent``: ContrastBolusAgent (0018,0010), a contrast-enhanced
    series' tag, written only when given. Raises ValueError for HU that stored values cannot represent."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = _stored(np.asarray(hu), slope, intercept)
    n, rows, cols = stored.shape
    rng = np.random.default_rng([seed, _case_key(case_id)])
    tilt = np.radians(tilt_deg)
    row, col = (1.0, 0.0, 0.0), (0.0, float(np.cos(tilt)), float(-np.sin(tilt)))
    x0, y0, z0 = _centred_origin(stored.shape, spacing, -37.5)
    instance = rng.permutation(n) + 1
    if n > 1 and (np.array_equal(instance, np.arange(1, n + 1)) or np.array_equal(instance, np.arange(n, 0, -1))):
        instance = np.roll(np.arange(1, n + 1), 1)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.ImageType, ds.SeriesNumber = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"], 1
        ds.PatientID = patient_id if patient_id is not None else case_id
        if patient_name is not None:
            ds.PatientName = patient_name
        if birth_date is not None:
            ds.PatientBirthDate = birth_date
        if contrast_agent is not None:
            ds.ContrastBolusAgent = contrast_agent
        ds.InstanceNumber = int(instance[k])
        table = z_mm[k] if z_mm is not None else k * spacing[0]
        ds.ImagePositionPatient = [DS(v, auto_format=True) for v in (x0, y0, z0 + table)]
        ds.ImageOrientationPatient = [DS(v, auto_format=True) for v in row + col]
        ds.PixelSpacing = [DS(spacing[1], auto_format=True), DS(spacing[2], auto_format=True)]
        ds.SliceThickness = DS(spacing[0] * np.cos(tilt), auto_format=True)
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0 if stored.dtype == np.uint16 else 1
        if rescale_tags:
            ds.RescaleSlope, ds.RescaleIntercept = DS(slope, auto_format=True), DS(intercept, auto_format=True)
            ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 80
        ds.PixelData = np.ascontiguousarray(stored[k]).astype(stored.dtype.newbyteorder("<")).tobytes()
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax)
        name = (names[k] if names is not None else (rng.bytes(6).hex() + (".dcm" if k % 2 else "")) if shuffle
                else f"{k + 1:04d}.dcm")
        _save_atomic(ds, folder / name)
        paths.append(folder / name)
    return paths


def write_enhanced_ct(hu: np.ndarray, spacing: tuple[float, float, float], path: str | Path, case_id: str,
                      seed: int = 0, intercept: float = -1024) -> Path:
    """Write a canonical (Z, Y, X) HU int16 array as one Enhanced CT Image Storage file (multi-frame,
    Explicit VR Little Endian, stored = HU - intercept as uint16): orientation, pixel spacing and
    rescale in the shared functional groups, each frame's ImagePositionPatient in its per-frame
    group, the frames in a shuffled order. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = _stored(np.asarray(hu), 1, intercept)
    n, rows, cols = stored.shape
    order = np.random.default_rng([seed, _case_key(case_id)]).permutation(n)
    x0, y0, z0 = _centred_origin(stored.shape, spacing, -37.5)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = EnhancedCTImageStorage, generate_uid()
    meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.ImageType, ds.PatientID, ds.InstanceNumber = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"], case_id, 1
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.NumberOfFrames = n
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = [DS(spacing[1], auto_format=True), DS(spacing[2], auto_format=True)]
    shared.PixelMeasuresSequence[0].SliceThickness = DS(spacing[0], auto_format=True)
    shared.PixelValueTransformationSequence = [Dataset()]
    transform = shared.PixelValueTransformationSequence[0]
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, DS(intercept, auto_format=True), "HU"
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in order:
        frame = Dataset()
        frame.PlanePositionSequence = [Dataset()]
        frame.PlanePositionSequence[0].ImagePositionPatient = [DS(v, auto_format=True)
                                                                for v in (x0, y0, z0 + k * spacing[0])]
        frame.FrameContentSequence = [Dataset()]
        frame.FrameContentSequence[0].InStackPositionNumber = int(k) + 1
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.ascontiguousarray(stored[order]).astype("<u2").tobytes()
    _save_atomic(ds, path)
    return path


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_nnunet_dataset(out_dir: str | Path, seed: int, case_ids: list[str], test_ids: list[str], size: int,
                         slices: int, name: str = "Dataset001_AISDSynthetic", orientation: str = "RPI",
                         lesion_hu: float = LESION_HU, noise_hu: float = NOISE_HU, progress: bool = False,
                         anatomy: str = "realistic") -> Path:
    """Write an nnU-Net v2 raw dataset ``out_dir/name``: ``imagesTr/<case>_0000.nii.gz`` (HU),
    ``labelsTr/<case>.nii.gz`` (0/1), ``imagesTs``/``labelsTs`` likewise for ``test_ids``, and
    ``dataset.json`` (channel_names {"0": "CT"}, labels {"background": 0, "lesion": 1},
    numTraining, file_ending ".nii.gz"). Every file is written atomically. Returns the dataset folder.
    Raises ValueError when a case is in both lists. ``lesion_hu``, ``noise_hu``, ``anatomy``: as ``synth_volume``."""
    both = sorted(set(case_ids) & set(test_ids))
    if both:
        raise ValueError(f"cases in both the training and the test list: {', '.join(both)}")
    root = Path(out_dir) / name
    bar = progress_bar(total=len(case_ids) + len(test_ids), desc="synthesize nnU-Net", unit="case", enabled=progress)
    for cases, images, labels in ((case_ids, "imagesTr", "labelsTr"), (test_ids, "imagesTs", "labelsTs")):
        for case in cases:
            hu, mask, spacing = synth_volume(seed, case, size, slices, lesion_hu, noise_hu, anatomy=anatomy)
            write_nifti_case(hu, spacing, root / images / f"{case}_0000.nii.gz", orientation)
            write_nifti_case(mask, spacing, root / labels / f"{case}.nii.gz", orientation)
            bar.update()
    bar.close()
    root.mkdir(parents=True, exist_ok=True)
    _write_json({"name": name, "description": "synthetic non-contrast CT heads with one faint hypodense lesion",
                 "channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1},
                 "numTraining": len(case_ids), "file_ending": ".nii.gz"}, root / "dataset.json")
    return root


def write_dicom_cases(out_dir: str | Path, seed: int, case_ids: list[str], size: int, slices: int,
                      lesion_hu: float = LESION_HU, noise_hu: float = NOISE_HU, progress: bool = False,
                      anatomy: str = "realistic", **series: object) -> Path:
    """Write ``out_dir/<case>/`` (one CT series folder per case, ``write_dicom_series``; ``series``
    passes slope, intercept, tilt_deg, shuffle on) and ``out_dir/labels/<case>.nii.gz`` (0/1, in the
    series' own geometry, as ``volume_write.write_nifti`` writes masks). ``anatomy``: as
    ``synth_volume``. Returns ``out_dir``."""
    out = Path(out_dir)
    for case in progress_bar(case_ids, desc="synthesize DICOM", unit="case", enabled=progress):
        hu, mask, spacing = synth_volume(seed, case, size, slices, lesion_hu, noise_hu, anatomy=anatomy)
        write_dicom_series(hu, spacing, out / case, case, seed=seed, **series)
        write_nifti(read_volume(out / case), mask, out / "labels" / f"{case}.nii.gz")
    return out


def write_patient_series(folder: str | Path, cfg: SyntheticConfig, case: str) -> Path:
    """One synthetic patient (``cfg``'s size, slices, seed, HU contrast and anatomy) as a DICOM series in
    ``folder``, files shuffled, with a gantry-free axial geometry: what a scanner export gives
    ``infer --input``. Returns ``folder``."""
    hu, _, spacing = synth_volume(cfg.seed, case, cfg.size, cfg.slices_per_case, cfg.lesion_hu, cfg.noise_hu,
                                  anatomy=cfg.anatomy)
    write_dicom_series(hu, spacing, folder, case, seed=cfg.seed)
    return Path(folder)

