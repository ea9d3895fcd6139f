"""Loading the config tree from TOML or from the original's INI file, never executed, and
``--set`` overrides typed against the tree.

The original parsed every INI value with ``eval()``; here values are read with
``ast.literal_eval`` only, and every key is checked against the tree so that a typo is
an error naming the file, section and key rather than a silently ignored setting.
"""

from __future__ import annotations

import ast
import configparser
import copy
import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any

from aisd_ray import config_rules  # the module: the rules read apply_params from this one
from aisd_ray.config import CONFIG_DIR, SEARCHABLE, WHOLE_NUMBER_KEYS, Config, ConfigError

Override = str | tuple[str, str]  # "section.key=value", or (that, how the user gave it: "--backend ray")


def load_config(path: str | Path | None = None, overrides: list[Override] | tuple[Override, ...] = ()) -> Config:
    """Load a TOML or seed-INI file (or the defaults), apply ``section.key=value`` overrides in
    order, validate. An override is ``--set``'s text, or a pair (that text, how the user gave it,
    e.g. a CLI flag ``--backend ray``): errors name the override as the user gave it."""
    cfg = Config()
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        text = path.read_text()
        if path.suffix == ".toml":
            _apply_toml(cfg, text, source)
        else:
            _apply_ini(cfg, text, source, base_dir=path.parent)
    base = copy.deepcopy(cfg) if overrides else None
    pairs = [(o, f"--set {o}") if isinstance(o, str) else tuple(o) for o in overrides]
    for item, shown in pairs:
        _apply_override(cfg, item, shown)
    try:
        config_rules.validate(cfg, source)
    except ConfigError:
        if base is None:
            raise
        config_rules.validate(copy.deepcopy(base), source)  # the file itself is invalid: that error names it
        # the overrides are at fault: name those without which the config is valid (all if none is)
        shown_all = list(dict.fromkeys(shown for _, shown in pairs))  # a flag may set several keys
        culprits = [s for s in shown_all if _valid_with(base, [p for p in pairs if p[1] != s])] or shown_all
        config_rules.validate(cfg, f"{' '.join(culprits)} (on {source})")
    return cfg


def _valid_with(base: Config, pairs: list[tuple[str, str]]) -> bool:
    cfg = copy.deepcopy(base)
    try:
        for item, shown in pairs:
            _apply_override(cfg, item, shown)
        config_rules.validate(cfg)
    except ConfigError:
        return False
    return True


def builtin_config(name: str) -> Path:
    """Path of a shipped config (``demo``, ``aisd512``, ``tiny``)."""
    path = CONFIG_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
        raise ConfigError(f"no built-in config {name!r} (known: {known})")
    return path


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    cfg = Config()
    for section, values in data.items():
        for key, value in values.items():
            _set(cfg, section, key, value, source)
    config_rules.validate(cfg, source)
    return cfg


def _apply_toml(cfg: Config, text: str, source: str) -> None:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"{source}: not valid TOML: a value nested too deeply to parse") from None
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: top-level key {section!r} must be a [section]")
        for key, value in values.items():
            _set(cfg, section, key, value, source)


def _apply_override(cfg: Config, item: str, shown: str | None = None) -> None:
    shown = shown or f"--set {item}"
    dotted, sep, raw = item.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not sep or not dot:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as local or parquet
    except RecursionError:
        raise ConfigError(f"override {item!r}: a value nested too deeply to parse") from None
    key, _, entry = key.partition(".")
    if entry:  # section.table.entry=value: one entry of a table-valued key, e.g. tune.space.dilation
        current = getattr(getattr(cfg, section, None), key, None)
        if not isinstance(current, dict):
            raise ConfigError(f"override {item!r}: [{section}] {key} is not a table")
        value = {**current, entry: value}
    _set(cfg, section, key, value, shown)


# The original's INI keys and where they land in our tree. Keys mapped to None are accepted for
# compatibility but have no effect: our run folder decides where outputs go.
_INI_KEYS: dict[tuple[str, str], str | None] = {
    **{("model", k): f"model.{k}" for k in (
        "image_width", "image_height", "image_channels", "input_normalize", "normalization",
        "num_classes", "base_filters", "base_kernels", "num_layers", "dropout_rate", "dilation",
        "activation", "final_activation")},
    ("model", "learning_rate"): "train.learning_rate",
    ("model", "clipvalue"): "train.clipvalue",
    ("model", "loss"): "train.loss",
    **{("train", k): f"train.{k}" for k in (
        "epochs", "batch_size", "patience", "learning_rate_reducer", "reducer_factor",
        "reducer_patience", "epoch_change_infer", "num_infer_images", "steps_per_epoch",
        "validation_steps")},
    ("eval", "batch_size"): "eval.batch_size",
    ("infer", "images_dir"): "infer.images_dir",
    ("infer", "output_dir"): "infer.output_dir",
    ("mask", "rgb_map"): "data.rgb_map",
    **{k: None for k in (
        ("model", "metrics"), ("model", "show_summary"), ("train", "metrics"),
        ("train", "model_dir"), ("train", "eval_dir"), ("train", "create_backup"),
        ("train", "epoch_change_infer_dir"), ("train", "save_weights_only"))},
}
# Keys whose only meaningful value is the one we implement.
_INI_FIXED: dict[tuple[str, str], tuple[Any, ...]] = {
    ("model", "model"): ("TensorFlowFlexUNet",),
    ("model", "generator"): (False,),
    ("model", "optimizer"): ("Adam",),
    ("dataset", "class_name"): ("ImageCategorizedMaskDataset",),
    ("image", "color_order"): ("RGB",),
    ("mask", "mask_datatype"): ("categorized",),
    ("mask", "mask_file_format"): (".png",),
}
_INI_LOSSES = {"categorical_crossentropy": "ce", "dice_loss": "dice", "bce_dice_loss": "ce_dice"}


def _apply_ini(cfg: Config, text: str, source: str, base_dir: Path) -> None:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=None)
    parser.optionxform = str  # keep key case
    try:
        parser.read_string(text, source=source)
    except configparser.Error as exc:
        raise ConfigError(f"{source}: not a valid INI file: {exc}") from exc
    for raw_section in parser.sections():
        section = raw_section.strip()  # the original writes "[test] " with a trailing space
        for key, raw in parser.items(raw_section):
            where = f"{source}: [{section}] {key}"
            try:
                value = ast.literal_eval(raw.strip())
            except (ValueError, SyntaxError, RecursionError, MemoryError):
                raise ConfigError(f"{where}: value {raw.strip()!r} is not a Python literal "
                                  "(config values are read, never executed)") from None
            if section in ("train", "valid", "test") and key in ("images_dir", "masks_dir"):
                split = {"train": "train", "valid": "valid", "test": "test"}[section]
                pair = list(cfg.data.split_dirs.get(split, ("", "")))
                pair[0 if key == "images_dir" else 1] = str((base_dir / value) if value else "")
                cfg.data.split_dirs[split] = (pair[0], pair[1])
                continue
            if (section, key) in _INI_FIXED:
                if value not in _INI_FIXED[(section, key)]:
                    raise ConfigError(f"{where}: only {_INI_FIXED[(section, key)]!r} is supported, "
                                      f"got {value!r}")
                continue
            if (section, key) not in _INI_KEYS:
                raise ConfigError(f"{where}: unknown key")
            target = _INI_KEYS[(section, key)]
            if target is None:
                continue
            if target == "train.loss":
                if value not in _INI_LOSSES:
                    raise ConfigError(f"{where}: unknown loss {value!r} (known: {sorted(_INI_LOSSES)})")
                value = _INI_LOSSES[value]
            if target == "data.rgb_map":
                value = _rgb_map_from_dict(value, where)
            tsection, tkey = target.split(".")
            _set(cfg, tsection, tkey, value, source, shown=f"[{section}] {key}")


def _rgb_map_from_dict(value: Any, where: str) -> list[list[int]]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: expected a dict {{(r,g,b): class_id, ...}}")
    by_class = {cls: colour for colour, cls in value.items()}
    if sorted(by_class) != list(range(len(by_class))):
        raise ConfigError(f"{where}: class ids must be 0..{len(by_class) - 1}, got {sorted(by_class)}")
    return [list(by_class[c]) for c in range(len(by_class))]


# --------------------------------------------------------------------------- typing


def _set(cfg: Config, section: str, key: str, value: Any, source: str, shown: str | None = None) -> None:
    shown = shown or f"[{section}] {key}"
    sub = getattr(cfg, section, None) if section in {f.name for f in dataclasses.fields(Config)} else None
    if sub is None:
        raise ConfigError(f"{source}: unknown section [{section}]")
    hints = typing.get_type_hints(type(sub))
    if key not in hints:
        raise ConfigError(f"{source}: {shown}: unknown key")
    try:
        setattr(sub, key, _coerce(value, hints[key]))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {shown}: {exc}") from None


def _coerce(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise TypeError(f"expected {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected a table, got {value!r}")
        return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()}
    raise TypeError(f"unsupported type {hint}")  # pragma: no cover - the tree uses the types above


def tomlable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: tomlable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tomlable(v) for v in value]
    return value


def apply_params(cfg: Config, params: dict[str, float]) -> Config:
    """Write one trial's sampled values into the config tree (kernels and dilation are square)."""
    for key, value in params.items():
        section = SEARCHABLE[key]
        if key in WHOLE_NUMBER_KEYS:
            if float(value) != int(value) or int(value) < 1:
                raise TypeError(f"{key} must be a whole number >= 1, got {value}")
            value = int(value)
            if key in ("base_kernels", "dilation"):
                value = (value, value)
        setattr(getattr(cfg, section), key, value if key in WHOLE_NUMBER_KEYS else float(value))
    return cfg
