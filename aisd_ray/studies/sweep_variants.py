"""``aisd-ray sweep --variants``: what each accuracy piece adds, measured side by side over seeds.

For every synthetic data set (``synthetic.seed``, CT volumes in HU with faint lesions) and every
training seed, on the local backend, with one config (``--config``/``--set``):

- ``grey``: the original's input (one brain window replicated), no TTA, no post-processing: the
  baseline;
- ``neighbours``, ``symmetry``, ``windows``: the other input channel modes (``data.channels``;
  ``windows`` takes ``WINDOWS``), each a run of its own on a store of its own;
- ``grey + TTA``: the baseline's export with mirroring TTA;
- ``grey + post-processing``: the baseline's export with the post-processing chosen on its valid
  split (``postprocess.choose``);
- ``grey 5-fold ensemble``: ``crossval`` with 5 folds of the same config and seed, its ensemble
  (with the post-processing chosen out of fold, as nnU-Net) on the same test split.

Each is scored on the test split: case Dice (mean over the split's patients), pooled lesion Dice
(every lesion voxel of the split; the network's own, before post-processing), HD95 (median over
cases, mm) and lesion-wise F1 (pooled over cases). ``variants.json`` holds every run and, per
variant, the median and minimum over runs and the median of its paired difference from the
baseline's run of the same data set and seed. Each finished unit writes its figures to
``figures.json``: rerunning the same command skips them, so an interrupted sweep resumes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from aisd_ray import stages
from aisd_ray.config import Config
from aisd_ray.core import provenance, storage
from aisd_ray.evaluation.evaluate import evaluate_export

log = logging.getLogger(__name__)
CHANNELS = ("grey", "neighbours", "symmetry", "windows")
# brain (level 40, width 80, the AISD PNGs' window), a narrow stroke window (35, 30) in which a few HU of
# early ischaemic change spans several grey levels, and a wide one (40, 400) that keeps bone and air apart
WINDOWS = ((40.0, 80.0), (35.0, 30.0), (40.0, 400.0))
BRAIN = ((40.0, 80.0),)  # the other modes' one window (grey: replicated, as the AISD PNGs; the others: their first)
VARIANTS = ("grey", "neighbours", "symmetry", "windows", "grey + TTA", "grey + post-processing",
            "grey 5-fold ensemble")
BASELINE = "grey"
FIGURES = ("case_dice", "lesion_dice", "hd95_mm", "lesion_f1")


@dataclass
class VariantPlan:
    train_seeds: tuple[int, ...] = (1, 2, 3)
    synthetic_seeds: tuple[int, ...] = (2024, 7)
    folds: int = 5


def _figures(report: dict[str, Any]) -> dict[str, float]:
    cases = report.get("cases", {})
    return {"case_dice": cases.get("case_dice_mean", math.nan), "lesion_dice": report["lesion_dice"],
            "hd95_mm": cases.get("case_hd95_mm_median", math.nan),
            "lesion_f1": cases.get("case_lesion_f1_pooled", math.nan)}


def _once(folder: str, compute: Callable[[], dict[str, dict[str, float]]], cfg: Config
          ) -> dict[str, dict[str, float]]:
    """``compute()`` (variant -> figures) unless ``folder/figures.json`` has them from an earlier run
    of the same config (its hash: other ``--set`` values, another plan's seeds, are computed anew;
    the runs' folders resume or are refused as each stage does)."""
    uri = storage.join(folder, "figures.json")
    digest = hashlib.sha256(cfg.to_toml().encode()).hexdigest()
    if storage.exists(uri):
        saved = json.loads(storage.read_bytes(uri))
        if saved.get("config_sha256") == digest:
            return saved["figures"]
        log.warning("%s: from another config; computing it again", uri)
    figures = compute()
    storage.write_json(uri, {"config_sha256": digest, "figures": figures})
    return figures


def _channel_runs(cfg: Config, root: str, source: str, mode: str, seed: int) -> dict[str, dict[str, float]]:
    """One channel mode's run: prepare (once per data set), train, export, score on the test split;
    the grey run also with TTA and with the post-processing chosen on its valid split."""
    run_cfg = copy.deepcopy(cfg)
    run_cfg.data.channels, run_cfg.train.seed, run_cfg.run.name = mode, seed, f"{mode}-seed{seed}"
    run_cfg.data.windows = WINDOWS if mode == "windows" else BRAIN
    run_cfg.data.source_dir, run_cfg.data.shards_dir = source, storage.join(root, f"shards-{mode}")
    store = run_cfg.data.shards_dir
    stages.prepare(run_cfg, progress=False)
    stages.train(run_cfg, store, storage.join(root, "runs"), verify_checksums=False)
    run = stages.run_uri(run_cfg, storage.join(root, "runs"))
    export_uri, _ = stages.export(run)
    batch = cfg.eval.batch_size

    def score(name: str, split: str = "test", **options) -> dict[str, Any]:
        return evaluate_export(export_uri, store, storage.join(run, name), split, batch, False, False, **options)

    out = {mode: _figures(score("eval-test", tta=False))}
    if mode == BASELINE:
        out["grey + TTA"] = _figures(score("eval-test-tta", tta=True))
        score("eval-valid-choose", "valid", tta=False, choose_postprocessing=True)  # writes postprocess.json
        out["grey + post-processing"] = _figures(score("eval-test-postprocessed", tta=False))
    return out


def _ensemble(cfg: Config, root: str, source: str, seed: int, folds: int) -> dict[str, dict[str, float]]:
    from aisd_ray.studies.crossval import crossval

    cv_cfg = copy.deepcopy(cfg)
    cv_cfg.data.channels, cv_cfg.data.windows, cv_cfg.train.seed, cv_cfg.data.folds = BASELINE, BRAIN, seed, folds
    cv_cfg.eval.tta = False  # the ensemble alone: TTA is a variant of its own
    cv_cfg.data.source_dir = source
    summary = crossval(cv_cfg, storage.join(root, f"crossval-seed{seed}"), progress=False)
    t = {k: math.nan if v is None else v for k, v in summary["ensemble_test"].items()}  # NaN read back from JSON
    return {"grey 5-fold ensemble": {"case_dice": t["case_dice_mean"], "lesion_dice": t["lesion_dice_pooled"],
                                     "hd95_mm": t["case_hd95_mm_median"], "lesion_f1": t["case_lesion_f1_pooled"]}}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: median and min of each figure over its runs, and the median paired difference
    from the baseline run of the same data set and seed."""
    base = {(r["synthetic_seed"], r["train_seed"]): r for r in runs if r["variant"] == BASELINE}
    out = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        row: dict[str, Any] = {"runs": len(mine)}
        for key in FIGURES:
            values = [r[key] for r in mine if r[key] == r[key]]
            row[f"{key}_median"] = statistics.median(values) if values else math.nan
            row[f"{key}_min"] = min(values) if values else math.nan
            paired = [r[key] - base[k][key] for r in mine
                      if (k := (r["synthetic_seed"], r["train_seed"])) in base and r[key] == r[key]
                      and base[k][key] == base[k][key]]
            row[f"{key}_vs_grey"] = statistics.median(paired) if paired and variant != BASELINE else math.nan
        out[variant] = row
    return out


def sweep_variants(cfg: Config, output: str, plan: VariantPlan, progress: bool = False) -> dict[str, Any]:
    """Run (or resume) the comparison under ``output``; the report, also ``variants.json``."""
    from aisd_ray.data.synthetic.slices import synthetic_test_cases

    started = time.time()
    output = storage.absolute(output)
    runs = []
    for data_seed in plan.synthetic_seeds:
        root = storage.join(output, f"synthetic-{data_seed}")
        data_cfg = copy.deepcopy(cfg)
        data_cfg.synthetic.seed, data_cfg.train.backend = data_seed, "local"
        data_cfg.data.test_cases = tuple(synthetic_test_cases(data_cfg.synthetic))
        source, _ = stages.synthetic_source(data_cfg, root, progress)
        for seed in plan.train_seeds:
            units = [(mode, partial(_channel_runs, data_cfg, root, str(source), mode, seed)) for mode in CHANNELS]
            units.append(("ensemble", partial(_ensemble, data_cfg, root, str(source), seed, plan.folds)))
            for name, compute in units:
                log.info("variants: %s, training seed %d, data set %d", name, seed, data_seed)
                unit_cfg = copy.deepcopy(data_cfg)
                unit_cfg.train.seed = seed
                found = _once(storage.join(root, "figures", f"{name}-seed{seed}"), compute, unit_cfg)
                for variant, figures in found.items():
                    runs.append({"variant": variant, "synthetic_seed": data_seed, "train_seed": seed, **figures})
    report = {"provenance": provenance.facts(cfg.to_toml()), "config": cfg.to_dict(),
              "plan": {"train_seeds": list(plan.train_seeds), "synthetic_seeds": list(plan.synthetic_seeds),
                       "folds": plan.folds, "windows": [list(w) for w in WINDOWS]},
              "runs": runs, "summary": summarise(runs), "wall_seconds": round(time.time() - started, 1)}
    storage.write_json(storage.join(output, "variants.json"), report)
    return report


def table(report: dict[str, Any]) -> str:
    """One line per variant: medians (min) over its runs and the median paired change from grey."""
    head = (f"{'variant':<24} {'runs':>4}  {'case Dice':>17} {'pooled Dice':>17} {'HD95 mm':>8} {'lesion F1':>9}"
            f"  {'vs grey: case Dice':>18} {'pooled':>7} {'HD95':>6} {'F1':>6}")
    lines = [head, f"{'':<24} {'':>4}  {'median (min)':>17} {'median (min)':>17} {'median':>8} {'median':>9}"]
    for variant, s in report["summary"].items():
        delta = "" if variant == BASELINE else (
            f"  {s['case_dice_vs_grey']:>+18.3f} {s['lesion_dice_vs_grey']:>+7.3f} {s['hd95_mm_vs_grey']:>+6.2f} "
            f"{s['lesion_f1_vs_grey']:>+6.3f}")
        lines.append(f"{variant:<24} {s['runs']:>4}  {s['case_dice_median']:>8.3f} ({s['case_dice_min']:.3f}) "
                     f"{s['lesion_dice_median']:>8.3f} ({s['lesion_dice_min']:.3f}) {s['hd95_mm_median']:>8.2f} "
                     f"{s['lesion_f1_median']:>9.3f}{delta}")
    return "\n".join(lines)
