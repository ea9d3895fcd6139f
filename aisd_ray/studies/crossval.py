"""``aisd-ray crossval --folds K``: patient k-fold cross-validation, its K runs trained at once on
Ray, and the ensemble of the K fold models as one export.

nnU-Net's recipe (five folds, out-of-fold validation, post-processing chosen on the out-of-fold
predictions, the fold models' probabilities averaged at inference), with what nnU-Net lacks: the
folds train **concurrently**, as many at once as the cluster has resources for (on one small
machine, one after another), each a Ray Train run (``train.backend = "ray"``; the local backend
trains them in this process, one after another). The K runs are a Ray Tune grid over the fold,
because Tune already gives what K concurrent runs need: a concurrency limit, per-trial failure
handling, and an experiment state that a rerun restores (finished folds are kept, unfinished
ones resume from their last checkpoint).

Output folder (the same command again resumes; every step skips what is complete):

- ``fold_<k>/shards/``: fold k's store (``data.folds`` = K, ``data.fold`` = k: fold k's patients
  are valid, the others train; the test split is every store's same official test cases);
- ``runs/fold_<k>/``: fold k's training run; ``tune/crossval/``: the Tune experiment;
- ``fold_<k>/export/``: its best checkpoint as a SavedModel; ``fold_<k>/validation/``: that export
  scored on its valid split (the fold's out-of-fold cases), with each case's predicted and true
  label maps as NIfTI (``predictions/``, ``labels/``, model resolution);
- ``oof/``: every fold's out-of-fold cases scored together (``evaluate_volumes``: case Dice,
  HD95, NSD, mL, lesion F1); ``folds.csv``: one row per fold;
- ``ensemble/``: the ensemble export (``export.write_ensemble``) with the post-processing chosen
  on the out-of-fold cases (``postprocess.choose``), usable wherever an export is, and its
  ``calibration.json``: one temperature and the review threshold fitted on the out-of-fold cases,
  each predicted by its own fold's model (``evaluation/calibrate.py`` says why);
- ``ensemble_test/``: the ensemble scored on the test split (when the store has one);
- ``crossval.json``: the figures, written last.

Cross-validation needs each case's spacing (the out-of-fold NIfTIs, the mL thresholds of
post-processing): the source must be CT volumes (nnU-Net, DICOM, the AISD DICOM release).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from aisd_ray import stages
from aisd_ray.config import Config, ConfigError, config_from_dict
from aisd_ray.core import provenance, storage
from aisd_ray.data.sources.layout import DataError
from aisd_ray.data.store import shards, volume_source
from aisd_ray.evaluation.calibrate import calibrate
from aisd_ray.evaluation.evaluate import VOLUMES, evaluate_export
from aisd_ray.evaluation.evaluate_volumes import evaluate_nifti_folders
from aisd_ray.inference import postprocess
from aisd_ray.inference.export import CALIBRATION, INFO, write_ensemble
from aisd_ray.train import TrainingFailed

log = logging.getLogger(__name__)
VOLUME_SOURCES = ("nnunet", "dicom", "aisd_dicom")
TRIAL_CPU = 0.01  # a fold's trial function only waits on its Train run


def fold_name(k: int) -> str:
    return f"fold_{k}"


def fold_config(cfg: Config, output: str, k: int) -> Config:
    """Fold k's config: ``data.fold`` = k, its store ``<output>/fold_<k>/shards``, run ``fold_<k>``."""
    fold = copy.deepcopy(cfg)
    fold.data.fold, fold.run.name = k, fold_name(k)
    fold.data.shards_dir = storage.join(output, fold_name(k), "shards")
    return fold


# keys a rerun may change: where it runs and is tracked, not what is trained or scored
RERUN_MAY_CHANGE = {("train", "backend"), ("run", "mlflow_tracking_uri"), ("run", "shared_filesystem"),
                    ("eval", "batch_size")}


def _check_output(cfg: Config, output: str) -> None:
    """A rerun continues the same cross-validation: its finished folds, exports and scores are kept,
    so refuse any other config (but ``RERUN_MAY_CHANGE``), naming the keys, before anything runs."""
    uri = storage.join(output, "config.toml")
    if storage.exists(uri):
        old = stages.run_config(output).to_dict()  # config.toml read as a run folder's is
        changed = [f"{section}.{key} {old.get(section, {}).get(key)!r} -> {value!r}"
                   for section, values in cfg.to_dict().items() if isinstance(values, dict)
                   for key, value in values.items()
                   if (section, key) not in RERUN_MAY_CHANGE and old.get(section, {}).get(key) != value]
        if changed:
            raise ConfigError(f"{output}: holds a cross-validation with another config ({'; '.join(changed)}); "
                              "rerun with its config (config.toml there) to resume, or give a new --output")
    storage.ensure_dir(output)
    storage.write_text(uri, cfg.to_toml())


def concurrent_folds(cfg: Config, folds: int) -> int:
    """How many fold runs fit on the cluster at once: each takes ``train.num_workers`` CPUs (and as
    many GPUs with ``train.use_gpu``) plus a CPU for its reads; at least 1, at most ``folds``."""
    import ray

    from aisd_ray.train.ray_session import ensure_ray

    ensure_ray(cfg.train.num_workers + 2)
    have = ray.cluster_resources()
    fits = int(have.get("CPU", 0) // (cfg.train.num_workers + 1))
    if cfg.train.use_gpu:
        fits = min(fits, int(have.get("GPU", 0) // cfg.train.num_workers))
    return max(1, min(folds, fits))


def _fold_trial(params: dict[str, Any], base: dict[str, Any], output: str, env: dict[str, str]) -> None:
    """One fold as a Tune trial: its Train run ``<output>/runs/fold_<k>`` (a restored trial resumes it)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ.update(env)  # where gs:// points, as the driver saw it
    cfg = fold_config(config_from_dict(base), output, int(params["fold"]))
    stages.train(cfg, cfg.data.shards_dir, storage.join(output, "runs"), callbacks=(TuneReportCallback(),),
                 verify_checksums=False)


def _train_folds(cfg: Config, output: str, folds: int) -> int:
    """Train every fold (Ray: a Tune grid over the fold, restored on a rerun); the concurrency used."""
    if cfg.train.backend == "local":
        for k in range(folds):
            fold = fold_config(cfg, output, k)
            stages.train(fold, fold.data.shards_dir, storage.join(output, "runs"), verify_checksums=False)
        return 1
    from ray import tune

    from aisd_ray.train.ray_session import require_shared_storage, storage_env

    require_shared_storage(cfg, {"the cross-validation folder": output})
    at_once = concurrent_folds(cfg, folds)
    log.info("training %d folds, %d at once (as the cluster's resources allow)", folds, at_once)
    fs, tune_root = storage.resolve(storage.join(output, "tune"))
    trainable = tune.with_resources(tune.with_parameters(_fold_trial, base=cfg.to_dict(), output=output,
                                                         env=storage_env()), {"cpu": TRIAL_CPU})
    experiment = f"{tune_root}/crossval"
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        log.info("resuming %s: finished folds are kept, unfinished ones continue", experiment)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        tuner = tune.Tuner(trainable, param_space={"fold": tune.grid_search(list(range(folds)))},
                           tune_config=tune.TuneConfig(max_concurrent_trials=at_once),
                           run_config=tune.RunConfig(name="crossval", storage_path=tune_root, storage_filesystem=fs,
                                                     failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    failed = [f"fold {r.config.get('fold')}: {_last_line(r.error)}" for r in (grid[i] for i in range(len(grid)))
              if r.error is not None]
    if failed:
        raise TrainingFailed(f"{output}: {len(failed)} of {folds} folds failed ({'; '.join(failed)}); rerun the same "
                             "command to continue them")
    return at_once


def _last_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[-1][:300]


def _score_fold(cfg: Config, output: str, k: int) -> dict[str, Any]:
    """Fold k exported (once) and scored on its valid split with its case volumes (once)."""
    fold = fold_config(cfg, output, k)
    export_uri = storage.join(output, fold_name(k), "export")
    if not storage.exists(storage.join(export_uri, storage.COMPLETE)):
        stages.export(stages.run_uri(fold, storage.join(output, "runs")), export_uri)
    out = storage.join(output, fold_name(k), "validation")
    if storage.exists(storage.join(out, storage.COMPLETE)):
        report = json.loads(storage.read_bytes(storage.join(out, "metrics.json")))
    else:
        report = stages.on_node(cfg, cfg.train.backend == "ray", evaluate_export, export_uri, fold.data.shards_dir,
                                out, "valid", cfg.eval.batch_size, False, False, tta=cfg.eval.tta,
                                write_volumes=True)
    validation = json.loads(storage.read_bytes(storage.join(export_uri, INFO))).get("validation", {})
    cases = report.get("cases", {})
    return {"fold": k, "valid_cases": cases.get("cases", 0), "best_epoch": validation.get("epoch"),
            "val_lesion_dice": validation.get("val_lesion_dice", math.nan),
            "oof_lesion_dice": report["lesion_dice"], "oof_case_dice_mean": cases.get("case_dice_mean", math.nan),
            "export": export_uri, "validation": out}


def _out_of_fold(output: str, rows: list[dict[str, Any]], progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every fold's out-of-fold cases together: scored (``oof/``), pooled lesion Dice over their
    voxels, and the post-processing chosen on them. (figures, choice)"""
    from aisd_ray.data.sources import volume

    with tempfile.TemporaryDirectory(prefix="aisd-oof-") as tmp:
        for row in rows:
            for folder in VOLUMES:
                storage.download_tree(storage.join(row["validation"], folder), Path(tmp) / folder)
        report = evaluate_nifti_folders(Path(tmp) / VOLUMES[0], Path(tmp) / VOLUMES[1], storage.join(output, "oof"),
                                        progress=progress)
        cases, tp, fp, fn = [], 0, 0, 0
        for truth_path in sorted((Path(tmp) / VOLUMES[1]).iterdir()):
            truth = volume.read_label_volume(truth_path)
            pred = volume.read_label_volume(Path(tmp) / VOLUMES[0] / truth_path.name)
            t, p = truth.labels > 0, pred.labels > 0
            tp, fp, fn = tp + int(np.sum(t & p)), fp + int(np.sum(~t & p)), fn + int(np.sum(t & ~p))
            cases.append((truth.labels, pred.labels, truth.spacing))
    choice = postprocess.choose(cases)
    figures = {k: report[k] for k in ("cases", "case_dice_mean", "case_dice_median", "case_hd95_mm_median",
                                       "case_nsd_mean", "case_avd_ml_median", "case_lesion_f1_pooled") if k in report}
    figures["lesion_dice_pooled"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    figures["case_dice_mean_postprocessed"] = choice["val_case_dice"][choice["chosen"]]
    return figures, choice


def crossval(cfg: Config, output: str, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the cross-validation of ``cfg`` (``data.folds`` >= 2, ``data.source_dir`` CT
    volumes) under ``output``; the summary also written as ``crossval.json``. ConfigError for fewer
    than 2 folds or another cross-validation in ``output``; DataError for a source without
    spacing; TrainingFailed naming the folds that failed (a rerun continues them)."""
    folds = cfg.data.folds
    if folds < 2:
        raise ConfigError(f"[data] folds: cross-validation needs at least 2 folds, got {folds} (--folds K)")
    output = storage.absolute(output)
    source = cfg.data.source_dir
    if not source:
        raise ConfigError("give --source or data.source_dir: CT volumes (an nnU-Net dataset, DICOM case folders with "
                          "labels/, the AISD DICOM release)")
    if storage.is_local(source) and not Path(source).exists():
        raise DataError(f"{source}: not found")
    if storage.is_local(source) and not volume_source.volume_layout(source):
        raise DataError(f"{source}: cross-validation needs CT volumes with their spacing (an nnU-Net dataset, DICOM "
                        "case folders with labels/, the AISD DICOM release)")
    _check_output(cfg, output)
    for k in range(folds):
        fold = fold_config(cfg, output, k)
        manifest = stages.prepare(fold, progress=progress)
        kind = (manifest.get("source") or {}).get("layout")
        if kind not in VOLUME_SOURCES:
            raise DataError(f"{cfg.data.source_dir}: cross-validation needs CT volumes with their spacing "
                            f"({', '.join(VOLUME_SOURCES)}), not the {kind} layout")
    at_once = _train_folds(cfg, output, folds)
    rows = [_score_fold(cfg, output, k) for k in range(folds)]
    oof, choice = _out_of_fold(output, rows, progress)
    storage.write_csv(storage.join(output, "folds.csv"), rows)
    log.info("out-of-fold: %d cases, case Dice %.4f mean; post-processing chosen on them: %s", oof.get("cases", 0),
             oof.get("case_dice_mean", math.nan), postprocess.describe(choice))
    ensemble = storage.join(output, "ensemble")
    if not storage.exists(storage.join(ensemble, storage.COMPLETE)):  # a rerun of the same config keeps it
        write_ensemble([r["export"] for r in rows], ensemble, choice,
                       {"folds": folds, "tta": cfg.eval.tta, "out_of_fold": oof, "config": cfg.to_dict()})
    if not storage.exists(storage.join(ensemble, CALIBRATION)):  # one T on the out-of-fold cases (calibrate.py)
        calibrate(ensemble, "", "valid", cfg.eval.batch_size, cfg.eval.tta,
                  members=[(r["export"], fold_config(cfg, output, r["fold"]).data.shards_dir) for r in rows])
    summary: dict[str, Any] = {"folds": folds, "concurrent": at_once, "per_fold": rows, "out_of_fold": oof,
                               "postprocessing": choice, "ensemble": ensemble}
    store = shards.ShardStore.open(fold_config(cfg, output, 0).data.shards_dir, cfg, checksums=False)
    tested = storage.join(output, "ensemble_test")
    if storage.exists(storage.join(tested, storage.COMPLETE)):
        report = json.loads(storage.read_bytes(storage.join(tested, "metrics.json")))
    elif "test" in store.manifest["splits"]:
        report = stages.on_node(cfg, cfg.train.backend == "ray", evaluate_export, ensemble, store.uri, tested,
                                "test", cfg.eval.batch_size, False, False, tta=cfg.eval.tta)
    else:
        report = None
    if report:
        cases = report.get("cases", {})
        keys = ("case_dice_mean", "case_dice_median", "case_hd95_mm_median", "case_lesion_f1_pooled")
        summary["ensemble_test"] = {"lesion_dice_pooled": report["lesion_dice"],
                                    **{k: cases.get(k, math.nan) for k in keys}}
    summary["provenance"] = provenance.facts(cfg.to_toml())
    storage.write_json(storage.join(output, "crossval.json"), summary)
    return summary


def _f(value: Any, spec: str) -> str:
    """A figure for the table: NaN, or None (NaN as JSON gives it back), as "nan"."""
    return f"{math.nan if value is None else value:{spec}}"


def table(summary: dict[str, Any]) -> str:
    """The printed report: one line per fold, the out-of-fold figures, the ensemble's test figures."""
    lines = [f"{'fold':<6} {'valid cases':>11} {'best epoch':>10} {'val Dice':>8} {'OOF case Dice':>13}"]
    for r in summary["per_fold"]:
        lines.append(f"{r['fold']:<6} {r['valid_cases']:>11} {r['best_epoch']!s:>10} "
                     f"{_f(r['val_lesion_dice'], '>8.4f')} {_f(r['oof_case_dice_mean'], '>13.4f')}")
    o = summary["out_of_fold"]
    lines += ["", f"out of fold ({o.get('cases', 0)} cases): case Dice {_f(o.get('case_dice_mean'), '.4f')} mean, "
              f"{_f(o.get('case_dice_median'), '.4f')} median; pooled lesion Dice "
              f"{_f(o.get('lesion_dice_pooled'), '.4f')}; HD95 {_f(o.get('case_hd95_mm_median'), '.2f')} mm "
              f"(median); lesion F1 {_f(o.get('case_lesion_f1_pooled'), '.3f')}",
              f"post-processing chosen on them: {postprocess.describe(summary['postprocessing'])} (case Dice "
              f"{_f(o.get('case_dice_mean_postprocessed'), '.4f')})"]
    t = summary.get("ensemble_test")
    if t:
        lines.append(f"ensemble of {summary['folds']} on the test split: case Dice {_f(t['case_dice_mean'], '.4f')} "
                     f"mean, pooled lesion Dice {_f(t['lesion_dice_pooled'], '.4f')}, HD95 "
                     f"{_f(t['case_hd95_mm_median'], '.2f')} mm (median), lesion F1 "
                     f"{_f(t['case_lesion_f1_pooled'], '.3f')}")
    lines += [f"{summary['folds']} folds, {summary['concurrent']} at once; ensemble export: {summary['ensemble']}"]
    return "\n".join(lines)
