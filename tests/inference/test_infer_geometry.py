"""Issue 28's cases 1, 4 and 5 through ``infer``: NaN outside the field of view, a NIfTI whose sform
and qform disagree, a gantry-tilted series. Each right value comes from the same pixels given as a
plain NIfTI or series (the control) or from the truth within one voxel layer."""

import nibabel as nib
import numpy as np
import pydicom
import pytest

from aisd_ray.data.synthetic.volumes import write_dicom_series, write_nifti_case
from aisd_ray.inference.infer_volumes import infer_volumes
from aisd_ray.scoring.volume_metrics import volume_ml
from tests.helpers import LPS_RAS, ThresholdModel, head_with_block, layer_ml

SPACING = (5.0, 0.9, 0.8)


class BlockModel(ThresholdModel):
    """Lesion where channel 0 (window level 40, width 160) shows the 86 HU block (grey > 190)."""

    windows = [(40.0, 160.0)]
    threshold = 190


class WaterBlindModel(BlockModel):
    """As a real export in a wide window does, it also takes water (0 HU, grey 50..80) for lesion."""

    def lesion(self, grey):
        return super().lesion(grey) | ((grey > 50) & (grey < 80))


def _infer(source, out, model=None):
    [summary] = infer_volumes("unused", source, str(out), batch_size=4, progress=False, model=model or BlockModel())
    return summary


def test_case1_nan_outside_the_field_of_view_is_air_and_the_ml_the_controls(tmp_path, caplog):
    hu, _ = head_with_block()
    control = write_nifti_case(hu.astype(np.float32), SPACING, tmp_path / "in" / "control.nii.gz", "LPS")
    img = nib.load(control)
    data = np.asarray(img.dataobj).astype(np.float32)  # stored (x, y, z), LPS: x = canonical column
    data[:4] = np.nan  # the columns beyond the resampled field of view, air in the control
    data[-4:] = np.inf
    (tmp_path / "nan").mkdir()
    nib.save(nib.Nifti1Image(data, img.affine), str(tmp_path / "nan" / "resampled.nii.gz"))
    want = _infer(control, tmp_path / "out-control", WaterBlindModel())
    with caplog.at_level("WARNING"):
        got = _infer(tmp_path / "nan" / "resampled.nii.gz", tmp_path / "out-nan", WaterBlindModel())
    assert got["lesion_ml"] == want["lesion_ml"] and got["lesion_count"] == want["lesion_count"]
    assert got["lesions"] == want["lesions"]
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "out-nan" / "resampled.nii.gz").dataobj),
                                  np.asarray(nib.load(tmp_path / "out-control" / "control.nii.gz").dataobj))
    bad = int((~np.isfinite(data)).sum())
    lines = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert lines == [f"case resampled: QA non_finite_voxels: {bad} non-finite voxels (NaN/inf) set to -1024 HU (air)"]


def test_case4_the_mask_carries_the_inputs_qform_and_sform_and_the_ml_the_controls(tmp_path):
    hu, truth = head_with_block()
    control = write_nifti_case(hu, SPACING, tmp_path / "in" / "control.nii.gz", "RPI")
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    moved = np.array([[c, -s, 0, 12], [s, c, 0, -8], [0, 0, 1, 20], [0, 0, 0, 1.0]])
    img = nib.load(control)
    coregistered = nib.Nifti1Image(np.asarray(img.dataobj), None)
    coregistered.header.set_qform(img.header.get_qform(), code=1)
    coregistered.header.set_sform(moved @ img.header.get_qform(), code=2)
    (tmp_path / "c4").mkdir()
    source = tmp_path / "c4" / "coreg.nii.gz"
    nib.save(coregistered, str(source))
    want, got = _infer(control, tmp_path / "out-control"), _infer(source, tmp_path / "out-c4")
    assert got["lesion_ml"] == want["lesion_ml"] and got["lesion_count"] == want["lesion_count"] == 1
    mask, given = nib.load(tmp_path / "out-c4" / "coreg.nii.gz"), nib.load(source)
    np.testing.assert_allclose(mask.affine, given.affine, atol=1e-5)
    assert mask.header.get_sform(coded=True)[1] == 2 and mask.header.get_qform(coded=True)[1] == 1
    np.testing.assert_allclose(mask.header.get_qform(), given.header.get_qform(), atol=1e-5)
    # in the input's stored order the mask is the control's, and lies on the image's 86 HU block
    found, block = np.asarray(mask.dataobj) > 0, np.asarray(given.dataobj) == 86
    np.testing.assert_array_equal(found, np.asarray(nib.load(tmp_path / "out-control" / "control.nii.gz").dataobj) > 0)
    assert 2 * np.sum(found & block) / (found.sum() + block.sum()) > 0.9


def test_case5_a_tilted_series_mask_overlays_each_slice_and_the_ml_are_right(tmp_path):
    hu, truth = head_with_block()
    files = write_dicom_series(hu, SPACING, tmp_path / "in" / "tilted", "tilted", tilt_deg=15.0, seed=2)
    got = _infer(tmp_path / "in" / "tilted", tmp_path / "out")
    normal_mm = SPACING[0] * np.cos(np.radians(15))  # the slices' distance along their normal
    spacing = (normal_mm,) + SPACING[1:]
    assert got["gantry_tilt_deg"] == pytest.approx(15.0, abs=1e-3)
    assert abs(got["lesion_ml"] - volume_ml(truth, spacing)) <= layer_ml(truth, spacing)
    mask = nib.load(tmp_path / "out" / "tilted.nii.gz")
    sform = mask.header.get_sform()
    for k, file in enumerate(files):
        ds = pydicom.dcmread(file)
        position, iop = (np.asarray([float(v) for v in ds[key].value]) for key in ("ImagePositionPatient",
                                                                                  "ImageOrientationPatient"))
        dy, dx = (float(v) for v in ds.PixelSpacing)
        for i, j in ((0, 0), (71, 79), (40, 30)):
            lps = position + i * dx * iop[:3] + j * dy * iop[3:]
            np.testing.assert_allclose(sform @ [i, j, k, 1], LPS_RAS @ np.append(lps, 1), atol=1e-3)
    lesion = np.argwhere(np.asarray(mask.dataobj) > 0)
    assert {int(k) for k in lesion[:, 2]} == {2, 3, 4}  # on the series' own slices 2..4
