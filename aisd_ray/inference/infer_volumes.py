"""``aisd-ray infer --input``: CT patients in (a DICOM series folder, a NIfTI file, or a folder of
them), lesion masks in the scan's geometry and lesion volumes in mL out.

Each case is read in HU (``data/volume.py``), its channels built as the model was trained (the
export's ``windows`` and ``channels`` mode: ``data/channels.py``, at the scan's own size), its
slices resized to the model size, segmented, and the class probabilities resized back to the
slice's own size before the most likely class is taken. The mask is then put back into the input's
geometry (same shape, spacing, origin and direction), its lesion voxels outside the brain removed
(``brain_mask.py``: the head model's intracranial regions, from the case's HU; on unless the export
or ``brain_mask`` turns it off), post-processed by the export's choice
(``postprocess.json``, chosen on validation cases: see ``postprocess.py``; none when the export has
none) and written as NIfTI. With ``tta``, each slice's prediction averages it and its left-right
mirror (``export.LoadedExport``).
Output, in nnU-Net's convention for a predictions folder (``evaluate --predictions`` reads it):

- ``<case>.nii.gz``: uint8 class ids in the input's geometry;
- ``cases/<case>/summary.json``: lesion volume in mL, the 3-D lesions (26-connected components:
  each one's mL and slice range, largest first), spacing, shape, windows, channel mode, gantry
  tilt, ``tta``, ``brain_mask`` ({"applied", "removed_ml"}, or "reason" when not applied), the
  ``postprocessing`` applied and the mL it removed (of what the brain mask left), and ``qa``: the QA
  gate's findings (``data/qa.py``: each check's name, status, value, training range and one-line message;
  the domain checks against the export's ``domain``, skipped for an export that records none);
- ``cases/<case>/preview.png``: the slices that hold lesion, windowed, the lesion outlined, mL in
  the title (the middle slices when there is none), and the first QA warning;
- ``cases/<case>/probabilities.nii.gz`` (with ``probabilities=True``): float32 lesion probability,
  the network's (with TTA if on), calibrated (the export's temperature), before the brain mask and
  post-processing;
- ``cases/<case>/uncertainty.nii.gz`` (with ``uncertainty=True``): float32 0..1, each voxel's
  normalised predictive entropy (``scoring/calibration.py``);
- ``cases/<case>/seg.dcm`` (with ``dicom_seg=True``, a DICOM series input only): the mask as a DICOM
  Segmentation on the series' own slices (``dicom_seg.py``); it carries the series' patient and study
  identity, hence opt-in; a NIfTI input gets one log line instead;
- summary.json's ``uncertainty`` ({"measure", "case_score", "threshold", "review": bool, or None
  for an export without calibration.json}) and each lesion's ``uncertainty`` (its voxels' mean);
  the preview shows the uncertainty as a heat map beside each outlined slice;
- ``cases.csv``: one row per case; its ``brain_removed_ml`` column the mL the brain mask removed, its
  ``qa`` column "pass" or "warn: <check>, ...", its ``uncertainty`` (the case score) and ``review``
  (True/False, empty without a threshold).

Each QA warning is also logged, one line per warning; with ``strict`` the first one refuses the case
(a VolumeError of one line: the case, the check, its value and the training range), nothing written.

Only the case ID (the file or folder name given) and the geometry are written: no DICOM header
value (names, dates, accession numbers) reaches an output or a log line, but the SEG asked for
with ``dicom_seg``. The output folder appears
only once every case is done; a case that is not CT (named in the error) leaves nothing behind.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from aisd_ray.core import storage
from aisd_ray.core.progress import progress_bar
from aisd_ray.data.ct import qa
from aisd_ray.data.ct.channels import model_input
from aisd_ray.data.ct.head import head_model
from aisd_ray.data.ct.windows import InPlane
from aisd_ray.data.sources import volume, volume_write
from aisd_ray.inference import dicom_seg as seg_out
from aisd_ray.inference import brain_mask as brain_step
from aisd_ray.inference import input_kind, postprocess
from aisd_ray.inference.export import LoadedExport
from aisd_ray.data.sources.layout import resize_probabilities
from aisd_ray.report import render
from aisd_ray.scoring import calibration, volume_metrics

PREVIEW_TILES = 12  # at most this many slices in a preview
PREVIEW_SIZE = 256  # px, each tile


def volume_cases(input_path: str | Path) -> dict[str, Path]:
    """{case ID: path}: one NIfTI file, DICOM series folder or enhanced CT file, or a folder of them."""
    path = Path(input_path)
    if volume.is_nifti(path) or volume.is_dicom_series(path) or volume.is_dicom_file(path):
        return {volume.case_id_of(path): path}
    if not path.exists():
        raise volume.VolumeError(f"{path}: not found")
    return volume.list_cases(path)


def is_volume_input(input_path: str | Path) -> bool:
    """True for a NIfTI file, a DICOM series folder or DICOM file, or a folder holding NIfTI files or
    series folders."""
    path = Path(input_path)
    if volume.is_nifti(path) or volume.is_dicom_series(path) or volume.is_dicom_file(path):
        return True
    return path.is_dir() and any(volume.is_nifti(p) or (p.is_dir() and volume.is_dicom_series(p))
                                 for p in path.iterdir())


def segment(model: LoadedExport, vol: volume.Volume, batch_size: int,
            uncertainty: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels uint8 (Z, Y, X), lesion probability float32 (Z, Y, X)) of one canonical volume;
    ``uncertainty``, a float32 (Z, Y, X) array, is filled with each voxel's uncertainty
    (``calibration.entropy`` of the class probabilities at the scan's size). Its
    channels are built as in prepare (``channels.build_channels`` with the model's ``windows`` and
    ``channel_mode``, "grey" for a model without one), then resized. VolumeError naming the case
    when they cannot be (the symmetry mode in a volume without a head)."""
    z, h, w = vol.hu.shape
    plane = InPlane(h, w, (vol.spacing[1], vol.spacing[2]), model.height, model.width)
    mode = getattr(model, "channel_mode", "grey")
    try:
        images = model_input(vol.hu, mode, model.windows, model.channels, model.height, model.width)
    except ValueError as exc:
        raise volume.VolumeError(f"{vol.case_id}: channels {mode!r}: {exc}") from None
    labels = np.zeros((z, h, w), np.uint8)
    lesion = np.zeros((z, h, w), np.float32)
    for start in range(0, z, batch_size):
        ks = range(start, min(z, start + batch_size))
        batch = images[start:start + batch_size]
        probabilities = model.predict(batch)["probabilities"].numpy()
        for k, probs in zip(ks, probabilities):
            back = plane.probabilities_back(probs)
            labels[k] = np.argmax(back, axis=-1)
            lesion[k] = 1.0 - back[..., 0]
            if uncertainty is not None:
                uncertainty[k] = calibration.entropy(back)
    return labels, lesion


def summary(vol: volume.Volume, labels: np.ndarray, windows, channels: str = "grey") -> dict[str, Any]:
    """What a clinician or a trial reads: lesion mL and the 3-D lesions, with the geometry."""
    lesions = volume_metrics.components(labels > 0, vol.spacing)
    return {
        "case_id": vol.case_id,
        "lesion_ml": round(volume_metrics.volume_ml(labels > 0, vol.spacing), 3),
        "lesions": [{"volume_ml": round(c["volume_ml"], 3), "voxels": c["voxels"],
                     "slices": [c["z_min"], c["z_max"]]} for c in lesions],
        "lesion_count": len(lesions),
        "shape_zyx": list(vol.hu.shape),
        "spacing_mm_zyx": [round(float(s), 5) for s in vol.spacing],
        "input": vol.kind,
        "gantry_tilt_deg": round(float(vol.gantry_tilt_deg), 3),
        "windows_hu": [list(w) for w in windows],
        "channels": channels,
        "slices": "canonical axial order, inferior to superior (0 = the lowest slice)",
    }


def preview(vol: volume.Volume, labels: np.ndarray, windows, info: dict[str, Any],
            uncertainty: np.ndarray | None = None) -> bytes:
    """PNG bytes: the lesion slices (or the middle ones), first window, lesion outlined; with
    ``uncertainty`` (Z, Y, X) 0..1, each beside its uncertainty as a heat map (``render.beside_heat``)."""
    z = vol.hu.shape[0]
    with_lesion = [k for k in range(z) if labels[k].any()]
    picked = with_lesion or list(range(max(0, z // 2 - 1), min(z, z // 2 + 2)))
    if len(picked) > PREVIEW_TILES:
        picked = [picked[i] for i in np.linspace(0, len(picked) - 1, PREVIEW_TILES).round().astype(int)]
    h, w = vol.hu.shape[1:]
    plane = InPlane(h, w, (vol.spacing[1], vol.spacing[2]), PREVIEW_SIZE, PREVIEW_SIZE)
    tiles = []
    for k in picked:
        image = plane.to_model(vol.hu[k], windows[:1], 3)
        mask = plane.labels_to_model(labels[k])
        tile = render.overlay(image, mask)
        if uncertainty is not None:
            tile = render.beside_heat(tile, resize_probabilities(uncertainty[k][..., None], *tile.shape[:2])[..., 0])
        tiles.append((f"slice {k}: {volume_metrics.volume_ml(labels[k:k + 1] > 0, vol.spacing):.2f} mL", tile))
    buf = io.BytesIO()
    legend = (("lesion", render.OUTLINE),) + ((() if uncertainty is None else (UNCERTAINTY_LEGEND,)))
    render.gallery(tiles, preview_title(vol.case_id, info, bool(with_lesion)), columns=4 if uncertainty is None else 2,
                   legend=legend).save(buf, format="PNG")
    return buf.getvalue()


def preview_title(case_id: str, info: dict[str, Any], with_lesion: bool) -> str:
    """The preview's title: the lesion mL and count (or "no lesion found"), and the first QA
    warning of ``info["qa"]`` by its check's name."""
    title = (f"{case_id}: lesion {info['lesion_ml']:.2f} mL in {info['lesion_count']} lesion(s)"
             if with_lesion else f"{case_id}: no lesion found")
    first = qa.warnings(qa.from_json(info.get("qa", ())))
    return f"{title}  |  QA warn: {first[0].check}" if first else title


CSV_FIELDS = ("case_id", "lesion_ml", "lesion_count", "largest_lesion_ml", "slices", "spacing_mm_zyx", "input",
              "gantry_tilt_deg", "brain_removed_ml", "qa", "uncertainty", "review")
UNCERTAINTY_LEGEND = ("right: uncertainty (entropy), dark 0 .. yellow 1", (252, 200, 60))


def postprocessed(choice: dict[str, Any], vol: volume.Volume, labels: np.ndarray, model: Any) -> np.ndarray:
    """``labels`` (Z, Y, X) on the scan's grid after ``choice`` (``postprocess.apply``): a ``min_ml``
    rule at the scan's spacing; a ``min_voxels`` rule, chosen at model resolution, as the volume of
    that many model-size voxels of this scan (slice spacing x the resized pixel spacing)."""
    plane = InPlane(*vol.hu.shape[1:], (vol.spacing[1], vol.spacing[2]), model.height, model.width)
    voxel_ml = volume_metrics.volume_ml(np.ones((1, 1, 1)), (vol.spacing[0], *plane.model_spacing))
    return postprocess.apply(choice, labels, vol.spacing, voxel_ml)


def infer_volumes(export_uri: str, input_path: str | Path, out_uri: str, batch_size: int = 4,
                  probabilities: bool = False, progress: bool = True, model: Any = None, tta: bool | None = None,
                  postprocessing: dict[str, Any] | None = None, strict: bool = False,
                  dicom_seg: bool = False, brain_mask: bool | None = None,
                  uncertainty: bool = False) -> list[dict[str, Any]]:
    """Segment every case of ``input_path``; return their summaries. A case that is not a CT volume
    is a VolumeError (one line naming the file) and leaves no output folder. ``model``: an already
    loaded export (anything with its ``height``, ``width``, ``channels``, ``windows`` and
    ``predict``; its ``channel_mode``, ``tta`` and ``postprocess`` where it has them), else the
    export is loaded, with ``tta``, once the first case has been read. ``postprocessing``: a choice
    used instead of the export's own (``postprocess.py``). ``strict``: a QA warning refuses its case
    (``qa.refuse_if_strict``) before anything is written. ``dicom_seg``: also a DICOM SEG of each DICOM
    series case (``dicom_seg.write_seg``; the export's ``class_names`` name its segments). ``brain_mask``:
    lesion voxels outside the brain removed (True) or not (False); None: as the model records it
    (``brain_mask.resolve``). ``uncertainty``: also write each case's
    ``uncertainty.nii.gz``."""
    cases = volume_cases(input_path)
    summaries = []
    bar = progress_bar(total=len(cases), desc="infer", unit="case", enabled=progress)
    kind: list = []  # the export's input-kind finding (input_kind.check, logged once), first in every case's QA
    with storage.staged_dir(out_uri) as folder:
        for case_id, path in cases.items():
            vol = volume.read_volume(path, case_id)
            if not kind:  # the export is loaded once the first case has been read; a given model is checked too
                model = model or LoadedExport(export_uri, tta=tta)
                kind = [input_kind.check(getattr(model, "input", None), input_kind.CT_HU, str(input_path),
                                         getattr(model, "uri", export_uri), model.windows)]
            choice = postprocessing or getattr(model, "postprocess", None) or postprocess.NONE
            head = head_model(vol.hu, vol.spacing)  # the QA gate's and the brain mask's
            own = qa.check_case(vol, head, getattr(model, "domain", None))
            findings = kind + own
            qa.refuse_if_strict(strict, path, case_id, findings)
            qa.log_warnings(case_id, own)
            unc = np.zeros(vol.hu.shape, np.float32)
            raw, lesion = segment(model, vol, batch_size, unc)
            raw, inside = brain_step.on_volume(raw, vol.hu, vol.spacing, head, brain_step.resolve(brain_mask, model))
            labels = postprocessed(choice, vol, raw, model)
            volume_write.write_nifti(vol, labels, folder / f"{case_id}.nii.gz")
            info = summary(vol, labels, model.windows, getattr(model, "channel_mode", "grey"))
            removed = volume_metrics.volume_ml(raw > 0, vol.spacing) - volume_metrics.volume_ml(labels > 0, vol.spacing)
            info.update(tta=bool(getattr(model, "tta", False)), postprocessing={
                **{k: choice.get(k) for k in postprocess.NONE}, "removed_ml": round(removed, 3)},
                qa=qa.as_json(findings), brain_mask=inside)
            calibration.annotate(info, labels > 0, lesion, unc, getattr(model, "calibration", None),
                                 getattr(model, "measure", "single"))
            case_dir = folder / "cases" / case_id
            case_dir.mkdir(parents=True)
            storage.write_json(str(case_dir / "summary.json"), info)
            (case_dir / "preview.png").write_bytes(preview(vol, labels, model.windows, info, unc))
            if probabilities:
                volume_write.write_nifti(vol, lesion, case_dir / "probabilities.nii.gz")
            if dicom_seg:
                seg_out.write_seg(vol, labels, getattr(model, "info", {}).get("class_names"), case_dir / seg_out.FILE)
            if uncertainty:
                volume_write.write_nifti(vol, unc, case_dir / "uncertainty.nii.gz")
            summaries.append(info)
            bar.update()
        bar.close()
        _write_cases_csv(folder / "cases.csv", summaries)
    return summaries


def _write_cases_csv(path: Path, summaries: list[dict[str, Any]]) -> None:
    storage.write_csv(str(path), [{
        "case_id": s["case_id"], "lesion_ml": s["lesion_ml"], "lesion_count": s["lesion_count"],
        "largest_lesion_ml": s["lesions"][0]["volume_ml"] if s["lesions"] else 0.0,
        "slices": s["shape_zyx"][0], "spacing_mm_zyx": " ".join(map(str, s["spacing_mm_zyx"])),
        "input": s["input"], "gantry_tilt_deg": s["gantry_tilt_deg"],
        "brain_removed_ml": s["brain_mask"]["removed_ml"],
        "qa": qa.label(qa.from_json(s["qa"])), "uncertainty": s["uncertainty"]["case_score"],
        "review": "" if s["uncertainty"]["review"] is None else s["uncertainty"]["review"]} for s in summaries],
        list(CSV_FIELDS))

