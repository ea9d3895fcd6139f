"""Config validation: every value the model or pipeline cannot use is refused, naming the key.

Pure (it changes nothing: the loader fills defaults that depend on other keys, such as class
names, before) and run once per load. One function per section, so that the search space's check
(``space.py``) runs the rules of the one section a candidate value lands on, not the whole tree.
"""

from __future__ import annotations

import re

from aisd_ray.config.schema import (
    AISD_TEST_CASES,
    BACKENDS,
    CHANNEL_MODES,
    LOSSES,
    LR_SCHEDULES,
    MASK_VALUES,
    ON_COLLAPSE,
    PLACEMENT_STRATEGIES,
    PRECISIONS,
    READERS,
    ROW_ENCODINGS,
    SHARD_FORMATS,
    SPLITS,
    SYNTHETIC_ANATOMIES,
    SYNTHETIC_LAYOUTS,
    AugmentConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    SyntheticConfig,
    TrainConfig,
)
from aisd_ray.config.space import Bad, check_space

# The rules a candidate value of the search space is checked against: those of the section it lands
# on (train's read the model too: XLA and synchronised BatchNorm).
SECTION_RULES = {
    "model": lambda cfg, bad: model_rules(cfg.model, bad),
    "train": lambda cfg, bad: train_rules(cfg.train, cfg.model, bad),
}


def validate(cfg: Config, source: str = "<config>") -> None:
    """Reject values the model or pipeline cannot use: ConfigError naming the source, section and key."""
    bad = complaint(source)
    model_rules(cfg.model, bad)
    data_rules(cfg.data, cfg.model, bad)
    synthetic_rules(cfg.synthetic, bad)
    augment_rules(cfg.augment, bad)
    train_rules(cfg.train, cfg.model, bad)
    if cfg.eval.batch_size < 1:
        raise bad("eval.batch_size", f"must be >= 1, got {cfg.eval.batch_size}")
    if cfg.infer.workers < 0:
        raise bad("infer.workers", f"must be >= 0 (0: the Ray cluster's GPUs, else half its CPUs), got {cfg.infer.workers}")
    if not cfg.run.name or "/" in cfg.run.name:
        raise bad("run.name", f"must be a non-empty name without '/', got {cfg.run.name!r}")
    if any(c.isspace() for c in cfg.run.mlflow_tracking_uri):
        raise bad("run.mlflow_tracking_uri", f"a URI has no spaces, got {cfg.run.mlflow_tracking_uri!r}")
    tune_rules(cfg, bad)
    check_space(cfg, bad, SECTION_RULES, complaint)  # last: each candidate value against its section's rules


def complaint(source: str) -> Bad:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: [{key.split('.')[0]}] {key.split('.')[1]}: {why}")

    return bad


def model_rules(m: ModelConfig, bad: Bad) -> None:
    for key in ("image_width", "image_height", "image_channels", "base_filters", "num_layers"):
        if getattr(m, key) < 1:
            raise bad(f"model.{key}", f"must be >= 1, got {getattr(m, key)}")
    if m.num_classes < 2:
        raise bad("model.num_classes", f"must be >= 2 (background is a class), got {m.num_classes}")
    if min(m.base_kernels) < 1:
        raise bad("model.base_kernels", f"kernel sizes must be >= 1, got {m.base_kernels}")
    if min(m.dilation) < 1:
        raise bad("model.dilation", f"dilation must be >= 1, got {m.dilation}")
    if not 0.0 <= m.dropout_rate * max(m.num_layers - 1, 1) < 1.0:
        raise bad("model.dropout_rate", f"dropout_rate * (num_layers-1) must lie in [0, 1), "
                                        f"got {m.dropout_rate} with {m.num_layers} layers")
    step = 2 ** (m.num_layers - 1)
    for key in ("image_width", "image_height"):
        if getattr(m, key) % step:
            raise bad(f"model.{key}", f"{getattr(m, key)} is not divisible by 2**(num_layers-1) = {step}")
    if not 0 <= m.bn_momentum < 1:
        raise bad("model.bn_momentum", f"must lie in [0, 1), got {m.bn_momentum}")
    if m.image_channels not in (1, 3):
        raise bad("model.image_channels", f"must be 1 or 3, got {m.image_channels}")

def data_rules(d: DataConfig, m: ModelConfig, bad: Bad) -> None:
    if len(d.rgb_map) != m.num_classes:
        raise bad("data.rgb_map", f"has {len(d.rgb_map)} colours but model.num_classes is {m.num_classes}")
    if len(d.class_names) != m.num_classes:
        raise bad("data.class_names", f"has {len(d.class_names)} names for {m.num_classes} classes")
    if len(set(d.class_names)) != len(d.class_names):
        raise bad("data.class_names", f"names a class twice: {list(d.class_names)}")
    if m.num_classes > 2 and "lesion" in d.class_names[1:]:
        raise bad("data.class_names", "'lesion' names every foreground class together in the metrics; "
                                      "with several foreground classes give each another name")
    for name in d.class_names:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name)):
            raise bad("data.class_names", f"{name!r}: a name is a metric key and a file name part "
                                          "(letters, digits, '_', '.', '-')")
    for colour in d.rgb_map:
        if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
            raise bad("data.rgb_map", f"colour {colour} is not an (r, g, b) triple in 0..255")
    if d.shard_format not in SHARD_FORMATS:
        raise bad("data.shard_format", f"must be one of {SHARD_FORMATS}, got {d.shard_format!r}")
    if d.row_encoding not in ROW_ENCODINGS:
        raise bad("data.row_encoding", f"must be one of {ROW_ENCODINGS}, got {d.row_encoding!r}")
    if d.shard_target_mb <= 0 or d.min_shards < 1:
        raise bad("data.shard_target_mb", "shard size must be > 0 and min_shards >= 1")
    if d.prepare_workers < 0:
        raise bad("data.prepare_workers", f"must be >= 0 (0: this machine's CPU count), got {d.prepare_workers}")
    if not d.raw_label_map or not all(0 <= c < m.num_classes for c in d.raw_label_map):
        raise bad("data.raw_label_map", f"class ids must lie in 0..{m.num_classes - 1}, got {d.raw_label_map}")
    if d.mask_values not in MASK_VALUES:
        raise bad("data.mask_values", f"must be one of {', '.join(MASK_VALUES)}, got {d.mask_values!r}")
    if d.mask_colour_tolerance < 0:
        raise bad("data.mask_colour_tolerance", f"must be >= 0, got {d.mask_colour_tolerance}")
    if not 0 <= d.foreground_fraction <= 1:
        raise bad("data.foreground_fraction", f"must lie in [0, 1], got {d.foreground_fraction}")
    if not 0 <= d.valid_fraction < 1:
        raise bad("data.valid_fraction", f"must lie in [0, 1), got {d.valid_fraction}")
    if d.folds == 1 or d.folds < 0:
        raise bad("data.folds", f"must be 0 (no folds) or at least 2, got {d.folds}")
    if not 0 <= d.fold < max(d.folds, 1):
        raise bad("data.fold", f"must lie in 0..{max(d.folds, 1) - 1} (data.folds = {d.folds}), got {d.fold}")
    if not d.windows or len(d.windows) not in (1, m.image_channels):
        raise bad("data.windows", f"give one (level, width) window, or one per channel ({m.image_channels}), "
                                  f"got {len(d.windows)}")
    for level, width in d.windows:
        if not width > 0 or not -1100 <= level <= 3100:
            raise bad("data.windows", f"({level:g}, {width:g}): a window is (level, width) in HU with width > 0 "
                                      "and the level within -1100..3100")
    for split in d.split_dirs:
        if split not in SPLITS:
            raise bad("data.split_dirs", f"unknown split {split!r}")
    channel_rules(d, m, bad)


def channel_rules(d: DataConfig, m: ModelConfig, bad: Bad) -> None:
    """``data.channels``: a known mode; three channels for every mode but grey; three windows for
    ``windows`` (one per channel)."""
    if d.channels not in CHANNEL_MODES:
        raise bad("data.channels", f"must be one of {', '.join(CHANNEL_MODES)}, got {d.channels!r}")
    if d.channels != "grey" and m.image_channels != 3:
        raise bad("model.image_channels", f"must be 3 for data.channels = {d.channels!r} (it makes three "
                                          f"channels), got {m.image_channels}")
    if d.channels == "windows" and len(d.windows) != 3:
        raise bad("data.windows", f"data.channels = 'windows' takes three (level, width) windows, one per "
                                  f"channel, got {len(d.windows)}")


def synthetic_rules(s: SyntheticConfig, bad: Bad) -> None:
    if s.layout not in SYNTHETIC_LAYOUTS:
        raise bad("synthetic.layout", f"must be one of {', '.join(SYNTHETIC_LAYOUTS)}, got {s.layout!r}")
    if s.anatomy not in SYNTHETIC_ANATOMIES:
        raise bad("synthetic.anatomy", f"must be one of {', '.join(SYNTHETIC_ANATOMIES)}, got {s.anatomy!r}")
    for key in ("num_train", "num_valid", "num_test", "size", "num_cases", "slices_per_case"):
        if getattr(s, key) < 1:
            raise bad(f"synthetic.{key}", f"must be >= 1, got {getattr(s, key)}")
    if s.noise_hu < 0 or not 0 <= s.lesion_hu < 100:
        raise bad("synthetic.lesion_hu" if s.noise_hu >= 0 else "synthetic.noise_hu",
                  f"lesion_hu must lie in [0, 100) and noise_hu be >= 0, got {s.lesion_hu}, {s.noise_hu}")
    if not 0 <= s.num_test_cases <= min(s.num_cases - 1, len(AISD_TEST_CASES)):
        raise bad("synthetic.num_test_cases", f"must lie in [0, {min(s.num_cases - 1, len(AISD_TEST_CASES))}] "
                  f"(fewer than synthetic.num_cases), got {s.num_test_cases}")

def augment_rules(a: AugmentConfig, bad: Bad) -> None:
    for key in ("rotation_deg", "shear_deg"):
        if not 0 <= getattr(a, key) < 45:
            raise bad(f"augment.{key}", f"must lie in [0, 45), got {getattr(a, key)}")
    for key in ("scale", "contrast"):
        low, high = getattr(a, key)
        if not 0 < low <= high:
            raise bad(f"augment.{key}", f"must be [low, high] with 0 < low <= high, got {list(getattr(a, key))}")
    if not 0 <= a.brightness < 1:
        raise bad("augment.brightness", f"must lie in [0, 1), got {a.brightness}")

def train_rules(t: TrainConfig, m: ModelConfig, bad: Bad) -> None:
    for key in ("epochs", "batch_size", "num_workers"):
        if getattr(t, key) < 1:
            raise bad(f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    for key in ("patience", "reducer_patience", "steps_per_epoch", "validation_steps",
                "num_infer_images", "shuffle_buffer", "max_failures", "warmup_epochs", "max_rollbacks"):
        if getattr(t, key) < 0:
            raise bad(f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    if t.log_every_seconds < 0:
        raise bad("train.log_every_seconds", f"must be >= 0 (0: off), got {t.log_every_seconds}")
    if t.learning_rate <= 0:
        raise bad("train.learning_rate", f"must be > 0, got {t.learning_rate}")
    if t.adam_epsilon <= 0:
        raise bad("train.adam_epsilon", f"must be > 0, got {t.adam_epsilon}")
    if t.clipvalue < 0 or t.clipnorm < 0:
        raise bad("train.clipnorm" if t.clipnorm < 0 else "train.clipvalue", "must be >= 0 (0: off)")
    if t.clipvalue and t.clipnorm:
        raise bad("train.clipnorm", f"clips by global norm; set train.clipvalue = 0 to use it "
                                    f"(both set: clipvalue {t.clipvalue}, clipnorm {t.clipnorm})")
    if t.lr_schedule not in LR_SCHEDULES:
        raise bad("train.lr_schedule", f"must be one of {LR_SCHEDULES}, got {t.lr_schedule!r}")
    if t.warmup_epochs >= t.epochs:
        raise bad("train.warmup_epochs", f"must be below train.epochs ({t.epochs}), got {t.warmup_epochs}")
    if t.on_collapse not in ON_COLLAPSE:
        raise bad("train.on_collapse", f"must be one of {ON_COLLAPSE}, got {t.on_collapse!r}")
    if t.collapse_patience < 1:
        raise bad("train.collapse_patience", f"must be >= 1, got {t.collapse_patience}")
    if not 0 < t.rollback_factor <= 1:
        raise bad("train.rollback_factor", f"must lie in (0, 1], got {t.rollback_factor}")
    if t.jit_compile and m.normalization and t.backend == "ray" and t.num_workers > 1:
        raise bad("train.jit_compile", "XLA cannot compile the synchronised BatchNorm of model.normalization "
                                       "across workers: turn one of them off, or train on one worker")
    if t.reader not in READERS:
        raise bad("train.reader", f"must be one of {READERS}, got {t.reader!r}")
    if t.placement_strategy not in PLACEMENT_STRATEGIES:
        raise bad("train.placement_strategy", f"must be one of {PLACEMENT_STRATEGIES}, got {t.placement_strategy!r}")
    if not 0 < t.reducer_factor < 1:
        raise bad("train.reducer_factor", f"must lie in (0, 1), got {t.reducer_factor}")
    if t.loss not in LOSSES:
        raise bad("train.loss", f"must be one of {LOSSES}, got {t.loss!r}")
    if t.mixed_precision not in PRECISIONS:
        raise bad("train.mixed_precision", f"must be one of {tuple(PRECISIONS)}, got {t.mixed_precision!r}")
    if t.backend not in BACKENDS:
        raise bad("train.backend", f"must be one of {BACKENDS}, got {t.backend!r}")


def tune_rules(cfg: Config, bad: Bad) -> None:
    tc = cfg.tune
    for key in ("num_samples", "max_concurrent_trials", "grace_period"):
        if getattr(tc, key) < 1:
            raise bad(f"tune.{key}", f"must be >= 1, got {getattr(tc, key)}")
    if not 0 <= tc.min_score <= 1:
        raise bad("tune.min_score", f"must lie in [0, 1] (a Dice), got {tc.min_score}")
    if tc.reduction_factor < 2:
        raise bad("tune.reduction_factor", f"must be >= 2, got {tc.reduction_factor}")
    if tc.searcher not in ("random", "optuna"):
        raise bad("tune.searcher", f"must be 'random' or 'optuna', got {tc.searcher!r}")
    if tc.scheduler not in ("asha", "fifo"):
        raise bad("tune.scheduler", f"must be 'asha' or 'fifo', got {tc.scheduler!r}")
    if not tc.name or "/" in tc.name:
        raise bad("tune.name", f"must be a non-empty name without '/', got {tc.name!r}")
