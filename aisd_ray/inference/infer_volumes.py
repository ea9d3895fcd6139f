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
  normalised predictive entropy (``scoring/calibration.py``), taken at the model's size where the
  network predicts and resized to the scan as the probabilities are;
- ``cases/<case>/seg.dcm`` (with ``dicom_seg=True``, a DICOM series input only): the mask as a DICOM
  Segmentation on the series' own slices (``dicom_seg.py``); it carries the series' patient and study
  identity, hence opt-in; a NIfTI input gets one log line instead;
- summary.json's ``uncertainty`` ({"measure", "case_score", "threshold", "review": bool, or None
  for an export without calibration.json}) and each lesion's ``uncertainty`` (its voxels' mean);
  the preview shows the uncertainty as a heat map beside each outlined slice;
- ``cases.csv``: one row per case; ``brain_removed_ml`` (the mL the brain mask removed), ``qa``
  ("pass" or "warn: <check>, ..."), ``uncertainty`` (the case score) and ``review`` (True/False,
  empty without a threshold), ``status``
"done" or "refused" and ``error`` the refused case's one line; ``cohort.json``: the cohort's
  summary (``cohort.cohort_summary``).

Each QA warning is also logged, one line per warning; with ``strict`` the first one refuses the case
(a VolumeError of one line: the case, the check, its value and the training range), nothing of it
written.

Per case (``infer_case``) and a driver (``infer_volumes``): the output folder is whole *per case*
(``cohort.py``: each case's outputs appear whole when it is done, a rerun skips the cases complete
for the same export, a refused case is a row and the others go on); the cases run in this process
or on a pool of Ray actors (``cohort_ray.py``). Memory: the volume is segmented in slice batches end
to end (``segment``), so beyond the int16 HU and the uint8 labels little grows with the volume
(the uncertainty kept as float16 for the lesions' scores and the preview; the case score summed
slice by slice: ``bench/benchmark_infer.py`` measures the bytes per added input voxel at the peak).

Only the case ID (the file or folder name given) and the geometry are written: no DICOM header
value (names, dates, accession numbers) reaches an output or a log line, but the SEG asked for
with ``dicom_seg``. A case that is not CT
(named in its row and the error) leaves nothing of itself behind.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from aisd_ray.core import storage
from aisd_ray.core.progress import progress_bar
from aisd_ray.data.ct import qa
from aisd_ray.data.ct.channels import midline, model_input
from aisd_ray.data.ct.head import head_model
from aisd_ray.data.ct.windows import InPlane
from aisd_ray.data.sources import volume, volume_write
from aisd_ray.data.sources.layout import resize_probabilities
from aisd_ray.inference import brain_mask as brain_step
from aisd_ray.inference import cohort, input_kind, postprocess
from aisd_ray.inference import dicom_seg as seg_out
from aisd_ray.inference.export import LoadedExport
from aisd_ray.report import render
from aisd_ray.scoring import calibration, volume_metrics

log = logging.getLogger(__name__)
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


def segment(model: LoadedExport, vol: volume.Volume, batch_size: int, probabilities: bool = True,
            uncertainty: np.ndarray | None = None, scores: calibration.CaseScores | None = None
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels uint8 (Z, Y, X), lesion probability float16 (Z, Y, X), None unless ``probabilities``)
    of one canonical volume, ``batch_size`` slices at a time end to end: each batch's channels are
    built as in prepare (``channels.model_input`` with the model's ``windows`` and ``channel_mode``,
    "grey" for a model without one; the neighbours mode sees one slice beyond the batch on each side,
    the symmetry mode the whole volume's midline), resized, segmented, and its probabilities resized
    back slice by slice, so that only the labels (1 byte a voxel) and, when asked, the lesion
    probability (2) grow with the volume. ``uncertainty``: a (Z, model height, model width) array
    (float16 is enough for 0..1) filled with each pixel's normalised predictive entropy
    (``calibration.entropy``) at the model's size, where the network predicts (``uncertainty_at``:
    a slice of it at the scan's size, resized as the probabilities are); ``scores``: the case's score
    accumulated slice by slice at the scan's size (``calibration.CaseScores``, under ``vol.case_id``). VolumeError naming the case when the channels
    cannot be built (the symmetry mode in a volume without a head)."""
    z, h, w = vol.hu.shape
    plane = InPlane(h, w, (vol.spacing[1], vol.spacing[2]), model.height, model.width)
    mode = getattr(model, "channel_mode", "grey")
    labels = np.zeros((z, h, w), np.uint8)
    lesion = np.zeros((z, h, w), np.float16) if probabilities else None
    line = _channels(vol, mode, lambda: midline(vol.hu)) if mode == "symmetry" else None
    for start in range(0, z, batch_size):
        stop = min(z, start + batch_size)
        lo, hi = max(0, start - 1), min(z, stop + 1)  # one neighbour each side
        batch = _channels(vol, mode, lambda: model_input(vol.hu[lo:hi], mode, model.windows, model.channels,
                                                         model.height, model.width, line)[start - lo:stop - lo])
        predicted = model.predict(batch)["probabilities"].numpy()
        for k, probs in zip(range(start, stop), predicted):
            back = plane.probabilities_back(probs)
            labels[k] = np.argmax(back, axis=-1)
            if lesion is not None:
                lesion[k] = 1.0 - back[..., 0]
            if uncertainty is not None or scores is not None:
                u = calibration.entropy(probs)
                if uncertainty is not None:
                    uncertainty[k] = u
                if scores is not None:
                    scores.add(vol.case_id, 1.0 - back[..., 0], plane.probabilities_back(u[..., None])[..., 0])
    return labels, lesion


def uncertainty_at(vol: volume.Volume, model: Any, uncertainty: np.ndarray, k: int) -> np.ndarray:
    """Slice ``k`` of ``segment``'s model-size ``uncertainty`` at the scan's size: (Y, X) float32
    0..1, resized (bilinear) as the class probabilities are."""
    plane = InPlane(*vol.hu.shape[1:], (vol.spacing[1], vol.spacing[2]), model.height, model.width)
    return plane.probabilities_back(uncertainty[k].astype(np.float32)[..., None])[..., 0]


def _channels(vol: volume.Volume, mode: str, build):
    try:
        return build()
    except ValueError as exc:
        raise volume.VolumeError(f"{vol.case_id}: channels {mode!r}: {exc}") from None


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
    ``uncertainty`` (Z, y, x) 0..1 (any in-plane size covering the slice: ``segment``'s is the
    model's), each beside its uncertainty as a heat map (``render.beside_heat``)."""
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
            heat = resize_probabilities(uncertainty[k].astype(np.float32)[..., None], *tile.shape[:2])[..., 0]
            tile = render.beside_heat(tile, heat)
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


class Segmenter:
    """The export of a cohort, loaded once (when the first case has been read: a folder whose
    cases are all refused never loads it) and kept, with its input-kind finding (``input_kind.check``,
    logged once), first in every case's QA. ``model``: an already loaded export or a stand-in."""

    def __init__(self, export_uri: str, tta: bool | None = None, model: Any = None, input_path: str = ""):
        self.export_uri, self.tta, self.model, self.input_path = export_uri, tta, model, input_path
        self.kind: list = []

    def loaded(self) -> tuple[Any, list]:
        if not self.kind:
            self.model = self.model or LoadedExport(self.export_uri, tta=self.tta)
            self.kind = [input_kind.check(getattr(self.model, "input", None), input_kind.CT_HU, self.input_path,
                                          getattr(self.model, "uri", self.export_uri), self.model.windows)]
        return self.model, self.kind


def infer_case(seg: Segmenter, case_id: str, path: Path, out_uri: str, export_id: str, batch_size: int = 4,
               probabilities: bool = False, postprocessing: dict[str, Any] | None = None, strict: bool = False,
               node: str | None = None, dicom_seg: bool = False, brain_mask: bool | None = None,
               uncertainty: bool = False) -> dict[str, Any]:
    """One case: read, QA, segment, post-process, and its outputs written whole (``cohort.case_output``:
    ``<case>.nii.gz`` and ``cases/<case>/``, its ``summary.json`` last); returns its summary (with
    ``export_id`` and, when given, the ``node`` that ran it). A VolumeError (not CT, a bad series,
    ``strict`` QA) refuses the case: its row (``cohort.refused``) comes back and nothing is written.
    ``dicom_seg``, ``brain_mask``, ``uncertainty``: as ``infer_volumes``."""
    try:
        vol = volume.read_volume(path, case_id)
        model, kind = seg.loaded()
        choice = postprocessing or getattr(model, "postprocess", None) or postprocess.NONE
        head = head_model(vol.hu, vol.spacing)  # the QA gate's and the brain mask's
        own = qa.check_case(vol, head, getattr(model, "domain", None))
        findings = kind + own
        qa.refuse_if_strict(strict, path, case_id, findings)
        qa.log_warnings(case_id, own)
        brain = brain_step.mask_of(vol.hu, vol.spacing, head, brain_step.resolve(brain_mask, model))
        del head  # its masks are not kept while the network runs (memory: one bool mask instead of four)
        unc = np.zeros((vol.hu.shape[0], model.height, model.width), np.float16)
        scores = calibration.CaseScores()
        raw, lesion = segment(model, vol, batch_size, probabilities, unc, scores)
    except volume.VolumeError as exc:
        return cohort.refused(case_id, str(exc))
    raw, inside = brain_step.on_mask(raw, brain, vol.spacing)
    del brain
    labels = postprocessed(choice, vol, raw, model)
    info = summary(vol, labels, model.windows, getattr(model, "channel_mode", "grey"))
    removed = volume_metrics.volume_ml(raw > 0, vol.spacing) - volume_metrics.volume_ml(labels > 0, vol.spacing)
    del raw
    info.update(tta=bool(getattr(model, "tta", False)), postprocessing={
        **{k: choice.get(k) for k in postprocess.NONE}, "removed_ml": round(removed, 3)},
        qa=qa.as_json(findings), brain_mask=inside, export_id=export_id, **({"node": node} if node else {}))
    calibration.annotate(info, labels > 0, scores.scores().get(case_id, 0.0),
                         lambda k: uncertainty_at(vol, model, unc, k), getattr(model, "calibration", None),
                         getattr(model, "measure", "single"))
    try:
        with cohort.case_output(out_uri, case_id) as (mask_path, case_dir):
            volume_write.write_nifti(vol, labels, mask_path)
            (case_dir / "preview.png").write_bytes(preview(vol, labels, model.windows, info, unc))
            if probabilities:
                volume_write.write_nifti(vol, lesion, case_dir / "probabilities.nii.gz")
            if uncertainty:
                volume_write.write_nifti(vol, np.stack([uncertainty_at(vol, model, unc, k) for k in range(len(unc))]),
                                         case_dir / "uncertainty.nii.gz")
            if dicom_seg:
                seg_out.write_seg(vol, labels, getattr(model, "info", {}).get("class_names"), case_dir / seg_out.FILE)
            storage.write_json(str(case_dir / "summary.json"), info)  # last: the case's completion
    except volume.VolumeError as exc:  # an output this case cannot have (a SEG off its series' grid): its row
        return cohort.refused(case_id, str(exc))
    return info


def infer_volumes(export_uri: str, input_path: str | Path, out_uri: str, batch_size: int = 4,
                  probabilities: bool = False, progress: bool = True, model: Any = None, tta: bool | None = None,
                  postprocessing: dict[str, Any] | None = None, strict: bool = False, redo: bool = False,
                  pool: Callable[..., dict[str, dict[str, Any]]] | None = None, dicom_seg: bool = False,
                  brain_mask: bool | None = None, uncertainty: bool = False) -> list[dict[str, Any]]:
    """Segment every case of ``input_path`` into ``out_uri``; return the done cases' summaries in
    case order. Each case is written whole when it finishes (``cohort.py``); a case already complete
    for this export (``cohort.export_identity``) is skipped unless ``redo``. A refused case (a
    VolumeError: not CT, a bad series, ``strict`` QA) gets its row in ``cases.csv`` and no outputs,
    the others go on; ``cases.csv`` and ``cohort.json`` are written at the end, then a VolumeError
    is raised with the refused cases' lines (one each). ``model``: an already loaded export
    (anything with its ``height``, ``width``, ``channels``, ``windows`` and ``predict``; its
    ``channel_mode``, ``tta`` and ``postprocess`` where it has them), else the export is loaded,
    with ``tta``, once the first case has been read. ``postprocessing``: a choice used instead of
    the export's own (``postprocess.py``). ``pool``: None, the cases in this process; else
    ``pool(todo, export_uri, out_uri, export_id, tta, input_path, settings, bar)`` runs them and
    returns their rows by case ID (the Ray actor pool: ``functools.partial(cohort_ray.run_pool, N)``).
    ``dicom_seg``: also a DICOM SEG of each DICOM series case (``dicom_seg.write_seg``; the export's
    ``class_names`` name its segments). ``brain_mask``: lesion voxels outside the brain removed (True)
    or not (False); None: as the model records it (``brain_mask.resolve``). ``uncertainty``: also
    write each case's ``uncertainty.nii.gz``. Each of these is part of the cases' ``export_id``: a
    rerun with another value redoes them."""
    cases = volume_cases(input_path)
    options = dict(dicom_seg=dicom_seg, brain_mask=brain_mask, uncertainty=uncertainty)
    export_id = cohort.export_identity(export_uri, model, tta=tta, postprocessing=postprocessing,
                                       probabilities=probabilities, strict=strict, **options)
    storage.ensure_dir(out_uri)
    if storage.exists(storage.join(out_uri, storage.COMPLETE)):
        storage.delete(storage.join(out_uri, storage.COMPLETE))  # being changed: not a finished folder
    cohort.remove_stale(out_uri)
    rows: dict[str, dict[str, Any]] = {}
    if not redo:
        rows = {c: info for c in cases if (info := cohort.complete(out_uri, c, export_id))}
    todo = {c: p for c, p in cases.items() if c not in rows}
    bar = progress_bar(total=len(cases), initial=len(rows), desc="infer", unit="case", enabled=progress)
    settings = dict(batch_size=batch_size, probabilities=probabilities, postprocessing=postprocessing, strict=strict,
                    **options)
    if pool is not None and todo:
        found = pool(todo, export_uri, out_uri, export_id, tta, str(input_path), settings, bar)
    else:
        seg = Segmenter(export_uri, tta, model, str(input_path))
        found = {}
        for case_id, path in todo.items():
            found[case_id] = infer_case(seg, case_id, path, out_uri, export_id, **settings)
            bar.update()
    bar.close()
    rows.update(found)
    ordered = [rows[c] for c in cases]
    cohort.write_cohort(out_uri, ordered, _csv_row, list(CSV_FIELDS), skipped=len(cases) - len(todo))
    bad = [r["error"] for r in ordered if cohort.is_refused(r)]
    log.info("infer: %d case(s) done (%d of them skipped: complete from an earlier run with this export and "
             "settings, --redo to segment them again), %d refused; cases.csv and cohort.json in %s",
             len(ordered) - len(bad), len(cases) - len(todo), len(bad), out_uri)
    if bad:
        raise volume.VolumeError("\n".join(bad))
    return ordered


def _csv_row(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "case_id": s["case_id"], "lesion_ml": s["lesion_ml"], "lesion_count": s["lesion_count"],
        "largest_lesion_ml": s["lesions"][0]["volume_ml"] if s["lesions"] else 0.0,
        "slices": s["shape_zyx"][0], "spacing_mm_zyx": " ".join(map(str, s["spacing_mm_zyx"])),
        "input": s["input"], "gantry_tilt_deg": s["gantry_tilt_deg"],
        "brain_removed_ml": s["brain_mask"]["removed_ml"], "qa": qa.label(qa.from_json(s["qa"])),
        "uncertainty": s["uncertainty"]["case_score"],
        "review": "" if s["uncertainty"]["review"] is None else s["uncertainty"]["review"]}
