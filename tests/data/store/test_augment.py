import numpy as np
import pytest
import tensorflow as tf

from aisd_ray.config import AugmentConfig
from aisd_ray.data.store import pipeline
from aisd_ray.data.store.augment import affine_transform, augment_fn
from aisd_ray.data.store.shards import encode_png


def mask_shaped(size=64):
    """A label map with an off-centre, asymmetric blob, and an image that is that mask in white."""
    labels = np.zeros((size, size), np.uint8)
    labels[10:30, 8:20] = 1
    labels[30:40, 12:44] = 1
    image = np.repeat(labels[..., None] * 255, 3, axis=-1).astype(np.float32)
    return image, labels


def run(cfg, seed, index=0):
    image, labels = mask_shaped()
    out = augment_fn(cfg, 64, 64)(tf.constant([seed, index], tf.int64), tf.constant(image), tf.constant(labels))
    return out[0].numpy(), out[1].numpy()


GEOMETRY_ONLY = AugmentConfig(enabled=True, hflip=True, vflip=True, rotation_deg=20, scale=(0.8, 1.2),
                              shear_deg=10, brightness=0.0, contrast=(1.0, 1.0))


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_image_and_mask_move_together(seed):
    image, labels = run(GEOMETRY_ONLY, seed)
    original = mask_shaped()[1]
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}  # nearest: ids stay ids
    assert not np.array_equal(labels, original)  # something moved
    agree = np.mean((image[..., 0] > 127) == (labels == 1))
    assert agree > 0.99, agree  # bilinear vs nearest differ only on the blob's rim


def test_same_seed_same_result_other_seed_other_result():
    a, b, c = run(GEOMETRY_ONLY, 7), run(GEOMETRY_ONLY, 7), run(GEOMETRY_ONLY, 8)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])


def test_identity_settings_change_nothing():
    cfg = AugmentConfig(enabled=True, hflip=False, vflip=False, rotation_deg=0, scale=(1, 1), shear_deg=0,
                        brightness=0, contrast=(1, 1))
    image, labels = run(cfg, 3)
    np.testing.assert_array_equal(labels, mask_shaped()[1])
    np.testing.assert_allclose(image, mask_shaped()[0], atol=1e-3)


def test_rotation_by_90_degrees_about_the_centre():
    t = affine_transform(tf.constant(np.pi / 2), tf.constant(1.0), tf.constant(0.0), 5, 5).numpy()
    # output pixel (x=4, y=2) comes from input (x=2, y=0) under a 90-degree rotation about (2, 2)
    x, y = 4, 2
    src = (t[0] * x + t[1] * y + t[2], t[3] * x + t[4] * y + t[5])
    np.testing.assert_allclose(src, (2, 0), atol=1e-5)


def test_brightness_and_contrast_touch_the_image_only():
    cfg = AugmentConfig(enabled=True, hflip=False, rotation_deg=0, scale=(1, 1), shear_deg=0,
                        brightness=0.2, contrast=(0.5, 0.7))
    image, labels = run(cfg, 1)
    np.testing.assert_array_equal(labels, mask_shaped()[1])
    assert not np.allclose(image, mask_shaped()[0])
    assert image.min() >= 0 and image.max() <= 255


def test_pipeline_batches_are_reproducible_with_augmentation():
    image, labels = mask_shaped()
    rows = [(encode_png(image.astype(np.uint8)), encode_png(labels))] * 6

    def take():
        ds = pipeline.batches(lambda: iter(rows), 3, 2, 3, augment=augment_fn(GEOMETRY_ONLY, 64, 64), augment_seed=11)
        return np.concatenate([y.numpy() for _, y in ds])

    first, second = take(), take()
    np.testing.assert_array_equal(first, second)
    assert not all(np.array_equal(first[0], first[i]) for i in range(1, 6))  # examples differ from each other
