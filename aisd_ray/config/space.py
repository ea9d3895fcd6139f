"""The search space: its rules, and a trial's sampled values written into the config tree.

Whole-number keys (kernel size, dilation, filters, levels) are coerced once, here, for both the
space's check and a trial's config; kernels and dilation are square.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from aisd_ray.config.schema import DISTRIBUTIONS, SEARCHABLE, WHOLE_NUMBER_KEYS, Config, ConfigError

Bad = Callable[[str, str], ConfigError]  # (section.key, why) -> the error naming both and the source


def check_space(cfg: Config, bad: Bad, section_rules: dict[str, Callable[[Config, Bad], None]],
                complaint: Callable[[str], Bad]) -> None:
    """Each searched key is searchable, has one known distribution with sound bounds, and each value a
    ``choice``/``grid`` can give makes a valid config: checked by its section's rules on a copy of
    that section (the rest of the tree is shared, unchanged). ``section_rules`` and ``complaint``
    come from ``rules.py`` (its ``validate`` calls this), so that the space needs nothing above it."""
    for key, spec in cfg.tune.space.items():
        where = f"tune.space.{key}"
        if key not in SEARCHABLE:
            raise bad("tune.space", f"cannot search {key!r} (searchable: {', '.join(SEARCHABLE)})")
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise bad("tune.space", f"{key} needs exactly one of {DISTRIBUTIONS}, got {sorted(spec)}")
        (kind, values), = spec.items()
        if not values:
            raise bad("tune.space", f"{key}: {kind} needs values")
        if kind in ("loguniform", "uniform"):
            if key in WHOLE_NUMBER_KEYS:
                raise bad("tune.space", f"{key} takes whole numbers: use choice or grid, not {kind}")
            if len(values) != 2 or not 0 <= values[0] < values[1] or (kind == "loguniform" and values[0] <= 0):
                relation = "<" if kind == "loguniform" else "<="
                raise bad("tune.space", f"{key}: {kind} needs [low, high] with 0 {relation} low < high, "
                                        f"got {list(values)}")
        section = SEARCHABLE[key]
        for value in values if kind in ("choice", "grid") else ():
            try:
                trial = dataclasses.replace(cfg, **{section: dataclasses.replace(
                    getattr(cfg, section), **{key: param_value(key, value)})})
                section_rules[section](trial, complaint(f"{where} = {value:g}"))
            except (ConfigError, TypeError) as exc:
                raise bad("tune.space", f"{key} = {value:g} would not give a valid config: {exc}") from None


def param_value(key: str, value: Any) -> Any:
    """A sampled value as the config holds it: whole numbers for WHOLE_NUMBER_KEYS (TypeError if it
    is not one, or < 1), square pairs for kernels and dilation, floats otherwise."""
    if key not in WHOLE_NUMBER_KEYS:
        return float(value)
    if float(value) != int(value) or int(value) < 1:
        raise TypeError(f"{key} must be a whole number >= 1, got {value}")
    value = int(value)
    return (value, value) if key in ("base_kernels", "dilation") else value


def apply_params(cfg: Config, params: dict[str, float]) -> Config:
    """Write one trial's sampled values into the config tree (in place; returns it)."""
    for key, value in params.items():
        setattr(getattr(cfg, SEARCHABLE[key]), key, param_value(key, value))
    return cfg
