"""The config tree, by concern: the schema (``schema.py``), loading and overrides (``load.py``),
the original's INI (``ini.py``), value typing (``coerce.py``), the rules (``rules.py``, run once per
load) and the search space (``space.py``). Imports neither TensorFlow nor Ray.

The public names are reached from here: ``from aisd_ray.config import Config, load_config``.
"""

from aisd_ray.config.load import Override, builtin_config, complete, config_from_dict, load_config
from aisd_ray.config.rules import validate
from aisd_ray.config.schema import (
    AISD_TEST_CASES,
    BACKENDS,
    CHANNEL_MODES,
    CONFIG_DIR,
    DISTRIBUTIONS,
    LOSSES,
    LR_SCHEDULES,
    MASK_VALUES,
    ON_COLLAPSE,
    PLACEMENT_STRATEGIES,
    PRECISIONS,
    READERS,
    ROW_ENCODINGS,
    SEARCHABLE,
    SHARD_FORMATS,
    SPLITS,
    SYNTHETIC_ANATOMIES,
    SYNTHETIC_LAYOUTS,
    VOLUME_LAYOUTS,
    WHOLE_NUMBER_KEYS,
    AugmentConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    InferConfig,
    ModelConfig,
    RunConfig,
    SyntheticConfig,
    TrainConfig,
    TuneConfig,
)
from aisd_ray.config.space import apply_params

__all__ = [
    "AISD_TEST_CASES", "BACKENDS", "CHANNEL_MODES", "CONFIG_DIR", "DISTRIBUTIONS", "LOSSES", "LR_SCHEDULES",
    "MASK_VALUES", "ON_COLLAPSE", "PLACEMENT_STRATEGIES", "PRECISIONS", "READERS", "ROW_ENCODINGS", "SEARCHABLE",
    "SHARD_FORMATS", "SPLITS", "SYNTHETIC_ANATOMIES", "SYNTHETIC_LAYOUTS", "VOLUME_LAYOUTS", "WHOLE_NUMBER_KEYS",
    "AugmentConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "InferConfig", "ModelConfig",
    "RunConfig", "SyntheticConfig", "TrainConfig", "TuneConfig",
    "Override", "apply_params", "builtin_config", "complete", "config_from_dict", "load_config", "validate",
]
