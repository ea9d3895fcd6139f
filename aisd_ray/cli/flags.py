"""Flags are overrides: the CLI's flags that set a config value, as ``--set``'s overrides.

A flag such as ``train --backend ray`` does not write into a config that was already validated:
it becomes the override ``train.backend="ray"``, appended after the user's ``--set`` ones and
applied, typed and validated with them by ``config.load_config`` - one path. So a value the
config refuses is refused the same way (exit 2, one line) whether it came from a flag or from
``--set``, before anything is written; the error names the flag as the user gave it
(``--backend ray (on tiny.toml): [train] jit_compile: ...``).
"""

from __future__ import annotations

import argparse
import shlex

import tomli_w

from aisd_ray.config import Config, ConfigError


def _source(folder: str) -> dict:
    return {"data.source_dir": folder, "data.split_dirs": {}}  # the folder replaces any per-split folders


# Every flag that sets a config value, per command: argparse dest -> the config key it sets, or a
# function of the flag's value giving {key: value}. A flag that is not given sets nothing.
_SHARED = {"shared_fs": lambda _: {"run.shared_filesystem": True}}
_TTA = {"tta": lambda _: {"eval.tta": True}, "no_tta": lambda _: {"eval.tta": False},
        "brain_mask": lambda _: {"eval.brain_mask": True}, "no_brain_mask": lambda _: {"eval.brain_mask": False}}
FLAG_KEYS = {
    "synthesize": {"layout": lambda layout: {"synthetic.layout": {"raw-zip": "raw"}.get(layout, layout)},
                   "cases": "synthetic.num_cases", "slices": "synthetic.slices_per_case"},
    "prepare": {"source": _source, "output": "data.shards_dir", "workers": "data.prepare_workers"},
    "train": {"data": "data.shards_dir", "output": "run.output_dir", "backend": "train.backend",
              "mlflow": "run.mlflow_tracking_uri", **_SHARED},
    "tune": {"data": "data.shards_dir", "mlflow": "run.mlflow_tracking_uri", **_SHARED},
    "evaluate": {"batch_size": "eval.batch_size", **_TTA},
    "infer": {"images": "infer.images_dir", "input": "infer.images_dir", "output": "infer.output_dir",
              "batch_size": "eval.batch_size", "no_overlays": lambda _: {"infer.overlays": False},
              "probabilities": lambda _: {"infer.probabilities": True},
              "dicom_seg": lambda _: {"infer.dicom_seg": True},
              "uncertainty": lambda _: {"infer.uncertainty": True}, "workers": "infer.workers", **_TTA},
    "pipeline": {"source": _source, "images": "infer.images_dir", "folds": "data.folds", "backend": "train.backend",
                 "mlflow": "run.mlflow_tracking_uri", **_SHARED},
    "crossval": {"folds": "data.folds", "source": _source, "backend": "train.backend",
                 "mlflow": "run.mlflow_tracking_uri", **_SHARED},
    "demo": {"backend": "train.backend", "mlflow": "run.mlflow_tracking_uri", **_SHARED},
}


def _toml_value(value) -> str:
    """``value`` as TOML text that --set's parser reads back exactly (any path, quotes, spaces, gs://)."""
    if value == {}:
        return "{}"
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def flag_overrides(args) -> list[tuple[str, str]]:
    """The command's flags as overrides: ("section.key=value", "--flag value") pairs, for
    ``load_config``, whose errors then name the flag. A key set by both a flag and --set is refused."""
    overrides = []
    for dest, target in FLAG_KEYS.get(args.command, {}).items():
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        flag = "--" + dest.replace("_", "-")
        shown = flag if value is True else f"{flag} {shlex.quote(str(value))}"
        for key, setting in (target(value) if callable(target) else {target: value}).items():
            overrides.append((f"{key}={_toml_value(setting)}", shown))
    set_keys = {item.partition("=")[0].strip(): item for item in getattr(args, "set", None) or ()}
    for item, shown in overrides:
        key = item.partition("=")[0]
        if key in set_keys:
            raise ConfigError(f"{shown} and --set {set_keys[key]} both set [{key.replace('.', '] ', 1)}: give one")
    return overrides


def synthetic_test_cases(args, base: Config, sets: list[str]) -> list[tuple[str, str]]:
    """``synthesize --cases N`` on the raw layout, where the config has at least N official test
    cases and no --set gives their number: the override for about the release's share of test
    cases (a fifth, at least 1, fewer than N). ``base``: the config without the flags."""
    layout = {"raw-zip": "raw"}.get(args.layout, args.layout) or base.synthetic.layout
    if (layout == "original" or base.synthetic.num_test_cases < args.cases
            or any(item.partition("=")[0].strip() == "synthetic.num_test_cases" for item in sets)):
        return []
    return [(f"synthetic.num_test_cases={min(max(1, args.cases // 5), args.cases - 1)}", f"--cases {args.cases}")]


def refuse(args, why: str, *dests: str) -> None:
    """Options the command would ignore in this mode are an error, never silently dropped."""
    given = ["--" + d.replace("_", "-") for d in dests if getattr(args, d, None) not in (None, False, [])]
    if given:
        raise ConfigError(f"{', '.join(given)}: not used {why}")


def add_strict(p: argparse.ArgumentParser) -> None:
    """--strict: a QA warning (``data/qa.py``) refuses the case, exit 2 with one line."""
    p.add_argument("--strict", action="store_true", help="CT volumes: refuse a case the QA gate warns of (outside "
                   "the export's training domain, a contrast agent named, not a head), with one line naming the "
                   "case, the check, its value and the training range")


def add_infer_outputs(p: argparse.ArgumentParser) -> None:
    """``infer``'s optional outputs for CT patients: --probabilities, --uncertainty (NIfTI maps) and
    --dicom-seg."""
    p.add_argument("--probabilities", action="store_true", help="CT patients: also each case's lesion "
                   "probability map, calibrated (else infer.probabilities)")
    p.add_argument("--uncertainty", action="store_true", help="CT patients: also each case's uncertainty map, "
                   "the normalised predictive entropy 0..1 (else infer.uncertainty)")
    p.add_argument("--dicom-seg", action="store_true", help="DICOM series inputs: also each case's mask as a "
                   "DICOM Segmentation on the series' own slices, cases/<case>/seg.dcm (else infer.dicom_seg). It "
                   "carries the series' patient and study identity (to be filed beside it): off by default")


def add_infer_options(p: argparse.ArgumentParser) -> None:
    """``infer``'s options for a cohort of CT patients: --workers (``infer.workers``) and --redo."""
    p.add_argument("--workers", type=int, help="CT patients on a Ray cluster: Ray actors, each loading the export "
                   "once (else infer.workers; 0: the cluster's GPUs, else half its CPUs); given without a cluster, "
                   "a local Ray is started")
    p.add_argument("--redo", action="store_true", help="CT patients: segment every case again (else the cases "
                   "already complete in --output for the same export and settings are kept)")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """``evaluate``'s options: an export on a split, or predictions against masks (``check_evaluate``)."""
    add_config(p)
    p.add_argument("--model", help="export folder")
    p.add_argument("--data", help="shard store")
    p.add_argument("--split", help="split of the shard store to score (default: test)")
    p.add_argument("--batch-size", type=int, help="images per prediction batch (else eval.batch_size, 4)")
    p.add_argument("--predictions", help="folder of predicted mask PNGs, or of <case>.nii.gz label volumes "
                                         "(no model needed)")
    p.add_argument("--masks", help="folder of ground-truth mask PNGs, or of <case>.nii.gz label volumes (scored "
                                   "per case in mm and mL)")
    p.add_argument("--no-overlays", action="store_true", help="no overlays/ folder (found, false and missed "
                                                               "lesion pixels per slice)")
    add_prediction_options(p)
    add_strict(p)
    p.add_argument("--choose-postprocessing", action="store_true", help="with --split valid: choose the "
                   "post-processing (none, remove small lesions, keep the largest) on the split's cases and "
                   "write it into the export as postprocess.json")
    p.add_argument("--output", required=True, help="folder for metrics.json, evaluation.csv, per_image.csv")


def check_evaluate(args) -> None:
    """``evaluate``'s two modes, an export on a split or predictions against masks: an option of the
    other mode, a missing one, or --choose-postprocessing off the valid split is refused."""
    if args.predictions:
        refuse(args, "with --predictions (masks are scored as they are)",
               "model", "data", "split", "batch_size", "no_overlays", "tta", "no_tta", "choose_postprocessing",
               "strict", "brain_mask", "no_brain_mask")
        if not args.masks:
            raise ConfigError("--predictions needs --masks (the ground-truth mask folder)")
        return
    refuse(args, "with --model (the export holds its own config; the batch size is --batch-size)",
           "config", "set", "masks")
    if not (args.model and args.data):
        raise ConfigError("give --model EXPORT_DIR --data SHARDS, or --predictions DIR --masks DIR")
    if args.choose_postprocessing and args.split != "valid":
        raise ConfigError("--choose-postprocessing: on --split valid only (the test split must not choose "
                          "what it is scored with)")


def add_config(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--config and --set, the two ways every command takes its config."""
    p.add_argument("--config", help="TOML file, the original's train_eval_infer.config (INI), or a shipped "
                   "config's name (see `aisd-ray configs`)" + (f"; default: '{default}'" if default else ""))
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set train.epochs=3")
    p.set_defaults(default_config=default)


def add_tta(p: argparse.ArgumentParser) -> None:
    """--tta / --no-tta: mirroring test-time augmentation on or off (``eval.tta``)."""
    both = p.add_mutually_exclusive_group()
    both.add_argument("--tta", action="store_true", help="average each prediction with that of the image's "
                      "left-right mirror, twice the compute (else as the export records it: its training's eval.tta)")
    both.add_argument("--no-tta", action="store_true", help="plain predictions")


def given_tta(args) -> bool | None:
    """--tta: True, --no-tta: False, neither: None (the export's own choice, its ``tta``)."""
    return True if getattr(args, "tta", False) else False if getattr(args, "no_tta", False) else None


def add_prediction_options(p: argparse.ArgumentParser) -> None:
    """How an export predicts, for ``infer`` and ``evaluate --model``: --tta/--no-tta and
    --brain-mask/--no-brain-mask (``eval.brain_mask``, ``inference/brain_mask.py``)."""
    add_tta(p)
    both = p.add_mutually_exclusive_group()
    both.add_argument("--brain-mask", action="store_true", help="CT volumes: remove predicted lesion voxels "
                      "outside the brain (the skull's intracranial space, from HU; else as the export records it: "
                      "its training's eval.brain_mask, on by default); a store of PNG slices has no mask")
    both.add_argument("--no-brain-mask", action="store_true", help="keep lesion voxels outside the brain")


def given_options(args) -> dict[str, bool | None]:
    """The options ``infer`` and ``evaluate --model`` share, as ``stages`` takes them: ``tta`` and
    ``brain_mask`` as given (True, False) or not (None: as the export records it), and ``strict``."""
    brain = True if getattr(args, "brain_mask", False) else False if getattr(args, "no_brain_mask", False) else None
    return {"tta": given_tta(args), "brain_mask": brain, "strict": bool(getattr(args, "strict", False))}


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of the commands that run training on a cluster: --mlflow and --shared-fs."""
    p.add_argument("--mlflow", metavar="URI", help="also log the run to this MLflow tracking server, e.g. "
                   "http://mlflow:5000: parameters, per-epoch metrics, artifacts (else run.mlflow_tracking_uri; "
                   "default: no tracking)")
    p.add_argument("--shared-fs", action="store_true", help="the local paths given are mounted on every node of "
                   "the Ray cluster (NFS): allow them on a multi-node cluster (run.shared_filesystem)")


def seeds(text: str) -> tuple[int, ...]:
    """An argparse type: "1,2,3" -> (1, 2, 3)."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """``sweep``'s options: the seeds of the backend sweep, or ``--variants``."""
    add_config(p, "demo")
    p.add_argument("--output", help="sweep folder: one output folder per run, sweep.json or variants.json "
                                    "(default: runs/sweep, with --variants runs/variants)")
    p.add_argument("--variants", action="store_true", help="compare the input channel modes, mirroring TTA, "
                   "post-processing and the 5-fold ensemble against the original's input, every one over "
                   "--train-seeds x --synthetic-seeds on the local backend (variants.json)")
    p.add_argument("--train-seeds", type=seeds, default=(1, 2, 3), metavar="N,N,...",
                   help="train.seed values on the local backend (default: 1,2,3)")
    p.add_argument("--synthetic-seeds", type=seeds, default=(2024, 7), metavar="N,N,...",
                   help="synthetic.seed values (data sets) for the local runs; the Ray runs use the first "
                        "(default: 2024,7)")
    p.add_argument("--ray-train-seeds", type=seeds, metavar="N,N,...",
                   help="train.seed values on the Ray backend; empty to skip it (default: 1,2,3)")
    p.add_argument("--ray-workers", type=int, help="Ray Train workers per Ray run (default: 2)")


def sweep_plan(args):
    """(plan, output folder) of ``sweep``: a ``sweep_variants.VariantPlan`` with --variants (which
    refuses the Ray options: its runs are local), else a ``sweep.Plan``. ConfigError for no seeds."""
    from aisd_ray.studies import sweep, sweep_variants

    if args.variants:
        refuse(args, "with --variants (every variant trains on the local backend)", "ray_train_seeds", "ray_workers")
        plan = sweep_variants.VariantPlan(train_seeds=args.train_seeds, synthetic_seeds=args.synthetic_seeds)
        ray_seeds = ()
    else:
        ray_seeds = (1, 2, 3) if args.ray_train_seeds is None else args.ray_train_seeds
        plan = sweep.Plan(train_seeds=args.train_seeds, synthetic_seeds=args.synthetic_seeds,
                          ray_train_seeds=ray_seeds, ray_workers=args.ray_workers or 2)
    if not plan.synthetic_seeds or not (plan.train_seeds or ray_seeds):
        raise ConfigError("give at least one --synthetic-seeds and one --train-seeds"
                          + ("" if args.variants else " or --ray-train-seeds"))
    return plan, args.output or ("runs/variants" if args.variants else "runs/sweep")


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    """``prepare``'s --output, --workers and --verify (after --source)."""
    p.add_argument("--output", help="shard store (else data.shards_dir)")
    p.add_argument("--workers", type=int, help="CT volumes: processes reading the cases side by side (else "
                                               "data.prepare_workers; 0: the CPU count); Ray tasks on a running "
                                               "Ray with train.backend = 'ray'")
    p.add_argument("--verify", action="store_true", help="read every shard of an existing store and check its "
                                                         "SHA-256 (else only shards whose size or time changed)")
