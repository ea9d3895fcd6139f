"""Scoring: an export on a sharded split, or mask PNGs in a folder against ground truth.

Both write ``metrics.json``: aggregate lesion figures at the top level (``lesion_dice`` is
the pooled Dice of all lesion pixels of the split; ``*_per_image`` are means over images
where the score is defined), the original's background-inclusive ``dice_coef_multiclass``
beside them for comparison, and a ``per_image`` list. Scoring an export also writes the
seed's ``evaluation.csv`` (``<loss>,<value>`` and ``<metric>,<value>`` lines), and, where
the shards know each slice's case (the raw release), per-case volume scores:
``per_case.csv``, a ``cases`` block in metrics.json and ``volume_agreement.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from aisd_ray import metrics, plots, render, storage
from aisd_ray.data import layout, masks, shards
from aisd_ray.export import LoadedExport
from aisd_ray.losses import categorical_crossentropy
from aisd_ray.progress import progress_bar

DEFINITIONS = {
    "lesion": "every non-background class together; background is never scored",
    "lesion_dice": "pooled over all pixels of the split: 2TP / (2TP + FP + FN)",
    "lesion_*_per_image": "mean over images where the score is defined (an image with no lesion in "
                          "truth or prediction has no Dice and is left out)",
    "dice_coef_multiclass": "the original's metric, background-inclusive (sums over the class axis too); "
                            "for comparison only, not a lesion score",
    "cases": "each case scored as a volume of its slices in order: case Dice; lesions are 26-connected "
             "3D components, found when a prediction overlaps them, false when a predicted one overlaps "
             "none; volumes in voxels at model resolution",
}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _write_csv(uri: str, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["name"])
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(uri, buf.getvalue())


class CaseVolumes:
    """Each case's true and predicted lesion masks (bit-packed) gathered as slices stream by."""

    def __init__(self) -> None:
        self._slices: dict[str, list[tuple[int, tuple[int, int], np.ndarray, np.ndarray]]] = {}

    def add(self, case_id: str, slice_index: int, truth: np.ndarray, pred: np.ndarray) -> None:
        if case_id:
            self._slices.setdefault(case_id, []).append(
                (slice_index, truth.shape, np.packbits(truth > 0), np.packbits(pred > 0)))

    def scores(self) -> list[dict[str, Any]]:
        rows = []
        for case in sorted(self._slices):
            slices = sorted(self._slices[case], key=lambda s: s[0])
            shape = slices[0][1]
            size = shape[0] * shape[1]
            truth = np.stack([np.unpackbits(t, count=size).reshape(shape) for _, _, t, _ in slices])
            pred = np.stack([np.unpackbits(p, count=size).reshape(shape) for _, _, _, p in slices])
            rows.append({"case_id": case, **metrics.case_scores(truth, pred)})
        return rows


def _write_overlay(out_uri: str, name: str, image, truth, pred) -> None:
    tp, fp, fn = metrics.lesion_counts(truth[None], pred[None])[0]
    dice = metrics.scores_from_counts(tp, fp, fn)["dice"]
    caption = (f"lesion Dice {dice:.3f}" if dice == dice else "no lesion, none predicted") + \
        f"   TP {tp}  FP {fp}  FN {fn} px"
    buf = io.BytesIO()
    render.error_panel(name, image, truth, pred, caption).save(buf, format="PNG")
    storage.write_bytes(storage.join(out_uri, "overlays", f"{name}.png"), buf.getvalue())


def _write_cases(out_uri: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    _write_csv(storage.join(out_uri, "per_case.csv"), rows)
    summary = metrics.summarize_cases(rows)
    plots.scatter([("case", [r["true_volume"] for r in rows], [r["pred_volume"] for r in rows])],
                  "true lesion volume (voxels)", "predicted lesion volume (voxels)",
                  storage.join(out_uri, "volume_agreement.png"), identity=True,
                  title=f"{len(rows)} cases, r = {summary['volume_correlation']:.3f}")
    plots.case_bars(rows, storage.join(out_uri, "per_case_dice.png"),
                    title=f"per-case lesion Dice (3D, each case's slices as one volume), {len(rows)} cases")
    return summary


def _write_report(out_uri: str, names: list[str], counts: np.ndarray, extra: dict[str, Any],
                  per_image_extra: dict[str, list[float]]) -> dict[str, Any]:
    summary = {**metrics.summarize(counts), **extra}
    per_image = []
    for i, name in enumerate(names):
        scores = metrics.scores_from_counts(*counts[i])
        row = {"name": name, **{f"lesion_{k}": v for k, v in scores.items()},
               "tp": int(counts[i][0]), "fp": int(counts[i][1]), "fn": int(counts[i][2]),
               **{k: v[i] for k, v in per_image_extra.items()}}
        per_image.append(row)
    report = {**summary, "definitions": DEFINITIONS, "per_image": per_image}
    storage.write_text(storage.join(out_uri, "metrics.json"), json.dumps(_json_safe(report), indent=2))
    _write_csv(storage.join(out_uri, "per_image.csv"), per_image)
    return report


def _batched(records: Iterable[dict], size: int):
    batch = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def evaluate_export(export_uri: str, shards_uri: str, out_uri: str, split: str = "test",
                    batch_size: int = 4, progress: bool = True, overlays: bool = True,
                    store: shards.ShardStore | None = None) -> dict[str, Any]:
    """Score an export on a sharded split; write metrics.json, per_image.csv, evaluation.csv and,
    with ``overlays``, ``overlays/<name>.png`` per slice (found, false and missed lesion pixels).
    ``store``: the command's already opened store, else it is opened (and verified) here."""
    model = LoadedExport(export_uri)
    manifest = (store or shards.ShardStore.open(shards_uri)).manifest
    have = tuple(manifest["image"][k] for k in ("height", "width", "channels"))
    if have != (model.height, model.width, model.channels):
        raise layout.DataError(f"{storage.join(shards_uri, shards.MANIFEST)}: the shards hold "
                               f"{'x'.join(map(str, have))} images but the export {export_uri} takes "
                               f"{model.height}x{model.width}x{model.channels}")
    with storage.staged_dir(out_uri) as folder:  # appears complete or not at all
        return _score_split(model, shards_uri, manifest, split, str(folder), batch_size, progress, overlays)


def _score_split(model: LoadedExport, shards_uri: str, manifest: dict, split: str, out: str, batch_size: int,
                 progress: bool, overlays: bool) -> dict[str, Any]:
    total = manifest["splits"][split]["records"] if split in manifest["splits"] else 0
    names, counts, losses, seed_dice = [], [], [], []
    volumes = CaseVolumes()
    bar = progress_bar(total=total, desc=f"evaluate {split}", unit="slice", enabled=progress)
    for batch in _batched(shards.iter_records(shards_uri, manifest, split), batch_size):
        arrays = [shards.record_to_arrays(r) for r in batch]
        images = np.stack([a[0] for a in arrays])
        labels = np.stack([a[1] for a in arrays])
        probs = model.predict(images)["probabilities"].numpy()
        onehot = np.eye(probs.shape[-1], dtype=np.float32)[labels]
        losses += [float(v) for v in categorical_crossentropy(onehot, probs).numpy()]
        seed_dice += [metrics.dice_coef_multiclass(onehot[i:i + 1], probs[i:i + 1]) for i in range(len(batch))]
        pred = np.argmax(probs, axis=-1)
        counts.append(metrics.lesion_counts(labels, pred))
        for record, image_i, truth_i, pred_i in zip(batch, images, labels, pred):
            volumes.add(record["case_id"], record["slice_index"], truth_i, pred_i)
            if overlays:
                _write_overlay(out, record["name"], image_i, truth_i, pred_i)
        names += [r["name"] for r in batch]
        bar.update(len(batch))
    bar.close()
    counts_arr = np.concatenate(counts) if counts else np.zeros((0, 3), np.int64)
    loss, seed = float(np.mean(losses)), float(np.mean(seed_dice))
    extra: dict[str, Any] = {"split": split, "categorical_crossentropy": loss, "dice_coef_multiclass": seed}
    case_rows = volumes.scores()
    if case_rows:
        extra["cases"] = {**_write_cases(out, case_rows), "per_case": case_rows}
    report = _write_report(out, names, counts_arr, extra,
                           {"categorical_crossentropy": [float(v) for v in losses],
                            "dice_coef_multiclass": seed_dice})
    storage.write_text(storage.join(out, "evaluation.csv"),
                       f"categorical_crossentropy,{loss:.4f}\ndice_coef_multiclass,{seed:.4f}\n")
    return report


def evaluate_folders(predictions_dir: str | Path, masks_dir: str | Path, rule, out_uri: str,
                     progress: bool = True) -> dict[str, Any]:
    """Score existing mask PNGs against ground truth by file name, without a model. ``rule``: how
    masks are read, a ``masks.MaskRule`` or the config's ``DataConfig`` (a bare rgb_map takes the
    other keys' defaults); each folder is read one way, chosen from all its files
    (``aisd_ray.data.masks``), so 0/1 predictions score against colour or raw-label ground truth."""
    pairs = layout.pair_by_name(predictions_dir, masks_dir)
    names, counts, seed_dice = [], [], []
    rule = masks.MaskRule.of(rule)
    num_classes = rule.num_classes
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
        names.append(name)
    with storage.staged_dir(out_uri) as folder:
        return _write_report(str(folder), names, np.array(counts).reshape(-1, 3),
                             {"source": str(predictions_dir), "dice_coef_multiclass": float(np.mean(seed_dice))},
                             {"dice_coef_multiclass": seed_dice})
