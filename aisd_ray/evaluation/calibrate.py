"""Calibrating an export on the validation patients, and the calibration part of ``evaluate``.

``calibrate``: predicts a split of a shard store with the export at T = 1, fits one temperature on
a seeded uniform sample of its voxels (at most ``MAX_VOXELS``, every forward pass kept so that T is
fitted on exactly what the export then computes: each pass scaled, then averaged;
``scoring/calibration.py``), predicts the split again with T to measure the ECE before and after
over all its voxels and each case's uncertainty score (``calibration.CASE_RULE``) against its Dice
(the network's argmax, each case's slices as one volume, before any post-processing: it is chosen
later), chooses the review threshold (``calibration.THRESHOLD_RULE``) and writes
``calibration.json`` into the export (atomically). Run by ``stages.export`` on the run's store's
valid split, and by ``crossval`` for its ensemble on the folds' out-of-fold patients (``members``:
each fold's valid split predicted by its own fold model; the ensemble's averaged output has no
patient none of its members trained on, so its T and threshold are fitted on the members'
out-of-fold output: the ensemble's entropy is at least its members' mean, so its cases lean
towards review, the safe side).

``SplitCalibration``: what ``evaluate`` adds (``ece_before``, ``ece_after``, ``ece_bins``,
``temperature``, ``reliability``, ``uncertainty`` in metrics.json, ``uncertainty`` and ``review``
per case, ``reliability.png``).
"""

from __future__ import annotations

import itertools

import logging
import math
from typing import Any, Iterable

import numpy as np

from aisd_ray.core import storage
from aisd_ray.data.store import shards
from aisd_ray.inference.export import CALIBRATION, LoadedExport
from aisd_ray.report import plots
from aisd_ray.scoring import calibration as calib
from aisd_ray.scoring import metrics

log = logging.getLogger(__name__)
MAX_VOXELS = 500_000  # voxels sampled to fit T (x passes x classes x 4 bytes: 12 MB for 2 classes, TTA)
SEED = 0
ECE_DEFINITION = (f"top-label confidence vs accuracy over every voxel of the split, {calib.ECE_BINS} equal-width "
                  "bins over [0, 1], sum of |accuracy - confidence| weighted by the bin's share of voxels "
                  "(Guo et al. 2017)")


def _batches(shards_uri: str, manifest: dict, split: str, batch_size: int) -> Iterable:
    """(records, images (N, H, W, C) uint8, labels (N, H, W) uint8) of a split, batch by batch."""
    batch: list = []
    for record in itertools.chain(shards.iter_records(shards_uri, manifest, split), [None]):  # streamed
        if record is not None:
            batch.append(record)
        if batch and (record is None or len(batch) == batch_size):
            arrays = [shards.record_to_arrays(r) for r in batch]
            yield batch, np.stack([a[0] for a in arrays]), np.stack([a[1] for a in arrays])
            batch = []


class SplitCalibration:
    """ECE before (T = 1) and after the export's T, and each case's uncertainty score, accumulated
    over ``add``'s batches of ``LoadedExport.predict(..., passes=True)`` outputs."""

    def __init__(self, model: LoadedExport) -> None:
        self.model = model
        self.before, self.after = calib.Reliability(), calib.Reliability()
        self.cases = calib.CaseScores()
        self.counts: dict[str, np.ndarray] = {}

    def add(self, out: dict[str, Any], labels: np.ndarray, case_ids: list[str]) -> None:
        """``out``: numpy ``probabilities`` (N, H, W, C), ``uncertainty`` (N, H, W), ``passes``
        (K, N, H, W, C); ``labels`` (N, H, W) true class ids; ``case_ids`` one per slice ("" none)."""
        self.before.add(out["passes"].mean(axis=0), labels)
        self.after.add(out["probabilities"], labels)
        pred = np.argmax(out["probabilities"], axis=-1)
        for case, p, u, counts in zip(case_ids, out["probabilities"], out["uncertainty"],
                                      metrics.lesion_counts(labels, pred)):
            if case:
                self.cases.add(case, 1.0 - p[..., 0], u)
                self.counts[case] = self.counts.get(case, 0) + counts

    def dice(self) -> dict[str, float]:
        """Each case's Dice of the network's argmax (its slices pooled: the 3-D case Dice)."""
        return {case: metrics.scores_from_counts(*c)["dice"] for case, c in self.counts.items()}

    def figures(self) -> dict[str, Any]:
        return {"temperature": self.model.temperature, "calibrated": self.model.calibration is not None,
                "ece_before": self.before.ece(), "ece_after": self.after.ece(), "ece_bins": calib.ECE_BINS,
                "ece_definition": ECE_DEFINITION}

    def report(self, out: str, extra: dict[str, Any], case_rows: list[dict[str, Any]]) -> None:
        """Into ``extra`` (metrics.json) the figures, the reliability bins and ``uncertainty`` (the
        measure, rules, threshold, the AUROC of the case score for case Dice < 0.5 and the mean
        Dice of the unflagged cases); into each case row its ``uncertainty`` score and ``review``
        (empty without a threshold); ``out/reliability.png``; one log line."""
        figures = self.figures()
        extra.update(figures, reliability={"before": self.before.table(), "after": self.after.table()})
        threshold = (self.model.calibration or {}).get("review_threshold")
        scores = self.cases.scores()
        for row in case_rows:
            row["uncertainty"] = round(scores.get(row["case_id"], 0.0), 5)
            flag = calib.is_review(row["uncertainty"], threshold)
            row["review"] = "" if flag is None else flag
        extra["uncertainty"] = {"measure": f"{calib.MEASURE}; {calib.MEASURES[self.model.measure]}",
                                "case_rule": calib.CASE_RULE, "threshold": threshold,
                                "threshold_rule": calib.THRESHOLD_RULE if threshold is not None else
                                "no calibration.json in the export: no threshold, no case flagged",
                                **ranking(case_rows, threshold)}
        title = f"T = {figures['temperature']:.3g}: ECE {figures['ece_before']:.4f} -> {figures['ece_after']:.4f}"
        plots.reliability(self.before.table(), self.after.table(), storage.join(out, "reliability.png"), title)
        log.info("ECE (%d bins, top-label) %.4f before, %.4f after temperature scaling (T = %.3f%s)", calib.ECE_BINS,
                 figures["ece_before"], figures["ece_after"], figures["temperature"],
                 "" if figures["calibrated"] else ": the export has no calibration.json")


def ranking(case_rows: list[dict[str, Any]], threshold: float | None) -> dict[str, Any]:
    """How well the case ``uncertainty`` ranks the cases of Dice < 0.5 (``auroc_dice_below_0_5``,
    over the cases of defined Dice) and, with a ``threshold``, the cases flagged and the mean Dice of
    the others (``unflagged_dice_mean``)."""
    rows = [r for r in case_rows if r.get("dice") == r.get("dice") and r.get("dice") is not None]
    out: dict[str, Any] = {"cases_scored": len(rows), "cases_dice_below_0_5": sum(r["dice"] < calib.BAD_DICE for r in rows),
                           "auroc_dice_below_0_5": calib.auroc([r["uncertainty"] for r in rows],
                                                               [r["dice"] < calib.BAD_DICE for r in rows])}
    if threshold is not None:
        kept = [r["dice"] for r in rows if r["uncertainty"] < threshold]
        out.update(flagged=sum(r["uncertainty"] >= threshold for r in case_rows),
                   unflagged_dice_mean=float(np.mean(kept)) if kept else math.nan,
                   all_dice_mean=float(np.mean([r["dice"] for r in rows])) if rows else math.nan)
    return out


def test_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The demo's (and sweep's) calibration figures of a test split's metrics.json ``report``."""
    u = report.get("uncertainty", {})
    out = {"temperature (fitted on valid)": report.get("temperature", math.nan),
           "test ECE before temperature scaling": report.get("ece_before", math.nan),
           "test ECE after temperature scaling": report.get("ece_after", math.nan),
           "test uncertainty AUROC (case Dice < 0.5)": u.get("auroc_dice_below_0_5", math.nan)}
    if "flagged" in u:
        out.update({"test cases flagged for review": u["flagged"],
                    "test case Dice of the unflagged (mean)": u["unflagged_dice_mean"]})
    return out


def _sample(model: LoadedExport, sources: list[tuple[LoadedExport, str, dict]], split: str, batch_size: int,
            max_voxels: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(passes (K, M, C) float32, labels (M,), voxels in the split(s)): a seeded uniform sample of at
    most about ``max_voxels`` voxels, every pass's softmax at T = 1."""
    total = sum(m["splits"][split]["records"] for _, _, m in sources) * model.height * model.width
    rate = min(1.0, max_voxels / max(total, 1))
    rng = np.random.default_rng(SEED)
    passes, labels = [], []
    for member, uri, manifest in sources:
        for _, images, truth in _batches(uri, manifest, split, batch_size):
            out = member.predict(images, passes=True, temperature=1.0)["passes"].numpy()
            keep = rng.random(truth.shape) < rate
            passes.append(out[:, keep])
            labels.append(truth[keep])
    return np.concatenate(passes, axis=1), np.concatenate(labels), total


def calibrate(export_uri: str, shards_uri: str, split: str = "valid", batch_size: int = 4, tta: bool | None = None,
              max_voxels: int = MAX_VOXELS, members: list[tuple[str, str]] | None = None) -> dict[str, Any] | None:
    """Fit the export's temperature and review threshold on ``split`` of the store ``shards_uri``
    and write ``calibration.json`` into it (the module); return its record, or None (nothing
    written, one warning) when the split has no slices. ``tta``: as ``LoadedExport`` (None: the
    export's own). ``members``: (member export, its store) pairs whose ``split`` is predicted
    instead, each by its own member (an ensemble's out-of-fold patients)."""
    model = LoadedExport(export_uri, tta=tta)
    pairs = members or [(export_uri, shards_uri)]
    sources = []
    for member_uri, uri in pairs:
        member = model if member_uri == export_uri else LoadedExport(member_uri, tta=model.tta)
        sources.append((member, uri, shards.ShardStore.open(uri, checksums=False).manifest))
    if not all(m["splits"].get(split, {}).get("records") for _, _, m in sources):
        log.warning("%s: no %s slices in %s; the export is not calibrated (T = 1, no review threshold)", export_uri,
                    split, ", ".join(uri for _, uri in pairs))
        return None
    passes, labels, total = _sample(model, sources, split, batch_size, max_voxels)
    t = calib.fit_temperature(passes, labels)
    tallies = []
    for member, uri, manifest in sources:
        member.temperature, member.calibration = t, {}  # the fitted T, applied as the export will apply it
        tally = SplitCalibration(member)
        for records, images, truth in _batches(uri, manifest, split, batch_size):
            out = {k: v.numpy() for k, v in member.predict(images, passes=True).items()}
            tally.add(out, truth, [r["case_id"] for r in records])
        tallies.append(tally)
    before, after, cases, dice = calib.Reliability(), calib.Reliability(), {}, {}
    for tally in tallies:
        for mine, theirs in ((before, tally.before), (after, tally.after)):
            mine.count += theirs.count
            mine.confidence += theirs.confidence
            mine.correct += theirs.correct
        cases.update(tally.cases.scores())
        dice.update(tally.dice())
    names = sorted(cases)
    threshold, chosen = calib.review_threshold([cases[c] for c in names], [dice[c] for c in names])
    rows = [{"case_id": c, "dice": dice[c], "uncertainty": cases[c]} for c in names]
    record = {
        "temperature": t, "method": f"temperature scaling (Guo et al. 2017): T minimising the mean NLL, searched "
                                    f"over log T, T in {list(calib.T_BOUNDS)}, applied to each forward pass's "
                                    "logits before TTA and ensemble averaging",
        "fitted_on": {"split": split, "stores": [uri for _, uri in pairs], "cases": len(names),
                      "voxels": int(len(labels)), "voxels_in_split": int(total),
                      "sampling": f"uniform, seeded ({SEED}), at most about {max_voxels} voxels",
                      "predicted_by": "each fold's own model (out-of-fold)" if members else "this export",
                      "passes": int(passes.shape[0]), "tta": model.tta},
        "nll_before": calib.nll(passes, labels, 1.0), "nll_after": calib.nll(passes, labels, t),
        "ece_before": before.ece(), "ece_after": after.ece(), "ece_bins": calib.ECE_BINS,
        "ece_definition": ECE_DEFINITION,
        "uncertainty": {"measure": calib.MEASURE, "here": calib.MEASURES[model.measure], "case_rule": calib.CASE_RULE,
                        "lesion_rule": calib.LESION_RULE},
        "review_threshold": None if threshold != threshold else threshold, "review_rule": calib.THRESHOLD_RULE,
        "review_chosen_by": chosen, "case_dice": "the network's argmax, each case's slices as one volume, "
                                                 "before post-processing",
        **ranking(rows, None if threshold != threshold else threshold), "cases": rows,
    }
    storage.write_json(storage.join(export_uri, CALIBRATION), record)
    log.info("calibrated %s on %d %s voxels of %d cases: T = %.3f, NLL %.4f -> %.4f, ECE %.4f -> %.4f; review "
             "threshold %.4f (%s)", export_uri, len(labels), split, len(names), t, record["nll_before"],
             record["nll_after"], record["ece_before"], record["ece_after"], threshold, chosen)
    return record
