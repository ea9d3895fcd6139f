import numpy as np
import pytest
from PIL import Image

from aisd_ray.data.sources.layout import DataError, categorize, pair_by_name
from aisd_ray.data.sources.masks import original_refs


def _split(images_dir, masks_dir, height, width, channels, rule):
    """The number of pairs of a split and its samples, loaded lazily (as prepare reads them)."""
    refs = original_refs(images_dir, masks_dir, height, width, channels, rule)
    return len(refs), (ref.load() for ref in refs)



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
    _, samples = _split(images, masks, 8, 8, 3, ((0, 0, 0), (255, 255, 255)))
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
    n, samples = _split(tmp_path / "images", tmp_path / "masks", 16, 16, 1, ((0, 0, 0), (255, 255, 255)))
    sample = next(samples)
    assert n == 1 and sample.image.shape == (16, 16, 1) and sample.labels.shape == (16, 16)
    assert set(np.unique(sample.labels)) == {0, 1}


def test_size_mismatch_is_named(tmp_path):
    save(tmp_path / "images" / "x.png", np.zeros((8, 8, 3), np.uint8))
    save(tmp_path / "masks" / "x.png", np.zeros((9, 8, 3), np.uint8))
    _, samples = _split(tmp_path / "images", tmp_path / "masks", 8, 8, 3, ((0, 0, 0), (255, 255, 255)))
    with pytest.raises(DataError, match=r"masks/x.png: mask is 8x9 but its image x.png is 8x8"):
        next(samples)


@pytest.mark.parametrize("path, metadata", [
    ("__MACOSX/image/0072723/._4.png", True), ("image/0072723/._4.png", True), (".DS_Store", True),
    ("image/0072723/.DS_Store", True), ("mask/Thumbs.db", True), ("Desktop.ini", True), ("image/.hidden/1.png", True),
    ("image/0072723/4.png", False), ("train/images/10001.png", False), ("a_.png", False),
])
def test_os_metadata_is_recognised_by_one_rule(path, metadata):
    from aisd_ray.data.sources.layout import is_metadata

    assert is_metadata(path) is metadata


def test_os_metadata_beside_the_slices_is_skipped_and_counted(tmp_path, caplog):
    images, masks = make_pair_dirs(tmp_path, ["1.png", "2.png"], ["1.png", "2.png"])
    for folder in (images, masks):
        (folder / "._1.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not a PNG")
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    with caplog.at_level("INFO"):
        n, samples = _split(images, masks, 8, 8, 3, ((0, 0, 0), (255, 255, 255)))
        assert n == 2 and [s.name for s in samples] == ["1", "2"]
    assert f"{images}: 3 OS metadata file(s) skipped" in caplog.text
    assert f"{masks}: 3 OS metadata file(s) skipped" in caplog.text


def test_an_undecodable_stream_is_named_by_where_not_by_the_stream(tmp_path):
    import io

    from aisd_ray.data.sources.layout import open_image, read_image

    with pytest.raises(DataError) as err:
        open_image(io.BytesIO(b"\x00\x05\x16\x07 not an image"), "image.zip:image/0072723/4.png")
    assert str(err.value).startswith("image.zip:image/0072723/4.png: cannot read image")
    assert "BytesIO" not in str(err.value)
    with pytest.raises(DataError) as err:
        read_image(io.BytesIO(b"junk"), 3)
    assert "BytesIO" not in str(err.value)
