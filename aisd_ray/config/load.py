"""Loading the config tree: a TOML file, the original's INI (``ini.py``), a built-in name or a
dict, then ``--set`` overrides and CLI flags (one path for both), typed against the tree
(``coerce.py``), completed, and validated once (``rules.py``).

Every key is checked against the tree, so a typo is an error naming the file, section and key
rather than a silently ignored setting.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import aisd_ray.config.rules as rules  # the module: tests count its validate calls
from aisd_ray.config.coerce import set_value
from aisd_ray.config.ini import apply_ini
from aisd_ray.config.schema import CONFIG_DIR, Config, ConfigError, DataConfig

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
            apply_ini(cfg, text, source, base_dir=path.parent)
    base = copy.deepcopy(cfg) if overrides else None
    pairs = [(o, f"--set {o}") if isinstance(o, str) else tuple(o) for o in overrides]
    for item, shown in pairs:
        _apply_override(cfg, item, shown)
    complete(cfg)
    try:
        rules.validate(cfg, source)
    except ConfigError:
        if base is None:
            raise
        rules.validate(complete(copy.deepcopy(base)), source)  # the file itself is invalid: that error names it
        # the overrides are at fault: name those without which the config is valid (all if none is)
        shown_all = list(dict.fromkeys(shown for _, shown in pairs))  # a flag may set several keys
        culprits = [s for s in shown_all if _valid_with(base, [p for p in pairs if p[1] != s])] or shown_all
        rules.validate(cfg, f"{' '.join(culprits)} (on {source})")
    return cfg


def complete(cfg: Config) -> Config:
    """Fill the defaults that follow from other keys (in place; returns it): with more than two
    classes and the default class names, ``background, class_1, class_2, ...``."""
    d, m = cfg.data, cfg.model
    if len(d.class_names) != m.num_classes and d.class_names == DataConfig().class_names:
        d.class_names = ("background",) + tuple(f"class_{i}" for i in range(1, m.num_classes))
    return cfg


def _valid_with(base: Config, pairs: list[tuple[str, str]]) -> bool:
    cfg = copy.deepcopy(base)
    try:
        for item, shown in pairs:
            _apply_override(cfg, item, shown)
        rules.validate(complete(cfg))
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
            set_value(cfg, section, key, value, source)
    rules.validate(complete(cfg), source)
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
            set_value(cfg, section, key, value, source)


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
    set_value(cfg, section, key, value, shown)
