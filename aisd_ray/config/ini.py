"""The original FlexUNet's INI config, translated into our tree: never executed.

The original parsed every INI value with ``eval()``; here values are read with
``ast.literal_eval`` only, and every key is checked against a table of where it lands, so that a
typo is an error naming the file, section and key rather than a silently ignored setting.
"""

from __future__ import annotations

import ast
import configparser
from pathlib import Path
from typing import Any

from aisd_ray.config.coerce import set_value
from aisd_ray.config.schema import SPLITS, Config, ConfigError

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


def apply_ini(cfg: Config, text: str, source: str, base_dir: Path) -> None:
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
            if section in SPLITS and key in ("images_dir", "masks_dir"):
                split = section
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
            set_value(cfg, tsection, tkey, value, source, shown=f"[{section}] {key}")


def _rgb_map_from_dict(value: Any, where: str) -> list[list[int]]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: expected a dict {{(r,g,b): class_id, ...}}")
    by_class = {cls: colour for colour, cls in value.items()}
    if sorted(by_class) != list(range(len(by_class))):
        raise ConfigError(f"{where}: class ids must be 0..{len(by_class) - 1}, got {sorted(by_class)}")
    return [list(by_class[c]) for c in range(len(by_class))]
