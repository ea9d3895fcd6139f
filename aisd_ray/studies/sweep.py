"""``aisd-ray sweep``: what a config reaches as a distribution over seeds, not one lucky run.

Trains the demo pipeline (prepare -> train -> export -> evaluate on the test split) for every
(synthetic-data seed x training seed) on the local backend and for a set of training seeds on
the Ray backend with several workers, and reports min / median / max test lesion Dice
(pooled and per image) and the number of collapsed runs per backend, as ``sweep.json`` and a
printed table; also each run's test ECE before and after temperature scaling and how well the case
uncertainty ranks the test cases of Dice < 0.5 (``calibration.pooled``: AUROC per run and over every
run's test cases together, the mean Dice of the cases not flagged for review). Both backends train with the same global batch: a local run's batch is
``train.batch_size`` times the Ray runs' worker count, so the backends differ only in how the
batch is split. Each run keeps its own output folder; rerunning the same command skips the runs
that finished (their ``summary.json`` is read back), so an interrupted sweep resumes.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

from aisd_ray import stages
from aisd_ray.config import Config
from aisd_ray.core import provenance, storage
from aisd_ray.scoring import calibration
from aisd_ray.scoring.metrics import COLLAPSED_BELOW  # a run also counts as collapsed when its training diverged
from aisd_ray.train import TrainingFailed
from aisd_ray.train import checkpoint as ckpt

log = logging.getLogger(__name__)


@dataclass
class Plan:
    train_seeds: tuple[int, ...] = (1, 2, 3)
    synthetic_seeds: tuple[int, ...] = (2024, 7)
    ray_train_seeds: tuple[int, ...] = (1, 2, 3)
    ray_workers: int = 2


def _run_one(cfg: Config, root: str, backend: str, train_seed: int, synthetic_seed: int, workers: int,
             progress: bool) -> dict[str, Any]:
    name = f"{backend}-seed{train_seed}"
    data_root = storage.join(root, f"synthetic-{synthetic_seed}")
    output = storage.join(data_root, name)
    summary_uri = storage.join(output, "summary.json")
    if storage.exists(summary_uri):
        log.info("%s: finished before, reading %s", name, summary_uri)
        figures = json.loads(storage.read_bytes(summary_uri))["figures"]
    else:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.synthetic.seed, run_cfg.train.seed = synthetic_seed, train_seed
        run_cfg.train.backend, run_cfg.run.name = backend, name
        if backend == "ray":
            run_cfg.train.num_workers = workers
        else:  # the same global batch as the Ray runs
            run_cfg.train.batch_size = cfg.train.batch_size * workers
        run_cfg.data.shards_dir = storage.join(data_root, "shards")  # one store per synthetic seed
        log.info("sweep: %s on synthetic seed %d", name, synthetic_seed)
        try:
            figures = stages.demo(run_cfg, output, progress=progress, source_root=data_root).figures
        except TrainingFailed as exc:  # a diverged run is a result of the sweep, not its end
            if ckpt.DIVERGED not in str(exc):
                raise
            log.warning("sweep: %s diverged; counted as collapsed, with no test figures: %s", name, exc)
            figures = _diverged_figures(stages.run_uri(run_cfg, output), str(exc))
    dice = figures["test lesion Dice (pooled)"]
    return {"backend": backend, "workers": workers if backend == "ray" else 1,
            "global_batch": cfg.train.batch_size * workers, "train_seed": train_seed,
            "synthetic_seed": synthetic_seed, "test_lesion_dice": dice,
            "test_lesion_dice_per_image": figures["test lesion Dice (per image)"],
            "test_case_dice_mean": figures.get("test case Dice (mean)", float("nan")),
            "best_epoch": figures["best epoch"], "epochs_run": figures["epochs run"],
            "rollbacks": figures.get("rollbacks", 0), "stop_reason": figures.get("stop reason", ""),
            "collapsed": bool(not dice >= COLLAPSED_BELOW or ckpt.DIVERGED in str(figures.get("stop reason", ""))),
            "wall_seconds": figures["wall time (s)"], "output": output,
            "test_ece_before": figures.get("test ECE before temperature scaling", float("nan")),
            "test_ece_after": figures.get("test ECE after temperature scaling", float("nan")),
            "temperature": figures.get("temperature (fitted on valid)", float("nan")),
            "test_uncertainty_auroc": figures.get("test uncertainty AUROC (case Dice < 0.5)", float("nan")),
            "test_cases": _test_cases(storage.join(output, name))}


def _test_cases(run: str) -> list[dict[str, Any]]:
    """Each test case's Dice, uncertainty score and review flag from the run's ``eval/metrics.json``
    ([] when it has none: a diverged run)."""
    uri = storage.join(run, "eval", "metrics.json")
    if not storage.exists(uri):
        return []
    rows = json.loads(storage.read_bytes(uri)).get("cases", {}).get("per_case", [])
    return [{k: r.get(k) for k in ("case_id", "dice", "uncertainty", "review")} for r in rows if "uncertainty" in r]


def _diverged_figures(run: str, reason: str) -> dict[str, Any]:
    """The figures of a run the divergence guard stopped: its epochs from the run's history, no
    test figures (NaN: the pipeline stopped before export, so nothing was scored)."""
    state = ckpt.list_checkpoints(run)
    history = state[-1][1].history if state else []
    best = ckpt.best_row(history)
    nan = float("nan")
    return {"test lesion Dice (pooled)": nan, "test lesion Dice (per image)": nan, "test case Dice (mean)": nan,
            "best epoch": best["epoch"] if best else 0, "epochs run": len(history),
            "rollbacks": history[-1].get("rollbacks", 0) if history else 0,
            "stop reason": reason, "wall time (s)": nan}


def _spread(values: list[float]) -> dict[str, float]:
    """min / median / max of the defined values (a diverged run has none); NaN when none is."""
    values = [v for v in values if v == v]
    if not values:
        return {"min": float("nan"), "median": float("nan"), "max": float("nan")}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for backend in sorted({r["backend"] for r in runs}):
        mine = [r for r in runs if r["backend"] == backend]
        out[backend] = {"runs": len(mine), "collapses": sum(r["collapsed"] for r in mine),
                        "test_lesion_dice": _spread([r["test_lesion_dice"] for r in mine]),
                        "test_lesion_dice_per_image": _spread([r["test_lesion_dice_per_image"] for r in mine]),
                        "test_case_dice_mean": _spread([r.get("test_case_dice_mean", float("nan")) for r in mine]),
                        "rollbacks": sum(r["rollbacks"] for r in mine),
                        "test_ece_before": _spread([r.get("test_ece_before", float("nan")) for r in mine]),
                        "test_ece_after": _spread([r.get("test_ece_after", float("nan")) for r in mine]),
                        "test_uncertainty_auroc": _spread([r.get("test_uncertainty_auroc", float("nan"))
                                                           for r in mine]),
                        "uncertainty_pooled": calibration.pooled([c for r in mine for c in r.get("test_cases", [])])}
    if {"local", "ray"} <= set(out):
        out["ray_minus_local_median"] = (out["ray"]["test_lesion_dice"]["median"]
                                         - out["local"]["test_lesion_dice"]["median"])
    return out


def sweep(cfg: Config, output: str, plan: Plan, progress: bool = False) -> dict[str, Any]:
    started = time.time()
    output = storage.absolute(output)
    runs = []
    for synthetic_seed in plan.synthetic_seeds:
        for seed in plan.train_seeds:
            runs.append(_run_one(cfg, output, "local", seed, synthetic_seed, plan.ray_workers, progress))
    for seed in plan.ray_train_seeds:
        runs.append(_run_one(cfg, output, "ray", seed, plan.synthetic_seeds[0], plan.ray_workers, progress))
    report = {"provenance": provenance.facts(cfg.to_toml()),
              "config": {"model": cfg.to_dict()["model"], "train": cfg.to_dict()["train"]},
              "runs": runs, "summary": summarise(runs), "wall_seconds": round(time.time() - started, 1)}
    storage.write_text(storage.join(output, "sweep.json"), json.dumps(report, indent=2))
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"{'backend':<8} {'workers':>7} {'train seed':>10} {'data seed':>9} {'test Dice':>9} "
             f"{'per image':>9} {'case Dice':>9} {'best ep':>7} {'epochs':>6} {'rollbacks':>9}  note"]
    for r in report["runs"]:
        lines.append(f"{r['backend']:<8} {r['workers']:>7} {r['train_seed']:>10} {r['synthetic_seed']:>9} "
                     f"{r['test_lesion_dice']:>9.3f} {r['test_lesion_dice_per_image']:>9.3f} "
                     f"{r.get('test_case_dice_mean', float('nan')):>9.3f} {r['best_epoch']:>7} "
                     f"{r['epochs_run']:>6} {r['rollbacks']:>9}  {'COLLAPSED' if r['collapsed'] else ''}")
    lines.append("")
    for backend, s in report["summary"].items():
        if not isinstance(s, dict):
            continue
        d, p = s["test_lesion_dice"], s["test_lesion_dice_per_image"]
        c = s.get("test_case_dice_mean")
        lines.append(f"{backend}: {s['runs']} runs, {s['collapses']} collapsed; test lesion Dice pooled "
                     f"min {d['min']:.3f} / median {d['median']:.3f} / max {d['max']:.3f}; per image "
                     f"min {p['min']:.3f} / median {p['median']:.3f} / max {p['max']:.3f}"
                     + (f"; case Dice (mean per run) min {c['min']:.3f} / median {c['median']:.3f} / max "
                        f"{c['max']:.3f}" if c and c["median"] == c["median"] else ""))
        e0, e1, u = s.get("test_ece_before"), s.get("test_ece_after"), s.get("uncertainty_pooled") or {}
        if e0 and e0["median"] == e0["median"]:
            lines.append(f"{backend}: test ECE median {e0['median']:.4f} before, {e1['median']:.4f} after temperature "
                         f"scaling; case uncertainty AUROC for Dice < 0.5 over {u.get('cases', 0)} test cases "
                         f"{u.get('auroc', float('nan')):.3f}; Dice of the unflagged {u.get('unflagged_dice_mean', float('nan')):.3f} "
                         f"({u.get('flagged', 0)} flagged), of all {u.get('all_dice_mean', float('nan')):.3f}")
    if "ray_minus_local_median" in report["summary"]:
        lines.append(f"ray median - local median: {report['summary']['ray_minus_local_median']:+.3f}")
    return "\n".join(lines)
