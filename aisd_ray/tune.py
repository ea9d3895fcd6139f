"""``aisd-ray tune``: a Ray Tune search in which every trial is a Ray Train run.

Ray 2.60 drives Train V2 runs from Tune as function trainables (FACTS section 7): each trial
calls ``TensorflowTrainer.fit()`` (through ``stages.train``) and a ``TuneReportCallback``
passes every epoch's metrics up, so ASHA can stop weak trials at its rungs of the validation
score that also picks each run's best checkpoint (``checkpoint.SCORE``: the mean val Dice over
the foreground classes, the lesion Dice with one lesion class). The experiment lives in the
configured storage (folder or ``gs://``); running the same command again restores it and runs
only what is unfinished. When the search ends the
best trial is exported like a single run, and ``best_config.toml`` (which ``aisd-ray train``
accepts), ``leaderboard.csv``, ``search.png`` and ``curves.png`` are written beside it.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from aisd_ray import plots, stages, storage
from aisd_ray.config import WHOLE_NUMBER_KEYS, Config, apply_params, config_from_dict
from aisd_ray.data import shards
from aisd_ray.train.checkpoint import LEGACY_SCORE, SCORE, best_row, score_of
from aisd_ray.train.ray_train import ensure_ray, require_shared_storage

log = logging.getLogger(__name__)
TRIAL_CPU = 0.01  # the trial function only waits on its Train run; zero is refused


def param_space(cfg: Config) -> dict[str, Any]:
    """``tune.space`` as Ray Tune distributions."""
    space: dict[str, Any] = {}
    for key, spec in cfg.tune.space.items():
        (kind, values), = spec.items()
        values = [int(v) for v in values] if key in WHOLE_NUMBER_KEYS else list(values)
        space[key] = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
                      "choice": lambda v: tune.choice(list(v)), "grid": lambda v: tune.grid_search(list(v))
                      }[kind](values)
    return space


def _searcher(cfg: Config):
    """The search algorithm, limited to ``max_concurrent_trials`` at once."""
    if cfg.tune.searcher == "random":  # a generator, which TuneConfig.max_concurrent_trials would not limit
        return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=cfg.tune.max_concurrent_trials)
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ImportError("tune.searcher = 'optuna' needs the optuna package: pip install 'aisd-ray[optuna]'") from None
    if any("grid" in spec for spec in cfg.tune.space.values()):
        raise ValueError("tune.searcher = 'optuna' cannot take grid values; use choice")
    return ConcurrencyLimiter(OptunaSearch(seed=cfg.tune.seed), max_concurrent=cfg.tune.max_concurrent_trials)


def _scheduler(cfg: Config):
    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=cfg.tune.grace_period,
                         reduction_factor=cfg.tune.reduction_factor)


def _trial(params: dict[str, Any], base: dict[str, Any], shards_uri: str, trials_root: str,
           env: dict[str, str]) -> None:
    """One trial: the base config with this trial's values, trained as run ``trials_root/<trial id>``
    (a restored trial finds its own checkpoints there and resumes)."""
    os.environ.update(env)  # where gs:// points, as the driver saw it
    cfg = apply_params(config_from_dict(base), params)
    cfg.run.name = tune.get_context().get_trial_id()
    # the search verified the store's checksums once; a trial checks sizes and the config
    # a diverged trial is a result of the search (its stop reason in the leaderboard), not an error
    stages.train(cfg, shards_uri, trials_root, callbacks=(TuneReportCallback(),), verify_checksums=False,
                 allow_divergence=True)


@dataclass
class SearchResult:
    rows: list[dict[str, Any]]
    outputs: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        keys = [k for k in self.rows[0] if k != "run"] if self.rows else []
        cells = [[_cell(row[k]) for k in keys] for row in self.rows]
        widths = [max([len(k)] + [len(c[i]) for c in cells]) for i, k in enumerate(keys)]
        lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _row(result, cfg: Config, trials_root: str) -> dict[str, Any]:
    history = result.metrics_dataframe
    trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(result.path)
    row: dict[str, Any] = {"trial_id": trial_id}
    row.update({k: result.config.get(k) for k in cfg.tune.space})
    rows = history.to_dict("records") if history is not None and {SCORE, LEGACY_SCORE} & set(history) else []
    best = best_row(rows)  # the epoch export takes: the same rule, the same tie-break
    row.update({f"best_{SCORE}": score_of(best) if best else math.nan,
                # the best epoch's lesion Dice beside its score (equal with one lesion class)
                "best_val_lesion_dice": float(best.get("val_lesion_dice", math.nan)) if best else math.nan,
                "best_epoch": int(best["epoch"]) if best else 0,
                "epochs_run": int(history["epoch"].max()) if rows else 0})
    reason = history["stop_reason"].iloc[-1] if history is not None and "stop_reason" in history else ""
    reason = reason if isinstance(reason, str) else ""
    if result.error is not None:
        reason = f"error: {str(result.error).strip().splitlines()[-1][:200]}"
    elif not reason:
        reason = f"stopped by ASHA after epoch {row['epochs_run']}"
    row["stop_reason"] = reason
    row["run"] = storage.join(trials_root, trial_id)
    return row


def _order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    key = f"best_{SCORE}"
    return sorted(rows, key=lambda r: (math.isnan(r[key]), -r[key] if not math.isnan(r[key]) else 0, r["trial_id"]))


def _write_outputs(rows: list[dict[str, Any]], curves: dict[str, Any], cfg: Config, output: str) -> dict[str, str]:
    outputs = {}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["rank", *rows[0]])
    writer.writeheader()
    writer.writerows({"rank": i + 1, **row} for i, row in enumerate(rows))
    outputs["leaderboard"] = storage.join(output, "leaderboard.csv")
    storage.write_text(outputs["leaderboard"], buf.getvalue())

    score = f"best_{SCORE}"
    x_key = "learning_rate" if "learning_rate" in cfg.tune.space else None
    group = next((k for k in ("base_kernels", "dilation") if k in cfg.tune.space), None)
    series: dict[str, tuple[list, list]] = {}
    for i, row in enumerate(rows):
        label = f"{group} {row[group]}" if group else "trial"
        xs, ys = series.setdefault(label, ([], []))
        xs.append(row[x_key] if x_key else i + 1)
        ys.append(row[score])
    outputs["search plot"] = storage.join(output, "search.png")
    plots.scatter([(k, xs, ys) for k, (xs, ys) in sorted(series.items())], x_key or "trial (by rank)",
                  f"best {SCORE}", outputs["search plot"], logx=x_key == "learning_rate",
                  title=f"{len(rows)} trials")
    outputs["curves plot"] = storage.join(output, "curves.png")
    plots.lines([(trial_id, list(h["epoch"]), list(h[SCORE].astype(float))) for trial_id, h in curves.items()],
                "epoch", SCORE, outputs["curves plot"])
    return outputs


def search(cfg: Config, shards_uri: str, output: str) -> SearchResult:
    """Run (or resume) the search under ``output``; export the best trial and write the summaries."""
    output, shards_uri = storage.absolute(output), storage.absolute(shards_uri)
    shards.ShardStore.open(shards_uri, cfg)
    t, tc = cfg.train, cfg.tune
    # a local cluster: each concurrent trial's workers plus a CPU for its Ray Data reads
    ensure_ray(tc.max_concurrent_trials * (t.num_workers + 1) + 1)
    require_shared_storage(cfg, {"the search folder": output, "the shard store": shards_uri})
    trials_root = storage.join(output, "trials")
    fs, tune_root = storage.resolve(storage.join(output, "tune"))
    experiment = f"{tune_root}/{tc.name}"
    env = {k: os.environ[k] for k in storage.GCS_ENV if k in os.environ}
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=cfg.to_dict(), shards_uri=shards_uri, trials_root=trials_root, env=env),
        {"cpu": TRIAL_CPU})
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        log.info("resuming search %s: finished trials are kept, unfinished ones continue", experiment)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space(cfg),
            tune_config=tune.TuneConfig(metric=SCORE, mode="max", num_samples=tc.num_samples,
                                        search_alg=_searcher(cfg), scheduler=_scheduler(cfg)),
            run_config=tune.RunConfig(name=tc.name, storage_path=tune_root, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=t.max_failures)))
    grid = tuner.fit()
    results = [grid[i] for i in range(len(grid))]
    rows = _order([_row(r, cfg, trials_root) for r in results])
    histories = {(r.metrics or {}).get("trial_id"): r.metrics_dataframe for r in results}
    curves = {row["trial_id"]: histories[row["trial_id"]] for row in rows  # in leaderboard order
              if histories.get(row["trial_id"]) is not None and SCORE in histories[row["trial_id"]]}
    if not rows or math.isnan(rows[0][f"best_{SCORE}"]):
        raise RuntimeError(f"no trial of {experiment} reported {SCORE}; see the trial errors above")
    result = SearchResult(rows, _write_outputs(rows, curves, cfg, output))
    best = rows[0]
    export_uri, _ = stages.export(best["run"], storage.join(output, "best_export"))
    best_cfg = stages.run_config(best["run"])
    best_cfg.run.name = f"{tc.name}-best"
    result.outputs["best config"] = storage.join(output, "best_config.toml")
    storage.write_text(result.outputs["best config"], best_cfg.to_toml())
    result.outputs["best SavedModel"] = storage.join(export_uri, "saved_model")
    result.outputs["experiment"] = storage.join(output, "tune", tc.name)
    log.info("best trial %s: %s %.4f", best["trial_id"], SCORE, best[f"best_{SCORE}"])
    return result

