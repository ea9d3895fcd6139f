"""The brain-mask step (``inference/brain_mask.py``): lesion voxels outside the brain removed and their
mL counted; on synthetic heads nothing of the true lesion removed; ``infer`` on CT volumes applies it
before post-processing and reports it per case (summary.json, cases.csv), on by default in the
export, off with ``--no-brain-mask``."""

import csv
import json

import numpy as np
import pytest

from aisd_ray.cli import main
from aisd_ray.data.ct.head import brain_mask, head_model
from aisd_ray.data.sources import volume
from aisd_ray.data.synthetic.volumes import synth_volume, write_nifti_case
from aisd_ray.inference import brain_mask as step
from aisd_ray.inference.export import LoadedExport
from aisd_ray.inference.infer_volumes import infer_volumes
from aisd_ray.scoring import volume_metrics
from tests.conftest import tiny_config
from tests.helpers import Probabilities, ThresholdModel, copy_export, lesion_everywhere_export


def test_apply_removes_the_lesion_voxels_outside_and_counts_their_ml():
    labels = np.zeros((3, 6, 5), np.uint8)
    labels[0, 1:3, 1:3] = 1  # 4 voxels inside
    labels[1, 0, :] = 2  # 5 voxels of another class: 2 inside, 3 outside
    labels[2, 5, 4] = 1  # 1 voxel outside
    brain = np.zeros(labels.shape, bool)
    brain[:, 1:5, 1:4] = True
    brain[1, 0, 1:3] = True
    kept, removed = step.apply(labels, brain, (5.0, 0.5, 0.4))
    assert kept.dtype == np.uint8
    assert np.array_equal(kept[brain], labels[brain]) and not kept[~brain].any()
    assert removed == pytest.approx(4 * 5.0 * 0.5 * 0.4 / 1000)
    with pytest.raises(ValueError, match="shape"):
        step.apply(labels, brain[:2], (5.0, 0.5, 0.4))


@pytest.mark.parametrize("seed,case,size,slices", [(1, "1000001", 64, 8), (7, "1000002", 96, 6),
                                                   (2024, "1000003", 128, 10)])
def test_on_synthetic_heads_the_step_removes_nothing_of_the_true_lesion(seed, case, size, slices):
    hu, labels, spacing = synth_volume(seed, case, size, slices)
    assert labels.any()
    kept, record = step.on_volume(labels, hu, spacing, head_model(hu, spacing), True)
    assert np.array_equal(kept, labels) and record == {"applied": True, "removed_ml": 0.0}
    assert step.on_volume(labels, hu, spacing, None, False)[1] == step.not_applied(step.OFF)


class CornerModel(ThresholdModel):
    """A double predicting, on every slice, lesion in two fixed model-size squares: one in the middle
    (inside a synthetic head's brain) and one in the top-left corner (the air outside the head)."""

    def predict(self, batch):
        lesion = np.zeros(np.asarray(batch).shape[:3], np.float32)
        lesion[:, 26:38, 26:38] = 1
        lesion[:, 1:9, 1:9] = 1
        return {"probabilities": Probabilities(np.stack([1 - lesion, lesion], axis=-1))}


class BrainCornerModel(CornerModel):
    brain_mask = True  # as an export records it


@pytest.fixture
def head_nifti(tmp_path):
    hu, _, spacing = synth_volume(7, "1000002", 96, 6)
    return write_nifti_case(hu, spacing, tmp_path / "in" / "head.nii.gz"), hu, spacing


def test_infer_removes_the_lesion_outside_the_brain_and_reports_its_ml(head_nifti, tmp_path):
    path, hu, spacing = head_nifti
    off = infer_volumes("unused", path, str(tmp_path / "off"), progress=False, model=CornerModel())[0]
    on = infer_volumes("unused", path, str(tmp_path / "on"), progress=False, model=BrainCornerModel())[0]
    # without the step: both squares, each through every slice, the corner one the smaller
    assert off["lesion_count"] == 2 and off["brain_mask"] == step.not_applied(step.OFF)
    middle, corner = off["lesions"]
    # with it: the corner square gone, the middle one less what of it lies outside the brain (at the skull
    # base: sinus air and bone), the removed mL that of the voxels outside the brain mask of the case's HU
    inside = brain_mask(hu, spacing)
    before = volume.read_labels(tmp_path / "off" / "head.nii.gz", like=volume.read_volume(path)) > 0
    outside_ml = volume_metrics.volume_ml(before & ~inside, spacing)
    assert on["lesion_count"] == 1 and on["lesions"][0]["voxels"] == int((before & inside).sum())
    assert corner["volume_ml"] <= outside_ml < corner["volume_ml"] + middle["volume_ml"]
    assert on["brain_mask"] == {"applied": True, "removed_ml": pytest.approx(outside_ml, abs=1e-3)}
    labels = volume.read_labels(tmp_path / "on" / "head.nii.gz", like=volume.read_volume(path))
    assert not labels[~inside].any()
    for out, summary in (("off", off), ("on", on)):
        written = json.loads((tmp_path / out / "cases" / "head" / "summary.json").read_text())
        assert written["brain_mask"] == summary["brain_mask"]
        [row] = list(csv.DictReader(open(tmp_path / out / "cases.csv")))
        assert float(row["brain_removed_ml"]) == summary["brain_mask"]["removed_ml"]
    # the argument wins over the model's record, both ways
    assert infer_volumes("unused", path, str(tmp_path / "off2"), progress=False, model=BrainCornerModel(),
                         brain_mask=False)[0]["lesion_count"] == 2
    assert infer_volumes("unused", path, str(tmp_path / "on2"), progress=False, model=CornerModel(),
                         brain_mask=True)[0]["brain_mask"] == on["brain_mask"]


def test_the_brain_mask_comes_before_the_postprocessing(head_nifti, tmp_path):
    """keep_largest after the brain mask keeps the middle square (the corner one is gone first); the
    post-processing removes nothing more, and each step reports what it removed."""
    path, _, _ = head_nifti
    model = BrainCornerModel()
    model.postprocess = {"rule": "keep_largest", "min_ml": None, "min_voxels": None}
    [summary] = infer_volumes("unused", path, str(tmp_path / "out"), progress=False, model=model)
    assert summary["lesion_count"] == 1 and summary["postprocessing"]["removed_ml"] == 0.0
    assert summary["brain_mask"]["removed_ml"] > 0


def test_an_export_records_the_step_and_the_cli_turns_it_off(head_nifti, tmp_path):
    """A real export predicting lesion everywhere: with the step (on by default, export.json
    ``brain_mask``) what is left is the brain mask of the case's HU, exactly; ``--no-brain-mask`` keeps
    every voxel; an export recording false, or none (an older export: on), is read so."""
    path, hu, spacing = head_nifti
    cfg = tiny_config()
    export = lesion_everywhere_export(cfg, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "export.json").read_text())["brain_mask"] is True
    assert LoadedExport(export).brain_mask is True
    assert LoadedExport(copy_export(export, tmp_path / "old", brain_mask=None)).brain_mask is True
    off_export = copy_export(export, tmp_path / "off-export", brain_mask=False)
    assert LoadedExport(off_export).brain_mask is False
    brain = brain_mask(hu, spacing)
    total, inside = (volume_metrics.volume_ml(np.ones(hu.shape), spacing), volume_metrics.volume_ml(brain, spacing))
    for name, args, applied in (("default", [], True), ("no", ["--no-brain-mask"], False),
                                ("export-off", [], False), ("forced", ["--brain-mask"], True)):
        model = off_export if name in ("export-off", "forced") else export
        assert main(["infer", "--model", model, "--input", str(path), "--output", str(tmp_path / name), *args]) == 0
        summary = json.loads((tmp_path / name / "cases" / "head" / "summary.json").read_text())
        assert summary["brain_mask"]["applied"] is applied
        if applied:
            labels = volume.read_labels(tmp_path / name / "head.nii.gz", like=volume.read_volume(path))
            assert np.array_equal(labels > 0, brain)
            assert summary["lesion_ml"] == pytest.approx(inside, abs=1e-3)
            assert summary["brain_mask"]["removed_ml"] == pytest.approx(total - inside, abs=1e-3)
        else:
            assert summary["lesion_ml"] == pytest.approx(total, abs=1e-3)
            assert summary["brain_mask"]["reason"] == step.OFF


def test_a_store_says_whether_it_holds_the_mask_and_why_not():
    assert step.store_reason({"source": {"layout": "original"}}) == step.NO_MASK
    assert step.store_reason({"source": {"layout": "nnunet", "geometry": {"c": {}}}}) == step.OLD_STORE
    assert step.store_reason({"source": {"layout": "nnunet", "geometry": {}, "brain_mask": {"feature": "brain"}}}) \
        is None
    assert step.resolve(None, CornerModel()) is False and step.resolve(None, BrainCornerModel()) is True
    assert step.resolve(False, BrainCornerModel()) is False and step.resolve(True, CornerModel()) is True


def test_asking_for_the_brain_mask_on_a_folder_of_images_is_one_line(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "images" / "a.png")
    assert main(["infer", "--model", str(tmp_path / "no-export"), "--images", str(tmp_path / "images"),
                 "--output", str(tmp_path / "out"), "--brain-mask"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--brain-mask" in err[0] and "CT volumes" in err[0]
    assert not (tmp_path / "out").exists()
