"""train and export: a run folder ``<output root>/<run.name>`` with its checkpoints, history, plots,
TensorBoard and resolved ``config.toml``; ``export/``, ``eval/`` and ``infer/`` are written beside them.
Also where a stage runs: here, or as a Ray task on a training node (``on_worker``)."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from aisd_ray.config import Config, load_config
from aisd_ray.core import provenance, storage
from aisd_ray.inference import input_kind
from aisd_ray.report import track

log = logging.getLogger(__name__)


def run_uri(cfg: Config, output_root: str) -> str:
    return storage.join(output_root, cfg.run.name)


def _check_resume(cfg: Config, run: str) -> None:
    """A rerun resumes the run's checkpoints: refuse one whose model differs from the run's."""
    from aisd_ray.config import ConfigError
    from aisd_ray.train import checkpoint as ckpt

    uri = storage.join(run, "config.toml")
    if not storage.exists(uri) or not ckpt.list_checkpoints(run):
        return
    old = run_config(run).to_dict()["model"]
    new = cfg.to_dict()["model"]
    changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
    if changed:
        raise ConfigError(f"{run}: this run's checkpoints hold another model ([model] {'; '.join(changed)}); "
                          "rerun with its config to resume, or give a new run.name or --output")


def train(cfg: Config, shards_uri: str, output_root: str, callbacks: tuple = (),
          verify_checksums: bool = True, store=None, allow_divergence: bool = False) -> dict[str, Any]:
    """Train (or resume) the run ``output_root/run.name``; return its last reported metrics.
    ``callbacks`` go to Ray Train (the ray backend only).

    A run that the divergence guard stopped (``train.on_collapse``) raises ``TrainingFailed``
    (the CLI exits 1) with the reason, on either backend, unless ``allow_divergence`` (a Tune
    trial: the search records it and goes on); its diverged epochs are never export candidates.

    Everything is checked before anything is written: the shard store (manifest against the
    config, every shard's size and SHA-256, once per command), that a worker's share fills a
    batch, and that a resumed run has the same model; the run's ``config.toml`` (and its store's
    input kind and training domain, ``input_kind.RUN_RECORD``, for its export) is written when
    training starts, so a failed command leaves an existing run as it was. ``store``: the
    command's already opened ``ShardStore`` (the pipeline opens it once for all its stages)."""
    from aisd_ray.config import ConfigError
    from aisd_ray.data.store import order, shards

    track.check(cfg)  # an MLflow tracker that does not answer, before anything is read or written
    shards_uri, output_root = storage.absolute(shards_uri), storage.absolute(output_root)
    store = store or shards.ShardStore.open(shards_uri, cfg, checksums=verify_checksums)
    workers = cfg.train.num_workers if cfg.train.backend == "ray" else 1
    share = order.share_size(store.records("train"), workers)
    if share < cfg.train.batch_size:
        raise ConfigError(f"[train] batch_size: {cfg.train.batch_size} is more than a worker's share of the "
                          f"{store.records('train')} training slices in {shards_uri} ({share} each on {workers} "
                          f"worker{'s' if workers > 1 else ''}); lower train.batch_size or train.num_workers")
    run = run_uri(cfg, output_root)
    if cfg.train.backend == "ray":
        _require_shared_storage(cfg, {"the output root": output_root, "the shard store": shards_uri})
    _check_resume(cfg, run)
    storage.ensure_dir(run)
    toml = cfg.to_toml()
    storage.write_text(storage.join(run, "config.toml"), toml)
    facts = provenance.facts(toml)
    storage.write_text(storage.join(run, "provenance.json"), json.dumps(facts, indent=2))
    input_kind.write_run_record(run, store.manifest)  # what export.json says it was trained on
    tracker = track.Tracker.start(cfg, run, facts)  # None unless run.mlflow_tracking_uri
    log.info("training run %s with the %s backend (%d worker%s)", run, cfg.train.backend, workers,
             "s" if workers > 1 else "")
    try:
        last = _train_on_backend(cfg, store, run, output_root, callbacks)
    except BaseException as exc:
        if tracker:
            if not isinstance(exc, KeyboardInterrupt):
                tracker.log_run_folder(run)
            tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    if tracker:
        tracker.log_run_folder(run)
        reason = str(last.get("stop_reason", ""))
        tracker.end("FAILED" if _diverged(reason) else "FINISHED", reason)
    if not allow_divergence:
        _fail_if_diverged(run, last)
    return last


def _train_on_backend(cfg: Config, store, run: str, output_root: str, callbacks: tuple) -> dict[str, Any]:
    """Train on ``train.backend``; the last epoch's row with its stop reason ({} if no epoch ran)."""
    if cfg.train.backend == "local":
        from aisd_ray.train.local import train_local

        state = train_local(cfg, store, run)
        if not state.history:
            return {}
        return {**state.history[-1], "stop_reason": state.stop_reason or f"reached {cfg.train.epochs} epochs"}
    from aisd_ray.train.ray_train import train_ray

    return dict(train_ray(cfg, store, output_root, run, callbacks).metrics or {})


def _diverged(reason: str) -> bool:
    from aisd_ray.train import checkpoint as ckpt

    return ckpt.diverged(reason)


def _require_shared_storage(cfg: Config, paths: dict[str, str]) -> None:
    from aisd_ray.train.ray_session import require_shared_storage

    require_shared_storage(cfg, paths)


def _fail_if_diverged(run: str, last: dict[str, Any]) -> None:
    from aisd_ray.train import TrainingFailed
    from aisd_ray.train import checkpoint as ckpt

    reason = str(last.get("stop_reason", ""))
    if not ckpt.diverged(reason):
        return
    best = ckpt.best_of(ckpt.list_checkpoints(run))
    kept = (f"export takes its best epoch before that ({best[1].get('epoch')})" if best else
            "no checkpoint is left to export")
    raise TrainingFailed(f"{run}: training stopped: {reason}; {kept}. A rerun of this run stays stopped: "
                         "train a new run (run.name or --output) with a lower train.learning_rate")


def run_config(run: str) -> Config:
    """The resolved config a run was trained with."""
    uri = storage.join(run, "config.toml")
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: not found; is {run} a training run folder?")
    with tempfile.TemporaryDirectory(prefix="aisd-config-") as tmp:
        local = Path(tmp) / "config.toml"
        local.write_bytes(storage.read_bytes(uri))
        return load_config(local)


def export(run: str, out_uri: str | None = None, shards_uri: str | None = None,
           on_worker: bool = False) -> tuple[str, dict[str, Any]]:
    """Export the run's best checkpoint to ``out_uri`` (default ``<run>/export``) and calibrate it
    on the valid split of its store (``evaluation/calibrate.py``: temperature and review threshold,
    ``calibration.json``; with ``on_worker`` as a Ray task on a training node, as evaluate):
    ``shards_uri``, else the run config's ``data.shards_dir`` when that store exists; an export
    without one is not calibrated (T = 1, no review flag), one log line."""
    from aisd_ray.data.store import shards
    from aisd_ray.inference.export import export_best

    out_uri = out_uri or storage.join(run, "export")
    cfg = run_config(run)
    checkpoint, metrics = export_best(cfg, run, out_uri)
    log.info("exported %s (epoch %s, val_lesion_dice %.4f) to %s", checkpoint, metrics.get("epoch"),
             metrics.get("val_lesion_dice", float("nan")), out_uri)
    store = shards_uri or cfg.data.shards_dir
    if store and storage.exists(storage.join(store, shards.MANIFEST)):
        from aisd_ray.evaluation.calibrate import calibrate

        on_node(cfg, on_worker, calibrate, storage.absolute(out_uri), storage.absolute(store), "valid",
                cfg.eval.batch_size, cfg.eval.tta)
    else:
        log.info("%s: not calibrated (no shard store known for %s): T = 1, no review threshold", out_uri, run)
    return out_uri, metrics


def on_node(cfg: Config, on_worker: bool, fn, *args, **kwargs):
    if not on_worker:
        return fn(*args, **kwargs)
    from aisd_ray.train.ray_session import run_on_worker

    return run_on_worker(cfg, fn, *args, **kwargs)
