"""The mask rule: each reading, the choice per split, and the errors naming the file and values."""

import numpy as np
import pytest
from PIL import Image

from aisd_ray.config import ConfigError
from aisd_ray.data.sources.layout import DataError
from aisd_ray.data.sources.masks import FOLDER_ORDER, RAW_RELEASE_ORDER, MaskRule, SplitMasks, read_pixels
from tests.conftest import tiny_config

RULE = MaskRule()  # black/white, raw_label_map (0, 1, 1, 1, 0, 1), tolerance 64, auto
LESION = np.zeros((8, 8), bool)
LESION[2:5, 3:6] = True  # 9 lesion pixels


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def split(tmp_path, arrays, rule=RULE, order=FOLDER_ORDER):
    """The arrays saved as one split's masks: (its SplitMasks, the class ids of each)."""
    paths = [save(tmp_path / f"{i}.png", a) for i, a in enumerate(arrays)]
    masks = SplitMasks.of_paths(rule, paths, "the test split", order)
    return masks, [masks.labels(p, p) for p in paths]


def colour(lesion, white=254):
    return np.repeat((lesion * white).astype(np.uint8)[..., None], 3, axis=-1)


def test_colour_masks_are_read_by_nearest_rgb_map_colour(tmp_path):
    masks, labels = split(tmp_path, [colour(LESION, 252), colour(LESION, 255), colour(np.zeros((8, 8), bool))])
    assert masks.reading == "colours"
    assert [int(x.sum()) for x in labels] == [9, 9, 0]
    np.testing.assert_array_equal(labels[0], LESION.astype(np.uint8))


def test_class_id_masks_0_1_are_class_ids(tmp_path):
    masks, labels = split(tmp_path, [LESION.astype(np.uint8), np.zeros((8, 8), np.uint8)])
    assert masks.reading == "class_ids"
    np.testing.assert_array_equal(labels[0], LESION.astype(np.uint8))


def test_aisd_label_masks_are_raw_labels_mapped_by_raw_label_map(tmp_path):
    raw = (LESION * 2).astype(np.uint8)
    raw[7, :] = 4  # "invisible acute": background by the default map
    masks, labels = split(tmp_path, [raw, LESION.astype(np.uint8)])  # 0/1 fits class ids, 0/2/4 does not
    assert masks.reading == "raw_labels"
    np.testing.assert_array_equal(labels[0], LESION.astype(np.uint8))
    other = MaskRule(raw_label_map=(0, 0, 0, 1, 0, 1))  # remote and clear acute infarcts left out
    masks, labels = split(tmp_path / "other", [raw], other)
    assert masks.reading == "raw_labels" and not labels[0].any()


def test_the_raw_release_prefers_raw_labels_where_class_ids_fit_too(tmp_path):
    rule = MaskRule(raw_label_map=(0, 0, 1, 1, 0, 1))  # label 1 (remote infarct) is background
    masks, labels = split(tmp_path, [LESION.astype(np.uint8)], rule, RAW_RELEASE_ORDER)
    assert masks.reading == "raw_labels" and not labels[0].any()
    masks, labels = split(tmp_path / "folder", [LESION.astype(np.uint8)], rule)
    assert masks.reading == "class_ids" and labels[0].sum() == 9


def test_all_zero_masks_are_background_under_any_reading(tmp_path):
    zero = np.zeros((8, 8), np.uint8)
    masks, labels = split(tmp_path, [zero, zero])
    assert masks.reading == "class_ids" and not any(x.any() for x in labels)
    masks, labels = split(tmp_path / "c", [zero, colour(LESION)])  # beside colour masks: colours
    assert masks.reading == "colours" and [int(x.sum()) for x in labels] == [0, 9]


@pytest.mark.parametrize("kind", ["1-bit", "16-bit", "LA", "palette", "grey RGB"])
def test_storage_formats_of_label_masks(tmp_path, kind):
    path = tmp_path / "m.png"
    if kind == "1-bit":
        Image.fromarray(LESION).convert("1").save(path)
    elif kind == "16-bit":
        Image.fromarray(LESION.astype(np.uint16)).save(path)  # I;16, values 0/1
    elif kind == "LA":
        Image.fromarray(np.stack([LESION * 2, np.full((8, 8), 255)], -1).astype(np.uint8), "LA").save(path)
    elif kind == "palette":
        image = Image.fromarray(LESION.astype(np.uint8), "P")
        image.putpalette([0, 0, 0, 255, 255, 255])
        image.save(path)
    else:
        Image.fromarray(np.repeat((LESION * 2).astype(np.uint8)[..., None], 3, -1)).save(path)
    masks = SplitMasks.of_paths(RULE, [path], "one file")
    np.testing.assert_array_equal(masks.labels(path, path), LESION.astype(np.uint8))
    assert masks.reading == {"palette": "colours", "LA": "raw_labels", "grey RGB": "raw_labels"}.get(kind, "class_ids")


def test_a_mask_that_fits_no_reading_names_the_file_and_its_values(tmp_path):
    bad = (LESION * 9).astype(np.uint8)
    with pytest.raises(DataError, match=r"1\.png: label value 9 is outside 0\.\.5 .*values seen: 0, 9"):
        split(tmp_path, [LESION.astype(np.uint8), bad])
    red = colour(LESION)
    red[LESION] = (220, 20, 20)
    with pytest.raises(DataError, match=r"0\.png: 9 pixels are farther than 64 from every rgb_map colour.*"
                                        r"\(220, 20, 20\) x9"):
        split(tmp_path / "red", [red])


def test_a_16_bit_mask_gets_mask_advice_not_ct_advice(tmp_path):
    with pytest.raises(DataError) as info:
        split(tmp_path, [(LESION * 40000).astype(np.uint16)])
    message = str(info.value)
    assert "0.png: label value 40000 is outside 0..5" in message and "values above 255 (I;16)" in message
    assert "0, 40000 (I;16)" in message and "window" not in message


def test_masks_of_one_split_that_disagree_name_the_odd_one(tmp_path):
    arrays = [colour(LESION), colour(LESION), LESION.astype(np.uint8), colour(LESION)]
    with pytest.raises(DataError) as info:
        split(tmp_path, arrays)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / '2.png'}: as rgb_map colours its values would all be class 0, and 3 of "
                              "the 4 masks of the test split are rgb_map colours")
    assert f"e.g. {tmp_path / '0.png'}: 0, 254" in message and "values 0, 1 fit class ids or raw AISD labels" in message


@pytest.mark.parametrize("chosen, array, fits", [
    ("class_ids", LESION * 2, "raw AISD labels"),
    ("colours", LESION * 1, "class ids or raw AISD labels"),
    ("raw_labels", LESION * 255, "rgb_map colours"),
])
def test_an_explicit_reading_the_data_do_not_fit_is_refused(tmp_path, chosen, array, fits):
    with pytest.raises(DataError, match=rf"0\.png: data\.mask_values is '{chosen}' but .*fit {fits} "):
        split(tmp_path, [array.astype(np.uint8)], MaskRule(mask_values=chosen))


def test_an_explicit_reading_that_fits_is_used(tmp_path):
    masks, labels = split(tmp_path, [LESION.astype(np.uint8)], MaskRule(mask_values="raw_labels"))
    assert masks.reading == "raw_labels" and labels[0].sum() == 9


def test_values_as_the_rule_sees_them(tmp_path):
    path = save(tmp_path / "f.tif", np.array([[0.0, 1.5]], np.float32))  # a float TIFF
    with pytest.raises(DataError, match=r"f\.tif: mask holds non-integer values \(F\)"):
        read_pixels(path, path)
    path = save(tmp_path / "c.png", colour(LESION))
    assert read_pixels(path, path).grey  # three equal channels are grey values


def test_mask_values_is_validated():
    with pytest.raises(ConfigError, match=r"\[data\] mask_values: must be one of auto, colours, class_ids"):
        tiny_config("data.mask_values='labels'")
    assert MaskRule.of(tiny_config("data.mask_values='class_ids'").data).mask_values == "class_ids"
