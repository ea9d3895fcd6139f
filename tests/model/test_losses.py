import numpy as np
import pytest
import tensorflow as tf

from aisd_ray.model import losses


def cases(seed, classes=2):
    rng = np.random.default_rng(seed)
    labels = (rng.random((3, 8, 8)) < 0.2).astype(int) * rng.integers(1, classes, (3, 8, 8))
    labels[0] = 0  # an empty mask
    y = np.eye(classes, dtype=np.float32)[labels]
    p = rng.dirichlet(np.ones(classes), (3, 8, 8)).astype(np.float32)
    return y, p


def ref_ce(y, p):
    return -np.mean(np.sum(y * np.log(np.clip(p, 1e-7, 1 - 1e-7)), -1), axis=(1, 2))


def ref_dice(y, p, smooth=1.0):
    inter = np.sum(y[..., 1:] * p[..., 1:], axis=(1, 2))
    denom = np.sum(y[..., 1:], axis=(1, 2)) + np.sum(p[..., 1:], axis=(1, 2))
    return 1 - np.mean((2 * inter + smooth) / (denom + smooth), axis=-1)


@pytest.mark.parametrize("seed, classes", [(0, 2), (1, 2), (2, 4)])
@pytest.mark.parametrize("name, reference", [
    ("ce", ref_ce), ("dice", ref_dice), ("ce_dice", lambda y, p: ref_ce(y, p) + ref_dice(y, p))])
def test_losses_match_numpy_per_example(seed, classes, name, reference):
    y, p = cases(seed, classes)
    got = losses.get_loss(name)(tf.constant(y), tf.constant(p)).numpy()
    assert got.shape == (3,)
    np.testing.assert_allclose(got, reference(y, p), rtol=1e-5, atol=1e-6)


def test_perfect_prediction_has_near_zero_loss():
    y, _ = cases(3)
    assert losses.ce_dice_loss(tf.constant(y), tf.constant(y)).numpy().max() < 1e-5
