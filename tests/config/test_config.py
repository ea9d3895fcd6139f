from pathlib import Path

import pytest

from aisd_ray.config import Config, ConfigError, builtin_config, load_config

SEED_CONFIG = Path(__file__).resolve().parents[3] / "shared" / "seed" / "train_eval_infer.config"
needs_seed = pytest.mark.skipif(not SEED_CONFIG.is_file(), reason=f"{SEED_CONFIG} not present (shared/ absent)")


@needs_seed
def test_seed_ini_loads_verbatim():
    cfg = load_config(SEED_CONFIG)
    m, t = cfg.model, cfg.train
    assert (m.image_width, m.image_height, m.image_channels) == (512, 512, 3)
    assert (m.base_filters, m.base_kernels, m.num_layers, m.dilation) == (16, (9, 9), 8, (3, 3))
    assert m.dropout_rate == 0.05 and m.input_normalize is False and m.normalization is False
    assert (t.learning_rate, t.clipvalue, t.loss) == (0.00005, 0.5, "ce")
    assert (t.epochs, t.batch_size, t.patience) == (100, 2, 10)
    assert (t.reducer_factor, t.reducer_patience, t.num_infer_images) == (0.5, 4, 6)
    assert cfg.data.rgb_map == ((0, 0, 0), (255, 255, 255))
    # "[test] " carries a trailing space in the original's file; its directories still land in the test split
    assert cfg.data.split_dirs["test"][0].endswith("dataset/AISD/test/images")
    assert cfg.infer.images_dir == "./mini_test/images/"


@needs_seed
def test_seed_ini_and_toml_equivalent_model():
    assert load_config(SEED_CONFIG).model == load_config(builtin_config("aisd512")).model


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_non_literal_value_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, "evil.config", f"[model]\nbase_filters = __import__('os').system('touch {marker}')\n")
    with pytest.raises(ConfigError, match=r"evil.config: \[model\] base_filters: .*not a Python literal"):
        load_config(path)
    assert not marker.exists()


@pytest.mark.parametrize("text, message", [
    ("[model]\nbase_filterz = 8\n", r"\[model\] base_filterz: unknown key"),
    ("[modle]\nbase_filters = 8\n", r"\[modle\] base_filters: unknown key"),
    ("[model]\nmodel = 'OtherNet'\n", r"\[model\] model: only \('TensorFlowFlexUNet',\) is supported"),
    ("[model]\nbase_filters = '8'\n", r"\[model\] base_filters: expected an integer"),
])
def test_ini_errors_name_file_section_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, "bad.config", text))


@pytest.mark.parametrize("text, message", [
    ("[model]\nbase_filters = -4\n", r"bad.toml: \[model\] base_filters: must be >= 1"),
    ("[model]\nbase_kernels = [0, 3]\n", r"\[model\] base_kernels: kernel sizes must be >= 1"),
    ("[model]\nimage_width = 100\nnum_layers = 4\n",
     r"\[model\] image_width: 100 is not divisible by 2\*\*\(num_layers-1\) = 8"),
    ("[train]\nloss = 'hinge'\n", r"\[train\] loss: must be one of"),
    ("[train]\nepochs = 0\n", r"\[train\] epochs: must be >= 1"),
    ("[data]\nrgb_map = [[0, 0, 0]]\n", r"\[data\] rgb_map: has 1 colours but model.num_classes is 2"),
    ("[nope]\nx = 1\n", r"unknown section \[nope\]"),
    ("[train]\nepochz = 3\n", r"\[train\] epochz: unknown key"),
    ("[train]\nclipnorm = 1.0\n", r"\[train\] clipnorm: clips by global norm; set train.clipvalue = 0"),
    ("[train]\nlr_schedule = 'step'\n", r"\[train\] lr_schedule: must be one of \('plateau', 'cosine'"),
    ("[train]\nepochs = 3\nwarmup_epochs = 3\n", r"\[train\] warmup_epochs: must be below train.epochs \(3\)"),
    ("[train]\non_collapse = 'panic'\n", r"\[train\] on_collapse: must be one of \('rollback', 'stop', 'ignore'\)"),
    ("[train]\nrollback_factor = 0\n", r"\[train\] rollback_factor: must lie in \(0, 1\]"),
    ("[train]\nreader = 'spark'\n", r"\[train\] reader: must be one of \('shards', 'ray_data'\)"),
    ("[train]\nadam_epsilon = 0\n", r"\[train\] adam_epsilon: must be > 0"),
    ("[data]\nforeground_fraction = 1.5\n", r"\[data\] foreground_fraction: must lie in \[0, 1\]"),
    ("[model]\nbn_momentum = 1.0\n", r"\[model\] bn_momentum: must lie in \[0, 1\)"),
    ("[model]\nnormalization = true\n[train]\njit_compile = true\nnum_workers = 2\n",
     r"\[train\] jit_compile: XLA cannot compile the synchronised BatchNorm"),
])
def test_toml_errors_name_file_section_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, "bad.toml", text))


def test_overrides_apply_and_are_typed():
    cfg = load_config(builtin_config("tiny"), ["train.epochs=3", "train.backend=local", "model.dilation=[2, 2]"])
    assert (cfg.train.epochs, cfg.train.backend, cfg.model.dilation) == (3, "local", (2, 2))
    with pytest.raises(ConfigError, match=r"--set train.epochs=x: \[train\] epochs: expected an integer"):
        load_config(None, ["train.epochs=x"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["epochs=3"])


def test_toml_round_trip(tmp_path):
    cfg = load_config(builtin_config("demo"), ["data.split_dirs={train=['a','b']}"])
    again = load_config(write(tmp_path, "again.toml", cfg.to_toml()))
    assert again == cfg
    assert isinstance(Config().to_toml(), str)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nothere.toml: config file not found"):
        load_config(tmp_path / "nothere.toml")


@pytest.mark.parametrize("space, message", [
    ("{lr={choice=[1]}}", "cannot search 'lr'"),
    ("{learning_rate={choice=[1], grid=[2]}}", "needs exactly one of"),
    ("{learning_rate={loguniform=[0, 1]}}", "loguniform needs \\[low, high\\]"),
    ("{base_kernels={uniform=[3, 9]}}", "takes whole numbers: use choice or grid"),
    ("{num_layers={choice=[3, 9]}}", "num_layers = 9 would not give a valid config.*not divisible"),
    ("{dilation={grid=[0]}}", "dilation must be >= 1|whole number >= 1"),
])
def test_bad_search_spaces_name_the_key(space, message):
    with pytest.raises(ConfigError, match=message):
        load_config(builtin_config("tiny"), [f"tune.space={space}"])


def test_trial_values_land_on_the_model_and_train_keys():
    from aisd_ray.config import apply_params

    cfg = apply_params(load_config(builtin_config("tiny")), {"learning_rate": 0.004, "base_kernels": 5.0,
                                                             "dilation": 2, "num_layers": 2, "dropout_rate": 0.1})
    assert cfg.train.learning_rate == 0.004 and cfg.model.base_kernels == (5, 5) and cfg.model.dilation == (2, 2)
    assert cfg.model.num_layers == 2 and cfg.model.dropout_rate == 0.1


def test_an_override_that_breaks_a_valid_config_is_named():
    with pytest.raises(ConfigError, match=r"^--set model.num_layers=9 \(on .*tiny.toml\): \[model\] image_width: 64 is "
                                          r"not divisible"):
        load_config(builtin_config("tiny"), ["model.num_layers=9"])


def test_validation_runs_once_per_load_and_changes_nothing(monkeypatch):
    """The rules run once per load (the search space's candidates are checked against their own
    section's rules, not by validating the whole tree again per value), and are pure: a validated
    config is unchanged by validating it again."""
    import copy

    from aisd_ray.config import config_from_dict, rules, validate

    calls = []
    real = rules.validate
    monkeypatch.setattr(rules, "validate", lambda cfg, source="<config>": (calls.append(source), real(cfg, source)))
    cfg = load_config(builtin_config("demo"), ["train.epochs=3", ("train.backend=local", "--backend local")])
    assert len(calls) == 1, calls
    assert cfg.tune.space["base_kernels"]["choice"]  # the default space has choices, each checked
    config_from_dict(cfg.to_dict())
    assert len(calls) == 2, calls
    before = copy.deepcopy(cfg)
    validate(cfg)
    assert cfg == before


def test_default_class_names_follow_the_class_count():
    """Filled by the loader (validation changes nothing): three classes and the default names give
    background, class_1, class_2; names given for the wrong count are refused, naming the key."""
    cfg = load_config(None, ["model.num_classes=3", "data.rgb_map=[[0,0,0],[255,255,255],[255,0,0]]"])
    assert cfg.data.class_names == ("background", "class_1", "class_2")
    with pytest.raises(ConfigError, match=r"\[data\] class_names: has 3 names for 2 classes"):
        load_config(None, ["data.class_names=['background','a','b']"])
