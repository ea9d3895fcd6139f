"""The pipeline's stages as plain functions: prepare -> train -> export -> evaluate -> infer.

The CLI and the ``jobs/`` entry points call these; each returns where its outputs went.
``pipeline`` chains them for one submission; ``demo`` is the pipeline on synthetic data.
A run folder is ``<output root>/<run.name>``: checkpoints, history, plots, TensorBoard, and
the resolved ``config.toml``; ``export/``, ``eval/`` and ``infer/`` are written beside them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aisd_ray import provenance, storage, track
from aisd_ray.config import AISD_TEST_CASES, VOLUME_LAYOUTS, Config, load_config
from aisd_ray.data.prepare import prepare
from aisd_ray.data.shards import ShardStore

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
    batch, and that a resumed run has the same model; the run's ``config.toml`` is written when
    training starts, so a failed command leaves an existing run as it was. ``store``: the
    command's already opened ``ShardStore`` (the pipeline opens it once for all its stages)."""
    from aisd_ray.config import ConfigError
    from aisd_ray.data import order, shards

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

    return dict(train_ray(cfg, store, output_root, callbacks).metrics or {})


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


def export(run: str, out_uri: str | None = None) -> tuple[str, dict[str, Any]]:
    from aisd_ray.export import export_best

    out_uri = out_uri or storage.join(run, "export")
    checkpoint, metrics = export_best(run_config(run), run, out_uri)
    log.info("exported %s (epoch %s, val_lesion_dice %.4f) to %s", checkpoint, metrics.get("epoch"),
             metrics.get("val_lesion_dice", float("nan")), out_uri)
    return out_uri, metrics


@dataclass
class DemoResult:
    outputs: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        rows = list(self.outputs.items())
        rows += [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in self.figures.items()]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# where each synthetic layout's source lies under the demo's source folder
_SYNTHETIC_FOLDERS = {"raw": "release", "original": "AISD", "nnunet": "Dataset001_AISDSynthetic", "dicom": "dicom"}


def _synthetic_source(cfg: Config, root: str, progress: bool) -> tuple[Path, Path]:
    """The demo's synthetic AISD-like source (``synthetic.layout``), written once per [synthetic]
    settings, and what its last stage segments: one test patient's slices (raw layout), the test
    images (original layout), or one test patient as a DICOM series (volume layouts). Source files
    are local input: in ``root`` for a folder, in a temp folder when the outputs go to gs://."""
    from aisd_ray.data.synthetic import synthetic_case_ids, synthetic_test_cases, write_synthetic

    wanted = json.dumps(cfg.to_dict()["synthetic"], sort_keys=True)
    if storage.is_local(root):
        source = Path(storage.resolve(root)[1]) / "source"
    else:
        digest = hashlib.sha256(wanted.encode()).hexdigest()[:12]
        source = Path(tempfile.gettempdir()) / f"aisd-ray-synthetic-{digest}"
    marker = source / "synthetic.json"
    layout = cfg.synthetic.layout
    patient = synthetic_test_cases(cfg.synthetic)[:1] or synthetic_case_ids(cfg.synthetic)[:1]
    infer_input = {"raw": source / "release" / "image" / synthetic_case_ids(cfg.synthetic)[0],
                   "original": source / "AISD" / "test" / "images"}.get(layout, source / "patient" / patient[0])
    if not (marker.is_file() and marker.read_text() == wanted):
        log.info("writing synthetic AISD-like %s (%s layout) to %s", "slices" if layout == "original" else "cases",
                 layout, source)
        if source.exists():
            shutil.rmtree(source)  # another [synthetic] setting's files must not mix in
        write_synthetic(source / "release" if layout == "raw" else source, cfg.synthetic, progress=progress)
        if layout in VOLUME_LAYOUTS:  # the patient the last stage segments, as a scanner gives it
            from aisd_ray.data import synthetic_volumes

            synthetic_volumes.write_patient_series(infer_input, cfg.synthetic, patient[0])
        marker.write_text(wanted)
    return source / _SYNTHETIC_FOLDERS[layout], infer_input


def pipeline(cfg: Config, output: str, progress: bool = True, result: DemoResult | None = None,
             started: float | None = None) -> DemoResult:
    """prepare -> train -> export -> evaluate (test split) -> infer, all under ``output``.

    The source is ``data.source_dir`` (either layout); inference runs on ``infer.images_dir``
    when set. Rerunning resumes: prepare is idempotent and training continues from its latest
    checkpoint, so a failed submission is simply submitted again. ``result`` and ``started``
    carry what a caller did before (the demo's synthetic source) into the summary.
    """
    track.check(cfg)  # before prepare writes anything (and before TensorFlow loads)
    from aisd_ray.evaluate import evaluate_export

    started = started or time.time()
    result = result or DemoResult()
    stages = 5 if cfg.infer.images_dir else 4
    shards_uri = cfg.data.shards_dir or storage.join(output, "shards")
    if cfg.train.backend == "ray":  # before prepare writes anything; evaluate and infer run on a training node
        _require_shared_storage(cfg, {"the output root": output, "the shard store": shards_uri,
                                      "infer.images_dir": cfg.infer.images_dir,
                                      "infer.output_dir": cfg.infer.output_dir})
    log.info("stage 1/%d: prepare %s -> %s", stages, cfg.data.source_dir or "data.split_dirs", shards_uri)
    prepare(cfg, shards_uri, progress=progress)
    result.outputs["shards + manifest"] = shards_uri
    store = ShardStore.open(storage.absolute(shards_uri), cfg)  # checked once for train and evaluate

    log.info("stage 2/%d: train", stages)
    last = train(cfg, shards_uri, output, store=store)
    run = run_uri(cfg, output)
    result.outputs["run (checkpoints, plots)"] = run
    log.info("stage 3/%d: export", stages)
    export_uri, best = export(run)
    result.outputs["SavedModel"] = storage.join(export_uri, "saved_model")

    on_worker = cfg.train.backend == "ray"  # on a cluster: a (GPU) training node, not the head
    log.info("stage 4/%d: evaluate on the test split%s", stages, " (a Ray task)" if on_worker else "")
    eval_uri = storage.absolute(storage.join(run, "eval"))
    report = _run(cfg, on_worker, evaluate_export, storage.absolute(export_uri), store.uri, eval_uri, "test",
                  cfg.eval.batch_size, progress and not on_worker, store=store)
    result.outputs["metrics.json"] = storage.join(eval_uri, "metrics.json")
    tracker = track.Tracker.of_run(cfg, run)
    if tracker:
        tracker.log_test(report, eval_uri, export_uri, int(best.get("epoch", 0)))
    if cfg.infer.images_dir:
        log.info("stage 5/5: infer %s%s", cfg.infer.images_dir, " (a Ray task)" if on_worker else "")
        cfg.infer.output_dir = cfg.infer.output_dir or storage.join(run, "infer")
        done = infer(cfg, export_uri, on_worker, progress)
        result.outputs["test masks (NIfTI) + summary.json + preview.png" if done.cases
                       else "test masks + overlays"] = done.output

    collapsed = report["lesion_dice"] < 0.1  # a diverged run stopped at train() (TrainingFailed)
    if collapsed:
        log.warning("\n%s\nTHIS RUN ENDED COLLAPSED: test lesion Dice %.3f (pooled); %s.\nIts model predicts (next "
                    "to) no lesion. See %s/history.csv; try another train.seed, a lower train.learning_rate or "
                    "train.on_collapse = 'rollback'.\n%s", "!" * 78, report["lesion_dice"],
                    last.get("stop_reason") or "training ended normally", run, "!" * 78)
    result.figures = {
        "epochs run": int(last.get("epoch", 0)),
        "best epoch": int(best.get("epoch", 0)),
        "stop reason": str(last.get("stop_reason", "")),
        "rollbacks": int(last.get("rollbacks", 0)),
        "collapsed": bool(collapsed),
        "val lesion Dice (best)": float(best.get("val_lesion_dice", float("nan"))),
        "test lesion Dice (pooled)": report["lesion_dice"],
        "test lesion Dice (per image)": report["lesion_dice_per_image"],
        **(_case_figures(report["cases"]) if "cases" in report else {}),
        "test dice_coef_multiclass (original, bg-incl.)": report["dice_coef_multiclass"],
        "wall time (s)": round(time.time() - started, 1),
    }
    storage.write_text(storage.join(output, "summary.json"),
                       json.dumps({"outputs": result.outputs, "figures": result.figures}, indent=2))
    return result


@dataclass
class Inferred:
    """What ``infer`` wrote: mask file names (images) or per-case summaries (CT patients)."""

    output: str
    written: list[str] = field(default_factory=list)
    cases: list[dict[str, Any]] = field(default_factory=list)


def infer(cfg: Config, export_uri: str, on_worker: bool = False, progress: bool = True) -> Inferred:
    """Segment ``infer.images_dir`` into ``infer.output_dir`` with an export: CT patients (a DICOM
    series folder, a NIfTI file, or a folder of them) give NIfTI masks in the scan's geometry with
    lesion volumes (``infer_volumes``); a folder of images gives mask PNGs (``infer``). With
    ``on_worker``, as a Ray task on a training node."""
    from aisd_ray.infer_volumes import is_volume_input

    source, out = cfg.infer.images_dir, storage.absolute(cfg.infer.output_dir)
    if storage.is_local(source) and is_volume_input(source):
        from aisd_ray.infer_volumes import infer_volumes

        cases = _run(cfg, on_worker, infer_volumes, storage.absolute(export_uri), storage.absolute(source), out,
                     cfg.eval.batch_size, cfg.infer.probabilities, progress=progress and not on_worker)
        return Inferred(out, cases=cases)
    from aisd_ray.infer import infer_folder

    written = _run(cfg, on_worker, infer_folder, storage.absolute(export_uri), storage.absolute(source), out,
                   cfg.eval.batch_size, overlays=cfg.infer.overlays, progress=progress and not on_worker)
    return Inferred(out, written=written)


def _run(cfg: Config, on_worker: bool, fn, *args, **kwargs):
    if not on_worker:
        return fn(*args, **kwargs)
    from aisd_ray.train.ray_train import run_on_worker

    return run_on_worker(cfg, fn, *args, **kwargs)


def _case_figures(cases: dict[str, Any]) -> dict[str, Any]:
    return {"test cases": cases["cases"],
            "test case Dice (mean)": cases["case_dice_mean"], "test case Dice (median)": cases["case_dice_median"],
            "test lesions found (3D)": f"{cases['lesions_found']} of {cases['lesions_true']}, "
                                       f"{cases['lesions_false']} false",
            "test volume correlation": cases["volume_correlation"]}


def demo(cfg: Config, output: str, progress: bool = True, source_root: str | None = None) -> DemoResult:
    """The pipeline on synthetic AISD-like data: what ``make demo`` runs (README, Two commands). The synthetic source
    goes to ``source_root/source`` (default: beside the outputs)."""
    started = time.time()
    track.check(cfg)  # before the synthetic source is written
    source, infer_input = _synthetic_source(cfg, source_root or output, progress)
    cfg.data.source_dir, cfg.data.split_dirs = str(source), {}
    if cfg.synthetic.layout != "original" and cfg.data.test_cases == AISD_TEST_CASES:
        from aisd_ray.data.synthetic import synthetic_test_cases  # the official test cases it holds, not all 52

        cfg.data.test_cases = tuple(synthetic_test_cases(cfg.synthetic))
    cfg.infer.images_dir = cfg.infer.images_dir or str(infer_input)
    return pipeline(cfg, output, progress, DemoResult(outputs={"synthetic source": str(source)}), started)
