"""Calibration on a real small export: the temperature applied by LoadedExport, fitted by
``calibrate`` on a valid split and written as calibration.json, reported by evaluate (ECE before
and after, reliability.png, per-case uncertainty and review) and by infer on CT volumes."""

import csv
import json
import math
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from aisd_ray.data.store import shards
from aisd_ray.inference.export import CALIBRATION, LoadedExport


def _images(store, split="test", n=4):
    manifest = shards.ShardStore.open(store, checksums=False).manifest
    arrays = [shards.record_to_arrays(r) for _, r in zip(range(n), shards.iter_records(store, manifest, split))]
    return np.stack([a[0] for a in arrays]), np.stack([a[1] for a in arrays])


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def raw_store(tmp_path_factory):
    """A raw-release store of 8 cases (4 slices each): a valid split of patients, 2 test cases."""
    from aisd_ray.config import AISD_TEST_CASES
    from aisd_ray.data.store.prepare import prepare
    from aisd_ray.data.synthetic.slices import write_synthetic_raw
    from tests.conftest import tiny_config

    root = tmp_path_factory.mktemp("calib-raw")
    cases = list(AISD_TEST_CASES[:2]) + [f"100000{i}" for i in range(1, 7)]
    write_synthetic_raw(root / "raw", tiny_config().synthetic, cases, slices=4, progress=False)
    prepare(tiny_config(f"data.source_dir='{root / 'raw'}'", "data.valid_fraction=0.4"), str(root / "shards"),
            progress=False)
    return str(root / "shards")


@pytest.fixture(scope="module")
def calibrated(trained_run, raw_store, tmp_path_factory):
    """A copy of the session's export, calibrated on the raw store's valid split; its record."""
    from aisd_ray.evaluation.calibrate import calibrate

    export = tmp_path_factory.mktemp("calib") / "export"
    shutil.copytree(trained_run[3], export)
    record = calibrate(str(export), raw_store, "valid", batch_size=4, tta=True, max_voxels=20000)
    return str(export), record


def test_loaded_export_applies_the_temperature_to_each_pass(trained_run, tmp_path):
    _, store, _, export_uri = trained_run
    images, _ = _images(store)
    plain = LoadedExport(export_uri, tta=False)
    assert plain.temperature == 1.0 and plain.calibration is None
    copy = tmp_path / "export"
    shutil.copytree(export_uri, copy)
    (copy / CALIBRATION).write_text(json.dumps({"temperature": 2.0, "review_threshold": 0.3}))
    hot = LoadedExport(str(copy), tta=False)
    assert hot.temperature == 2.0 and hot.calibration["review_threshold"] == 0.3
    p = plain.predict(images)["probabilities"].numpy().astype(np.float64)
    out = {k: v.numpy() for k, v in hot.predict(images).items()}
    # softmax(log p / T) by hand: what softmax(logits / T) is
    np.testing.assert_allclose(out["probabilities"], _softmax(np.log(np.clip(p, 1e-12, 1)) / 2.0), atol=1e-5)
    assert not np.allclose(out["probabilities"], p, atol=1e-4)  # the probabilities change ...
    np.testing.assert_array_equal(out["labels"], p.argmax(-1))  # ... their argmax does not
    entropy = -(out["probabilities"] * np.log(np.clip(out["probabilities"], 1e-12, 1))).sum(-1) / math.log(p.shape[-1])
    np.testing.assert_allclose(out["uncertainty"], entropy, atol=1e-5)
    assert out["uncertainty"].dtype == np.float32 and out["uncertainty"].shape == p.shape[:-1]
    # with TTA: each pass scaled, then averaged
    both = plain.predict(images, tta=True, passes=True)["passes"].numpy().astype(np.float64)
    assert both.shape[0] == 2
    expected = np.mean([_softmax(np.log(np.clip(q, 1e-12, 1)) / 2.0) for q in both], axis=0)
    np.testing.assert_allclose(hot.predict(images, tta=True)["probabilities"].numpy(), expected, atol=1e-5)
    (copy / CALIBRATION).write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match="calibration.json: temperature -1"):
        LoadedExport(str(copy))


def test_calibrate_writes_its_record_into_the_export(calibrated, raw_store):
    export, record = calibrated
    on_disk = json.loads((__import__("pathlib").Path(export) / CALIBRATION).read_text())
    assert on_disk["temperature"] == pytest.approx(record["temperature"])
    assert 0.05 <= record["temperature"] <= 20
    assert record["nll_after"] <= record["nll_before"] + 1e-9  # T = 1 is one of the candidates
    manifest = shards.ShardStore.open(raw_store, checksums=False).manifest
    valid_cases = manifest["source"]["cases"]["valid"]
    assert record["fitted_on"]["cases"] == len(valid_cases) == len(record["cases"])
    assert record["fitted_on"]["voxels_in_split"] == manifest["splits"]["valid"]["records"] * 64 * 64
    assert 0 < record["fitted_on"]["voxels"] <= record["fitted_on"]["voxels_in_split"]
    assert record["fitted_on"]["passes"] == 2 and record["review_chosen_by"] in ("youden", "top tenth")
    scores = [c["uncertainty"] for c in record["cases"]]
    assert min(scores) <= record["review_threshold"] <= max(scores)
    assert LoadedExport(export).temperature == pytest.approx(record["temperature"])


def test_evaluate_reports_ece_before_and_after_and_flags_cases(calibrated, raw_store, tmp_path):
    from aisd_ray.evaluation.evaluate import evaluate_export

    export, record = calibrated
    report = evaluate_export(export, raw_store, str(tmp_path / "eval"), "test", progress=False, overlays=False,
                             tta=False)
    assert report["temperature"] == pytest.approx(record["temperature"]) and report["ece_bins"] == 15
    # ECE at T = 1, derived here: top-label confidence, 15 equal-width bins, weighted by bin share
    plain = LoadedExport(export, tta=False)
    manifest = shards.ShardStore.open(raw_store, checksums=False).manifest
    conf, right = [], []
    for r in shards.iter_records(raw_store, manifest, "test"):
        image, truth = shards.record_to_arrays(r)
        p = plain.predict(image[None], temperature=1.0)["probabilities"].numpy()[0]
        conf.append(p.max(-1).ravel())
        right.append((p.argmax(-1) == truth).ravel())
    conf, right = np.concatenate(conf), np.concatenate(right)
    which = np.minimum((conf * 15).astype(int), 14)
    expected = sum(abs(right[which == b].mean() - conf[which == b].mean()) * (which == b).mean()
                   for b in range(15) if (which == b).any())
    assert report["ece_before"] == pytest.approx(expected, abs=1e-5)
    assert report["ece_after"] >= 0 and len(report["reliability"]["after"]) == 15
    assert (tmp_path / "eval" / "reliability.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(tmp_path / "eval" / "per_case.csv")))
    assert {"uncertainty", "review"} <= set(rows[0])
    for row in rows:
        assert row["review"] == str(float(row["uncertainty"]) >= record["review_threshold"])
    block = report["uncertainty"]
    assert block["threshold"] == record["review_threshold"] and "entropy" in block["measure"]
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"ece_before", "ece_after", "ece_bins", "temperature"} <= set(saved)


def test_infer_on_ct_writes_uncertainty_and_the_review_flag(calibrated, tmp_path):
    from aisd_ray.cli import main
    from aisd_ray.data.synthetic.volumes import write_nifti_case
    from tests.helpers import head_with_block

    export, record = calibrated
    hu, _ = head_with_block()
    write_nifti_case(hu, (5.0, 0.9, 0.8), tmp_path / "in" / "scan.nii.gz")
    out = tmp_path / "out"
    assert main(["infer", "--model", export, "--input", str(tmp_path / "in" / "scan.nii.gz"), "--output", str(out),
                 "--uncertainty", "--probabilities", "--no-tta"]) == 0
    summary = json.loads((out / "cases" / "scan" / "summary.json").read_text())
    block = summary["uncertainty"]
    assert block["threshold"] == record["review_threshold"]
    assert block["review"] is (block["case_score"] >= record["review_threshold"])
    assert 0.0 <= block["case_score"] <= 1.0 and "entropy" in block["measure"]
    assert all(0.0 <= lesion["uncertainty"] <= 1.0 for lesion in summary["lesions"])
    [row] = list(csv.DictReader(open(out / "cases.csv")))
    assert float(row["uncertainty"]) == pytest.approx(block["case_score"]) and row["review"] == str(block["review"])
    u = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "cases" / "scan" / "uncertainty.nii.gz")))
    assert u.dtype == np.float32 and u.shape == hu.shape and 0.0 <= u.min() and u.max() <= 1.0
    p = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "cases" / "scan" / "probabilities.nii.gz")))
    # the voxel map and the written probability agree: the map is the entropy at the model's size resized
    # to the scan, the probability resized first: where the probabilities are locally flat the two are the
    # entropy of (1 - p, p), and over the whole scan they differ only along edges (and float16 rounding)
    both = np.clip(np.stack([1 - p, p], -1).astype(np.float64), 1e-12, 1)
    derived = -(both * np.log(both)).sum(-1) / math.log(2)
    assert np.corrcoef(u.ravel(), derived.ravel())[0, 1] > 0.95 and np.abs(u - derived).mean() < 0.03
    assert (out / "cases" / "scan" / "preview.png").stat().st_size > 1000


def test_an_export_without_calibration_flags_nothing(tmp_path):
    from aisd_ray.data.synthetic.volumes import write_nifti_case
    from aisd_ray.inference.infer_volumes import infer_volumes
    from tests.helpers import ThresholdModel, head_with_block

    hu, _ = head_with_block()
    write_nifti_case(hu, (5.0, 0.9, 0.8), tmp_path / "scan.nii.gz")
    [summary] = infer_volumes("unused", tmp_path / "scan.nii.gz", str(tmp_path / "out"), progress=False,
                              model=ThresholdModel(), uncertainty=True)
    assert summary["uncertainty"]["review"] is None and summary["uncertainty"]["threshold"] is None
    # a 0/1 model is certain at its model size, where the uncertainty is taken (then resized): 0 everywhere
    assert summary["uncertainty"]["case_score"] == 0.0
    [row] = list(csv.DictReader(open(tmp_path / "out" / "cases.csv")))
    assert row["review"] == ""


def test_export_of_a_run_with_a_store_is_calibrated_and_without_one_is_not(trained_run, tmp_path):
    """stages.export (train -> export of pipeline, demo, train): calibrated on the store's valid split;
    the session store is the original tree (no case ids): a temperature, no review threshold."""
    from aisd_ray import stages

    _, store, run, _ = trained_run
    out, _ = stages.export(run, str(tmp_path / "with"), shards_uri=store)
    record = json.loads((tmp_path / "with" / CALIBRATION).read_text())
    manifest = shards.ShardStore.open(store, checksums=False).manifest
    assert record["fitted_on"]["voxels_in_split"] == manifest["splits"]["valid"]["records"] * 64 * 64
    assert record["review_threshold"] is None and record["review_chosen_by"] == "no cases"
    assert LoadedExport(out).temperature == pytest.approx(record["temperature"])
    stages.export(run, str(tmp_path / "without"))  # the run's config names no store
    assert not (tmp_path / "without" / CALIBRATION).exists()
    assert LoadedExport(str(tmp_path / "without")).temperature == 1.0
