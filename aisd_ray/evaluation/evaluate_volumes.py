"""``evaluate --predictions DIR --masks DIR`` on NIfTI label volumes: nnU-Net's ``evaluate_folder``
use, with the spacing-aware figures nnU-Net leaves out.

Predictions and ground truth are paired by case ID (``<case>.nii.gz``, as ``infer --input`` and
nnU-Net write them; an nnU-Net channel suffix ``_0000`` is ignored). Each pair must lie on one grid
(shape, spacing, direction, origin); each case is scored at its own spacing: Dice, HD95 (mm),
normalised surface Dice (``volume_metrics.DEFAULT_TOLERANCE_MM``), true and predicted lesion
volume and their absolute difference (mL), and lesion-wise detection (26-connected components, any
overlap: found, missed, false, F1). Writes ``metrics.json`` (split figures, definitions, per case),
``per_case.csv`` and ``volume_agreement.png`` (mL); the folder appears complete or not at all.
No TensorFlow: scoring files needs no model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aisd_ray.core import storage
from aisd_ray.core.progress import progress_bar
from aisd_ray.data.sources import volume
from aisd_ray.data.sources.layout import DataError
from aisd_ray.report import plots
from aisd_ray.scoring import volume_metrics

DEFINITIONS = {
    "case": "one NIfTI pair, scored as a volume at its own spacing; lesion = every non-background class",
    "dice": "2TP / (2TP + FP + FN) over the case's voxels (undefined, null, when neither has lesion)",
    "hd95_mm": "MONAI's percentile Hausdorff distance: the larger of the two directions' 95th percentile "
               "distance between the surface voxels (6-neighbour boundary), in mm; null when one mask is empty",
    "nsd": "normalised surface Dice (Nikolov et al. 2021): the share of both surfaces within nsd_tolerance_mm "
           "of the other",
    "true_ml, pred_ml, avd_ml": "lesion volumes and their absolute difference in mL (voxels x spacing product)",
    "lesion_found/missed/false, lesion_f1": "26-connected 3-D lesions: a true lesion is found when any predicted "
                                            "voxel overlaps it; a predicted lesion overlapping none is false; "
                                            "F1 = 2 found / (2 found + missed + false)",
}


def _nifti_cases(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder not found")
    return {volume.case_id_of(p): p for p in sorted(folder.iterdir()) if volume.is_nifti(p)}


def is_nifti_folder(folder: str | Path) -> bool:
    """True when ``folder`` holds at least one ``.nii``/``.nii.gz`` file."""
    folder = Path(folder)
    return folder.is_dir() and any(volume.is_nifti(p) for p in folder.iterdir())


def evaluate_nifti_folders(predictions_dir: str | Path, masks_dir: str | Path, out_uri: str,
                           tolerance_mm: float = volume_metrics.DEFAULT_TOLERANCE_MM,
                           progress: bool = True) -> dict[str, Any]:
    """Score every case of ``masks_dir`` against its prediction; return the report (as metrics.json).
    DataError naming the file for a missing prediction, a grid that differs, or an unreadable file."""
    predictions_dir, masks_dir = Path(predictions_dir), Path(masks_dir)
    truths = _nifti_cases(masks_dir, "ground-truth")
    predicted = _nifti_cases(predictions_dir, "predictions")
    if not truths:
        raise DataError(f"{masks_dir}: no .nii/.nii.gz label files")
    missing = sorted(truths.keys() - predicted.keys())
    if missing:
        raise DataError(f"{predictions_dir}: no prediction for {len(missing)} case(s): {', '.join(missing[:5])}")
    rows = []
    for case, truth_path in progress_bar(truths.items(), desc="evaluate", unit="case", enabled=progress):
        truth = volume.read_label_volume(truth_path)
        pred = volume.read_label_volume(predicted[case])
        volume.check_same_grid(predicted[case], pred, truth.labels.shape, truth.spacing, truth.geometry,
                               f"the ground truth {truth_path.name}", affine=truth.affine)
        scores = volume_metrics.case_volume_scores(truth.labels > 0, pred.labels > 0, truth.spacing, tolerance_mm)
        rows.append({"case_id": case, "slices": truth.labels.shape[0],
                     "spacing_mm_zyx": " ".join(f"{s:g}" for s in truth.spacing), **scores,
                     "true_lesions": int(scores["lesion_found"] + scores["lesion_missed"])})
    summary = volume_metrics.summarize_volume_cases(rows)
    report = {"source": str(predictions_dir), "ground_truth": str(masks_dir),
              **{f"case_{k}" if k not in ("cases", "nsd_tolerance_mm") else k: v for k, v in summary.items()},
              "definitions": DEFINITIONS, "per_case": rows}
    with storage.staged_dir(out_uri) as folder:
        storage.write_json(str(folder / "metrics.json"), report)
        storage.write_csv(str(folder / "per_case.csv"), rows)
        plots.scatter([("case", [r["true_ml"] for r in rows], [r["pred_ml"] for r in rows])],
                      "true lesion volume (mL)", "predicted lesion volume (mL)", str(folder / "volume_agreement.png"),
                      identity=True, title=f"{len(rows)} cases, median |error| {summary['avd_ml_median']:.2f} mL")
    return report
