"""``aisd-ray``: one command per stage, plus ``demo`` (all of them on synthetic data)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing on a CPU machine) unless -v asks for it
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from aisd_ray.cli.flags import (  # noqa: E402
    add_config, add_evaluate_arguments, add_infer_options, add_infer_outputs, add_prediction_options,
    add_prepare_arguments, add_run_options, add_strict, add_sweep_arguments, check_evaluate, flag_overrides,
    given_options, sweep_plan, synthetic_test_cases,
)
from aisd_ray.config import BACKENDS, SYNTHETIC_LAYOUTS, ConfigError, builtin_config, load_config  # noqa: E402
from aisd_ray.core import storage  # noqa: E402
from aisd_ray.core.provenance import package_version  # noqa: E402
from aisd_ray.core.quiet import LOG_DATEFMT, LOG_FORMAT, quiet_tensorflow_import  # noqa: E402
from aisd_ray.data.sources.layout import DataError  # noqa: E402
from aisd_ray.train import TrainingFailed  # noqa: E402

log = logging.getLogger("aisd_ray")


def _config(args) -> "Config":  # noqa: F821
    """The command's config: a file, a shipped config's name (``--config aisd512``), or the default,
    with --set's overrides and then the flags' (``flag_overrides``), validated once."""
    path = getattr(args, "config", None)
    if path and not os.path.exists(path) and os.sep not in path and not path.endswith((".toml", ".config")):
        path = builtin_config(path)  # a shipped name; an unknown one is an error listing them
    default = getattr(args, "default_config", None)
    path = path or (builtin_config(default) if default else None)
    sets = list(getattr(args, "set", None) or ())
    flags = flag_overrides(args)
    if args.command == "synthesize" and args.cases:
        flags += synthetic_test_cases(args, load_config(path, sets), sets)
    return load_config(path, sets + flags)


def cmd_inspect(args) -> None:
    cfg = _config(args)  # a bad config is reported before TensorFlow loads
    from aisd_ray.model.flexunet import build_flexunet

    model = build_flexunet(cfg.model)
    model.summary(line_length=110)
    print(f"Total parameters: {model.count_params():,}")


def cmd_synthesize(args) -> None:
    from aisd_ray import stages

    cfg = _config(args)
    s = cfg.synthetic
    if s.layout == "original" and (args.cases or args.slices):
        raise ConfigError(f"{'--cases' if args.cases else '--slices'}: the per-case layouts only; layout "
                          f"{s.layout!r} writes synthetic.num_train/num_valid/num_test slices")
    root = stages.synthesize(cfg, args.output, as_zip=args.layout == "raw-zip")
    print(f"synthetic AISD-like data ({args.layout or s.layout} layout) written to {root}")


def cmd_prepare(args) -> None:
    from aisd_ray import stages

    cfg = _config(args)
    out = cfg.data.shards_dir
    manifest = stages.prepare(cfg, verify=args.verify)
    for split, entry in manifest["splits"].items():
        print(f"{split:<6} {entry['records']:>6} slices  {len(entry['shards']):>3} shards  "
              f"lesion fraction {entry['lesion_fraction']:.4f}")
    print(f"manifest: {storage.join(out, 'manifest.json')}")


def cmd_train(args) -> None:
    from aisd_ray import stages

    cfg = _config(args)
    data = cfg.data.shards_dir
    if not data:
        raise ConfigError("give --data (a shards folder with manifest.json) or data.shards_dir")
    output = cfg.run.output_dir
    last = stages.train(cfg, data, output)
    run = stages.run_uri(cfg, output)
    print(f"run folder: {run}")
    if last:
        nan = float("nan")
        print(f"epoch {int(last.get('epoch', 0))}: loss {last.get('loss', nan):.4f}, val loss "
              f"{last.get('val_loss', nan):.4f}, val lesion Dice {last.get('val_lesion_dice', nan):.4f}; "
              f"{last.get('stop_reason') or 'done'} (every figure: {storage.join(run, 'history.csv')})")


def cmd_tune(args) -> None:
    cfg = _config(args)  # a bad config is reported before Ray loads
    from aisd_ray.report import track

    track.check(cfg)  # so is an MLflow tracker that does not answer
    from aisd_ray.studies.tune import search  # a Ray Tune search over Ray Train trials

    data = cfg.data.shards_dir
    if not data:
        raise ConfigError("give --data or data.shards_dir (a shard store from `aisd-ray prepare`)")
    result = search(cfg, data, args.output)
    print(result.table())
    print()
    if result.judged:
        print(result.verdict())
        print()
    for name, where in result.outputs.items():
        print(f"{name:<16} {where}")


def cmd_export(args) -> None:
    from aisd_ray import stages

    out, metrics = stages.export(args.run, args.output)
    print(f"export: {out} (best epoch {metrics.get('epoch')}, "
          f"val_lesion_dice {metrics.get('val_lesion_dice', float('nan')):.4f})")


def cmd_evaluate(args) -> None:
    check_evaluate(args)
    cfg = _config(args)  # the defaults and --batch-size, validated before TensorFlow loads
    from aisd_ray import stages

    report = stages.evaluate(cfg, args.output, model=args.model, shards=args.data, split=args.split or "test",
                             predictions=args.predictions, masks=args.masks, overlays=not args.no_overlays,
                             choose_postprocessing=args.choose_postprocessing, **given_options(args))
    if "images" not in report:  # label volumes, scored per case
        print(f"case Dice {report['case_dice_mean']:.4f} (mean), HD95 {report['case_hd95_mm_median']:.2f} mm "
              f"(median), volume error {report['case_avd_ml_median']:.2f} mL (median), lesion F1 "
              f"{report['case_lesion_f1_pooled']:.3f} over {report['cases']} cases")
    else:
        print(f"lesion Dice {report['lesion_dice']:.4f} (pooled), "
              f"{report['lesion_dice_per_image']:.4f} (per image) over {report['images']} images")
    for name in report.get("classes", []):
        print(f"{name} Dice {report[f'{name}_dice']:.4f} (pooled), {report[f'{name}_dice_per_image']:.4f} (per image)")
    if "postprocessing" in report:
        from aisd_ray.inference.postprocess import describe
        chosen = " (chosen here, written into the export)" if args.choose_postprocessing else ""
        print(f"tta {'on' if report['tta'] else 'off'}; case volumes post-processed: "
              f"{describe(report['postprocessing'])}{chosen}")
    print(f"metrics: {storage.join(args.output, 'metrics.json')}")


def cmd_infer(args) -> None:
    cfg = _config(args)  # --images/--input, --output, --batch-size, ... over the config's [infer] section
    if not (cfg.infer.images_dir and cfg.infer.output_dir):
        raise ConfigError("give --input (or --images) and --output (or a config whose [infer] section names them)")
    from aisd_ray import stages

    done = stages.infer(cfg, args.model, redo=args.redo, **given_options(args))
    if done.cases:
        for case in done.cases:
            print(f"{case['case_id']}: lesion {case['lesion_ml']:.2f} mL in {case['lesion_count']} lesion(s)")
        print(f"{len(done.cases)} case(s): NIfTI masks, cases/<case>/summary.json and preview.png, cases.csv "
              f"in {done.output}")
    else:
        print(f"{len(done.written)} masks written to {done.output}")


def cmd_pipeline(args) -> None:
    """``pipeline`` on a given source (with folds: the study, ``studies/study.py``), or ``demo`` on synthetic data."""
    from aisd_ray import stages
    from aisd_ray.studies import study

    cfg = _config(args)
    run = stages.demo if args.command == "demo" else study.study if cfg.data.folds else stages.pipeline
    print("\n" + run(cfg, args.output).table())


def cmd_benchmark(args) -> None:
    from aisd_ray.bench import benchmark
    from aisd_ray.core.quiet import import_tensorflow

    import_tensorflow()  # and its start-up chatter out of the report (-v keeps it)

    report = benchmark.run(args.output, tiny=args.tiny, overrides=args.set or (), object_store=args.object_store)
    print(benchmark.table(report))
    print(f"figures: {args.output}")


def cmd_gpu_probe(args) -> None:
    from aisd_ray.bench import gpu_probe

    if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
        from aisd_ray.core.quiet import import_tensorflow

        import_tensorflow()
    try:
        gpu_probe.run(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def cmd_sweep(args) -> None:
    from aisd_ray.studies import sweep, sweep_variants

    cfg = _config(args)
    plan, output = sweep_plan(args)
    # the demo over several seeds on both backends (a sweep.Plan), or the accuracy variants side by side
    if isinstance(plan, sweep_variants.VariantPlan):
        print(sweep_variants.table(sweep_variants.sweep_variants(cfg, output, plan, False)))
    else:
        print(sweep.table(sweep.sweep(cfg, output, plan, False)))
    print(f"figures: {storage.join(output, 'variants.json' if args.variants else 'sweep.json')}")


def cmd_crossval(args) -> None:
    cfg = _config(args)  # a bad config is reported before Ray loads
    from aisd_ray.studies import crossval

    summary = crossval.crossval(cfg, args.output, True)
    print(crossval.table(summary))


def cmd_configs(args) -> None:
    from aisd_ray.config import CONFIG_DIR

    paths = sorted(CONFIG_DIR.glob("*.toml"))
    for path in paths:
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"{path.stem:<{max(len(p.stem) for p in paths)}} {first}")
    print(f"\n(in {CONFIG_DIR}; use one with --config NAME)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # -v/-q before or after the subcommand
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="warnings and errors only")
    parser = argparse.ArgumentParser(prog="aisd-ray", description=__doc__, parents=[common])
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_parser(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    p = add_parser("configs", help="list the shipped configs (usable as --config NAME)")
    p.set_defaults(func=cmd_configs)

    p = add_parser("inspect", help="print the model summary and its parameter count")
    add_config(p, "demo")
    p.set_defaults(func=cmd_inspect)

    p = add_parser("synthesize", help="write synthetic AISD-like data (the original's tree, the raw release, or CT "
                                      "volumes in HU)")
    add_config(p, "demo")
    p.add_argument("--output", required=True, help="folder to write (the layout's tree inside)")
    p.add_argument("--layout", choices=(*SYNTHETIC_LAYOUTS, "raw-zip"),
                   help="original: the original FlexUNet's {train,valid,test}/{images,masks}; raw: the raw "
                        "release's image/ and mask/ per-case folders; raw-zip: image.zip and mask.zip; "
                        "nnunet: HU volumes as an nnU-Net raw dataset (NIfTI); dicom: a DICOM series folder "
                        "per case and labels/ (default: synthetic.layout)")
    p.add_argument("--cases", type=int, help="per-case layouts: number of cases (default: synthetic.num_cases)")
    p.add_argument("--slices", type=int, help="per-case layouts: slices per case (default: "
                                              "synthetic.slices_per_case)")
    p.set_defaults(func=cmd_synthesize)

    p = add_parser("prepare", help="shard AISD slices into TFRecord/Parquet + manifest.json")
    add_config(p)
    p.add_argument("--source", help="CT volumes (an nnU-Net raw dataset, DICOM case folders with labels/, the AISD "
                                    "DICOM release), the raw release (image.zip + mask.zip, or image/ + mask/) or "
                                    "{train,valid,test}/{images,masks}; a local folder or gs://BUCKET/PREFIX (else "
                                    "data.source_dir)")
    add_prepare_arguments(p)
    p.set_defaults(func=cmd_prepare)

    p = add_parser("train", help="train a FlexUNet (Ray Train, or --backend local)")
    add_config(p)
    p.add_argument("--data", help="shard store with manifest.json (else data.shards_dir)")
    p.add_argument("--output", help="output root; the run folder is OUTPUT/run.name (else run.output_dir)")
    p.add_argument("--backend", choices=BACKENDS, help="ray: Ray Train workers; local: this process, "
                   "no Ray (else train.backend, 'ray')")
    add_run_options(p)
    p.set_defaults(func=cmd_train)

    p = add_parser("tune", help="Ray Tune search ([tune] section); exports the best trial")
    add_config(p, "tune-demo")
    p.add_argument("--data", help="shard store with manifest.json (else data.shards_dir)")
    p.add_argument("--output", required=True,
                   help="search folder (or gs://): leaderboard.csv, best_config.toml, best_export/, trials/")
    add_run_options(p)
    p.set_defaults(func=cmd_tune)

    p = add_parser("export", help="export a run's best checkpoint as a SavedModel")
    p.add_argument("--run", required=True, help="run folder (holds config.toml and checkpoints)")
    p.add_argument("--output", help="export folder (default: RUN/export)")
    p.set_defaults(func=cmd_export)

    p = add_parser("evaluate", help="score an export on a split, or mask PNGs against ground truth")
    add_evaluate_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = add_parser("infer", help="segment CT patients (DICOM series, NIfTI) or a folder of images with an export")
    p.add_argument("--model", required=True, help="export folder")
    given = p.add_mutually_exclusive_group()
    given.add_argument("--input", help="a DICOM series folder, a .nii/.nii.gz file, or a folder of them (masks "
                                       "as NIfTI in the scan's geometry, lesion mL); a folder of images too")
    given.add_argument("--images", help="folder of images (else infer.images_dir)")
    p.add_argument("--output", help="mask folder (else infer.output_dir)")
    add_config(p)
    p.add_argument("--batch-size", type=int, help="images per prediction batch (else eval.batch_size, 4)")
    p.add_argument("--no-overlays", action="store_true", help="masks only, no overlays/ folder (else "
                                                               "infer.overlays)")
    add_infer_outputs(p)
    add_prediction_options(p)
    add_strict(p)
    add_infer_options(p)  # --workers, --redo
    p.set_defaults(func=cmd_infer)

    p = add_parser("benchmark", help="measure input pipeline, memory, training and inference speed")
    p.add_argument("--output", default="benchmark.json", help="JSON file of figures")
    p.add_argument("--tiny", action="store_true", help="seconds-scale sizes (what the tests run)")
    p.add_argument("--object-store", metavar="gs://BUCKET/PREFIX",
                   help="also time prepare into this object-store prefix (e.g. the emulator's)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.set_defaults(func=cmd_benchmark)

    p = add_parser("gpu-probe", help="the model's training step under plain Keras on any backend (JAX on a GPU "
                                     "machine without TensorFlow): images/s and fraction of peak per precision "
                                     "and batch size")
    from aisd_ray.bench.gpu_probe import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_gpu_probe)

    p = add_parser("sweep", help="train the demo over several seeds on both backends, or --variants: the input "
                   "channels, TTA, post-processing and the 5-fold ensemble side by side; the spread of each")
    add_sweep_arguments(p)
    p.set_defaults(func=cmd_sweep)

    p = add_parser("crossval", help="patient k-fold cross-validation: K fold runs at once on Ray, out-of-fold "
                   "metrics, post-processing chosen on them, the folds' ensemble exported; reruns resume")
    add_config(p)
    p.add_argument("--folds", type=int, required=True, help="number of patient folds K (nnU-Net: 5)")
    p.add_argument("--source", help="CT volumes: nnU-Net dataset, DICOM case folders, AISD (else data.source_dir)")
    p.add_argument("--output", required=True, help="folder: fold_K/, runs/, oof/, ensemble/, crossval.json")
    p.add_argument("--backend", choices=BACKENDS, help="ray: folds as concurrent Ray Train runs; local: one after "
                                                       "another here (else train.backend)")
    add_run_options(p)
    p.set_defaults(func=cmd_crossval)

    p = add_parser("pipeline", help="prepare, train, export, evaluate (and infer) in one go; reruns resume")
    add_config(p)
    p.add_argument("--source", help="the original's AISD tree or the raw AISD release, a folder or gs://BUCKET/PREFIX "
                   "(else data.source_dir)")
    p.add_argument("--output", required=True, help="output root: shards/, RUN.NAME/, summary.json")
    p.add_argument("--images", help="also segment this folder of images (else [infer] images_dir, if set)")
    p.add_argument("--folds", type=int, help="K >= 2: crossval with its ensemble, then every test patient segmented")
    p.add_argument("--backend", choices=BACKENDS, help="training backend (else train.backend, 'ray')")
    add_run_options(p)
    p.set_defaults(func=cmd_pipeline)

    p = add_parser("demo", help="the whole pipeline on synthetic data, end to end")
    add_config(p, "demo")
    p.add_argument("--output", default="runs/demo", help="output root (default: %(default)s)")
    p.add_argument("--backend", choices=BACKENDS, help="training backend (else train.backend, 'ray')")
    add_run_options(p)
    p.set_defaults(func=cmd_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if getattr(args, "verbose", False) else (
        logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    if level == logging.DEBUG and "tensorflow" not in sys.modules:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        os.environ["AISD_RAY_VERBOSE"] = "1"  # TensorFlow's start-up lines, here and in local Ray workers
    # whichever module loads TensorFlow (Keras, export, the TFRecord writer...), it loads quietly
    quiet_tensorflow_import(quiet=level != logging.DEBUG)
    if not sys.stdout.isatty():  # job logs, files, kubectl logs: Ray's worker-line prefixes without colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=LOG_DATEFMT)
    if level != logging.DEBUG:  # "Assets written to ..." on every export, and the like
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
    try:
        args.func(args)
    except (ConfigError, DataError, FileNotFoundError, storage.StorageError) as exc:
        print(f"aisd-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingFailed as exc:  # a diverged run; Ray Train workers failed past train.max_failures
        print(f"aisd-ray {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # storage gone, or a path that cannot be written (a file in the way, disk full)
        where = f"{exc.filename}: " if exc.filename else ""
        message = storage.explain(exc) or f"{where}{exc.strerror or exc}"
        print(f"aisd-ray {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0
