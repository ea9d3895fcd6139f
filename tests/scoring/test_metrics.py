import math

import numpy as np
import pytest

from aisd_ray.scoring import metrics


def reference_dice(t, p):
    t, p = t > 0, p > 0
    denom = t.sum() + p.sum()
    return math.nan if denom == 0 else 2 * (t & p).sum() / denom


@pytest.mark.parametrize("seed", range(5))
def test_lesion_counts_and_scores_match_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    truth = (rng.random((6, 16, 16)) < rng.uniform(0, 0.3)).astype(np.uint8)
    pred = (rng.random((6, 16, 16)) < rng.uniform(0, 0.3)).astype(np.uint8) * rng.integers(1, 3)
    truth[0] = 0  # an empty mask
    pred[0] = 0
    counts = metrics.lesion_counts(truth, pred)
    for i in range(6):
        got = metrics.scores_from_counts(*counts[i])["dice"]
        want = reference_dice(truth[i], pred[i])
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)
    summary = metrics.summarize(counts)
    assert summary["lesion_dice"] == pytest.approx(reference_dice(truth, pred))
    defined = [reference_dice(truth[i], pred[i]) for i in range(6)]
    assert summary["lesion_dice_per_image"] == pytest.approx(np.nanmean(defined))
    t, p = truth > 0, pred > 0
    assert summary["lesion_iou"] == pytest.approx((t & p).sum() / (t | p).sum())
    assert summary["lesion_precision"] == pytest.approx((t & p).sum() / p.sum())
    assert summary["lesion_recall"] == pytest.approx((t & p).sum() / t.sum())


def test_empty_truth_and_prediction_is_undefined_not_perfect():
    scores = metrics.scores_from_counts(0, 0, 0)
    assert all(math.isnan(v) for v in scores.values())
    counts = metrics.lesion_counts(np.zeros((1, 4, 4)), np.ones((1, 4, 4)))
    assert metrics.scores_from_counts(*counts[0])["dice"] == 0.0  # false positives on an empty slice


def test_seed_metric_is_background_dominated():
    """A 1%-lesion slice predicted all background scores ~0.99 on the original's metric, 0 on ours."""
    truth = np.zeros((1, 100, 100), np.int64)
    truth[0, :10, :10] = 1
    onehot = np.eye(2)[truth]
    all_background = np.eye(2)[np.zeros_like(truth)]
    assert metrics.dice_coef_multiclass(onehot, all_background) == pytest.approx(0.99, abs=1e-3)
    assert metrics.summarize(metrics.lesion_counts(truth, np.zeros_like(truth)))["lesion_dice"] == 0.0


def test_seed_metric_matches_formula():
    rng = np.random.default_rng(1)
    y = np.eye(3)[rng.integers(0, 3, (2, 8, 8))]
    p = rng.dirichlet(np.ones(3), (2, 8, 8))
    want = np.mean([(2 * (y[i] * p[i]).sum() + 1) / (y[i].sum() + p[i].sum() + 1) for i in range(2)])
    assert metrics.dice_coef_multiclass(y, p) == pytest.approx(want)


def test_training_loop_seed_metric_matches_numpy():
    import tensorflow as tf

    from aisd_ray.train.loop import seed_dice

    rng = np.random.default_rng(2)
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, (3, 8, 8))]
    p = rng.dirichlet(np.ones(2), (3, 8, 8)).astype(np.float32)
    got = seed_dice(tf.constant(y), tf.constant(p)).numpy()
    want = [metrics.dice_coef_multiclass(y[i:i + 1], p[i:i + 1]) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def _volume():
    v = np.zeros((3, 10, 10), np.uint8)
    return v


def test_case_scores_count_3d_lesions_found_missed_and_false():
    truth, pred = _volume(), _volume()
    truth[0:2, 1:3, 1:3] = 1  # lesion A spans two slices: one 3D component
    truth[2, 7:9, 7:9] = 1  # lesion B
    pred[1, 2:4, 2:4] = 1  # touches A on slice 1
    pred[0, 6:8, 0:2] = 1  # overlaps nothing: false
    scores = metrics.case_scores(truth, pred)
    assert (scores["true_lesions"], scores["found_lesions"], scores["missed_lesions"],
            scores["false_lesions"]) == (2, 1, 1, 1)
    tp, fp, fn = 1, 3 + 4, 8 + 4 - 1
    assert scores["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert (scores["true_volume"], scores["pred_volume"], scores["slices"]) == (12, 8, 3)


def test_diagonal_neighbours_across_slices_are_one_lesion():
    truth = _volume()
    truth[0, 1, 1] = truth[1, 2, 2] = 1
    assert metrics.case_scores(truth, truth)["true_lesions"] == 1


def test_summarize_cases_pools_detection_and_volumes():
    rows = [{"dice": 0.5, "true_lesions": 2, "found_lesions": 1, "false_lesions": 1, "true_volume": 10,
             "pred_volume": 8},
            {"dice": math.nan, "true_lesions": 0, "found_lesions": 0, "false_lesions": 0, "true_volume": 0,
             "pred_volume": 0},
            {"dice": 1.0, "true_lesions": 1, "found_lesions": 1, "false_lesions": 0, "true_volume": 4,
             "pred_volume": 4}]
    out = metrics.summarize_cases(rows)
    assert out["case_dice_mean"] == pytest.approx(0.75) and out["case_dice_median"] == pytest.approx(0.75)
    assert out["lesion_detection_rate"] == pytest.approx(2 / 3)
    assert out["false_lesions_per_case"] == pytest.approx(1 / 3)
    assert out["volume_abs_error_mean"] == pytest.approx(2 / 3)
    assert out["volume_correlation"] == pytest.approx(np.corrcoef([10, 0, 4], [8, 0, 4])[0, 1])


def _class_reference(t, p, k):
    """tp, fp, fn of class k counted pixel by pixel (no vectorised shortcut)."""
    tp = fp = fn = 0
    for a, b in zip(np.ravel(t), np.ravel(p)):
        tp += int(a == k and b == k)
        fp += int(a != k and b == k)
        fn += int(a == k and b != k)
    return tp, fp, fn


def test_class_counts_by_hand():
    """Core (2) predicted as penumbra (1) is a miss of core, a false penumbra, and lesion all the same."""
    truth = np.array([[[0, 1, 1, 2],
                       [0, 2, 2, 0]]])
    pred = np.array([[[1, 1, 0, 1],
                      [0, 2, 0, 0]]])
    counts = metrics.class_counts(truth, pred, 3)
    assert counts.shape == (1, 2, 3) and counts.dtype == np.int64
    assert counts[0].tolist() == [[1, 2, 1],   # penumbra: (0,1) found; (0,0), (0,3) false; (0,2) missed
                                  [1, 0, 2]]   # core: (1,1) found; (0,3), (1,2) missed
    assert metrics.lesion_counts(truth, pred)[0].tolist() == [3, 1, 2]
    summary = metrics.summarize(metrics.lesion_counts(truth, pred), counts, ["penumbra", "core"])
    assert summary["penumbra_dice"] == pytest.approx(2 / 5) and summary["core_dice"] == pytest.approx(2 / 4)
    assert summary["lesion_dice"] == pytest.approx(6 / 9)
    assert summary["core_recall"] == pytest.approx(1 / 3) and summary["penumbra_precision"] == pytest.approx(1 / 3)
    assert summary["class_dice_mean"] == pytest.approx((2 / 5 + 2 / 4) / 2)
    assert summary["images_with_core"] == 1 and summary["images_with_penumbra"] == 1


@pytest.mark.parametrize("seed", range(3))
def test_class_counts_and_summary_match_a_pixel_by_pixel_count(seed):
    rng = np.random.default_rng(seed)
    truth = rng.choice(4, size=(5, 8, 8), p=[0.7, 0.1, 0.1, 0.1])
    pred = rng.choice(4, size=(5, 8, 8), p=[0.7, 0.1, 0.1, 0.1])
    truth[0] = 0
    pred[0] = 0  # an empty slice: every class undefined there
    pred[1][pred[1] == 3] = 0  # class 3 never predicted on slice 1
    names = ["a", "b", "c"]
    counts = metrics.class_counts(truth, pred, 4)
    for i in range(5):
        for k in (1, 2, 3):
            assert tuple(counts[i, k - 1]) == _class_reference(truth[i], pred[i], k)
    summary = metrics.summarize(metrics.lesion_counts(truth, pred), counts, names)
    for k, name in enumerate(names, start=1):
        tp, fp, fn = _class_reference(truth, pred, k)
        assert summary[f"{name}_dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert summary[f"{name}_iou"] == pytest.approx(tp / (tp + fp + fn))
        per_image = [reference_dice(truth[i] == k, pred[i] == k) for i in range(5)]
        assert summary[f"{name}_dice_per_image"] == pytest.approx(np.nanmean(per_image))
    assert summary["class_dice_mean"] == pytest.approx(np.mean([summary[f"{n}_dice"] for n in names]))
    assert summary["lesion_dice"] == pytest.approx(reference_dice(truth, pred))


def test_one_lesion_class_adds_nothing_and_selection_score_is_the_lesion_dice():
    rng = np.random.default_rng(7)
    truth = (rng.random((4, 8, 8)) < 0.3).astype(np.uint8)
    pred = (rng.random((4, 8, 8)) < 0.3).astype(np.uint8)
    lesion = metrics.lesion_counts(truth, pred)
    per_class = metrics.class_counts(truth, pred, 2)
    assert np.array_equal(per_class[:, 0], lesion)
    plain = metrics.summarize(lesion)
    assert metrics.summarize(lesion, per_class, ["lesion"]) == plain  # the two-class default: no new key
    named = metrics.summarize(lesion, per_class, ["infarct"])  # one class named otherwise: equal copies
    assert {k: named[k] for k in plain} == plain and "class_dice_mean" not in named
    assert named["infarct_dice"] == plain["lesion_dice"]
    assert named["infarct_iou_per_image"] == plain["lesion_iou_per_image"]
    dice = metrics.scores_from_counts(*per_class.sum(axis=0)[0])["dice"]
    assert metrics.selection_score([dice]) == plain["lesion_dice"]  # exactly: picks the same checkpoint


def test_selection_score_is_the_mean_over_classes_with_a_dice():
    assert metrics.selection_score([0.2, 0.6]) == pytest.approx(0.4)
    assert metrics.selection_score([math.nan, 0.6]) == pytest.approx(0.6)  # a class absent everywhere
    assert math.isnan(metrics.selection_score([math.nan, math.nan]))
    assert metrics.foreground_names(None, 2) == ["lesion"]
    assert metrics.foreground_names(["bg", "penumbra", "core"], 3) == ["penumbra", "core"]
    assert metrics.foreground_names(None, 3) == ["class_1", "class_2"]


def test_case_scores_per_class_and_their_summary():
    truth = np.zeros((3, 6, 6), np.uint8)
    pred = np.zeros((3, 6, 6), np.uint8)
    truth[0:2, 1:3, 1:3] = 1  # one penumbra lesion over two slices, found
    pred[1, 1:3, 1:3] = 1
    truth[2, 4:6, 4:6] = 2  # one core lesion, predicted as penumbra: missed as core
    pred[2, 4:6, 4:6] = 1
    pred[0, 5, 0] = 2  # a false core voxel
    rows = [{"case_id": "a", **metrics.case_scores(truth, pred),
             **metrics.class_case_scores(truth, pred, ["penumbra", "core"])}]
    row = rows[0]
    assert row["true_lesions"] == 2 and row["found_lesions"] == 2  # lesion-wise both are found
    assert row["penumbra_true_lesions"] == 1 and row["penumbra_found_lesions"] == 1
    assert row["penumbra_false_lesions"] == 1  # the core lesion's voxels predicted as penumbra
    assert row["penumbra_dice"] == pytest.approx(2 * 4 / (8 + 8))
    assert row["core_true_lesions"] == 1 and row["core_missed_lesions"] == 1 and row["core_false_lesions"] == 1
    assert row["core_dice"] == 0.0 and row["core_true_volume"] == 4 and row["core_pred_volume"] == 1
    summary = metrics.summarize_cases(rows, ["penumbra", "core"])
    assert summary["core_case_dice_mean"] == 0.0 and summary["core_lesions_missed"] == 1
    assert summary["penumbra_case_dice_mean"] == pytest.approx(0.5) and summary["penumbra_lesions_false"] == 1
    assert summary["case_dice_mean"] == row["dice"] and "cases" in summary and "core_cases" not in summary
    assert metrics.summarize_cases(rows, ["lesion"]) == metrics.summarize_cases(rows)
