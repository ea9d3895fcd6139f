"""Scoring: an export on a sharded split (mask PNGs in a folder against ground truth: ``evaluate_masks.py``, with this module's ``write_report``).

Both write ``metrics.json``: aggregate lesion figures at the top level (``lesion_dice`` is
the pooled Dice of all lesion pixels of the split; ``*_per_image`` are means over images
where the score is defined), the original's background-inclusive ``dice_coef_multiclass``
beside them for comparison, and a ``per_image`` list. Scoring an export also writes the
original's ``evaluation.csv`` (``<loss>,<value>`` and ``<metric>,<value>`` lines), and, where
the shards know each slice's case (the raw release), per-case volume scores:
``per_case.csv``, a ``cases`` block in metrics.json and ``volume_agreement.png``. On a store
prepared from CT volumes each case is also checked by the QA gate (``data/qa.py``): its recorded
findings and its recorded values against the export's training domain, a ``qa`` column in
``per_case.csv`` ("pass" or "warn: <check>, ..."), every finding in metrics.json's ``qa`` block,
one log line per warning; with ``strict`` the first warning refuses the evaluation (one line).
Scoring an export also reports its calibration (``calibrate.SplitCalibration``): ``ece_before``
and ``ece_after`` (T = 1 and the export's temperature), ``ece_bins``, ``temperature``, the
reliability bins and ``reliability.png``, and each case's ``uncertainty`` score and ``review`` flag.

``tta``, ``brain_mask`` and ``postprocessing`` in metrics.json say how an export's predictions were
made: mirroring test-time augmentation on or off (``export.LoadedExport``); the brain mask
(``brain_mask.py``: on a store prepared from CT volumes, each case's predicted lesion voxels outside
the intracranial mask that ``prepare`` stored beside each slice are removed, ``brain_removed_ml`` per
case in per_case.csv, the total in metrics.json; a store of PNG slices has no mask, and
``brain_mask`` says it was not applied and why, in one log line too); then the export's
post-processing choice (``postprocess.py``); both applied to each case's predicted volume before its
case figures are scored (and before a choice is made here). The per-slice figures (``lesion_dice``,
``per_image``, the losses, the overlays) are the network's own, before either: they stay comparable
with training's validation figures, a 3-D rule needs a whole case, which a per-slice score does not
have, and a store without case ids (the original's tree) has no cases to post-process.

With several foreground classes, each has every figure too under its ``class_names`` name
(``metrics``): ``core_dice`` beside ``lesion_dice``, ``core_tp`` etc. beside ``tp`` in each
``per_image`` row, ``core_case_dice_mean`` in ``cases``, a ``core`` series in the volume plot
and ``per_case_dice_core.png``; ``class_dice_mean`` is the mean of the classes' pooled Dice.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from aisd_ray.core import storage
from aisd_ray.core.progress import progress_bar
from aisd_ray.data.ct import qa
from aisd_ray.data.sources import layout
from aisd_ray.data.store import shards
from aisd_ray.inference import brain_mask as brain_step
from aisd_ray.evaluation.calibrate import SplitCalibration
from aisd_ray.inference import input_kind, postprocess
from aisd_ray.inference.export import LoadedExport
from aisd_ray.model.losses import categorical_crossentropy
from aisd_ray.report import plots, render
from aisd_ray.scoring import metrics, volume_metrics

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
    "case_hd95_mm_*, case_nsd_*, case_*_ml_*": "cases of a store prepared from CT volumes (their spacing known): "
             "HD95 in mm (MONAI's: the larger of the two directions' 95th percentile surface distance), "
             "normalised surface Dice at nsd_tolerance_mm, volumes and absolute volume difference in mL, at model "
             "resolution (in-plane spacing scaled by the resize)",
    "ece_before, ece_after": "expected calibration error at T = 1 and at the export's temperature (calibration.json; "
                             "1 without): top-label, ece_bins equal-width bins, |accuracy - confidence| weighted "
                             "by the bin's share of voxels (Guo et al. 2017); the probabilities scored are the after",
    "uncertainty": "per case: mean normalised predictive entropy over the voxels of lesion probability > 0.1; "
                   "review: score >= the export's review threshold (empty without calibration.json)",
    "tta": "whether each prediction averaged the softmax of the slice and of its left-right mirror",
    "postprocessing": "the export's post-processing choice (postprocess.json; rule none when it has none), "
                      "applied to each case's predicted volume before the case figures; the per-slice "
                      "figures are the network's own, before it",
    "brain_mask": "predicted lesion voxels outside each case's stored intracranial mask removed before the case "
                  "figures and the post-processing (removed_ml: their total, mL); not applied to a store without "
                  "the mask (reason)",
}
# where ``write_volumes`` puts each case's predicted and true label maps (NIfTI, model resolution)
VOLUMES = ("predictions", "labels")
# added where foreground classes have keys of their own (not for the two-class default)
CLASS_DEFINITIONS = {
    "<class>_*": "one foreground class alone (listed in 'classes', from data.class_names): its pixels are "
                 "those labelled with its id in truth and prediction, so a pixel of one class predicted as "
                 "another is a miss of the first and a false one of the second (but lesion all the same)",
    "class_dice_mean": "mean of the foreground classes' pooled Dice over those where it is defined "
                       "(the rule that picks the best checkpoint, as val_score)",
}


class CaseVolumes:
    """Each case's true and predicted label maps gathered as slices stream by, bit-packed: one bit
    plane per foreground class (``foreground_names``; one plane, the lesion, by default)."""

    def __init__(self, foreground_names=("lesion",)) -> None:
        self.names = list(foreground_names)
        self._slices: dict[str, list[tuple[int, tuple[int, int], np.ndarray, np.ndarray]]] = {}
        self._brains: dict[str, dict[int, np.ndarray]] = {}  # each slice's intracranial mask, where stored
        self.brain_removed: dict[str, float] = {}  # mL per case, once ``apply_brain`` has run

    def _pack(self, labels: np.ndarray) -> np.ndarray:
        if len(self.names) == 1:
            return np.packbits(labels > 0)
        return np.packbits(labels[None] == np.arange(1, len(self.names) + 1)[:, None, None])

    def _unpack(self, packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        planes = np.unpackbits(packed, count=len(self.names) * shape[0] * shape[1])
        planes = planes.reshape(len(self.names), *shape).astype(np.uint8)
        return np.tensordot(np.arange(1, len(self.names) + 1, dtype=np.uint8), planes, axes=1).astype(np.uint8)

    def add(self, case_id: str, slice_index: int, truth: np.ndarray, pred: np.ndarray, brain=None) -> None:
        if case_id:
            self._slices.setdefault(case_id, []).append((slice_index, truth.shape, self._pack(truth),
                                                         self._pack(pred)))
            if brain is not None:
                self._brains.setdefault(case_id, {})[slice_index] = np.packbits(brain)

    def apply_brain(self, spacing: dict[str, tuple[float, float, float]]) -> float:
        """Every case's predictions with the lesion voxels outside its slices' intracranial masks set to
        0 (``brain_mask.apply``), in place; ``brain_removed`` the mL per case (``spacing``: (z, y, x)
        mm of a model-size voxel per case, as ``case_spacing``); the total mL."""
        for case, slices in self._slices.items():
            brains, removed = self._brains[case], 0.0
            for i, (k, shape, t, p) in enumerate(slices):
                inside = np.unpackbits(brains[k], count=shape[0] * shape[1]).reshape(1, *shape)
                kept, ml = brain_step.apply(self._unpack(p, shape)[None], inside, spacing[case])
                slices[i], removed = (k, shape, t, self._pack(kept[0])), removed + ml
            self.brain_removed[case] = round(removed, 3)
        return sum(self.brain_removed.values())

    def volumes(self):
        """(case id, truth, prediction) per case in case order: (Z, Y, X) uint8 class ids, slices in order."""
        for case in sorted(self._slices):
            slices = sorted(self._slices[case], key=lambda s: s[0])
            yield (case, np.stack([self._unpack(t, shape) for _, shape, t, _ in slices]),
                   np.stack([self._unpack(p, shape) for _, shape, _, p in slices]))

    def scores(self, spacing: dict[str, tuple[float, float, float]] | None = None,
               choice: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """One row per case. ``spacing``: (z, y, x) mm of a model-size voxel per case (a volume
        source's manifest has it): those cases gain HD95, NSD, volumes in mL and lesion-wise F1
        (``volume_metrics.case_volume_scores``). ``choice``: a post-processing choice applied to each
        predicted volume first (``postprocess.apply``; a ``min_ml`` rule needs every case's spacing)."""
        rows = []
        for case, truth, pred in self.volumes():
            if choice:
                pred = postprocess.apply(choice, pred, (spacing or {}).get(case))
            row = {"case_id": case, **metrics.case_scores(truth, pred),
                   **metrics.class_case_scores(truth, pred, self.names)}
            if case in self.brain_removed:
                row["brain_removed_ml"] = self.brain_removed[case]
            if spacing and case in spacing:
                mm = volume_metrics.case_volume_scores(truth, pred, spacing[case])
                row.update({k: v for k, v in mm.items() if k != "dice"})
            rows.append(row)
        return rows


def case_spacing(manifest: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    """(z, y, x) mm of a model-size voxel per case, where the store was prepared from volumes."""
    geometry = (manifest.get("source") or {}).get("geometry") or {}
    return {case: tuple(g["model_spacing_mm"]) for case, g in geometry.items()}


def _write_overlay(out_uri: str, name: str, image, truth, pred, foreground_names=()) -> None:
    tp, fp, fn = metrics.lesion_counts(truth[None], pred[None])[0]
    dice = metrics.scores_from_counts(tp, fp, fn)["dice"]
    caption = (f"lesion Dice {dice:.3f}" if dice == dice else "no lesion, none predicted") + \
        f"   TP {tp}  FP {fp}  FN {fn} px"
    own = metrics.own_classes(foreground_names)
    if len(own) > 1:
        per_class = metrics.class_counts(truth[None], pred[None], len(own) + 1)[0]
        dice_of = [metrics.scores_from_counts(*n)["dice"] for n in per_class]
        caption += "   " + "  ".join(f"{c} {d:.3f}" for c, d in zip(own, dice_of))
    buf = io.BytesIO()
    render.error_panel(name, image, truth, pred, caption).save(buf, format="PNG")
    storage.write_bytes(storage.join(out_uri, "overlays", f"{name}.png"), buf.getvalue())


def _write_cases(out_uri: str, rows: list[dict[str, Any]], foreground_names=()) -> dict[str, Any]:
    storage.write_csv(storage.join(out_uri, "per_case.csv"), rows)
    summary = metrics.summarize_cases(rows, foreground_names)
    in_mm = [r for r in rows if "hd95_mm" in r]
    if in_mm:  # cases with a known spacing: HD95, NSD, mL
        summary.update({f"case_{k}": v for k, v in volume_metrics.summarize_volume_cases(in_mm).items()
                        if k != "cases" and not k.startswith("dice")})
    own = metrics.own_classes(foreground_names)
    series = [("case" if not own else "lesion", [r["true_volume"] for r in rows], [r["pred_volume"] for r in rows])]
    series += [(c, [r[f"{c}_true_volume"] for r in rows], [r[f"{c}_pred_volume"] for r in rows]) for c in own]
    plots.scatter(series, "true lesion volume (voxels)", "predicted lesion volume (voxels)",
                  storage.join(out_uri, "volume_agreement.png"), identity=True,
                  title=f"{len(rows)} cases, r = {summary['volume_correlation']:.3f}")
    plots.case_bars(rows, storage.join(out_uri, "per_case_dice.png"),
                    title=f"per-case lesion Dice (3D, each case's slices as one volume), {len(rows)} cases")
    for c in own:
        plots.case_bars([{"case_id": r["case_id"], "dice": r[f"{c}_dice"]} for r in rows],
                        storage.join(out_uri, f"per_case_dice_{c}.png"),
                        title=f"per-case {c} Dice (3D, each case's slices as one volume), {len(rows)} cases")
    return summary


def write_report(out_uri: str, names: list[str], counts: np.ndarray, extra: dict[str, Any],
                  per_image_extra: dict[str, list[float]], per_class: np.ndarray | None = None,
                  foreground_names=()) -> dict[str, Any]:
    """``per_class``: (N, K, 3) ``metrics.class_counts`` of the images, ``foreground_names`` their names."""
    summary = {**metrics.summarize(counts, per_class, foreground_names), **extra}
    own = metrics.own_classes(foreground_names)
    if own:
        summary["classes"] = own
    per_image = []
    for i, name in enumerate(names):
        scores = metrics.scores_from_counts(*counts[i])
        row = {"name": name, **{f"lesion_{k}": v for k, v in scores.items()},
               "tp": int(counts[i][0]), "fp": int(counts[i][1]), "fn": int(counts[i][2])}
        for k, c in enumerate(foreground_names if own else ()):
            tp, fp, fn = (int(v) for v in per_class[i][k])
            row.update({**{f"{c}_{key}": v for key, v in metrics.scores_from_counts(tp, fp, fn).items()},
                        f"{c}_tp": tp, f"{c}_fp": fp, f"{c}_fn": fn})
        row.update({k: v[i] for k, v in per_image_extra.items()})
        per_image.append(row)
    definitions = {**DEFINITIONS, **CLASS_DEFINITIONS} if own else DEFINITIONS
    report = {**summary, "definitions": definitions, "per_image": per_image}
    storage.write_json(storage.join(out_uri, "metrics.json"), report)
    storage.write_csv(storage.join(out_uri, "per_image.csv"), per_image)
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
                    store: shards.ShardStore | None = None, tta: bool | None = None,
                    choose_postprocessing: bool = False, write_volumes: bool = False,
                    strict: bool = False, brain_mask: bool | None = None) -> dict[str, Any]:
    """Score an export on a sharded split; write metrics.json, per_image.csv, evaluation.csv and,
    with ``overlays``, ``overlays/<name>.png`` per slice (found, false and missed lesion pixels).
    ``store``: the command's already opened store, else it is opened (and verified) here. ``tta``:
    mirroring test-time augmentation (``LoadedExport``; None: the export's own choice).
    ``choose_postprocessing`` (the ``valid`` split only, so the test split never decides it): choose
    the post-processing on this split's cases (``postprocess.choose``), write it into the export
    (``postprocess.json``) and score with it; DataError when the split's slices carry no case ids.
    ``write_volumes``: also write each case's predicted label map (after the brain mask, before
    post-processing) and its ground truth as NIfTI at model resolution (``VOLUMES``:
    ``predictions/<case>.nii.gz``, ``labels/<case>.nii.gz``, ``volume_write.write_model_grid``), as
    nnU-Net keeps a fold's validation predictions; DataError when the store does not know every
    case's spacing (prepare CT volumes). ``strict``: a case the QA gate warns of is a DataError (one
    line: the store, the case, the check, its value and the training range), nothing written.
    ``brain_mask``: lesion voxels outside the stored intracranial mask removed from each case's
    prediction first (the module); None: as the export records it."""
    if choose_postprocessing and split != "valid":
        raise ValueError(f"post-processing is chosen on the valid split only, not {split!r}")
    model = LoadedExport(export_uri, tta=tta)
    model.brain_mask = brain_step.resolve(brain_mask, model)
    manifest = (store or shards.ShardStore.open(shards_uri)).manifest
    takes = f"the export {export_uri} takes"
    shards.check_input(shards_uri, manifest, (model.height, model.width, model.channels), model.windows,
                       model.channel_mode, takes, takes, takes,
                       "evaluate it on shards prepared with the config it was trained with")
    where, given = storage.join(shards_uri, shards.MANIFEST), input_kind.of_source(manifest.get("source"))["kind"]
    kind = input_kind.check(model.input, given, where, export_uri, model.windows,  # the rule infer applies
                            "evaluate it on shards prepared from the input it was trained on")
    qa.refuse_if_strict(strict, where, None, [kind])
    found = qa.manifest_findings(manifest, split, getattr(model, "domain", None))
    if strict and not found and given == input_kind.CT_HU:
        raise layout.DataError(f"{where}: --strict, but the store records no QA per case (prepared before the QA "
                               "gate): prepare it again")
    for case, findings in found.items():
        qa.refuse_if_strict(strict, where, case, findings)
        qa.log_warnings(case, findings)
    found = {case: [kind, *findings] for case, findings in found.items()}  # as infer: the input kind leads
    with storage.staged_dir(out_uri) as folder:  # appears complete or not at all
        return _score_split(model, shards_uri, manifest, split, str(folder), batch_size, progress, overlays,
                            choose_postprocessing, write_volumes, found)


def _postprocessing(model: LoadedExport, volumes: CaseVolumes, spacing: dict, shards_uri: str, split: str,
                    choose: bool) -> dict[str, Any]:
    """The export's post-processing choice, chosen here on ``volumes`` first with ``choose``."""
    where = storage.join(shards_uri, shards.MANIFEST)
    if choose:
        cases = [(t, p, spacing.get(case)) for case, t, p in volumes.volumes()]
        if not cases:
            raise layout.DataError(f"{where}: the {split} split's slices carry no case ids; post-processing "
                                   "is chosen on per-case volumes (prepare the raw release or CT volumes)")
        model.postprocess = postprocess.choose(cases)
        postprocess.save(model.uri, model.postprocess)
    missing = [case for case, _, _ in volumes.volumes() if case not in spacing]
    if model.postprocess.get("min_ml") is not None and missing:
        raise layout.DataError(f"{storage.join(model.uri, postprocess.FILE)}: "
                               f"{postprocess.describe(model.postprocess)} needs each case's spacing; {where} "
                               f"has none for {len(missing)} case(s), e.g. {missing[0]}")
    return model.postprocess


def _write_volumes(out: str, volumes: CaseVolumes, spacing: dict, where: str) -> None:
    from aisd_ray.data.sources.volume_write import write_model_grid

    for case, truth, pred in volumes.volumes():
        if case not in spacing:
            raise layout.DataError(f"{where}: no spacing for case {case}; case volumes are written from stores "
                                   "prepared from CT volumes")
        for folder, labels in zip(VOLUMES, (pred, truth)):
            write_model_grid(labels, spacing[case], Path(out) / folder / f"{case}.nii.gz")


def _score_split(model: LoadedExport, shards_uri: str, manifest: dict, split: str, out: str, batch_size: int,
                 progress: bool, overlays: bool, choose: bool = False, write_volumes: bool = False,
                 found: dict[str, list] | None = None) -> dict[str, Any]:
    total = manifest["splits"][split]["records"] if split in manifest["splits"] else 0
    names, counts, class_counts, losses, seed_dice = [], [], [], [], []
    num_classes = len(model.rgb_map)
    foreground = metrics.foreground_names(model.info.get("class_names"), num_classes)
    volumes, calibration = CaseVolumes(foreground), SplitCalibration(model)
    bar = progress_bar(total=total, desc=f"evaluate {split}", unit="slice", enabled=progress)
    for batch in _batched(shards.iter_records(shards_uri, manifest, split), batch_size):
        arrays = [shards.record_to_arrays(r) for r in batch]
        images = np.stack([a[0] for a in arrays])
        labels = np.stack([a[1] for a in arrays])
        out_batch = {k: v.numpy() for k, v in model.predict(images, passes=True).items()}
        calibration.add(out_batch, labels, [r["case_id"] for r in batch])
        probs = out_batch["probabilities"]
        onehot = np.eye(probs.shape[-1], dtype=np.float32)[labels]
        losses += [float(v) for v in categorical_crossentropy(onehot, probs).numpy()]
        seed_dice += [metrics.dice_coef_multiclass(onehot[i:i + 1], probs[i:i + 1]) for i in range(len(batch))]
        pred = np.argmax(probs, axis=-1)
        counts.append(metrics.lesion_counts(labels, pred))
        class_counts.append(metrics.class_counts(labels, pred, num_classes))
        for record, image_i, truth_i, pred_i in zip(batch, images, labels, pred):
            volumes.add(record["case_id"], record["slice_index"], truth_i, pred_i, shards.record_brain(record))
            if overlays:
                _write_overlay(out, record["name"], image_i, truth_i, pred_i, foreground)
        names += [r["name"] for r in batch]
        bar.update(len(batch))
    bar.close()
    counts_arr = np.concatenate(counts) if counts else np.zeros((0, 3), np.int64)
    class_arr = np.concatenate(class_counts) if class_counts else np.zeros((0, num_classes - 1, 3), np.int64)
    loss, seed = float(np.mean(losses)), float(np.mean(seed_dice))
    spacing = case_spacing(manifest)
    brain = brain_step.on_store(volumes, manifest, spacing, model.brain_mask)  # before post-processing is chosen
    choice = _postprocessing(model, volumes, spacing, shards_uri, split, choose)
    if write_volumes:
        _write_volumes(out, volumes, spacing, storage.join(shards_uri, shards.MANIFEST))
    extra: dict[str, Any] = {"split": split, "categorical_crossentropy": loss, "dice_coef_multiclass": seed,
                             "tta": model.tta, "brain_mask": brain,
                             "postprocessing": {**choice, "applied_to": "per-case volumes"}}
    case_rows = volumes.scores(spacing, choice)
    if found:
        extra["qa"] = {case: qa.as_json(findings) for case, findings in found.items()}
        for row in case_rows:
            row["qa"] = qa.label(found.get(row["case_id"], ()))
    calibration.report(out, extra, case_rows)  # ECE before/after, reliability.png, case uncertainty and review
    if case_rows:
        extra["cases"] = {**_write_cases(out, case_rows, foreground), "per_case": case_rows}
    report = write_report(out, names, counts_arr, extra,
                           {"categorical_crossentropy": [float(v) for v in losses],
                            "dice_coef_multiclass": seed_dice}, class_arr, foreground)
    storage.write_text(storage.join(out, "evaluation.csv"),
                       f"categorical_crossentropy,{loss:.4f}\ndice_coef_multiclass,{seed:.4f}\n")
    return report

