"""Flags are overrides: a flag that sets a config value goes through --set's path (typed,
validated, refused with one line) before anything is written, and no option is silently dropped."""

import tomllib
from pathlib import Path

import pytest
import tomli_w

from aisd_ray.cli import build_parser, main
from aisd_ray.cli.commands import _config
from aisd_ray.config import builtin_config, load_config

TINY = str(builtin_config("tiny"))


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture
def xla_config(tmp_path) -> Path:
    """The tiny config on the local backend with XLA and BatchNorm on: valid there, refused by
    validation on Ray with 2 workers (XLA cannot compile the synchronised BatchNorm)."""
    data = tomllib.loads(Path(TINY).read_text())
    data["train"].update(backend="local", jit_compile=True)
    data["model"]["normalization"] = True
    path = tmp_path / "xla.toml"
    path.write_text(tomli_w.dumps(data))
    assert load_config(path).train.backend == "local"  # valid as written
    return path


@pytest.mark.parametrize("command", ["train", "pipeline", "demo"])
def test_backend_flag_is_refused_exactly_like_set(xla_config, tmp_path, capsys, command):
    out = tmp_path / "out"
    where = {"train": ["--data", str(tmp_path / "shards"), "--output", str(out)],
             "pipeline": ["--source", str(tmp_path / "src"), "--output", str(out)],
             "demo": ["--output", str(out)]}[command]
    args = [command, "--config", str(xla_config), *where]
    assert main([*args, "--set", "train.backend=ray"]) == 2
    by_set = error_line(capsys)
    assert main([*args, "--backend", "ray"]) == 2
    by_flag = error_line(capsys)
    assert by_set == (f"aisd-ray {command}: error: --set train.backend=ray (on {xla_config}): [train] jit_compile: "
                      "XLA cannot compile the synchronised BatchNorm of model.normalization across workers: turn "
                      "one of them off, or train on one worker")
    assert by_flag == by_set.replace("--set train.backend=ray", "--backend ray")
    assert not out.exists()  # no run folder, no config.toml, no synthetic source


def test_flag_values_keep_their_type_and_text(tmp_path):
    odd = tmp_path / "it's a \"tree\" = 2024"
    for source in (str(odd), "gs://bucket/AISD release/v1", "2024", "true", "[1, 2]"):
        args = build_parser().parse_args(["prepare", "--config", "tiny", "--source", source, "--output", source])
        cfg = _config(args)
        assert (cfg.data.source_dir, cfg.data.shards_dir, cfg.data.split_dirs) == (source, source, {})
    cfg = _config(build_parser().parse_args(["synthesize", "--config", "tiny", "--output", "x", "--layout",
                                             "raw-zip", "--cases", "3", "--slices", "2"]))
    s = cfg.synthetic
    assert (s.layout, s.num_cases, s.slices_per_case, s.num_test_cases) == ("raw", 3, 2, 1)
    cfg = _config(build_parser().parse_args(["infer", "--model", "m", "--config", "tiny", "--images", "i",
                                             "--output", "o", "--batch-size", "2", "--no-overlays"]))
    assert (cfg.infer.images_dir, cfg.infer.output_dir, cfg.eval.batch_size, cfg.infer.overlays) == ("i", "o", 2, False)
    for command in (["infer", "--model", "m", "--images", "i"], ["evaluate", "--model", "m", "--data", "d",
                                                                "--output", "o"]):
        for flags, tta in (([], True), (["--tta"], True), (["--no-tta"], False)):
            assert _config(build_parser().parse_args([*command, *flags])).eval.tta is tta
    assert _config(build_parser().parse_args(["infer", "--model", "m", "--set", "eval.tta=true"])).eval.tta is True


def test_a_folder_with_quotes_and_spaces_prepares_through_the_flag(synthetic_root, tmp_path, capsys):
    odd = tmp_path / "it's a \"tree\" = 1"
    odd.symlink_to(synthetic_root, target_is_directory=True)
    assert main(["prepare", "--config", "tiny", "--source", str(odd), "--output", str(odd) + " shards"]) == 0
    assert f"manifest: {odd} shards/manifest.json" in capsys.readouterr().out


@pytest.mark.parametrize("args, line", [
    (["train", "--config", "tiny", "--data", "d", "--output", "{out}", "--backend", "local",
      "--set", "train.backend='ray'"],
     "aisd-ray train: error: --backend local and --set train.backend='ray' both set [train] backend: give one"),
    (["synthesize", "--config", "tiny", "--output", "{out}", "--layout", "raw", "--cases", "0"],
     "aisd-ray synthesize: error: --cases 0 (on {tiny}): [synthetic] num_cases: must be >= 1, got 0"),
    (["synthesize", "--config", "tiny", "--output", "{out}", "--layout", "original", "--slices", "3"],
     "aisd-ray synthesize: error: --slices: the per-case layouts only; layout 'original' writes "
     "synthetic.num_train/num_valid/num_test slices"),
    (["infer", "--model", "m", "--images", "i", "--output", "{out}", "--batch-size", "0"],
     "aisd-ray infer: error: --batch-size 0 (on <defaults>): [eval] batch_size: must be >= 1, got 0"),
    (["infer", "--model", "m", "--config", "nosuch", "--images", "i", "--output", "{out}"],
     "aisd-ray infer: error: no built-in config 'nosuch' (known: aisd512, aisd512-recommended, demo, tiny, tune-demo)"),
    (["evaluate", "--model", "m", "--data", "d", "--config", "tiny", "--set", "eval.batch_size=2",
      "--output", "{out}"],
     "aisd-ray evaluate: error: --config, --set: not used with --model (the export holds its own config; "
     "the batch size is --batch-size)"),
    (["evaluate", "--predictions", "p", "--masks", "m", "--split", "valid", "--batch-size", "2", "--no-overlays",
      "--output", "{out}"],
     "aisd-ray evaluate: error: --split, --batch-size, --no-overlays: not used with --predictions (masks are "
     "scored as they are)"),
    (["evaluate", "--predictions", "p", "--masks", "m", "--no-tta", "--output", "{out}"],
     "aisd-ray evaluate: error: --no-tta: not used with --predictions (masks are scored as they are)"),
    (["evaluate", "--model", "m", "--data", "d", "--choose-postprocessing", "--output", "{out}"],
     "aisd-ray evaluate: error: --choose-postprocessing: on --split valid only (the test split must not choose "
     "what it is scored with)"),
    (["infer", "--model", "m", "--images", "i", "--output", "{out}", "--no-tta", "--set", "eval.tta=true"],
     "aisd-ray infer: error: --no-tta and --set eval.tta=true both set [eval] tta: give one"),
])
def test_an_option_the_command_would_ignore_or_a_bad_flag_value_is_refused(tmp_path, capsys, args, line):
    out = tmp_path / "out"
    assert main([a.format(out=out) for a in args]) == 2
    assert error_line(capsys) == line.format(tiny=TINY)
    assert not out.exists()


def test_flag_choices_come_from_the_config():
    from aisd_ray.config import BACKENDS, SYNTHETIC_LAYOUTS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("train", "pipeline", "demo"):
        assert next(a for a in sub[command]._actions if a.dest == "backend").choices == BACKENDS
    assert next(a for a in sub["synthesize"]._actions if a.dest == "layout").choices == (*SYNTHETIC_LAYOUTS, "raw-zip")


def test_infer_takes_a_shipped_config_name_and_set(trained_run, synthetic_root, tmp_path, capsys):
    out = tmp_path / "masks"
    assert main(["infer", "--model", trained_run[3], "--config", "tiny", "--set", "infer.overlays=false",
                 "--images", str(synthetic_root / "test" / "images"), "--output", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 8 and not (out / "overlays").exists()


@pytest.mark.parametrize("argv", [
    ["evaluate", "--predictions", "P", "--masks", "M", "--output", "E", "--set", "model.num_classes=0"],
    ["evaluate", "--model", "X", "--data", "D", "--output", "E", "--batch-size", "0"],
    ["infer", "--model", "X", "--images", "I", "--output", "O", "--set", "eval.batch_size=0"],
    ["train", "--config", "tiny", "--data", "D", "--output", "R", "--set", "train.epochs=0"],
])
def test_a_config_error_is_reported_before_tensorflow_loads(argv):
    """docs/cli.md's promise: a bad config ends in one line before TensorFlow or Ray load (a fraction
    of a second), for evaluate and infer too (they imported TensorFlow before validating)."""
    import subprocess
    import sys

    code = ("import sys; from aisd_ray.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, 'tensorflow' in sys.modules, 'ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"], (done.stdout, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1


def test_prepare_workers_and_verify(synthetic_root, tmp_path, capsys, caplog):
    """--workers is data.prepare_workers (refused like --set when negative); --verify reads every shard
    of an up-to-date store, where a plain rerun reads none."""
    import logging

    out = tmp_path / "store"
    assert main(["prepare", "--config", TINY, "--source", str(synthetic_root), "--output", str(out), "--workers",
                 "-1"]) == 2
    line = error_line(capsys)
    assert line.startswith("aisd-ray prepare: error: --workers -1 (on ") and not out.exists()
    assert line.endswith("[data] prepare_workers: must be >= 0 (0: this machine's CPU count), got -1")
    args = ["prepare", "--config", TINY, "--source", str(synthetic_root), "--output", str(out), "--workers", "2"]
    assert main(args) == 0
    with caplog.at_level(logging.INFO, logger="aisd_ray"):
        assert main(args) == 0
        assert "verified (SHA-256)" not in caplog.text and "nothing to do" in caplog.text
        caplog.clear()
        assert main([*args, "--verify"]) == 0
    shards = sum(1 for p in out.rglob("*.parquet"))
    assert f"{shards} shard(s) read whole and verified (SHA-256)" in caplog.text
