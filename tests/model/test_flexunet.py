import numpy as np
import pytest

from aisd_ray.config import ModelConfig, builtin_config, load_config
from aisd_ray.model.flexunet import build_flexunet, level_dilations, level_kernels


def test_seed_aisd_config_builds_124_996_866_parameters():
    model = build_flexunet(load_config(builtin_config("aisd512")).model)
    assert model.count_params() == 124_996_866


def test_kernel_and_dilation_taper_like_the_seed():
    cfg = ModelConfig(base_kernels=(9, 9), dilation=(3, 3), num_layers=8)
    assert [k[0] for k in level_kernels(cfg)] == [9, 7, 5, 3, 3, 3, 3, 3]
    assert [d[0] for d in level_dilations(cfg)] == [3, 2, 1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("normalization, classes", [(False, 2), (True, 3)])
def test_output_is_a_per_pixel_distribution(normalization, classes):
    cfg = ModelConfig(image_width=32, image_height=32, base_filters=4, num_layers=3,
                      normalization=normalization, num_classes=classes)
    model = build_flexunet(cfg)
    out = model(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")).numpy()
    assert out.shape == (2, 32, 32, classes)
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)
    assert any("bn" in layer.name for layer in model.layers) == normalization
