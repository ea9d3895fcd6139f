"""Honest lesion metrics (background excluded) and the original's metric, kept for comparison.

Counts are additive, so the same code scores one image, a batch, or a whole split reduced
across Ray workers: per-image true positive / false positive / false negative pixel counts
of the lesion (every non-background class together). Where slices are known to belong to a
case, the case is scored as a volume too: its Dice (the literature's AISD metric), lesions as
3D connected components (found, missed, false), and predicted against true lesion volume.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

# Lesions are 26-connected in (slice, row, column): touching across a face, edge or corner.
CONNECTIVITY = ndimage.generate_binary_structure(3, 3)


def lesion_counts(true_labels: np.ndarray, pred_labels: np.ndarray) -> np.ndarray:
    """(N, 3) int64 array of tp, fp, fn lesion pixels per image for (N, H, W) label maps."""
    t = np.asarray(true_labels).reshape(len(true_labels), -1) > 0
    p = np.asarray(pred_labels).reshape(len(pred_labels), -1) > 0
    tp = np.sum(t & p, axis=1)
    fp = np.sum(~t & p, axis=1)
    fn = np.sum(t & ~p, axis=1)
    return np.stack([tp, fp, fn], axis=1).astype(np.int64)


def scores_from_counts(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Dice, IoU, precision, recall of lesion pixels; NaN where undefined (0/0).

    An image with no lesion in truth or prediction has an undefined Dice: it is reported
    as NaN and left out of per-image means (nnU-Net's convention), never counted as 1.
    """
    def ratio(a: float, b: float) -> float:
        return float(a / b) if b > 0 else math.nan

    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
    }


def summarize(counts: np.ndarray) -> dict[str, Any]:
    """Aggregate lesion scores of a split from per-image counts.

    ``lesion_dice`` etc. pool every pixel of the split (a global Dice); the ``*_per_image``
    figures are means over the images where the score is defined.
    """
    counts = np.asarray(counts, dtype=np.float64).reshape(-1, 3)
    pooled = scores_from_counts(*counts.sum(axis=0))
    per_image = [scores_from_counts(*row) for row in counts]
    out: dict[str, Any] = {f"lesion_{k}": v for k, v in pooled.items()}
    for key in ("dice", "iou", "precision", "recall"):
        values = [s[key] for s in per_image if not math.isnan(s[key])]
        out[f"lesion_{key}_per_image"] = float(np.mean(values)) if values else math.nan
    out["images"] = int(len(counts))
    out["images_with_lesion"] = int(np.sum(counts[:, 0] + counts[:, 2] > 0))
    out["images_with_zero_dice"] = int(sum(1 for s in per_image if s["dice"] == 0.0))
    return out


def dice_coef_multiclass(y_true: np.ndarray, y_prob: np.ndarray, smooth: float = 1.0) -> float:
    """The original's metric: sums over H, W *and the class axis*, so background dominates.

    Kept only to compare with the original's published 0.9904; it is not a lesion score.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    axes = tuple(range(1, y_true.ndim))
    inter = np.sum(y_true * y_prob, axis=axes)
    dice = (2 * inter + smooth) / (np.sum(y_true, axis=axes) + np.sum(y_prob, axis=axes) + smooth)
    return float(np.mean(dice))


def case_scores(true_volume: np.ndarray, pred_volume: np.ndarray) -> dict[str, float]:
    """Scores of one case from its (slices, H, W) label maps, slices in order.

    A true lesion is *found* when any predicted lesion voxel overlaps it, else *missed*; a
    predicted lesion that overlaps no true lesion is *false*.
    """
    t, p = np.asarray(true_volume) > 0, np.asarray(pred_volume) > 0
    tp, fp, fn = int(np.sum(t & p)), int(np.sum(~t & p)), int(np.sum(t & ~p))
    true_components, n_true = ndimage.label(t, CONNECTIVITY)
    pred_components, n_pred = ndimage.label(p, CONNECTIVITY)
    found = len(np.unique(true_components[t & p]))
    hit_pred = len(np.unique(pred_components[t & p]))
    return {"slices": int(len(t)), "dice": scores_from_counts(tp, fp, fn)["dice"],
            "true_lesions": n_true, "found_lesions": found, "missed_lesions": n_true - found,
            "false_lesions": n_pred - hit_pred, "true_volume": int(t.sum()), "pred_volume": int(p.sum())}


def summarize_cases(rows: list[dict[str, float]]) -> dict[str, float]:
    """Split figures from per-case scores: mean/median case Dice (over cases where it is
    defined), lesion-wise detection, and volume agreement (in voxels at model resolution)."""
    dice = [r["dice"] for r in rows if not math.isnan(r["dice"])]
    true_lesions = sum(r["true_lesions"] for r in rows)
    found = sum(r["found_lesions"] for r in rows)
    false = sum(r["false_lesions"] for r in rows)
    tv = np.array([r["true_volume"] for r in rows], np.float64)
    pv = np.array([r["pred_volume"] for r in rows], np.float64)
    defined = len(rows) > 1 and tv.std() > 0 and pv.std() > 0
    return {
        "cases": len(rows),
        "case_dice_mean": float(np.mean(dice)) if dice else math.nan,
        "case_dice_median": float(np.median(dice)) if dice else math.nan,
        "lesions_true": int(true_lesions), "lesions_found": int(found),
        "lesions_missed": int(true_lesions - found), "lesions_false": int(false),
        "lesion_detection_rate": found / true_lesions if true_lesions else math.nan,
        "false_lesions_per_case": false / len(rows) if rows else math.nan,
        "volume_abs_error_mean": float(np.mean(np.abs(pv - tv))) if rows else math.nan,
        "volume_correlation": float(np.corrcoef(tv, pv)[0, 1]) if defined else math.nan,
    }
