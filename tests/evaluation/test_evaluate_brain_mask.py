"""evaluate and the brain mask: on a store prepared from CT volumes, each case's prediction loses its
lesion voxels outside the intracranial mask that prepare stored beside each slice (per_case.csv
``brain_removed_ml``, metrics.json ``brain_mask``), before the case figures; a store of PNG slices
has no mask, and metrics.json and one log line say the step was not applied."""

import csv
import json

import numpy as np
import pytest

from aisd_ray.cli import main
from aisd_ray.data.ct.head import brain_mask
from aisd_ray.data.ct.windows import InPlane
from aisd_ray.data.sources import volume
from aisd_ray.data.store import shards
from aisd_ray.data.store.prepare import prepare
from aisd_ray.data.synthetic.layouts import write_synthetic
from aisd_ray.inference import brain_mask as step
from tests.conftest import tiny_config, volume_config
from tests.helpers import lesion_everywhere_export


def test_evaluate_on_a_volume_store_applies_the_stored_mask_before_the_case_figures(tmp_path):
    cfg = volume_config("nnunet", 4, 2, 80, 5)
    source = write_synthetic(tmp_path / "src", cfg.synthetic, progress=False)
    cfg.data.source_dir = str(source)
    manifest = prepare(cfg, str(tmp_path / "shards"), progress=False)
    assert manifest["source"]["brain_mask"]
    export = lesion_everywhere_export(cfg, tmp_path / "export")
    # each test case's brain at model size, from its own HU, as the store must hold it
    expected = {}
    for case in manifest["source"]["cases"]["test"]:
        vol = volume.read_volume(source / "imagesTs" / f"{case}_0000.nii.gz")
        truth = volume.read_labels(source / "labelsTs" / f"{case}.nii.gz", like=vol)
        plane = InPlane(*vol.hu.shape[1:], vol.spacing[1:], 64, 64)
        inside = brain_mask(vol.hu, vol.spacing)
        model_brain = np.stack([plane.labels_to_model(s.astype(np.uint8)) for s in inside]) > 0
        model_truth = np.stack([plane.labels_to_model(s) for s in truth]) > 0
        assert model_truth.any() and not (model_truth & ~model_brain).any()  # nothing of the truth outside
        voxel_ml = vol.spacing[0] * float(np.prod(plane.model_spacing)) / 1000
        expected[case] = (model_brain, (model_brain.size - model_brain.sum()) * voxel_ml)
    stored = {}
    for record in shards.iter_records(str(tmp_path / "shards"), manifest, "test"):
        stored.setdefault(record["case_id"], {})[record["slice_index"]] = shards.record_brain(record)
    for case, (model_brain, _) in expected.items():
        assert np.array_equal(np.stack([stored[case][k] for k in sorted(stored[case])]), model_brain)

    for name, args in (("on", []), ("off", ["--no-brain-mask"])):
        assert main(["evaluate", "--model", export, "--data", str(tmp_path / "shards"), "--no-overlays",
                     "--output", str(tmp_path / name), *args]) == 0
    on = json.loads((tmp_path / "on" / "metrics.json").read_text())
    off = json.loads((tmp_path / "off" / "metrics.json").read_text())
    rows = {r["case_id"]: r for r in csv.DictReader(open(tmp_path / "on" / "per_case.csv"))}
    assert set(rows) == set(expected)
    for case, (model_brain, removed_ml) in expected.items():
        assert float(rows[case]["brain_removed_ml"]) == pytest.approx(removed_ml, abs=1e-3)
        assert int(rows[case]["pred_volume"]) == model_brain.sum()  # lesion everywhere, then the brain only
    assert on["brain_mask"]["applied"] is True and on["brain_mask"]["cases"] == len(expected)
    assert on["brain_mask"]["removed_ml"] == pytest.approx(sum(r for _, r in expected.values()), abs=1e-2)
    assert off["brain_mask"] == step.not_applied(step.OFF)
    assert "brain_removed_ml" not in off["cases"]["per_case"][0]
    # the case figures only: better with the step; the per-slice figures are the network's own
    on_dice = {r["case_id"]: r["dice"] for r in on["cases"]["per_case"]}
    off_dice = {r["case_id"]: r["dice"] for r in off["cases"]["per_case"]}
    assert all(on_dice[c] > off_dice[c] for c in expected)
    assert on["lesion_dice"] == off["lesion_dice"]


def test_evaluate_on_a_store_of_png_slices_says_the_step_was_not_applied(parquet_store, tmp_path, caplog):
    _, store = parquet_store
    export = lesion_everywhere_export(tiny_config(), tmp_path / "export")
    with caplog.at_level("INFO"):
        assert main(["evaluate", "--model", export, "--data", store, "--no-overlays",
                     "--output", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["brain_mask"] == {"applied": False, "reason": step.NO_MASK, "removed_ml": 0.0}
    assert "slices, not CT volumes" in step.NO_MASK
    lines = [r.getMessage() for r in caplog.records if "brain mask" in r.getMessage()]
    assert lines == [f"brain mask not applied: {step.NO_MASK}"]
