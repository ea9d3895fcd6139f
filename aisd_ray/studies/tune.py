"""``aisd-ray tune``: a Ray Tune search in which every trial is a Ray Train run.

Ray 2.60 drives Train V2 runs from Tune only as function trainables: each trial calls
``TensorflowTrainer.fit()`` (through ``stages.train``) and a ``TuneReportCallback`` passes every
epoch's metrics up, so ASHA stops weak trials on the score that picks each run's best checkpoint
(``checkpoint.SCORE``: mean val Dice over the foreground classes). The experiment lives in the
configured storage (folder or ``gs://``); running the same command again restores it and runs
only what is unfinished.

Every trial gets a status (``trial_status``): ``ok``, ``below floor`` or ``collapsed`` (its best
val_score under ``tune.min_score``), ``diverged`` (the training loop's divergence guard stopped
it), ``error``. ``leaderboard.csv``, the log and the plots (``search.png``, ``curves.png``) name
it; only an ``ok`` trial can rank first. When the search ends the best trial is exported like a
single run and scored on the test split, beside the trial of the base config's own values
(``tune.include_default``), in ``summary.json``; ``best_config.toml`` (which ``aisd-ray train``
accepts) is written beside it. A search whose best trial is not ``ok`` raises ``TrainingFailed``
(the CLI exits 1) naming the trials, and exports nothing.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from aisd_ray import stages
from aisd_ray.config import WHOLE_NUMBER_KEYS, Config, apply_params, config_from_dict
from aisd_ray.core import storage
from aisd_ray.data.sources.layout import DataError
from aisd_ray.data.store import shards
from aisd_ray.evaluation.evaluate import evaluate_export
from aisd_ray.report import plots, track
from aisd_ray.scoring.metrics import COLLAPSED_BELOW
from aisd_ray.train import TrainingFailed
from aisd_ray.train.checkpoint import LEGACY_SCORE, SCORE, best_row, diverged, score_of
from aisd_ray.train.ray_session import ensure_ray, require_shared_storage, run_on_worker

log = logging.getLogger(__name__)
TRIAL_CPU = 0.01  # the trial function only waits on its Train run; zero is refused
STATUSES = ("ok", "below floor", "collapsed", "diverged", "error")
DEFAULT, SAMPLED = "base config", "sampled"  # the leaderboard's origin column


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


def default_point(cfg: Config) -> dict[str, Any] | None:
    """The base config's own values of the searched keys (the default configuration as a trial), or
    None: ``tune.include_default`` off, grid values in the space (a grid is its own list of points),
    or a kernel or dilation that is not square (a trial's values are)."""
    if not cfg.tune.include_default or any("grid" in spec for spec in cfg.tune.space.values()):
        return None
    point: dict[str, Any] = {}
    for key in cfg.tune.space:
        value = getattr(getattr(cfg, "model" if key != "learning_rate" else "train"), key)
        if isinstance(value, (tuple, list)):
            if len(set(value)) != 1:
                return None
            value = value[0]
        point[key] = int(value) if key in WHOLE_NUMBER_KEYS else float(value)
    return point


def _searcher(cfg: Config):
    """The search algorithm, limited to ``max_concurrent_trials`` at once; the default point first."""
    points = [p for p in [default_point(cfg)] if p]
    if cfg.tune.searcher == "random":  # a generator, which TuneConfig.max_concurrent_trials would not limit
        return BasicVariantGenerator(points_to_evaluate=points, random_state=cfg.tune.seed,
                                     max_concurrent=cfg.tune.max_concurrent_trials)
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ImportError("tune.searcher = 'optuna' needs the optuna package: pip install 'aisd-ray[optuna]'") from None
    if any("grid" in spec for spec in cfg.tune.space.values()):
        raise ValueError("tune.searcher = 'optuna' cannot take grid values; use choice")
    return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=points or None, seed=cfg.tune.seed),
                              max_concurrent=cfg.tune.max_concurrent_trials)


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
    judged: dict[str, Any] = field(default_factory=dict)  # _judge: best and default on the test split

    def verdict(self) -> str:
        """The best trial beside the default configuration, on validation and the test split."""
        lines = []
        for role in ("best", "default"):
            f = self.judged.get(role)
            if f:
                test = f.get("test") or (f"test lesion Dice {_cell(f.get('test lesion Dice', math.nan))}, test case "
                                         f"Dice (mean) {_cell(f.get('test case Dice (mean)', math.nan))}")
                lines.append(f"{role + ' trial':<14} {f['trial_id']} ({f['status']}, {f['epochs_run']} epochs): "
                             f"val lesion Dice {_cell(f['val lesion Dice'])}, {test}")
        if self.judged.get("best", {}).get("trial_id") == self.judged.get("default", {}).get("trial_id"):
            lines.append("the default configuration is the best trial: the search did not beat it")
        elif "beat_default" in self.judged:
            lines.append("the search " + ("beat" if self.judged["beat_default"] else "did not beat")
                         + " the default configuration on the test split")
        elif self.judged.get("best") and not self.judged.get("default"):
            lines.append("no default trial to compare with (tune.include_default off, grid values, or a "
                         "non-square kernel or dilation)")
        return "\n".join(lines)

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
    status = trial_status(row, cfg.tune.min_score, errored=result.error is not None)
    row = {"trial_id": trial_id, "status": status, "origin": SAMPLED, **row}
    row["run"] = storage.join(trials_root, trial_id)
    return row


def trial_status(row: dict[str, Any], min_score: float, errored: bool = False) -> str:
    """One of ``STATUSES`` for a leaderboard row (its ``best_val_score``, NaN when no epoch was a
    candidate, and ``stop_reason``):

    - ``error``: the trial raised (``errored``);
    - ``diverged``: the divergence guard stopped it (``checkpoint.diverged``: a non-finite loss,
      weights or optimizer state, or a collapse past ``train.max_rollbacks``), whatever it scored
      before;
    - ``collapsed``: no epoch was a candidate, or its best val_score is below ``min_score`` and
      below ``COLLAPSED_BELOW`` (0.1): its model finds next to no lesion;
    - ``below floor``: its best val_score lies in [0.1, ``min_score``);
    - ``ok``: otherwise. Only an ``ok`` trial is ever the search's answer."""
    if errored or str(row.get("stop_reason", "")).startswith("error:"):
        return "error"
    if diverged(row.get("stop_reason", "")):
        return "diverged"
    score = float(row.get(f"best_{SCORE}", math.nan))
    if math.isnan(score) or score < min_score:
        return "collapsed" if math.isnan(score) or score < COLLAPSED_BELOW else "below floor"
    return "ok"


def _order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first: trials that ended normally by score (collapsed ones fall to the end by their
    score), then diverged and failed ones; ties by trial id."""
    key = f"best_{SCORE}"
    return sorted(rows, key=lambda r: (r["status"] in ("diverged", "error"), math.isnan(r[key]),
                                       -r[key] if not math.isnan(r[key]) else 0, r["trial_id"]))


def _mark_default(rows: list[dict[str, Any]], point: dict[str, Any] | None) -> dict[str, Any] | None:
    """Mark (origin) and return the trial of the default point: the first trial id with its values."""
    matches = sorted((r for r in rows if point and all(_same(r.get(k), v) for k, v in point.items())),
                     key=lambda r: r["trial_id"])
    if matches:
        matches[0]["origin"] = DEFAULT
    return matches[0] if matches else None


def _same(a: Any, b: Any) -> bool:
    return a is not None and math.isclose(float(a), float(b), rel_tol=1e-9)


def _write_outputs(rows: list[dict[str, Any]], curves: dict[str, Any], cfg: Config, output: str) -> dict[str, str]:
    outputs = {}
    outputs["leaderboard"] = storage.join(output, "leaderboard.csv")
    storage.write_csv(outputs["leaderboard"], [{"rank": i + 1, **row} for i, row in enumerate(rows)],
                      ["rank", *rows[0]])

    score = f"best_{SCORE}"
    x_key = "learning_rate" if "learning_rate" in cfg.tune.space else None
    group = next((k for k in ("base_kernels", "dilation") if k in cfg.tune.space), None)
    series: dict[str, tuple[list, list]] = {}
    apart = []  # collapsed, diverged, failed trials: crosses of their own (at 0 when they have no score)
    for i, row in enumerate(rows):
        usable = row["status"] in ("ok", "below floor")
        label = (f"{group} {row[group]}" if group else "trial") if usable else row["status"]
        if not usable and label not in apart:
            apart.append(label)
        xs, ys = series.setdefault(label, ([], []))
        xs.append(row[x_key] if x_key else i + 1)
        ys.append(0.0 if math.isnan(row[score]) else row[score])
    outputs["search plot"] = storage.join(output, "search.png")
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    below = counts["below floor"]
    notes = ([f"{below} below tune.min_score {cfg.tune.min_score:g}"] if below else []) \
        + ([", ".join(f"{counts[s]} {s}" for s in apart) + ": crosses"] if apart else [])
    plots.scatter([(k, *series[k]) for k in sorted(k for k in series if k not in apart) + apart],
                  x_key or "trial (by rank)", f"best {SCORE}", outputs["search plot"], logx=x_key == "learning_rate",
                  title=f"{len(rows)} trials" + (f" ({'; '.join(notes)})" if notes else ""), crossed=apart)
    outputs["curves plot"] = storage.join(output, "curves.png")
    status = {row["trial_id"]: row["status"] for row in rows}
    default = {row["trial_id"] for row in rows if row["origin"] == DEFAULT}
    labels = {t: t + "".join(f" ({n})" for n in (DEFAULT if t in default else "",
                                                   "" if status[t] == "ok" else status[t])
                             if n) for t in curves}
    plots.lines([(labels[t], list(h["epoch"]), list(h[SCORE].astype(float))) for t, h in curves.items()],
                "epoch", SCORE, outputs["curves plot"], dashed=[labels[t] for t in curves if status[t] != "ok"],
                title="dashed: not ok (" + ", ".join(sorted({s for s in status.values() if s != "ok"})) + ")"
                if any(s != "ok" for s in status.values()) else "")
    return outputs


def search(cfg: Config, shards_uri: str, output: str) -> SearchResult:
    """Run (or resume) the search under ``output``; export the best trial and write the summaries."""
    output, shards_uri = storage.absolute(output), storage.absolute(shards_uri)
    store = shards.ShardStore.open(shards_uri, cfg)
    search_run = track.start_search(cfg, output)  # MLflow: the search's run, its trials' parent (None: off)
    try:
        result = _search(cfg, store, shards_uri, output, search_run)
    except BaseException as exc:  # a search with no answer, or an error: its tracked run ends FAILED
        if search_run:
            search_run.end("FAILED", (str(exc).splitlines() or [type(exc).__name__])[0])
        raise
    if search_run:
        track.end_search(search_run, cfg, result.rows, output)
    return result


def _search(cfg: Config, store: shards.ShardStore, shards_uri: str, output: str, search_run) -> SearchResult:
    """The search itself (``search``'s body, between its tracked run's start and end)."""
    t, tc = cfg.train, cfg.tune
    # a local cluster: each concurrent trial's workers plus a CPU for its Ray Data reads
    ensure_ray(tc.max_concurrent_trials * (t.num_workers + 1) + 1)
    require_shared_storage(cfg, {"the search folder": output, "the shard store": shards_uri})
    trials_root = storage.join(output, "trials")
    fs, tune_root = storage.resolve(storage.join(output, "tune"))
    experiment = f"{tune_root}/{tc.name}"
    env = {k: os.environ[k] for k in storage.GCS_ENV if k in os.environ}
    env.update({track.PARENT_ENV: search_run.run_id} if search_run else {})  # each trial's run: a child
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
    if not rows:
        raise TrainingFailed(f"search {tc.name}: no trial ran; nothing exported")
    default = _mark_default(rows, default_point(cfg))
    histories = {(r.metrics or {}).get("trial_id"): r.metrics_dataframe for r in results}
    curves = {row["trial_id"]: histories[row["trial_id"]] for row in rows  # in leaderboard order
              if histories.get(row["trial_id"]) is not None and SCORE in histories[row["trial_id"]]}
    for row in rows:
        (log.info if row["status"] == "ok" else log.warning)(
            "trial %s: %s (best %s %s at epoch %d of %d; %s)%s", row["trial_id"], row["status"].upper()
            if row["status"] != "ok" else "ok", SCORE, _cell(row[f"best_{SCORE}"]), row["best_epoch"],
            row["epochs_run"], row["stop_reason"], " [the base config's values]" if row is default else "")
    result = SearchResult(rows, _write_outputs(rows, curves, cfg, output))
    best = rows[0]
    if best["status"] != "ok":
        raise TrainingFailed(_no_answer(rows, tc, storage.join(output, "leaderboard.csv")))
    export_uri, _ = stages.export(best["run"], storage.join(output, "best_export"))
    best_cfg = stages.run_config(best["run"])
    best_cfg.run.name = f"{tc.name}-best"
    result.outputs["best config"] = storage.join(output, "best_config.toml")
    storage.write_text(result.outputs["best config"], best_cfg.to_toml())
    result.outputs["best SavedModel"] = storage.join(export_uri, "saved_model")
    log.info("best trial %s: %s %.4f", best["trial_id"], SCORE, best[f"best_{SCORE}"])
    result.judged = _judge(cfg, store, output, export_uri, best, default)
    result.outputs["summary"] = storage.join(output, "summary.json")
    storage.write_json(result.outputs["summary"], {
        "best": result.judged.get("best"), "default": result.judged.get("default"),
        "beat_default": result.judged.get("beat_default"), "leaderboard": rows})
    result.outputs["experiment"] = storage.join(output, "tune", tc.name)
    return result



def _no_answer(rows: list[dict[str, Any]], tc, leaderboard: str) -> str:
    """The one line a search with no ``ok`` trial ends with: every trial and its status."""
    named = "; ".join(f"{r['trial_id']} {r['status']} ({SCORE} {_cell(r[f'best_{SCORE}'])})" for r in rows)
    return (f"search {tc.name}: no trial reached tune.min_score = {tc.min_score:g} without collapsing or diverging "
            f"({named}); nothing exported (see {leaderboard})")


def _judge(cfg: Config, store: shards.ShardStore, output: str, best_export: str, best: dict[str, Any],
           default: dict[str, Any] | None) -> dict[str, Any]:
    """The best trial's export, and the default trial's (exported to ``default_export``), scored on
    the test split as the pipeline does (a Ray task on a training node): for each its val lesion
    Dice, test lesion Dice (pooled over the split) and mean case Dice (raw layout: per patient), and
    whether the best beat the default on the test split. Empty figures where the store has no test
    split or the default trial left no checkpoint to export (it diverged)."""
    judged: dict[str, Any] = {}
    if "test" not in store.manifest["splits"]:
        log.warning("the shard store has no test split: the best trial is not scored on one")
        return judged
    for role, row, export_uri in (("best", best, best_export), ("default", default, None)):
        if row is None:
            continue
        figures = {"trial_id": row["trial_id"], "status": row["status"], "epochs_run": row["epochs_run"],
                   "stop_reason": row["stop_reason"], "val lesion Dice": row["best_val_lesion_dice"]}
        judged[role] = figures
        if row is best and role == "default":  # the default won: scored once
            figures.update({k: v for k, v in judged["best"].items() if k.startswith("test")})
            continue
        if export_uri is None:
            try:
                export_uri, _ = stages.export(row["run"], storage.join(output, "default_export"))
            except DataError as exc:  # a default trial with no checkpoint to export (it diverged) is a finding
                figures["test"] = f"not scored: {str(exc).splitlines()[0][:200]}"
                continue
        report = run_on_worker(cfg, evaluate_export, storage.absolute(export_uri), store.uri,
                               storage.absolute(storage.join(output, f"{role}_eval")), "test", cfg.eval.batch_size,
                               False, role == "best", store=store)
        figures["test lesion Dice"] = report["lesion_dice"]
        figures["test case Dice (mean)"] = report.get("cases", {}).get("case_dice_mean", math.nan)
    if "test lesion Dice" in judged.get("default", {}):
        judged["beat_default"] = judged["best"]["test lesion Dice"] > judged["default"]["test lesion Dice"]
    return judged

