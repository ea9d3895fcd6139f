"""Masks and probability maps written in their input's own geometry: a NIfTI's own qform and sform
(codes, pixdim, storage order) and a DICOM series' exact, sheared under a gantry tilt, affine. Real
files written with nibabel, SimpleITK and pydicom, read back with nibabel and SimpleITK."""

import gzip

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from aisd_ray.data.synthetic.volumes import write_dicom_series, write_nifti_case
from aisd_ray.data.sources.volume import read_labels, read_volume
from aisd_ray.data.sources.volume_base import NIFTI_GEOMETRY_FIELDS, grid_affine
from aisd_ray.data.sources.volume_write import to_input_geometry, write_image, write_nifti
from tests.helpers import HEAD_SIZE, HEAD_SLICES, LPS_RAS, rigid

SIZE, SLICES = HEAD_SIZE, HEAD_SLICES


def recoded(path, qcode, scode, moved, text=False):
    """``path`` (written by SimpleITK, sform = qform) rewritten with nibabel: the same stored array and
    qform, the sform ``moved`` @ qform; the codes as given; with ``text``, free-text fields filled."""
    img = nib.load(path)
    out = nib.Nifti1Image(np.asarray(img.dataobj), None)
    qform = img.header.get_qform()
    out.header.set_qform(qform, code=qcode)
    out.header.set_sform(moved @ qform, code=scode)
    if text:
        for key, value in (("descrip", b"Doe^Jane"), ("aux_file", b"PID-4711"), ("intent_name", b"Doe"),
                           ("db_name", b"Jane")):
            out.header[key] = value
    nib.save(out, str(path))
    return path


GEOMETRIES = {"case4-sform2": (1, 2, True), "qform-only": (1, 0, True), "sform-only": (0, 1, True),
              "both-equal": (1, 1, False), "sform4-mni": (1, 4, True)}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_a_nifti_mask_carries_its_inputs_own_geometry(tmp_path, case, name):
    qcode, scode, moved = GEOMETRIES[name]
    hu, labels, spacing = case
    transform = rigid(10, (0.2, 0.3, 1), (12, -8, 20)) if moved else np.eye(4)
    source = recoded(write_nifti_case(hu, spacing, tmp_path / "ct.nii.gz", "PIR"), qcode, scode, transform, text=True)
    truth = recoded(write_nifti_case(labels, spacing, tmp_path / "truth.nii.gz", "PIR"), qcode, scode, transform)
    volume = read_volume(source)
    control = read_volume(write_nifti_case(hu, spacing, tmp_path / "control.nii.gz", "PIR"))
    np.testing.assert_array_equal(volume.hu, control.hu)
    np.testing.assert_allclose(volume.affine, LPS_RAS @ nib.load(source).affine, atol=1e-6)
    np.testing.assert_allclose(volume.canonical_affine, grid_affine(volume.canonical_geometry), atol=1e-4)

    mask_path = write_nifti(volume, labels, tmp_path / "out" / "mask.nii.gz")
    given, mask = nib.load(source), nib.load(mask_path)
    np.testing.assert_allclose(mask.affine, given.affine, atol=1e-6)
    for got, want in ((mask.header.get_qform(coded=True), given.header.get_qform(coded=True)),
                      (mask.header.get_sform(coded=True), given.header.get_sform(coded=True))):
        assert got[1] == want[1]
        if want[1]:
            np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    for key in NIFTI_GEOMETRY_FIELDS:  # as stored, coded or not
        np.testing.assert_array_equal(mask.header[key], given.header[key])
    assert mask.shape == given.shape and mask.get_data_dtype() == np.uint8
    assert mask.dataobj.slope == 1 and mask.dataobj.inter == 0
    for key in ("aux_file", "intent_name", "db_name"):
        assert mask.header[key].tobytes().strip(b"\0") == b""
    assert mask.header["descrip"].tobytes().rstrip(b"\0") == b"aisd-ray"
    assert not any(s in gzip.decompress(mask_path.read_bytes()) for s in (b"Doe", b"Jane", b"PID-4711"))
    # stored in the input's order: the mask's array is the truth's, voxel for voxel
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(nib.load(truth).dataobj))
    # the voxel under a lesion point of the image is the same voxel in the mask, and holds the lesion
    stored = np.asarray(nib.load(truth).dataobj)
    voxel = np.argwhere(stored > 0)[len(np.argwhere(stored > 0)) // 2]
    world = given.affine @ np.append(voxel, 1)
    under = np.rint(np.linalg.solve(mask.affine, world)[:3]).astype(int)
    np.testing.assert_array_equal(under, voxel)
    assert np.asarray(mask.dataobj)[tuple(under)] == 1
    np.testing.assert_array_equal(read_labels(mask_path, volume), labels)

    probabilities = write_nifti(volume, labels * np.float64(0.75), tmp_path / "out" / "p.nii.gz")
    prob = nib.load(probabilities)
    assert prob.get_data_dtype() == np.float32
    np.testing.assert_allclose(prob.affine, given.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(prob.dataobj), stored * np.float32(0.75))


def _series_mask(tmp_path, case, tilt):
    hu, labels, spacing = case
    files = write_dicom_series(hu, spacing, tmp_path / "series", "s", tilt_deg=tilt)
    volume = read_volume(tmp_path / "series")
    return files, volume, write_nifti(volume, labels, tmp_path / "mask.nii.gz")


def test_a_tilted_series_mask_lies_on_each_of_its_slices(tmp_path, case):
    _, labels, spacing = case
    files, volume, path = _series_mask(tmp_path, case, 15.0)
    assert volume.gantry_tilt_deg == pytest.approx(15.0, abs=1e-3)
    mask = nib.load(path)
    sform, code = mask.header.get_sform(coded=True)
    assert code == 1
    for k, file in enumerate(files):  # position order, as the series is read
        ds = pydicom.dcmread(file)
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        dy, dx = (float(v) for v in ds.PixelSpacing)
        for i, j in ((0, 0), (SIZE - 1, 0), (0, SIZE - 1), (17, 42)):
            lps = position + i * dx * iop[:3] + j * dy * iop[3:]
            np.testing.assert_allclose(sform @ [i, j, k, 1], LPS_RAS @ np.append(lps, 1), atol=1e-3)
    qform, qcode = mask.header.get_qform(coded=True)  # the nearest rigid grid: row, column, slice normal
    assert qcode == 1
    np.testing.assert_allclose(LPS_RAS @ qform, grid_affine(volume.input_geometry), atol=1e-4)
    np.testing.assert_array_equal(read_labels(path, volume), labels)  # read back on the sheared sform
    itk = sitk.ReadImage(str(path))  # ITK drops the sheared sform for the qform: the series' ITK grid
    grid = volume.input_geometry
    assert itk.GetSize() == grid.size
    np.testing.assert_allclose(itk.GetSpacing(), grid.spacing, rtol=1e-5)
    np.testing.assert_allclose(itk.GetOrigin(), grid.origin, atol=1e-3)
    np.testing.assert_allclose(itk.GetDirection(), grid.direction, atol=1e-5)


def test_an_untilted_series_mask_is_what_simpleitk_wrote(tmp_path, case):
    _, labels, _ = case
    _, volume, path = _series_mask(tmp_path, case, 0.0)
    before = nib.load(write_image(to_input_geometry(volume, labels), tmp_path / "itk.nii.gz"))
    mask = nib.load(path)
    for form in ("get_sform", "get_qform"):
        got, code = getattr(mask.header, form)(coded=True)
        want, want_code = getattr(before.header, form)(coded=True)
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert code == want_code == 1
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(before.dataobj))
    np.testing.assert_allclose(mask.header["pixdim"][1:4], before.header["pixdim"][1:4], rtol=1e-6)


def test_a_written_mask_copied_with_storage_download_tree_keeps_its_bytes(tmp_path, case):
    from aisd_ray.core import storage

    _, labels, _ = case
    _, volume, path = _series_mask(tmp_path, case, 0.0)
    (tmp_path / "tree").mkdir()
    path.rename(tmp_path / "tree" / "mask.nii.gz")
    assert storage.download_tree(str(tmp_path / "tree"), tmp_path / "copy") == 1
    copied = tmp_path / "copy" / "mask.nii.gz"
    assert copied.read_bytes() == (tmp_path / "tree" / "mask.nii.gz").read_bytes()  # still gzip, not inflated
    np.testing.assert_array_equal(read_labels(copied, volume), labels)
