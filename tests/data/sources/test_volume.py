"""CT volume readers and writers on real files: pydicom-written series, SimpleITK/nibabel NIfTI,
pydicom's own CT test file and nibabel's 4-D example."""

import gzip
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut
from pydicom.uid import generate_uid

from aisd_ray.data.sources import volume as vol
from aisd_ray.data.synthetic.volumes import synth_volume, write_dicom_series, write_nifti_case
from aisd_ray.data.sources.volume import VolumeError, list_cases, read_labels, read_volume
from aisd_ray.data.sources.volume_write import to_input_geometry, write_image, write_nifti
from tests.helpers import refused

SIZE, SLICES = 64, 8


@pytest.fixture(scope="module")
def case():
    return synth_volume(5, "0042", SIZE, SLICES)  # (hu, labels, spacing)


def headers(folder):
    return [(p, pydicom.dcmread(p)) for p in sorted(Path(folder).iterdir())]


@pytest.mark.parametrize("slope, intercept", [(1, -1024), (2, -1024)])
def test_dicom_round_trip_orders_by_position_not_names_or_instance_numbers(tmp_path, case, slope, intercept):
    hu, _, spacing = case
    hu = hu if slope == 1 else (hu // 2) * 2  # stored = (HU + 1024) / 2 must be whole
    written = write_dicom_series(hu, spacing, tmp_path / "0042", "0042", slope=slope, intercept=intercept)
    by_position = [p.name for p in written]
    found = headers(tmp_path / "0042")
    assert [p.name for p, _ in found] != by_position  # file-name order differs
    assert [p.name for p, _ in sorted(found, key=lambda item: int(item[1].InstanceNumber))] != by_position
    assert {float(ds.RescaleSlope) for _, ds in found} == {slope}
    assert any(p.suffix == ".dcm" for p in written) and any(p.suffix == "" for p in written)

    volume = read_volume(tmp_path / "0042")
    assert volume.hu.dtype == np.int16 and volume.hu.shape == (SLICES, SIZE, SIZE)
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.spacing == pytest.approx((5.0, 230 / SIZE, 230 / SIZE), rel=1e-9)
    assert (volume.case_id, volume.kind, volume.gantry_tilt_deg) == ("0042", "dicom", 0.0)
    assert volume.voxel_ml == pytest.approx(5.0 * (230 / SIZE) ** 2 / 1000)
    assert read_volume(tmp_path / "0042", case_id="P7").case_id == "P7"


@pytest.mark.parametrize("orientation", ["RPI", "PIR", "LPS"])
def test_nifti_with_any_affine_reads_as_the_dicom_series_does(tmp_path, case, orientation):
    hu, _, spacing = case
    write_dicom_series(hu, spacing, tmp_path / "series", "0042")
    path = write_nifti_case(hu, spacing, tmp_path / "0042_0000.nii.gz", orientation)
    on_disk = nib.load(path)
    assert nib.aff2axcodes(on_disk.affine) == tuple(orientation)
    assert np.abs(on_disk.affine[:3, 3]).min() > 1  # an offset origin
    if orientation != "LPS":
        assert not np.array_equal(np.asarray(on_disk.dataobj).transpose(2, 1, 0), hu)  # stored another way

    from_nifti, from_dicom = read_volume(path), read_volume(tmp_path / "series")
    assert (from_nifti.case_id, from_nifti.kind) == ("0042", "nifti")
    np.testing.assert_array_equal(from_nifti.hu, from_dicom.hu)
    assert from_nifti.spacing == pytest.approx(from_dicom.spacing, rel=1e-6)
    # and back: the canonical array in the file's own grid is the file's array
    back = to_input_geometry(from_nifti, from_nifti.hu)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(sitk.ReadImage(str(path))))


def test_write_nifti_keeps_the_input_geometry_and_reads_back(tmp_path, case):
    hu, labels, spacing = case
    source = write_nifti_case(hu, spacing, tmp_path / "in.nii.gz", "PIR")
    volume = read_volume(source)
    out = write_nifti(volume, labels, tmp_path / "out" / "mask.nii.gz")
    original, written = sitk.ReadImage(str(source)), sitk.ReadImage(str(out))
    assert written.GetSize() == original.GetSize()
    assert written.GetSpacing() == pytest.approx(original.GetSpacing())
    assert written.GetOrigin() == pytest.approx(original.GetOrigin())
    assert written.GetDirection() == pytest.approx(original.GetDirection())
    nib_in, nib_out = nib.load(source), nib.load(out)
    np.testing.assert_allclose(nib_out.affine, nib_in.affine, atol=1e-5)
    assert nib_out.shape == nib_in.shape and nib_out.get_data_dtype() == np.uint8
    assert nib_out.header["descrip"].tobytes().rstrip(b"\0") == b"aisd-ray"
    np.testing.assert_array_equal(read_labels(out, volume), labels)
    assert sorted(os.listdir(out.parent)) == ["mask.nii.gz"]  # no temporary file left

    probabilities = labels.astype(np.float32) * 0.75
    prob_path = write_nifti(volume, probabilities, tmp_path / "prob.nii.gz")
    assert nib.load(prob_path).get_data_dtype() == np.float32
    read_back = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(prob_path)), "LPS"))
    np.testing.assert_array_equal(read_back, probabilities)


def test_write_nifti_of_a_dicom_series_lies_on_its_slices(tmp_path, case):
    hu, labels, spacing = case
    written = write_dicom_series(hu, spacing, tmp_path / "s", "s")
    volume = read_volume(tmp_path / "s")
    out = nib.load(write_nifti(volume, labels, tmp_path / "s.nii.gz"))
    lowest = pydicom.dcmread(written[0])
    # LPS position of the first slice -> RAS: x and y change sign
    expected_origin = np.asarray([float(v) for v in lowest.ImagePositionPatient]) * [-1, -1, 1]
    np.testing.assert_allclose(out.affine[:3, 3], expected_origin, atol=1e-4)
    np.testing.assert_allclose(np.diag(out.affine)[:3], [-spacing[2], -spacing[1], spacing[0]], atol=1e-5)
    np.testing.assert_array_equal(read_labels(tmp_path / "s.nii.gz", volume), labels)


def test_gantry_tilt_is_recorded_and_volumes_stay_right(tmp_path, case):
    hu, _, spacing = case
    write_dicom_series(hu, spacing, tmp_path / "tilt", "tilt", tilt_deg=7.0)
    iop = [float(v) for v in headers(tmp_path / "tilt")[0][1].ImageOrientationPatient]
    np.testing.assert_allclose(iop, [1, 0, 0, 0, 0.9925, -0.1219], atol=1e-4)  # as AISD's tilted series
    volume = read_volume(tmp_path / "tilt")
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.gantry_tilt_deg == pytest.approx(7.0, abs=1e-3)
    assert volume.spacing[0] == pytest.approx(4.96273, abs=1e-4)  # 5 mm table step x cos 7 degrees
    block = np.zeros(hu.shape, np.uint8)
    block[2:6, 10:20, 5:25] = 1  # 4 slices x 10 rows x 20 columns
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    edges = np.stack([20 * spacing[2] * row, 10 * spacing[1] * col, 4 * spacing[0] * np.array([0, 0, 1.0])])
    assert block.sum() * volume.voxel_ml == pytest.approx(abs(np.linalg.det(edges)) / 1000, rel=1e-4)


def test_pydicom_ct_test_file_reads_as_its_modality_lut(tmp_path):
    source = get_testdata_file("CT_small.dcm", download=False)
    (tmp_path / "ct").mkdir()
    shutil.copy(source, tmp_path / "ct" / "CT_small.dcm")
    (tmp_path / "ct" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    shutil.copy(get_testdata_file("DICOMDIR", download=False), tmp_path / "ct" / "DICOMDIR")  # an index, skipped
    ds = pydicom.dcmread(source)
    volume = read_volume(tmp_path / "ct")
    assert volume.hu.shape == (1, 128, 128) and volume.spacing == pytest.approx((5.0, 0.661468, 0.661468))
    np.testing.assert_array_equal(volume.hu[0], apply_modality_lut(ds.pixel_array, ds))
    assert list_cases(tmp_path / "ct") == {"ct": tmp_path / "ct"}


def test_nothing_of_the_patient_leaks(tmp_path, case):
    hu, labels, spacing = case
    secrets = ["Doe^Jane", "Doe", "Jane", "19700101", "PID-4711"]
    written = write_dicom_series(hu, spacing, tmp_path / "anon-7", "anon-7", patient_name="Doe^Jane",
                                 birth_date="19700101", patient_id="PID-4711")
    ds = pydicom.dcmread(written[0])
    assert (ds.PatientName, ds.PatientBirthDate, ds.PatientID) == ("Doe^Jane", "19700101", "PID-4711")
    volume = read_volume(tmp_path / "anon-7")
    text = " ".join([repr(volume), str(volume.__dict__), repr(volume.input_geometry),
                     repr(volume.canonical_geometry)])
    assert not any(s in text for s in secrets)
    for name, array in (("image.nii.gz", volume.hu), ("mask.nii.gz", labels)):
        raw = gzip.decompress(write_nifti(volume, array, tmp_path / name).read_bytes())
        assert not any(s.encode() in raw for s in secrets)
    for path, ds in headers(tmp_path / "anon-7"):  # a refusal says nothing of the patient either
        ds.Modality = "MR"
        ds.save_as(path)
    assert not any(s in refused(tmp_path / "anon-7", "Modality MR, not CT") for s in secrets)


def test_refuses_another_modality(tmp_path, case):
    hu, _, spacing = case
    write_dicom_series(hu, spacing, tmp_path / "mr", "mr")
    for path, ds in headers(tmp_path / "mr"):
        ds.Modality = "MR"
        ds.save_as(path)
    refused(tmp_path / "mr", r"mr: Modality MR, not CT$")


def test_refuses_a_4d_nifti():
    example = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    refused(example, r"example4d\.nii\.gz: a 4-D NIfTI: one CT volume expected$")


def test_refuses_a_missing_slice(tmp_path, case):
    hu, _, spacing = case
    written = write_dicom_series(hu, spacing, tmp_path / "gap", "gap")
    written[SLICES // 2].unlink()
    refused(tmp_path / "gap", r"missing slice\(s\): a gap of 10\.00 mm .*median step 5\.00 mm")


def test_refuses_two_series_in_one_folder(tmp_path, case):
    hu, _, spacing = case
    write_dicom_series(hu, spacing, tmp_path / "two", "two", seed=1)
    write_dicom_series(hu, spacing, tmp_path / "two", "two", seed=2)
    refused(tmp_path / "two", r"2 DICOM series in one folder")


def test_refuses_a_folder_without_dicom(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image\n")
    (junk / "blob").write_bytes(np.random.default_rng(0).bytes(4096))
    (junk / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    refused(junk, r"no DICOM files \(2 other file\(s\)\)")
    assert not vol.is_dicom_series(junk) and list_cases(junk) == {}


def test_refuses_duplicated_positions(tmp_path, case):
    hu, _, spacing = case
    written = write_dicom_series(hu, spacing, tmp_path / "dup", "dup")
    ds = pydicom.dcmread(written[3])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "dup" / "copy.dcm")
    refused(tmp_path / "dup", r"two slices at one position")


def test_refuses_a_non_axial_series(tmp_path, case):
    hu, _, spacing = case
    write_dicom_series(hu, spacing, tmp_path / "sag", "sag")
    for path, ds in headers(tmp_path / "sag"):
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
        ds.save_as(path)
    refused(tmp_path / "sag", r"not an axial series \(slice normal 90 degrees")


def test_refuses_images_not_in_hu_and_unreadable_files(tmp_path, case):
    hu, _, spacing = case
    scaled = write_nifti_case(((hu + 1024) / 4096).astype(np.float32), spacing, tmp_path / "norm.nii.gz")
    refused(scaled, r"values 0\.\d+\.\.0\.\d+ are not Hounsfield units")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    refused(bad, r"bad\.nii\.gz: cannot read NIfTI")
    refused(tmp_path / "absent.nii.gz", r"not found")
    (tmp_path / "x.png").write_bytes(b"x")
    refused(tmp_path / "x.png", r"neither a DICOM series folder, an enhanced CT file nor a \.nii/\.nii\.gz file")


def test_read_labels_refuses_another_grid_or_bad_values(tmp_path, case):
    hu, labels, spacing = case
    volume = read_volume(write_nifti_case(hu, spacing, tmp_path / "ct.nii.gz"))
    tilted = to_input_geometry(volume, labels)
    c, s = np.cos(np.radians(7)), np.sin(np.radians(7))
    tilted.SetDirection(tuple((np.asarray(tilted.GetDirection()).reshape(3, 3) @ [[1, 0, 0], [0, c, -s], [0, s, c]])
                              .ravel()))
    tilted = write_image(tilted, tmp_path / "tilted.nii.gz")
    bad = {
        "shape": (write_nifti_case(labels[1:], spacing, tmp_path / "shape.nii.gz"), r"labels are \(7, 64, 64\)"),
        "spacing": (write_nifti_case(labels, (4.0,) + spacing[1:], tmp_path / "sp.nii.gz"), r"spacing \(4\.0"),
        "orientation": (tilted, r"orientation differs"),
        "origin": (write_nifti_case(labels, spacing, tmp_path / "moved.nii.gz", z0=0.0), r"origin .* differs"),
        "fraction": (write_nifti_case(labels * np.float32(0.5), spacing, tmp_path / "half.nii.gz"),
                     r"non-integer label values \(e\.g\. 0\.5\)"),
        "negative": (write_nifti_case(labels.astype(np.int16) - 1, spacing, tmp_path / "neg.nii.gz"),
                     r"label values -1\.\.0; whole numbers 0\.\.255 expected"),
    }
    for path, match in bad.values():
        with pytest.raises(VolumeError, match=match) as info:
            read_labels(path, volume)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    for orientation in ("RPI", "RAS", "PIR"):  # stored any way, the same grid in space reads the same
        ok = write_nifti_case(labels, spacing, tmp_path / f"ok-{orientation}.nii.gz", orientation)
        np.testing.assert_array_equal(read_labels(ok, volume), labels)


def test_list_cases(tmp_path, case):
    hu, labels, spacing = case
    root = tmp_path / "cases"
    write_nifti_case(hu, spacing, root / "a.nii.gz")
    write_nifti_case(hu, spacing, root / "b_0000.nii")
    write_dicom_series(hu, spacing, root / "c", "c")
    write_nifti_case(labels, spacing, root / "labels" / "a.nii.gz")
    (root / "dataset.json").write_text("{}")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "__MACOSX").mkdir()
    assert list_cases(root) == {"a": root / "a.nii.gz", "b": root / "b_0000.nii", "c": root / "c"}
    assert vol.is_nifti(root / "a.nii.gz") and vol.is_dicom_series(root / "c")
    assert not vol.is_dicom_series(root / "labels")
    write_nifti_case(hu, spacing, root / "a_0000.nii.gz")
    with pytest.raises(VolumeError, match=r"cases: two cases named 'a': a\.nii\.gz and a_0000\.nii\.gz"):
        list_cases(root)
    with pytest.raises(VolumeError, match="folder not found"):
        list_cases(tmp_path / "nowhere")


def test_to_input_geometry_refuses_another_shape(tmp_path, case):
    hu, _, spacing = case
    volume = read_volume(write_nifti_case(hu, spacing, tmp_path / "v.nii.gz"))
    with pytest.raises(VolumeError, match=r"case v: array \(8, 64, 63\) does not match"):
        to_input_geometry(volume, hu[..., 1:])
    with pytest.raises(VolumeError, match=r"a NIfTI name"):
        write_nifti(volume, hu, tmp_path / "v.mha")
