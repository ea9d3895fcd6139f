"""Calibration and uncertainty numbers against values derived independently of the code."""

import math

import numpy as np
import pytest

from aisd_ray.scoring import calibration as calib


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _drawn(t0: float, n: int = 40000, classes: int = 3, seed: int = 0):
    """Logits z, labels drawn from softmax(z / t0), and the over-/under-confident softmax(z) the
    'network' reports: the temperature that calibrates softmax(z) is t0."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, classes))
    truth = _softmax(z / t0)
    labels = (rng.random(n)[:, None] > np.cumsum(truth, axis=1)).sum(axis=1)
    return _softmax(z), labels


@pytest.mark.parametrize("t0", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_at(t0):
    probabilities, labels = _drawn(t0)
    assert calib.fit_temperature(probabilities, labels) == pytest.approx(t0, rel=0.06)


def test_fit_temperature_on_passes_fits_what_is_averaged():
    # two identical passes average to one: the same T as one pass
    probabilities, labels = _drawn(2.0)
    stacked = np.stack([probabilities, probabilities])
    assert calib.fit_temperature(stacked, labels) == pytest.approx(calib.fit_temperature(probabilities, labels),
                                                                    rel=1e-3)


def test_scaled_at_t_is_softmax_of_the_logits_over_t():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (50, 4))
    np.testing.assert_allclose(calib.scaled(_softmax(z), 3.0), _softmax(z / 3.0), rtol=1e-9)
    assert (calib.scaled(_softmax(z), 3.0).argmax(1) == z.argmax(1)).all()  # one pass: argmax kept


def test_ece_of_a_calibrated_set_is_near_zero_and_of_an_overconfident_one_large_and_lowered_by_fitting():
    calibrated, labels = _drawn(1.0, n=60000, seed=3)
    assert calib.ece(calibrated, labels) < 0.01
    overconfident, labels = _drawn(3.0, n=60000, seed=4)  # the truth is much softer than what is said
    before = calib.ece(overconfident, labels)
    assert before > 0.1
    t = calib.fit_temperature(overconfident, labels)
    assert calib.ece(calib.scaled(overconfident, t), labels) < before / 5


def test_ece_by_hand():
    # bin of 0.9 (15 bins: 0.8667..0.9333): 10 voxels, 7 right -> |0.7 - 0.9| ; bin of 0.6: 10 voxels, 6 right
    p = np.array([[0.9, 0.1]] * 10 + [[0.4, 0.6]] * 10)
    y = np.array([0] * 7 + [1] * 3 + [1] * 6 + [0] * 4)
    assert calib.ece(p, y) == pytest.approx(0.5 * 0.2 + 0.5 * 0.0)
    r = calib.Reliability()
    r.add(p, y)
    filled = [row for row in r.table() if row["voxels"]]
    assert [row["voxels"] for row in filled] == [10, 10]
    assert [row["accuracy"] for row in filled] == pytest.approx([0.6, 0.7])
    assert math.isnan(calib.ece(np.zeros((0, 2)), np.zeros(0, int)))


def test_entropy_is_one_for_uniform_and_zero_for_certain():
    assert calib.entropy(np.full((2, 5), 0.2)) == pytest.approx([1.0, 1.0])
    assert calib.entropy(np.array([[1.0, 0.0, 0.0]])) == pytest.approx([0.0], abs=1e-6)
    p = np.array([0.75, 0.25])
    assert calib.entropy(p) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2))


def test_case_and_lesion_scores():
    lesion = np.zeros((3, 4, 4), np.float32)
    u = np.zeros((3, 4, 4), np.float32)
    lesion[0, 0, 0], u[0, 0, 0] = 0.9, 0.4  # candidate
    lesion[2, 3, 3], u[2, 3, 3] = 0.2, 0.8  # candidate
    lesion[1, 1, 1], u[1, 1, 1] = 0.05, 1.0  # below 0.1: not counted
    assert calib.case_score(lesion, u) == pytest.approx((0.4 + 0.8) / 2)
    assert calib.case_score(np.zeros((2, 2)), np.ones((2, 2))) == 0.0
    mask = np.zeros((3, 4, 4), bool)
    mask[0, :2, :2] = True  # 4 voxels
    mask[2, 3, 3] = True  # 1 voxel
    u[0, :2, :2] = [[0.1, 0.2], [0.3, 0.4]]
    assert calib.lesion_scores(mask, u) == pytest.approx([0.25, 0.8])  # largest first
    info = calib.annotate({"lesions": [{}, {}]}, mask, calib.case_score(lesion, u), u, {"review_threshold": 0.5}, "tta")
    assert [x["uncertainty"] for x in info["lesions"]] == pytest.approx([0.25, 0.8])
    # u[0, 0, 0] is now 0.1: the case score (0.1 + 0.8) / 2 is below the threshold 0.5
    assert info["uncertainty"]["case_score"] == pytest.approx(0.45) and info["uncertainty"]["review"] is False
    assert calib.annotate({"lesions": []}, mask, calib.case_score(lesion, u), u, None, "single")["uncertainty"]["review"] is None


def test_auroc_by_hand():
    assert calib.auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert calib.auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    # pairs (pos, neg): (0.5, 0.5) tie, (0.5, 0.1) win, (0.3, 0.5) loss, (0.3, 0.1) win -> 2.5 / 4
    assert calib.auroc([0.5, 0.3, 0.5, 0.1], [True, True, False, False]) == 0.625
    assert math.isnan(calib.auroc([0.1, 0.2], [True, True]))


def test_review_threshold_on_hand_made_cases():
    scores = [0.1, 0.2, 0.3, 0.6, 0.7]
    dice = [0.9, 0.8, 0.7, 0.2, 0.1]  # the two worst have the two highest scores: J = 1 at 0.6
    assert calib.review_threshold(scores, dice) == (0.6, "youden")
    # one bad case among good ones with a higher score than it: best J at the bad one's score 0.3
    assert calib.review_threshold([0.1, 0.3, 0.5], [0.9, 0.2, 0.9])[0] in (0.3,)
    # none bad: the top tenth (90th percentile)
    t, rule = calib.review_threshold(list(np.arange(11) / 10), [0.9] * 11)
    assert rule == "top tenth" and t == pytest.approx(0.9)
    t, rule = calib.review_threshold([0.2, 0.4], [0.1, 0.3])  # all bad
    assert rule == "top tenth" and t == pytest.approx(0.38)
    # a case of undefined Dice (nothing in truth nor prediction) is not a bad one
    assert calib.review_threshold([0.1, 0.9], [math.nan, 0.1]) == (0.9, "youden")
    assert calib.is_review(0.5, 0.5) is True and calib.is_review(0.4, 0.5) is False
    assert calib.is_review(0.4, None) is None


def test_pooled_ranking():
    cases = [{"dice": 0.9, "uncertainty": 0.1, "review": False}, {"dice": 0.3, "uncertainty": 0.5, "review": True},
             {"dice": 0.7, "uncertainty": 0.6, "review": True}, {"dice": math.nan, "uncertainty": 0.2, "review": False}]
    out = calib.pooled(cases)
    assert out["cases"] == 3 and out["bad"] == 1 and out["flagged"] == 2
    assert out["auroc"] == 0.5  # the bad case (0.5) beats 0.1 and loses to 0.6
    assert out["unflagged_dice_mean"] == 0.9
