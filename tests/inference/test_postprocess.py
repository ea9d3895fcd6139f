"""Post-processing on hand-made volumes at an anisotropic spacing: what each rule removes, and that
the choice on validation cases takes a rule only when it raises the mean case Dice by the margin."""

import json
import math
import re

import numpy as np
import pytest

from aisd_ray.data.sources.layout import DataError
from aisd_ray.inference import postprocess
from aisd_ray.scoring.volume_metrics import volume_ml

SPACING = (8.0, 1.0, 0.5)  # mm: thick slices, rectangular pixels; a voxel is 4 mm3 = 0.004 mL


def blob_and_speck():
    """(labels (8, 40, 40) uint8, blob, speck): a 6.4 mL blob (4 x 20 x 20 voxels, part of it class 2)
    with one voxel touching it only by a corner on the next slice (the same lesion under
    26-connectivity), and a 0.2 mL speck (2 x 5 x 5 voxels) apart from it."""
    labels = np.zeros((8, 40, 40), np.uint8)
    labels[1:5, 2:22, 2:22] = 1
    labels[1:5, 2:8, 2:8] = 2
    labels[5, 22, 22] = 1  # corner neighbour of (4, 21, 21)
    blob = labels > 0
    labels[5:7, 30:35, 30:35] = 1
    speck = (labels > 0) & ~blob
    return labels, blob, speck


def test_the_hand_made_volumes_are_what_they_say():
    labels, blob, speck = blob_and_speck()
    assert volume_ml(speck, SPACING) == pytest.approx(0.2)
    assert volume_ml(blob, SPACING) == pytest.approx(6.4 + 0.004)


def test_remove_small_drops_only_the_lesions_under_the_threshold_in_ml():
    labels, blob, speck = blob_and_speck()
    kept = postprocess.remove_small(labels, SPACING, 0.5)
    assert kept.dtype == np.uint8
    assert np.array_equal(kept, np.where(blob, labels, 0))  # the blob, its classes and corner voxel kept
    assert np.array_equal(postprocess.remove_small(labels, SPACING, 0.19), labels)  # 0.2 mL is not under 0.19
    assert not postprocess.remove_small(labels, SPACING, 0.21)[speck].any()
    assert not postprocess.remove_small(labels, SPACING, 7.0).any()  # both under 7 mL
    # the same threshold in voxels, for stores without spacing: 50 voxels is not under 50
    assert np.array_equal(postprocess.remove_small(labels, min_voxels=50), labels)
    assert np.array_equal(postprocess.remove_small(labels, min_voxels=51), kept)
    with pytest.raises(ValueError, match="spacing"):
        postprocess.remove_small(labels, None, 0.5)
    with pytest.raises(ValueError, match="not both"):
        postprocess.remove_small(labels, SPACING, 0.5, min_voxels=3)


def test_keep_largest_keeps_the_big_lesion_and_an_empty_mask_stays_empty():
    labels, blob, _ = blob_and_speck()
    assert np.array_equal(postprocess.keep_largest(labels), np.where(blob, labels, 0))
    empty = np.zeros((3, 4, 4), np.uint8)
    assert not postprocess.keep_largest(empty).any()
    twins = np.zeros((1, 3, 5), np.uint8)
    twins[0, 1, 0] = twins[0, 1, 4] = 1  # equal sizes: the first in C order stays
    assert postprocess.keep_largest(twins).tolist() == [[[0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]]


def test_the_choice_takes_a_rule_only_when_it_raises_the_mean_case_dice():
    labels, blob, speck = blob_and_speck()
    blob_only = np.where(blob, labels, 0)
    # a false speck on one case, a clean second case: removing specks raises the mean by ~0.0077
    cases = [(blob_only, labels, SPACING), (blob_only, blob_only, SPACING)]
    choice = postprocess.choose(cases)
    dice = choice["val_case_dice"]
    assert dice["none"] == pytest.approx((2 * blob.sum() / (2 * blob.sum() + speck.sum()) + 1) / 2)
    assert dice["remove_small_0.1ml"] == dice["none"]  # the 0.2 mL speck is over 0.1 mL
    assert dice["remove_small_0.5ml"] == dice["keep_largest"] == 1.0
    assert (choice["rule"], choice["min_ml"], choice["chosen"]) == ("remove_small", 0.5, "remove_small_0.5ml")
    assert choice["cases"] == 2 and choice["margin"] == postprocess.MARGIN
    # the speck is a true lesion: removing it costs Dice, so nothing is chosen
    truth_speck = [(labels, labels, SPACING), (blob_only, blob_only, SPACING)]
    choice = postprocess.choose(truth_speck)
    assert choice["rule"] == "none" and choice["min_ml"] is None
    assert choice["val_case_dice"]["keep_largest"] < choice["val_case_dice"]["none"] == 1.0
    # the same gain spread over enough clean cases falls under the margin: none
    many = cases + [(blob_only, blob_only, SPACING)] * 2
    assert postprocess.choose(many)["val_case_dice"]["remove_small_0.5ml"] - \
        postprocess.choose(many)["val_case_dice"]["none"] < postprocess.MARGIN
    assert postprocess.choose(many)["rule"] == "none"


def test_without_spacing_the_thresholds_are_voxels_and_a_removed_false_lesion_leaves_the_mean():
    labels, blob, speck = blob_and_speck()
    empty = np.zeros_like(labels)
    # a case without lesion whose prediction is a false speck: Dice 0; once removed, undefined (left out)
    cases = [(np.where(blob, labels, 0), np.where(blob, labels, 0), None), (empty, np.where(speck, 1, 0), None)]
    choice = postprocess.choose(cases)
    assert choice["val_case_dice"]["none"] == pytest.approx(0.5)
    assert choice["val_case_dice"]["remove_small_80vox"] == 1.0  # the 50-voxel speck is under 80 voxels
    assert (choice["rule"], choice["min_voxels"], choice["min_ml"]) == ("remove_small", 80, None)
    assert math.isnan(postprocess.choose([(empty, empty, None)])["val_case_dice"]["none"])
    assert postprocess.choose([(empty, empty, None)])["rule"] == "none"
    with pytest.raises(ValueError, match="no validation cases"):
        postprocess.choose([])


def test_a_choice_is_saved_atomically_read_back_and_a_bad_one_named(tmp_path):
    assert postprocess.load(tmp_path, "x") == postprocess.NONE
    choice = postprocess.choose([(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), SPACING)])
    uri = postprocess.save(str(tmp_path), choice)
    assert uri == str(tmp_path / postprocess.FILE) and [p.name for p in tmp_path.iterdir()] == [postprocess.FILE]
    assert postprocess.load(tmp_path, uri)["rule"] == "none"
    for bad, why in (({"rule": "largest"}, "rule must be one of none, remove_small, keep_largest, got 'largest'"),
                     ({"rule": "remove_small", "min_ml": -1}, "remove_small needs one positive min_ml")):
        (tmp_path / postprocess.FILE).write_text(json.dumps(bad))
        with pytest.raises(DataError, match="^" + re.escape(f"{uri}: {why}")):
            postprocess.load(tmp_path, uri)
    (tmp_path / postprocess.FILE).write_text("{")
    with pytest.raises(DataError, match="not JSON"):
        postprocess.load(tmp_path, uri)
    assert postprocess.describe({"rule": "remove_small", "min_ml": 0.5}) == "remove_small < 0.5 mL"
    assert postprocess.describe({"rule": "remove_small", "min_voxels": 20}) == "remove_small < 20 voxels"
