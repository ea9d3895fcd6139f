"""The GPU probe: plain Keras, any backend; here it runs its tiny CPU mode, so that on a GPU
machine it is one command (see docs/performance.md, The GPU probe)."""

import json

import keras
import numpy as np
import pytest

from aisd_ray.bench.gpu_probe import flops_per_image
from aisd_ray.cli import main


@pytest.mark.parametrize("layer, shape, expected", [
    (keras.layers.Conv2D(16, 3, padding="same"), (32, 32, 8), 2 * 32 * 32 * 9 * 8 * 16),
    (keras.layers.Conv2D(4, 5, dilation_rate=2, padding="same"), (16, 16, 3), 2 * 16 * 16 * 25 * 3 * 4),
    (keras.layers.Conv2DTranspose(8, 2, strides=2), (16, 16, 32), 2 * 16 * 16 * 4 * 32 * 8),
])
def test_flops_are_two_macs_per_convolution(layer, shape, expected):
    inputs = keras.Input(shape)
    model = keras.Model(inputs, layer(inputs))
    assert flops_per_image(model) == expected


def test_tiny_probe_trains_every_setting_and_writes_its_figures(tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert main(["gpu-probe", "--tiny", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "CPU" and report["backend"] == keras.backend.backend()
    settings = {(f["precision"], f["batch_size"]) for f in report["figures"]}
    assert settings == {("float32", 1), ("float32", 2), ("bf16", 1), ("bf16", 2)}
    assert all(f["images_per_second"] > 0 and "error" not in f for f in report["figures"])
    assert report["train_flops_per_image"] == 3 * report["forward_flops_per_image"] > 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4  # one JSON line per setting as it finishes


def test_the_probe_needs_neither_tensorflow_nor_ray():
    """What the GPU machine lacks: importing the probe and its chain (probe, model, config, its
    loading and its rules) names no TensorFlow, Ray, pyarrow or any other module of this package
    (Keras brings its backend; the probe asks TensorFlow or torch for the device name only when
    Keras runs on them)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "aisd_ray"
    config_modules = sorted(p.relative_to(package).as_posix() for p in (package / "config").glob("*.py"))
    allowed_internal = {"aisd_ray.config", "aisd_ray.model.flexunet"} | {
        f"aisd_ray.config.{Path(m).stem}" for m in config_modules if m != "config/__init__.py"}
    for name in ("bench/gpu_probe.py", "model/flexunet.py", *config_modules):
        body = ast.parse((package / name).read_text()).body  # what importing the module runs
        imported = {alias.name for node in body if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in body if isinstance(node, ast.ImportFrom)
                     and node.module and node.module != "aisd_ray"}
        imported |= {f"aisd_ray.{alias.name}" for node in body if isinstance(node, ast.ImportFrom)
                     and node.module == "aisd_ray" for alias in node.names}
        roots = {m.split(".")[0] for m in imported}
        assert not roots & {"tensorflow", "ray", "pyarrow", "google"}, (name, imported)
        assert {m for m in imported if m.startswith("aisd_ray")} <= allowed_internal, (name, imported)
    # and the AISD model's size and work through it, as infra/README.md (Cost notes) states
    from aisd_ray.config import builtin_config, load_config
    from aisd_ray.model.flexunet import build_flexunet

    model = build_flexunet(load_config(builtin_config("aisd512")).model)
    assert model.count_params() == 124_996_866
    assert np.isclose(flops_per_image(model), 116e9, rtol=0.05)  # infra/README.md's 116 GFLOP per image forward
