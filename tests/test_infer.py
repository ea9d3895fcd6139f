import numpy as np
from PIL import Image

from aisd_ray.infer import infer_folder


def test_masks_come_back_at_each_input_size_with_palette_colours(trained_run, tmp_path):
    export_uri = trained_run[3]
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (100, 80, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(images / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(images / "c.jpeg")
    out = tmp_path / "out"
    written = infer_folder(export_uri, images, str(out), batch_size=2, progress=False)
    assert written == ["a.png", "b.png", "c.png"]
    for name, size in (("a", (80, 100)), ("b", (64, 64)), ("c", (200, 300))):
        mask = Image.open(out / f"{name}.png")
        assert mask.mode == "P" and mask.size == size
        assert mask.getpalette()[:6] == [0, 0, 0, 255, 255, 255]
        assert set(np.unique(np.asarray(mask))) <= {0, 1}
        overlay = Image.open(out / "overlays" / f"{name}.png")
        assert overlay.size == (2 * size[0] + 4, size[1])


def test_no_images_is_an_error(trained_run, tmp_path):
    import pytest

    from aisd_ray.data.layout import DataError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images"):
        infer_folder(trained_run[3], tmp_path / "empty", str(tmp_path / "out"), progress=False)


def test_upscaled_masks_follow_the_probabilities_not_the_model_grid():
    from aisd_ray.data.layout import labels_at, resize_labels

    probs = np.zeros((4, 4, 2), np.float32)
    probs[..., 0] = 1.0
    probs[1:3, 1:3] = (0.0, 1.0)  # a 2x2 lesion in a 4x4 prediction
    smooth = labels_at(probs, 32, 32)
    blocky = resize_labels(np.argmax(probs, -1).astype(np.uint8), 32, 32)
    assert smooth.shape == (32, 32) and smooth[16, 16] == 1 and smooth[0, 0] == 0
    assert smooth.sum() < blocky.sum()  # bilinear probabilities round the square's corners
    assert not smooth[8, 8] and blocky[8, 8]  # the corner pixel of the 2x2 block
    assert (labels_at(probs, 4, 4) == np.argmax(probs, -1)).all()
