"""The command line as users call it (a real subprocess for the console script)."""

import subprocess
import sys
from pathlib import Path

import pytest

from aisd_ray.cli import build_parser, main
from aisd_ray.config import builtin_config

TINY = str(builtin_config("tiny"))
COMMANDS = ["inspect", "synthesize", "prepare", "train", "export", "evaluate", "infer", "demo", "sweep", "crossval",
            "configs"]
SEED_CONFIG = Path(__file__).resolve().parents[3] / "shared" / "seed" / "train_eval_infer.config"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: aisd-ray" in capsys.readouterr().out


def test_inspect_console_script_prints_the_parameter_count(tmp_path):
    config = SEED_CONFIG if SEED_CONFIG.is_file() else Path(__file__).parents[2] / "aisd_ray/configs/aisd512.toml"
    out = subprocess.run([Path(sys.executable).parent / "aisd-ray", "inspect", "--config", str(config)],
                         capture_output=True, text=True, check=True).stdout
    assert "Total parameters: 124,996,866" in out


def test_version_and_shipped_config_names(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"aisd-ray {version('aisd-ray')}"
    assert main(["configs"]) == 0
    assert {"aisd512", "aisd512-recommended", "demo", "tiny", "tune-demo"} <= {
        line.split()[0] for line in capsys.readouterr().out.splitlines()[:5]}
    assert main(["inspect", "--config", "nosuchconfig"]) == 2
    known = "aisd512, aisd512-recommended, demo, tiny, tune-demo"
    assert f"no built-in config 'nosuchconfig' (known: {known})" in capsys.readouterr().err


def test_verbosity_flags_go_before_or_after_the_subcommand():
    for argv in (["-v", "configs"], ["configs", "-v"], ["configs", "-q"]):
        args = build_parser().parse_args(argv)
        assert getattr(args, "verbose", False) or getattr(args, "quiet", False)


@pytest.mark.parametrize("command", ["inspect", "train", "tune"])
def test_a_config_typo_is_reported_before_tensorflow_or_ray_load(tmp_path, command):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nbase_filterz = 8\n")
    extra = [] if command == "inspect" else ["--data", "x", "--output", "y"]
    probe = ("import sys; from aisd_ray.cli import main; "
             f"code = main([{command!r}, '--config', {str(bad)!r}] + {extra!r}); "
             "print(code, 'tensorflow' in sys.modules, 'ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.split() == ["2", "False", "False"], done.stderr
    assert "bad.toml: [model] base_filterz: unknown key" in done.stderr


def test_bad_config_exits_2_with_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochz = 1\n")
    assert main(["inspect", "--config", str(bad)]) == 2
    assert "bad.toml: [train] epochz: unknown key" in capsys.readouterr().err


def test_cli_stages_end_to_end(trained_run, synthetic_root, tmp_path, capsys):
    cfg, shards, run, export_uri = trained_run
    assert main(["export", "--run", run, "--output", str(tmp_path / "export")]) == 0
    assert main(["evaluate", "--model", str(tmp_path / "export"), "--data", shards,
                 "--output", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "metrics.json").is_file()
    assert main(["infer", "--model", str(tmp_path / "export"), "--images",
                 str(synthetic_root / "test" / "images"), "--output", str(tmp_path / "masks")]) == 0
    assert main(["evaluate", "--predictions", str(tmp_path / "masks"), "--masks",
                 str(synthetic_root / "test" / "masks"), "--output", str(tmp_path / "eval2")]) == 0
    out = capsys.readouterr().out
    assert "8 masks written" in out and out.count("lesion Dice") == 2


def test_prepare_and_train_local_from_cli(synthetic_root, tmp_path, capsys):
    assert main(["prepare", "--config", TINY, "--source", str(synthetic_root),
                 "--output", str(tmp_path / "shards")]) == 0
    assert "manifest:" in capsys.readouterr().out
    assert main(["train", "--config", TINY, "--data", str(tmp_path / "shards"),
                 "--output", str(tmp_path / "runs"), "--backend", "local", "--set", "train.epochs=1"]) == 0
    assert (tmp_path / "runs" / "tiny" / "history.csv").is_file()


def test_infer_folders_can_come_from_the_config(trained_run, synthetic_root, tmp_path, capsys):
    export_uri = trained_run[3]
    config = tmp_path / "infer.toml"
    config.write_text(f"[infer]\nimages_dir = '{synthetic_root / 'test' / 'images'}'\n"
                      f"output_dir = '{tmp_path / 'out'}'\noverlays = false\n")
    assert main(["infer", "--model", export_uri, "--config", str(config)]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 8 and not (tmp_path / "out" / "overlays").exists()
    assert main(["infer", "--model", export_uri]) == 2
    assert "give --input (or --images) and --output" in capsys.readouterr().err


def test_every_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    missing = [(name, a.option_strings) for name, p in sub.choices.items() for a in p._actions
               if a.option_strings and not a.help]
    assert missing == []
