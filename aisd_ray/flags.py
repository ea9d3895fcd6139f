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
FLAG_KEYS = {
    "synthesize": {"layout": lambda layout: {"synthetic.layout": {"raw-zip": "raw"}.get(layout, layout)},
                   "cases": "synthetic.num_cases", "slices": "synthetic.slices_per_case"},
    "prepare": {"source": _source, "output": "data.shards_dir"},
    "train": {"data": "data.shards_dir", "output": "run.output_dir", "backend": "train.backend",
              "mlflow": "run.mlflow_tracking_uri", **_SHARED},
    "tune": {"data": "data.shards_dir", "mlflow": "run.mlflow_tracking_uri", **_SHARED},
    "evaluate": {"batch_size": "eval.batch_size"},
    "infer": {"images": "infer.images_dir", "input": "infer.images_dir", "output": "infer.output_dir",
              "batch_size": "eval.batch_size", "no_overlays": lambda _: {"infer.overlays": False},
              "probabilities": lambda _: {"infer.probabilities": True}},
    "pipeline": {"source": _source, "images": "infer.images_dir", "backend": "train.backend",
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


def add_config(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--config and --set, the two ways every command takes its config."""
    p.add_argument("--config", help="TOML file, the original's train_eval_infer.config (INI), or a shipped "
                   "config's name (see `aisd-ray configs`)" + (f"; default: '{default}'" if default else ""))
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set train.epochs=3")
    p.set_defaults(default_config=default)


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
