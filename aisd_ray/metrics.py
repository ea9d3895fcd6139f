"""Honest lesion metrics (background excluded) and the seed's metric, kept for comparison.

Counts are additive, so the same code scores one image, a batch, or a whole split reduced
across Ray workers: per-image true positive / false positive / false negative pixel counts
of the lesion (every non-background class together).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


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
    """The seed's metric: sums over H, W *and the class axis*, so background dominates.

    Kept only to compare with the seed's published 0.9904; it is not a lesion score.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    axes = tuple(range(1, y_true.ndim))
    inter = np.sum(y_true * y_prob, axis=axes)
    dice = (2 * inter + smooth) / (np.sum(y_true, axis=axes) + np.sum(y_prob, axis=axes) + smooth)
    return float(np.mean(dice))
