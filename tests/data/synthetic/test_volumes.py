"""Synthetic heads in HU and the files written from them (NIfTI, DICOM series, nnU-Net raw dataset)."""

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from aisd_ray.data.synthetic.volumes import (
    synth_volume,
    write_dicom_cases,
    write_dicom_series,
    write_nifti_case,
    write_nnunet_dataset,
)
from aisd_ray.data.sources.volume import list_cases, read_labels, read_volume


def test_synth_volume_is_deterministic_with_documented_types_and_spacing():
    hu, labels, spacing = synth_volume(3, "0101", 64, 8)
    again = synth_volume(3, "0101", 64, 8)
    np.testing.assert_array_equal(hu, again[0])
    np.testing.assert_array_equal(labels, again[1])
    assert not np.array_equal(hu, synth_volume(3, "0102", 64, 8)[0])
    assert not np.array_equal(hu, synth_volume(4, "0101", 64, 8)[0])
    assert hu.dtype == np.int16 and labels.dtype == np.uint8
    assert hu.shape == labels.shape == (8, 64, 64) and set(np.unique(labels)) == {0, 1}
    assert spacing == pytest.approx((5.0, 230 / 64, 230 / 64))
    assert synth_volume(3, "0101", 512, 3)[2] == pytest.approx((5.0, 0.44921875, 0.44921875))


def test_one_lesion_through_neighbouring_slices_never_the_first_or_last():
    for case in ("1", "2", "3", "abc"):
        _, labels, _ = synth_volume(0, case, 64, 10)
        per_slice = labels.sum(axis=(1, 2))
        assert per_slice[0] == per_slice[-1] == 0
        lesion_slices = np.flatnonzero(per_slice)
        assert len(lesion_slices) >= 1 and np.all(np.diff(lesion_slices) == 1)
        assert ndimage.label(labels)[1] >= 1


def test_tissues_in_hounsfield_units():
    hu, labels, _ = synth_volume(1, "7", 96, 8)
    middle = hu[4].astype(float)
    corner = middle[:8, :8]
    assert abs(np.median(corner) + 1000) <= 2 and np.std(corner) == pytest.approx(3.0, abs=0.6)  # air, noise SD 3
    assert 1000 <= hu[2:].max() <= 1215  # the vault 700..1200 plus noise
    assert hu[0].max() <= 1715  # the petrous bone at the skull base, 1300..1700
    brain = (middle > 15) & (middle < 50)
    assert 25 <= np.median(middle[brain]) <= 40  # parenchyma
    assert np.any((middle > -5) & (middle < 15))  # CSF: ventricles and sulci
    assert np.count_nonzero(middle > 600) > 50  # a skull ring


def test_lesion_is_a_faint_hypodensity_of_the_chosen_contrast():
    hu, labels, _ = synth_volume(2, "11", 96, 8)
    flat, _, _ = synth_volume(2, "11", 96, 8, lesion_hu=0.0)
    lesion = labels.astype(bool)
    difference = hu[lesion].astype(float) - flat[lesion]
    assert difference.mean() == pytest.approx(-5.0, abs=0.1)  # exactly the contrast, up to rounding
    # measured as a reader would: lesion against the parenchyma just around it
    around = ndimage.binary_dilation(lesion, iterations=6) & ~ndimage.binary_dilation(lesion, iterations=2)
    around &= (hu > 15) & (hu < 60) & (labels == 0)
    contrast = hu[around].mean() - hu[lesion].mean()
    assert 2.0 < contrast < 9.0
    strong, _, _ = synth_volume(2, "11", 96, 8, lesion_hu=20.0, noise_hu=0.0)
    assert strong[lesion].astype(float).mean() == pytest.approx(flat[lesion].mean() - 20.0, abs=0.5)
    assert np.std(strong[:, :6, :6]) == 0  # no noise asked, none drawn


def test_written_series_headers(tmp_path):
    hu, _, spacing = synth_volume(1, "5", 64, 6)
    paths = write_dicom_series(hu, spacing, tmp_path / "5", "5", shuffle=False)
    assert [p.name for p in paths] == [f"{k:04d}.dcm" for k in range(1, 7)]
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and ds.preamble == b"\0" * 128
    assert (ds.Modality, ds.PatientID, ds.Rows, ds.Columns, ds.PixelRepresentation) == ("CT", "5", 64, 64, 0)
    assert "PatientName" not in ds and "PatientBirthDate" not in ds
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    assert [int(pydicom.dcmread(p).InstanceNumber) for p in paths] != list(range(1, 7))
    np.testing.assert_array_equal(ds.pixel_array.astype(int) - 1024, hu[0])
    with pytest.raises(ValueError, match="not whole multiples of RescaleSlope 2"):
        write_dicom_series(np.full((2, 4, 4), -999, np.int16), spacing, tmp_path / "odd", "odd", slope=2)


def test_nifti_case_affine(tmp_path):
    hu, _, spacing = synth_volume(1, "5", 64, 6)
    image = nib.load(write_nifti_case(hu, spacing, tmp_path / "5.nii.gz"))
    assert nib.aff2axcodes(image.affine) == ("R", "P", "I") and image.shape == (64, 64, 6)
    np.testing.assert_allclose(np.abs(np.diag(image.affine)[:3]), [230 / 64, 230 / 64, 5.0], rtol=1e-6)
    # stored with x and z flipped: the file's first voxel is canonical's last x, first y, last z
    assert np.asarray(image.dataobj)[0, 0, 0] == hu[-1, 0, -1]


def test_nnunet_dataset_layout_and_read_back(tmp_path):
    root = write_nnunet_dataset(tmp_path, 9, ["a1", "a2"], ["t1"], 64, 6)
    assert root == tmp_path / "Dataset001_AISDSynthetic"
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert names == ["dataset.json", "imagesTr/a1_0000.nii.gz", "imagesTr/a2_0000.nii.gz", "imagesTs/t1_0000.nii.gz",
                     "labelsTr/a1.nii.gz", "labelsTr/a2.nii.gz", "labelsTs/t1.nii.gz"]
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    assert nib.load(root / "labelsTr" / "a1.nii.gz").get_data_dtype() == np.uint8
    assert list(list_cases(root / "imagesTr")) == ["a1", "a2"]
    for case, images, labels in (("a2", "imagesTr", "labelsTr"), ("t1", "imagesTs", "labelsTs")):
        hu, mask, spacing = synth_volume(9, case, 64, 6)
        volume = read_volume(root / images / f"{case}_0000.nii.gz")
        assert volume.case_id == case and volume.spacing == pytest.approx(spacing, rel=1e-6)
        np.testing.assert_array_equal(volume.hu, hu)
        np.testing.assert_array_equal(read_labels(root / labels / f"{case}.nii.gz", volume), mask)
    with pytest.raises(ValueError, match="in both the training and the test list: a1"):
        write_nnunet_dataset(tmp_path, 9, ["a1"], ["a1"], 64, 6)


@pytest.mark.parametrize("series", [{}, {"tilt_deg": 7.0, "slope": 1, "intercept": -1000}])
def test_dicom_cases_read_back_with_their_labels(tmp_path, series):
    out = write_dicom_cases(tmp_path, 4, ["c1", "c2"], 64, 6, **series)
    assert sorted(p.name for p in out.iterdir()) == ["c1", "c2", "labels"]
    assert list(list_cases(out)) == ["c1", "c2"]
    for case in ("c1", "c2"):
        hu, mask, _ = synth_volume(4, case, 64, 6)
        volume = read_volume(out / case)
        assert volume.gantry_tilt_deg == pytest.approx(series.get("tilt_deg", 0.0), abs=1e-3)
        np.testing.assert_array_equal(volume.hu, hu)
        np.testing.assert_array_equal(read_labels(out / "labels" / f"{case}.nii.gz", volume), mask)
