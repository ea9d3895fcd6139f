"""Scores from pixel or voxel counts, the one formula that slice metrics (``metrics.py``),
volume metrics (``volume_metrics.py``) and post-processing share: here, below all three, so that
neither metrics module imports the other for it."""

from __future__ import annotations

import math


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
