import numpy as np
import pytest
from PIL import Image

from aisd_ray.data.layout import DataError, categorize, iter_split, pair_by_name


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_pair_dirs(tmp_path, names_images, names_masks):
    for n in names_images:
        save(tmp_path / "images" / n, np.zeros((8, 8, 3), np.uint8))
    for n in names_masks:
        save(tmp_path / "masks" / n, np.zeros((8, 8, 3), np.uint8))
    return tmp_path / "images", tmp_path / "masks"


def test_pairs_by_name_not_by_listing_order(tmp_path):
    images, masks = make_pair_dirs(tmp_path, ["b.png", "a.png", "c.png"], ["c.png", "a.png", "b.png"])
    assert [name for name, _, _ in pair_by_name(images, masks)] == ["a", "b", "c"]


def test_unpaired_files_are_named(tmp_path):
    images, masks = make_pair_dirs(tmp_path, ["1.png", "2.png"], ["1.png", "3.png"])
    with pytest.raises(DataError, match=r"2 file\(s\) without a partner.*images/2.png.*masks/3.png"):
        pair_by_name(images, masks)


def test_unreadable_file_is_named(tmp_path):
    images, masks = make_pair_dirs(tmp_path, ["1.png"], [])
    masks.mkdir()
    (masks / "1.png").write_bytes(b"not a png")
    _, samples = iter_split(images, masks, 8, 8, 3, ((0, 0, 0), (255, 255, 255)))
    with pytest.raises(DataError, match=r"masks/1.png: cannot read image"):
        list(samples)


def test_nearest_colour_categorisation():
    rgb = np.array([[[0, 0, 0], [252, 252, 252], [255, 255, 255], [200, 10, 10], [90, 90, 90]]], np.uint8)
    assert categorize(rgb, ((0, 0, 0), (255, 255, 255)), tolerance=None).tolist() == [[0, 1, 1, 0, 0]]
    assert categorize(rgb, ((0, 0, 0), (255, 255, 255), (255, 0, 0)), tolerance=200).tolist() == [[0, 1, 1, 2, 0]]
    assert categorize(rgb[:, :3], ((0, 0, 0), (255, 255, 255))).tolist() == [[0, 1, 1]]  # near-white is lesion


def test_mask_colours_far_from_every_rgb_map_colour_are_an_error_naming_the_file_and_colours():
    rgb = np.array([[[0, 0, 0], [200, 10, 10], [200, 10, 10], [90, 90, 90]]], np.uint8)
    with pytest.raises(DataError, match=r"m.png: 3 pixels are farther than 64 from every rgb_map colour "
                                        r"\[\(0, 0, 0\), \(255, 255, 255\)\] \(most common: \(200, 10, 10\) x2, "
                                        r"\(90, 90, 90\) x1\)"):
        categorize(rgb, ((0, 0, 0), (255, 255, 255)), "m.png")


def test_resize_to_model_size_keeps_classes(tmp_path):
    mask = np.zeros((32, 48, 3), np.uint8)
    mask[8:24, 8:24] = 253
    save(tmp_path / "images" / "x.png", np.full((32, 48, 3), 100, np.uint8))
    save(tmp_path / "masks" / "x.png", mask)
    n, samples = iter_split(tmp_path / "images", tmp_path / "masks", 16, 16, 1, ((0, 0, 0), (255, 255, 255)))
    sample = next(samples)
    assert n == 1 and sample.image.shape == (16, 16, 1) and sample.labels.shape == (16, 16)
    assert set(np.unique(sample.labels)) == {0, 1}


def test_size_mismatch_is_named(tmp_path):
    save(tmp_path / "images" / "x.png", np.zeros((8, 8, 3), np.uint8))
    save(tmp_path / "masks" / "x.png", np.zeros((9, 8, 3), np.uint8))
    _, samples = iter_split(tmp_path / "images", tmp_path / "masks", 8, 8, 3, ((0, 0, 0), (255, 255, 255)))
    with pytest.raises(DataError, match=r"masks/x.png: mask is 8x9 but its image x.png is 8x8"):
        next(samples)
