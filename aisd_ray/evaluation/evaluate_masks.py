"""``evaluate --predictions``: mask PNGs already written (by aisd-ray, the original FlexUNet or any other
tool) scored against ground truth by file name, without a model; the report is the one
``evaluate.write_report`` writes for an export (``metrics.json``, the per-image figures), so both are
read the same way. A module of its own beside ``evaluate.py`` (an export on a sharded split), which it
shares only that writer with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from aisd_ray.config import DataConfig
from aisd_ray.core import storage
from aisd_ray.core.progress import progress_bar
from aisd_ray.data.sources import layout, masks
from aisd_ray.evaluation.evaluate import write_report
from aisd_ray.scoring import metrics


def evaluate_folders(predictions_dir: str | Path, masks_dir: str | Path, rule, out_uri: str,
                     progress: bool = True, class_names=None) -> dict[str, Any]:
    """Score existing mask PNGs against ground truth by file name, without a model. ``rule``: how
    masks are read, a ``masks.MaskRule`` or the config's ``DataConfig`` (a bare rgb_map takes the
    other keys' defaults); each folder is read one way, chosen from all its files
    (``aisd_ray.data.sources.masks``), so 0/1 predictions score against colour or raw-label ground truth.
    ``class_names``: one per class (default: a ``DataConfig``'s, else ``background``, ``class_1``,
    ...); with several foreground classes each is scored on its own too."""
    if class_names is None and isinstance(rule, DataConfig):
        class_names = rule.class_names
    pairs = layout.pair_by_name(predictions_dir, masks_dir)
    names, counts, class_counts, seed_dice = [], [], [], []
    rule = masks.MaskRule.of(rule)
    num_classes = rule.num_classes
    foreground = metrics.foreground_names(class_names, num_classes)
    predicted = masks.SplitMasks.of_paths(rule, [p for _, p, _ in pairs], f"the predictions ({predictions_dir})")
    truths = masks.SplitMasks.of_paths(rule, [m for _, _, m in pairs], f"the ground truth ({masks_dir})")
    for name, pred_path, mask_path in progress_bar(pairs, desc="evaluate", unit="mask", enabled=progress):
        pred = predicted.labels(pred_path, pred_path)
        truth = truths.labels(mask_path, mask_path)
        if pred.shape != truth.shape:
            raise layout.DataError(f"{pred_path}: prediction is {pred.shape[1]}x{pred.shape[0]}, "
                                   f"ground truth {mask_path.name} is {truth.shape[1]}x{truth.shape[0]}")
        eye = np.eye(num_classes, dtype=np.float32)
        seed_dice.append(metrics.dice_coef_multiclass(eye[truth][None], eye[pred][None]))
        counts.append(metrics.lesion_counts(truth[None], pred[None])[0])
        class_counts.append(metrics.class_counts(truth[None], pred[None], num_classes)[0])
        names.append(name)
    with storage.staged_dir(out_uri) as folder:
        return write_report(str(folder), names, np.array(counts).reshape(-1, 3),
                             {"source": str(predictions_dir), "dice_coef_multiclass": float(np.mean(seed_dice))},
                             {"dice_coef_multiclass": seed_dice},
                             np.array(class_counts).reshape(len(names), num_classes - 1, 3), foreground)
