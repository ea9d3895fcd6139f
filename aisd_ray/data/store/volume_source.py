"""``prepare`` from CT volumes: nnU-Net's raw dataset layout, a folder of DICOM series cases, or
the AISD release's DICOM archives beside its mask slices.

Three layouts are recognised by their shape:

- **nnU-Net raw dataset** (v2 or v1): ``dataset.json``, ``imagesTr/<case>_0000.nii.gz`` with
  ``labelsTr/<case>.nii.gz``, and ``imagesTs/`` with ``labelsTs/`` (the test split; a test image
  without labels is skipped and reported); ``dataset.json`` and the files checked against each
  other (``nnunet_dataset.py``: a label without its image, ``numTraining``, one CT channel).
- **DICOM cases**: one folder per case holding its DICOM series, and ``labels/<case>.nii.gz``
  beside them (a label volume in the series' geometry). Cases named in ``data.test_cases`` are the
  test split.
- **AISD DICOM**: ``dicom.zip`` (or ``dicom/``) beside ``mask.zip`` (or ``mask/``): each case's
  series with the release's mask slices paired in position order (``aisd_dicom.py``); the official
  test cases (``data.test_cases``) are the test split.

The training cases are split into train and valid by patient (``data.valid_fraction``,
``data.split_seed``), as the raw AISD release is. Each volume is read once (``volume.py``: HU,
spacing, canonical axial orientation), its channels built at its own size (``data.channels``,
``data.windows``: ``channels.py``), its slices resized to the model size and kept in a temporary
folder while the shards are written; a case whose labels do not match its image's geometry, or hold
a class id the model lacks, or without a head to find the midline of, is named before anything is
written. The manifest's ``source.geometry`` gives each case's shape, spacing (mm) and model-size
spacing, so that evaluation reports volumes in mL and distances in mm. ``source.qa`` gives each
case's QA record (``qa.record``: its domain values, its physics and coverage findings; warnings are
logged one line each) and ``source.domain`` the union of the training cases' values
(``qa.union_domain``), which an export copies as the domain its inputs are checked against. QA only
records here: no case is left out or changed by it. Each slice also carries its intracranial mask
(``head.brain_mask`` from the same head model, resized to the model size as the labels are, nearest
neighbour, so a lesion voxel inside the brain stays inside): the shards' ``brain`` feature, which
``evaluate`` applies (``inference/brain_mask.py``); ``source.brain_mask`` says the store has it.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from aisd_ray.config import DataConfig
from aisd_ray.core.progress import progress_bar
from aisd_ray.data.ct import qa
from aisd_ray.data.ct.channels import model_input
from aisd_ray.data.ct.head import brain_mask, head_model
from aisd_ray.data.ct.windows import InPlane
from aisd_ray.data.sources import volume
from aisd_ray.data.sources.aisd_dicom import aisd_dicom_cases, is_aisd_dicom
from aisd_ray.data.sources.layout import DataError, Sample, SliceRef, is_metadata
from aisd_ray.data.sources.nnunet_dataset import nnunet_cases
from aisd_ray.data.sources.raw import split_cases

log = logging.getLogger(__name__)
# what each slice holds beyond its image and labels, in every slice's stamp: a store written before
# slices carried their intracranial mask has another fingerprint, and prepare rewrites it
SLICE_FEATURES = "brain"


def volume_layout(root: str | Path) -> str | None:
    """"nnunet", "dicom", "aisd_dicom" or None (not a volume source)."""
    root = Path(root)
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return "nnunet"
    if is_aisd_dicom(root):
        return "aisd_dicom"
    if (root / "labels").is_dir() and any(volume.is_dicom_series(p) for p in root.iterdir() if p.is_dir()
                                          and p.name != "labels" and not is_metadata(p.name)):
        return "dicom"
    return None


@dataclass(frozen=True)
class Case:
    """One patient: its CT (a NIfTI file or a DICOM series folder), its labels (a NIfTI file, or a
    function of its ``Volume`` giving class ids) and a stamp that changes when its files do."""

    case_id: str
    image: Path
    labels: Path | Callable[[volume.Volume], np.ndarray]
    stamp: str = ""


def list_volume_cases(root: str | Path, data: DataConfig, num_classes: int,
                      workdir: Path) -> tuple[dict[str, list[Case]], dict]:
    """Cases per split and what the manifest says of the source. ``workdir``: a temporary folder
    (a zip of DICOM series is extracted there)."""
    root = Path(root)
    kind = volume_layout(root)
    extra: dict[str, Any] = {}
    if kind == "aisd_dicom":
        found, extra = aisd_dicom_cases(root, data, workdir)
        every = [Case(case, series, labels, stamp) for case, series, labels, stamp in found]
        test_ids = set(data.test_cases)
    elif kind == "nnunet":
        trained, tested = (
            [Case(case, image, label, f"{_stamp(image)}/{_stamp(label)}") for case, image, label in side]
            for side in nnunet_cases(root, tuple(data.class_names), num_classes))
        test_ids = {c.case_id for c in tested} | set(data.test_cases)
        every = trained + tested
    elif kind == "dicom":
        every = []
        for path in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "labels" and not is_metadata(p.name)):
            label = volume.nifti_named(root / "labels", path.name)
            if label is None:
                raise DataError(f"{path}: no label volume labels/{path.name}.nii.gz for this case")
            every.append(Case(path.name, path, label, f"{_stamp(path)}/{_stamp(label)}"))
        test_ids = set(data.test_cases)
    else:
        raise DataError(f"{root}: not a volume source (nnU-Net's dataset.json with imagesTr/, or DICOM case "
                        "folders with labels/)")
    if not every:
        raise DataError(f"{root}: no cases with labels found")
    by_id = {c.case_id: c for c in every}
    splits = split_cases(sorted(by_id), dataclasses.replace(data, test_cases=tuple(sorted(test_ids))))
    return ({s: [by_id[c] for c in ids] for s, ids in splits.items() if ids},
            {"layout": kind, "root": str(root.resolve()), "cases": splits, **extra})


@dataclass(frozen=True)
class LabelReading:
    """How a volume source's labels are read, for the manifest (as ``masks.SplitMasks.reading``)."""

    reading: str


@dataclass
class VolumeSplits:
    refs: dict[str, list[SliceRef]]  # each holds the processed slices' folder, removed after the last
    info: dict[str, Any]


def _class_ids(labels: np.ndarray, case: Case, data: DataConfig, num_classes: int) -> np.ndarray:
    if data.mask_values == "raw_labels":
        lut = np.asarray(data.raw_label_map, np.uint8)
        if labels.max(initial=0) >= len(lut):
            raise DataError(f"{case.labels}: label {int(labels.max())} is not a raw AISD label 0..{len(lut) - 1}")
        return lut[labels]
    if labels.max(initial=0) >= num_classes:
        found = sorted(int(v) for v in np.unique(labels))
        raise DataError(f"{case.labels}: label values {found[:8]} but the model has classes 0..{num_classes - 1}; "
                        "label volumes hold class ids (nnU-Net's convention), or set data.mask_values = "
                        "'raw_labels' for the raw AISD release's 0..5")
    return labels


def _process(case: Case, folder: Path, data: DataConfig, height: int, width: int, channels: int,
             num_classes: int) -> dict[str, Any]:
    """Read one case, write its model-size slices (images, labels) as .npy; return its geometry,
    with its QA record under "qa" (``qa.record``). The channels (``data.channels``) are built from
    the whole volume at its own size, then resized."""
    vol = volume.read_volume(case.image, case.case_id)
    head = head_model(vol.hu, vol.spacing)
    record = qa.record(vol, head)
    labels = (case.labels(vol) if callable(case.labels) else  # the AISD masks: class ids already
              _class_ids(volume.read_labels(case.labels, like=vol), case, data, num_classes))
    z, h, w = vol.hu.shape
    plane = InPlane(h, w, (vol.spacing[1], vol.spacing[2]), height, width)
    try:
        images = model_input(vol.hu, data.channels, data.windows, channels, height, width)
    except ValueError as exc:  # symmetry: no head in the volume
        raise DataError(f"{case.image}: data.channels {data.channels!r}: {exc}") from None
    model_labels = np.stack([plane.labels_to_model(labels[k]) for k in range(z)])
    inside = brain_mask(vol.hu, vol.spacing, head).astype(np.uint8)
    np.save(folder / f"{case.case_id}_brain.npy", np.stack([plane.labels_to_model(inside[k]) for k in range(z)]))
    np.save(folder / f"{case.case_id}_images.npy", images)
    np.save(folder / f"{case.case_id}_labels.npy", model_labels)
    return {"shape": [z, h, w], "spacing_mm": [float(s) for s in vol.spacing],
            "model_spacing_mm": [float(vol.spacing[0]), *map(float, plane.model_spacing)],
            "kind": vol.kind, "gantry_tilt_deg": round(float(vol.gantry_tilt_deg), 3), "qa": record}


def _load(tmp: tempfile.TemporaryDirectory, case_id: str, k: int, name: str) -> Sample:
    """One slice at model size. ``tmp``: the processed slices' folder, held by every ref so that it
    lives until the last ref is dropped."""
    images = np.load(Path(tmp.name) / f"{case_id}_images.npy", mmap_mode="r")
    labels = np.load(Path(tmp.name) / f"{case_id}_labels.npy", mmap_mode="r")
    brain = np.load(Path(tmp.name) / f"{case_id}_brain.npy", mmap_mode="r")
    return Sample(name, np.array(images[k]), np.array(labels[k]), case_id, k, brain=np.array(brain[k]) > 0)


def _load_labels(tmp: tempfile.TemporaryDirectory, case_id: str, k: int) -> np.ndarray:
    return np.array(np.load(Path(tmp.name) / f"{case_id}_labels.npy", mmap_mode="r")[k])


def _stamp(path: Path) -> str:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


@dataclass
class VolumeListing:
    """A volume source's cases per split and what the manifest says of it, found from names and file
    stamps alone (no volume read); ``tmp`` holds what listing extracted (a zip of DICOM series) and,
    later, the processed slices."""

    cases: dict[str, list[Case]]
    info: dict[str, Any]
    tmp: tempfile.TemporaryDirectory


def list_volume_source(root: str | Path, data: DataConfig, num_classes: int) -> VolumeListing:
    """The cases of a volume source, listed without reading a volume (``list_volume_cases``)."""
    tmp = tempfile.TemporaryDirectory(prefix="aisd-ray-volumes-")
    cases, info = list_volume_cases(root, data, num_classes, Path(tmp.name))
    return VolumeListing(cases, info, tmp)


def read_volume_source(root: str | Path, data: DataConfig, height: int, width: int, channels: int,
                       num_classes: int, progress: bool = True, listing: VolumeListing | None = None,
                       map: Callable | None = None) -> VolumeSplits:
    """Slice refs per split of a volume source; every case read once (a progress bar), its slices
    kept until this object is dropped. DataError (naming the file) for a case that cannot be used.
    ``listing``: ``list_volume_source``'s (else listed here); ``map(fn, cases)``: how the cases are
    read and windowed (``case_map``: in parallel; else one after another here), the results in
    case order, so the store is the same whatever the number of workers."""
    listing = listing or list_volume_source(root, data, num_classes)
    tmp, cases, info = listing.tmp, listing.cases, dict(listing.info)
    folder = Path(tmp.name)
    reading = LabelReading(info.pop("mask_values", "raw_labels" if data.mask_values == "raw_labels" else "class_ids"))
    geometry: dict[str, Any] = {}
    records: dict[str, Any] = {}
    refs: dict[str, list[SliceRef]] = {}
    every = [case for split_cases_ in cases.values() for case in split_cases_]
    process = partial(_process, folder=folder, data=data, height=height, width=width, channels=channels,
                      num_classes=num_classes)
    # the AISD DICOM masks are read through an open zip, which another process cannot be handed
    mapped = (map or _serial)(process, every) if not any(callable(c.labels) for c in every) else _serial(process, every)
    bar = progress_bar(total=len(every), desc="read volumes", unit="case", enabled=progress)
    for case, geo in zip(every, mapped):
        geometry[case.case_id] = geo
        bar.update()
    bar.close()
    for split, split_cases_ in cases.items():
        refs[split] = []
        for case in split_cases_:
            geo = geometry[case.case_id]
            records[case.case_id] = geo.pop("qa")
            refs[split] += [SliceRef(f"{case.case_id}_{k}", f"{case.stamp}/{k}/{SLICE_FEATURES}",
                                     partial(_load, tmp, case.case_id, k, f"{case.case_id}_{k}"),
                                     partial(_load_labels, tmp, case.case_id, k), reading)
                            for k in range(geo["shape"][0])]
    info["geometry"] = geometry
    info["qa"] = records
    trained = [c.case_id for c in cases.get("train", ())] or list(records)  # what the model learns from
    info["domain"] = qa.union_domain(records[c]["values"] for c in trained)
    info["windows"] = [list(w) for w in data.windows]
    info["channels"] = data.channels
    info["brain_mask"] = {"feature": "brain", "rule": "data/ct/head.py brain_mask, resized to the model size as the "
                          "labels (nearest neighbour)"}
    return VolumeSplits(refs, info)


def _serial(fn: Callable, items: list) -> Any:
    return (fn(item) for item in items)
