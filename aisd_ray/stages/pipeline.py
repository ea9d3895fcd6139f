"""pipeline and demo: prepare -> train -> export -> evaluate -> infer in one submission, and the
same on synthetic data (the README's first command)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aisd_ray.config import AISD_TEST_CASES, Config
from aisd_ray.core import storage
from aisd_ray.data.store.shards import ShardStore
from aisd_ray.inference.postprocess import describe
from aisd_ray.report import track
from aisd_ray.scoring.metrics import COLLAPSED_BELOW
from aisd_ray.stages.data import case_map, prepare_store, synthetic_source
from aisd_ray.stages.run import _require_shared_storage, export, on_node, run_uri, train
from aisd_ray.stages.score import infer

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    outputs: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        rows = list(self.outputs.items())
        rows += [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in self.figures.items()]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def pipeline(cfg: Config, output: str, progress: bool = True, result: DemoResult | None = None,
             started: float | None = None) -> DemoResult:
    """prepare -> train -> export -> evaluate (test split) -> infer, all under ``output``.

    The source is ``data.source_dir`` (either layout); inference runs on ``infer.images_dir``
    when set. Rerunning resumes: prepare is idempotent and training continues from its latest
    checkpoint, so a failed submission is simply submitted again. ``result`` and ``started``
    carry what a caller did before (the demo's synthetic source) into the summary.
    """
    track.check(cfg)  # before prepare writes anything (and before TensorFlow loads)
    from aisd_ray.evaluation.calibrate import test_figures
    from aisd_ray.evaluation.evaluate import evaluate_export

    started = started or time.time()
    result = result or DemoResult()
    stages = 5 if cfg.infer.images_dir else 4
    shards_uri = cfg.data.shards_dir or storage.join(output, "shards")
    if cfg.train.backend == "ray":  # before prepare writes anything; evaluate and infer run on a training node
        _require_shared_storage(cfg, {"the output root": output, "the shard store": shards_uri,
                                      "infer.images_dir": cfg.infer.images_dir,
                                      "infer.output_dir": cfg.infer.output_dir})
    log.info("stage 1/%d: prepare %s -> %s", stages, cfg.data.source_dir or "data.split_dirs", shards_uri)
    prepare_store(cfg, shards_uri, progress=progress, map=case_map(cfg))
    result.outputs["shards + manifest"] = shards_uri
    store = ShardStore.open(storage.absolute(shards_uri), cfg)  # checked once for train and evaluate

    log.info("stage 2/%d: train", stages)
    last = train(cfg, shards_uri, output, store=store)
    run = run_uri(cfg, output)
    result.outputs["run (checkpoints, plots)"] = run
    log.info("stage 3/%d: export", stages)
    export_uri, best = export(run, shards_uri=store.uri, on_worker=cfg.train.backend == "ray")  # calibrated on valid
    result.outputs["SavedModel"] = storage.join(export_uri, "saved_model")

    on_worker = cfg.train.backend == "ray"  # on a cluster: a (GPU) training node, not the head
    choice = None
    if (store.manifest.get("source") or {}).get("cases", {}).get("valid"):  # patients: choose on them (nnU-Net)
        log.info("stage 4/%d: post-processing chosen on the valid split's patients%s", stages,
                 " (a Ray task)" if on_worker else "")
        chosen = on_node(cfg, on_worker, evaluate_export, storage.absolute(export_uri), store.uri,
                         storage.absolute(storage.join(run, "eval-valid")), "valid", cfg.eval.batch_size, False,
                         False, store=store, tta=cfg.eval.tta, choose_postprocessing=True)
        choice = chosen["postprocessing"]
        result.outputs["post-processing choice"] = storage.join(export_uri, "postprocess.json")
    log.info("stage 4/%d: evaluate on the test split%s", stages, " (a Ray task)" if on_worker else "")
    eval_uri = storage.absolute(storage.join(run, "eval"))
    report = on_node(cfg, on_worker, evaluate_export, storage.absolute(export_uri), store.uri, eval_uri, "test",
                  cfg.eval.batch_size, progress and not on_worker, store=store, tta=cfg.eval.tta)
    result.outputs["metrics.json"] = storage.join(eval_uri, "metrics.json")
    tracker = track.Tracker.of_run(cfg, run)
    if tracker:
        tracker.log_test(report, eval_uri, export_uri, int(best.get("epoch", 0)))
    if cfg.infer.images_dir:
        log.info("stage 5/5: infer %s%s", cfg.infer.images_dir,
                 " (CT patients: a pool of Ray actors; images: a Ray task)" if on_worker else "")
        cfg.infer.output_dir = cfg.infer.output_dir or storage.join(run, "infer")
        done = infer(cfg, export_uri, on_worker, progress)
        result.outputs["test masks (NIfTI) + summary.json + preview.png" if done.cases
                       else "test masks + overlays"] = done.output

    collapsed = report["lesion_dice"] < COLLAPSED_BELOW  # a diverged run stopped at train() (TrainingFailed)
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
        **({"post-processing (chosen on valid)": describe(choice)} if choice else {}),
        "test dice_coef_multiclass (original, bg-incl.)": report["dice_coef_multiclass"],
        **test_figures(report),  # ECE before/after temperature scaling, the uncertainty ranking
        "wall time (s)": round(time.time() - started, 1),
    }
    storage.write_text(storage.join(output, "summary.json"),
                       json.dumps({"outputs": result.outputs, "figures": result.figures}, indent=2))
    return result


def _case_figures(cases: dict[str, Any]) -> dict[str, Any]:
    return {"test cases": cases["cases"],
            "test case Dice (mean)": cases["case_dice_mean"], "test case Dice (median)": cases["case_dice_median"],
            "test lesions found (3D)": f"{cases['lesions_found']} of {cases['lesions_true']}, "
                                       f"{cases['lesions_false']} false",
            "test volume correlation": cases["volume_correlation"],
            **({"test case HD95 (median, mm)": cases["case_hd95_mm_median"],
                "test case volume error (median, mL)": cases["case_avd_ml_median"]}
               if "case_hd95_mm_median" in cases else {})}


def demo(cfg: Config, output: str, progress: bool = True, source_root: str | None = None) -> DemoResult:
    """The pipeline on synthetic AISD-like data: what ``make demo`` runs (README, Two commands). The synthetic source
    goes to ``source_root/source`` (default: beside the outputs)."""
    started = time.time()
    track.check(cfg)  # before the synthetic source is written
    source, infer_input = synthetic_source(cfg, source_root or output, progress)
    cfg.data.source_dir, cfg.data.split_dirs = str(source), {}
    if cfg.synthetic.layout != "original" and cfg.data.test_cases == AISD_TEST_CASES:
        from aisd_ray.data.synthetic.slices import synthetic_test_cases  # the official test cases it holds, not all 52

        cfg.data.test_cases = tuple(synthetic_test_cases(cfg.synthetic))
    cfg.infer.images_dir = cfg.infer.images_dir or str(infer_input)
    return pipeline(cfg, output, progress, DemoResult(outputs={"synthetic source": str(source)}), started)
