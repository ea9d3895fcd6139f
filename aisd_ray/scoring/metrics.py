"""Honest lesion metrics (background excluded) and the original's metric, kept for comparison.

Counts are additive, so the same code scores one image, a batch, or a whole split reduced
across Ray workers: per-image true positive / false positive / false negative pixel counts
of the lesion (every non-background class together). Where slices are known to belong to a
case, the case is scored as a volume too: its Dice (the literature's AISD metric), lesions as
3D connected components (found, missed, false), and predicted against true lesion volume.

With several foreground classes (e.g. penumbra and core) every figure is also given per
class, under keys that carry the class's ``data.class_names`` name where the combined figure
carries ``lesion`` (``core_dice`` beside ``lesion_dice``); a class's pixels are those labelled
with its id, in truth and in prediction alike, so a core pixel predicted as penumbra is a
false negative of core and a false positive of penumbra (but a true positive of the lesion).
A foreground class named ``lesion`` (the two-class default) *is* the combined lesion: it gets
no second set of keys. The best checkpoint is chosen by ``selection_score``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from aisd_ray.scoring.counts import scores_from_counts  # also metrics.scores_from_counts, as before
from aisd_ray.scoring.volume_metrics import lesion_detection  # the one home of the matching rule

# Lesions are 26-connected in (slice, row, column): touching across a face, edge or corner.
CONNECTIVITY = ndimage.generate_binary_structure(3, 3)
# A lesion Dice below this means a model that finds next to no lesion: the one line between a
# collapsed model and a weak one, drawn by the pipeline (test split), tune (best val_score) and sweep.
COLLAPSED_BELOW = 0.1


def lesion_counts(true_labels: np.ndarray, pred_labels: np.ndarray) -> np.ndarray:
    """(N, 3) int64 array of tp, fp, fn lesion pixels per image for (N, H, W) label maps."""
    t = np.asarray(true_labels).reshape(len(true_labels), -1) > 0
    p = np.asarray(pred_labels).reshape(len(pred_labels), -1) > 0
    tp = np.sum(t & p, axis=1)
    fp = np.sum(~t & p, axis=1)
    fn = np.sum(t & ~p, axis=1)
    return np.stack([tp, fp, fn], axis=1).astype(np.int64)


def class_counts(true_labels: np.ndarray, pred_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes - 1, 3) int64 array: tp, fp, fn pixels of each foreground class 1..num_classes-1
    per image, for (N, H, W) integer label maps (a pixel is of class k where its label is k)."""
    t = np.asarray(true_labels).reshape(len(true_labels), -1)
    p = np.asarray(pred_labels).reshape(len(pred_labels), -1)
    out = np.zeros((len(t), max(num_classes - 1, 0), 3), np.int64)
    for k in range(1, num_classes):
        tk, pk = t == k, p == k
        out[:, k - 1] = np.stack([np.sum(tk & pk, axis=1), np.sum(~tk & pk, axis=1), np.sum(tk & ~pk, axis=1)], 1)
    return out


def foreground_names(class_names, num_classes: int) -> list[str]:
    """The names of classes 1..num_classes-1: ``class_names[1:]`` when it names every class, else
    the config's defaults (``lesion`` with two classes, ``class_1``, ``class_2``, ... with more)."""
    if class_names and len(class_names) == num_classes:
        return [str(c) for c in class_names[1:]]
    return ["lesion"] if num_classes == 2 else [f"class_{k}" for k in range(1, num_classes)]


def own_classes(foreground_names) -> list[str]:
    """The foreground class names that get keys of their own: all of them, except a single class
    named ``lesion`` (its figures are the combined lesion's, under the existing keys)."""
    names = list(foreground_names or ())
    return [] if names == ["lesion"] else names


# The row key that ranks epochs and checkpoints (and Tune's trials): selection_score, the mean val
# Dice over the foreground classes (= val_lesion_dice with one lesion class). Here, beside the score,
# so that tracking (report/track.py) names it without reaching up into train/.
SCORE = "val_score"


def selection_score(class_dice) -> float:
    """The score that picks the best checkpoint (and Tune's best trial): the mean of the foreground
    classes' validation Dice, each pooled over the split, over the classes where it is defined (a
    class absent from truth and prediction alike has no Dice and is left out, nnU-Net's mean
    foreground Dice); NaN when no class has one. With one foreground class it is that class's Dice,
    which is the lesion Dice: the two-class model is chosen as before."""
    defined = [float(d) for d in class_dice if not math.isnan(d)]
    return float(np.mean(defined)) if defined else math.nan


def class_figures(train_classes: np.ndarray, val_classes: np.ndarray, foreground_names) -> dict[str, float]:
    """A training epoch's per-class figures from (K, 3) pooled tp, fp, fn of each foreground class
    on the training and validation batches: ``<name>_dice`` and ``val_<name>_{dice,iou,precision,
    recall}`` of each class named by ``own_classes`` ({} for the two-class default)."""
    names = list(foreground_names)
    own = own_classes(names)
    row: dict[str, float] = {}
    for name, train_c, val_c in zip(names, np.reshape(train_classes, (-1, 3)), np.reshape(val_classes, (-1, 3))):
        if name in own:
            row[f"{name}_dice"] = scores_from_counts(*train_c)["dice"]
            row.update({f"val_{name}_{k}": v for k, v in scores_from_counts(*val_c).items()})
    return row


def _pooled_and_per_image(prefix: str, counts: np.ndarray) -> dict[str, float]:
    pooled = scores_from_counts(*counts.sum(axis=0))
    per_image = [scores_from_counts(*row) for row in counts]
    out: dict[str, Any] = {f"{prefix}_{k}": v for k, v in pooled.items()}
    for key in ("dice", "iou", "precision", "recall"):
        values = [s[key] for s in per_image if not math.isnan(s[key])]
        out[f"{prefix}_{key}_per_image"] = float(np.mean(values)) if values else math.nan
    return out


def summarize(counts: np.ndarray, per_class: np.ndarray | None = None,
              foreground_names=()) -> dict[str, Any]:
    """Aggregate lesion scores of a split from per-image counts.

    ``lesion_dice`` etc. pool every pixel of the split (a global Dice); the ``*_per_image``
    figures are means over the images where the score is defined. ``per_class``: the
    (N, K, 3) ``class_counts`` of the same images, with ``foreground_names`` their K names:
    each class named by ``own_classes`` gets ``<name>_dice`` etc., ``<name>_*_per_image`` and
    ``images_with_<name>``, and with two or more, ``class_dice_mean`` (``selection_score``
    of the pooled class Dice).
    """
    counts = np.asarray(counts, dtype=np.float64).reshape(-1, 3)
    out = _pooled_and_per_image("lesion", counts)
    per_image = [scores_from_counts(*row) for row in counts]
    out["images"] = int(len(counts))
    out["images_with_lesion"] = int(np.sum(counts[:, 0] + counts[:, 2] > 0))
    out["images_with_zero_dice"] = int(sum(1 for s in per_image if s["dice"] == 0.0))
    names = list(foreground_names or ())
    own = own_classes(names)
    if own:
        per_class = np.asarray(per_class, dtype=np.float64).reshape(len(counts), len(names), 3)
        for k, name in enumerate(names):
            out.update(_pooled_and_per_image(name, per_class[:, k]))
            out[f"images_with_{name}"] = int(np.sum(per_class[:, k, 0] + per_class[:, k, 2] > 0))
        if len(own) > 1:
            out["class_dice_mean"] = selection_score([out[f"{name}_dice"] for name in own])
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
    found = lesion_detection(t, p)
    return {"slices": int(len(t)), "dice": scores_from_counts(tp, fp, fn)["dice"],
            "true_lesions": found["true_lesions"], "found_lesions": found["found"],
            "missed_lesions": found["missed"], "false_lesions": found["false"], "true_volume": int(t.sum()),
            "pred_volume": int(p.sum())}


CASE_KEYS = ("dice", "true_lesions", "found_lesions", "missed_lesions", "false_lesions", "true_volume",
             "pred_volume")


def class_case_scores(true_volume: np.ndarray, pred_volume: np.ndarray, foreground_names) -> dict[str, float]:
    """``case_scores`` of each class named by ``own_classes`` (class id = 1 + its index in
    ``foreground_names``), its keys prefixed ``<name>_``; {} for the two-class default."""
    names = list(foreground_names or ())
    own = set(own_classes(names))
    t, p = np.asarray(true_volume), np.asarray(pred_volume)
    out: dict[str, float] = {}
    for k, name in enumerate(names, start=1):
        if name in own:
            scores = case_scores(t == k, p == k)
            out.update({f"{name}_{key}": scores[key] for key in CASE_KEYS})
    return out


def summarize_cases(rows: list[dict[str, float]], foreground_names=()) -> dict[str, float]:
    """Split figures from per-case scores: mean/median case Dice (over cases where it is
    defined), lesion-wise detection, and volume agreement (in voxels at model resolution).
    Rows with ``class_case_scores`` keys give the same figures per class, prefixed ``<name>_``."""
    out = _summarize_cases(rows)
    for name in own_classes(foreground_names):
        mine = [{key: r[f"{name}_{key}"] for key in CASE_KEYS} for r in rows]
        out.update({f"{name}_{k}": v for k, v in _summarize_cases(mine).items() if k != "cases"})
    return out


def _summarize_cases(rows: list[dict[str, float]]) -> dict[str, float]:
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
