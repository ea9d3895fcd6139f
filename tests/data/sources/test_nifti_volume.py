"""NIfTI read with nibabel's geometry (the sform when its code is > 0, else the qform), non-finite
voxels set to air by a stated rule, and label files on the same rule: real files written with
nibabel and compared with the same pixels as a plain NIfTI (the control)."""

import logging

import nibabel as nib
import numpy as np
import pytest

from aisd_ray.data.synthetic.volumes import write_nifti_case
from aisd_ray.data.sources.volume import VolumeError, read_label_volume, read_labels, read_volume
from aisd_ray.data.sources.volume_base import Finding
from tests.helpers import HEAD_SIZE, HEAD_SLICES, LPS_RAS, rigid

SIZE, SLICES = HEAD_SIZE, HEAD_SLICES


def plain_affine(shape, spacing, z0=-37.5):
    """RAS affine of a canonical (Z, Y, X) array stored as (x, y, z): LPS axes, centred in plane."""
    lps = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    lps[:3, 3] = (-(shape[2] - 1) / 2 * spacing[2], -(shape[1] - 1) / 2 * spacing[1], z0)
    return LPS_RAS @ lps


def write(array, path, qform, qcode=1, sform=None, scode=0, dtype=None, slope=None, inter=None, text=False):
    """A canonical (Z, Y, X) array as a NIfTI built with nibabel: stored (x, y, z), the qform and sform
    with their codes as given."""
    data = np.asarray(array).transpose(2, 1, 0)
    img = nib.Nifti1Image(data, None)
    img.header.set_qform(qform, code=qcode)
    img.header.set_sform(qform if sform is None else sform, code=scode)
    if dtype is not None:
        img.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    if text:
        img.header["descrip"], img.header["aux_file"], img.header["intent_name"] = b"Doe^Jane", b"PID-4711", b"x"
        img.header["db_name"] = b"Doe"
    nib.save(img, str(path))
    return path


# case 4: sform and qform disagree; nibabel's affine is the geometry read
@pytest.mark.parametrize("qcode, scode, moved", [(1, 2, True), (1, 0, True), (0, 1, True), (1, 1, False),
                                                 (1, 4, True)], ids=["case4-sform2", "qform-only", "sform-only",
                                                                     "both-equal", "sform4-mni"])
def test_the_geometry_read_is_the_one_nibabel_uses(tmp_path, case, qcode, scode, moved):
    hu, labels, spacing = case
    control = read_volume(write_nifti_case(hu, spacing, tmp_path / "control.nii.gz"))
    qform = plain_affine(hu.shape, spacing)
    sform = rigid(10, (0.2, 0.3, 1), (12, -8, 20)) @ qform if moved else qform
    path = write(hu, tmp_path / "c4.nii.gz", qform, qcode, sform, scode)
    on_disk = nib.load(path)
    volume = read_volume(path)
    np.testing.assert_allclose(volume.affine, LPS_RAS @ on_disk.affine, atol=1e-5)
    np.testing.assert_array_equal(volume.hu, control.hu)  # the same pixels, the same canonical array
    assert volume.spacing == pytest.approx(control.spacing, rel=1e-5) and volume.findings == ()
    # the label file beside it, written the same way, lies on its grid
    np.testing.assert_array_equal(read_labels(write(labels.astype(np.uint8), tmp_path / "l.nii.gz", qform, qcode,
                                                    sform, scode), volume), labels)
    if scode and qcode and moved:  # a label with the qform alone lies elsewhere: refused by name
        with pytest.raises(VolumeError, match=r"only\.nii\.gz: (orientation|origin) .*differ"):
            read_labels(write(labels.astype(np.uint8), tmp_path / "only.nii.gz", qform, 1), volume)


def test_a_scaled_sform_is_read_as_nibabel_reads_it(tmp_path, case):
    hu, _, spacing = case
    qform = plain_affine(hu.shape, spacing)
    sform = qform @ np.diag([1.25, 1.0, 0.8, 1.0])  # voxel sizes that differ from pixdim's
    volume = read_volume(write(hu, tmp_path / "scaled.nii.gz", qform, 1, sform, 2))
    assert volume.spacing == pytest.approx((spacing[0] * 0.8, spacing[1], spacing[2] * 1.25), rel=1e-6)
    assert volume.voxel_ml == pytest.approx(abs(np.linalg.det(sform[:3, :3])) / 1000, rel=1e-6)


def test_a_sheared_sform_reads_as_a_gantry_tilt_or_is_refused(tmp_path, case):
    hu, _, spacing = case
    qform = plain_affine(hu.shape, spacing)
    c, s = np.cos(np.radians(12)), np.sin(np.radians(12))
    tilted = qform.copy()  # slices of a series tilted 12 degrees: rows and columns orthogonal, steps along z
    tilted[:3, 1] = spacing[1] * np.array([0, -c, s])
    volume = read_volume(write(hu, tmp_path / "tilt.nii.gz", qform, 1, tilted, 1))
    control = read_volume(write(hu, tmp_path / "plain.nii.gz", qform))
    np.testing.assert_array_equal(volume.hu, control.hu)
    assert volume.gantry_tilt_deg == pytest.approx(12, abs=1e-4)
    np.testing.assert_allclose(volume.affine, LPS_RAS @ nib.load(tmp_path / "tilt.nii.gz").affine, atol=1e-5)
    assert volume.voxel_ml == pytest.approx(abs(np.linalg.det(tilted[:3, :3])) / 1000, rel=1e-6)
    assert [(f.check, f.value) for f in volume.findings] == [("gantry_tilt", 12.0)]  # noted as a series' tilt is
    assert control.findings == ()
    rounded = qform.copy()  # directions rounded to 4 decimals, as a converter may leave them: read
    rounded[:3, 1] += 3e-4 * qform[:3, 0] * spacing[1] / spacing[2]
    volume = read_volume(write(hu, tmp_path / "rounded.nii.gz", qform, 1, rounded, 1))
    np.testing.assert_array_equal(volume.hu, control.hu)
    np.testing.assert_allclose(volume.affine, LPS_RAS @ nib.load(tmp_path / "rounded.nii.gz").affine, atol=1e-5)
    skew = qform.copy()  # rows and columns of a slice not orthogonal: no scanner grid
    skew[:3, 1] += 0.3 * qform[:3, 0]
    skew[:3, 2] += 0.3 * qform[:3, 0]
    path = write(hu, tmp_path / "skew.nii.gz", qform, 1, skew, 2)
    with pytest.raises(VolumeError, match=r"skew\.nii\.gz: a sheared affine .*not supported"):
        read_volume(path)
    skew_in_plane = qform.copy()  # only the slice's rows and columns skewed (78.7 degrees): not a tilt either
    skew_in_plane[:3, 1] += 0.2 * qform[:3, 0]
    path = write(hu, tmp_path / "skew2.nii.gz", qform, 1, skew_in_plane, 1)
    with pytest.raises(VolumeError, match=r"skew2\.nii\.gz: a sheared affine \(the slices' voxel axes 0 and 1 "
                                          r"78\.\d+ degrees apart, not 90\): not supported"):
        read_volume(path)


# case 1: NaN outside the field of view
def _outside_fov(shape):
    """True outside a circular field of view (the corners of each slice), as a resampler leaves."""
    yy, xx = np.mgrid[0:shape[1], 0:shape[2]]
    ring = (yy - shape[1] / 2 + 0.5) ** 2 + (xx - shape[2] / 2 + 0.5) ** 2 > (0.48 * shape[1]) ** 2
    return np.broadcast_to(ring, shape)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_voxels_outside_the_field_of_view_are_air(tmp_path, case, caplog, bad):
    hu, _, spacing = case
    qform = plain_affine(hu.shape, spacing)
    control = read_volume(write(hu.astype(np.float32), tmp_path / "control.nii.gz", qform))
    outside = _outside_fov(hu.shape)
    assert np.all(hu[outside] < -900)  # only air is hidden: the head lies inside the field of view
    array = hu.astype(np.float32)
    array[outside] = bad
    with caplog.at_level(logging.WARNING):
        volume = read_volume(write(array, tmp_path / "resampled.nii.gz", qform))
    np.testing.assert_array_equal(volume.hu[~outside], control.hu[~outside])
    assert np.all(volume.hu[outside] == -1024)
    count = int(outside.sum())
    message = f"{count} non-finite voxels (NaN/inf) set to -1024 HU (air)"
    assert volume.findings == (Finding("non_finite_voxels", "warn", value=count, message=message),)
    assert not caplog.records  # recorded, not logged: the QA gate logs each warning once


def test_a_slice_wholly_outside_the_field_of_view_is_air(tmp_path, case):
    hu, _, spacing = case
    qform = plain_affine(hu.shape, spacing)
    array = hu.astype(np.float32)
    array[-1] = np.nan  # a resampled volume's top slice, beyond the source's last
    volume = read_volume(write(array, tmp_path / "top.nii.gz", qform))
    np.testing.assert_array_equal(volume.hu[:-1], hu[:-1])
    assert np.all(volume.hu[-1] == -1024) and volume.findings[0].value == SIZE * SIZE


def test_non_finite_voxels_that_cannot_be_air_are_refused(tmp_path, case):
    hu, _, spacing = case
    qform = plain_affine(hu.shape, spacing)
    hole = hu.astype(np.float32)
    hole[3, 30:34, 30:34] = np.nan  # inside the head: not outside the field of view
    hole[_outside_fov(hu.shape)] = np.nan
    with pytest.raises(VolumeError, match=r"hole\.nii\.gz: 16 NaN or infinite voxels enclosed by the image"):
        read_volume(write(hole, tmp_path / "hole.nii.gz", qform))
    with pytest.raises(VolumeError, match=r"void\.nii\.gz: every voxel is NaN"):
        read_volume(write(np.full(hu.shape, np.nan, np.float32), tmp_path / "void.nii.gz", qform))
    normalised = ((hu + 1024) / 4096).astype(np.float32)  # not HU, whatever the NaN around it
    normalised[_outside_fov(hu.shape)] = np.nan
    with pytest.raises(VolumeError, match=r"norm\.nii\.gz: values 0\.\d+\.\.0\.\d+ are not Hounsfield units"):
        read_volume(write(normalised, tmp_path / "norm.nii.gz", qform))


# right today and to stay right
def with_scaling(path, slope, inter):
    """``path`` (an uncompressed .nii) with scl_slope and scl_inter set in place, the stored values kept."""
    assert nib.load(path).header.endianness == "<"
    with open(path, "r+b") as fh:
        fh.seek(112)  # scl_slope, scl_inter: two float32 at bytes 112..119 of a NIfTI-1 header
        fh.write(np.asarray([slope, inter], "<f4").tobytes())
    proxy = nib.load(path).dataobj
    assert (proxy.slope, proxy.inter) == (slope, inter)
    return path


def test_scaling_trailing_dimension_and_a_flipped_affine_read_as_the_control(tmp_path, case):
    hu, _, spacing = case
    qform = plain_affine(hu.shape, spacing)
    control = read_volume(write(hu, tmp_path / "control.nii.gz", qform))
    scaled = with_scaling(write((hu + 1024).astype(np.uint16), tmp_path / "scaled.nii", qform), 1.0, -1024.0)
    halves = with_scaling(write(hu // 2, tmp_path / "halves.nii", qform), 2.0, 0.0)
    np.testing.assert_array_equal(read_volume(scaled).hu, control.hu)
    np.testing.assert_array_equal(read_volume(halves).hu, hu // 2 * 2)
    four = nib.Nifti1Image(hu.transpose(2, 1, 0)[..., None], qform)  # (x, y, z, 1)
    nib.save(four, str(tmp_path / "four.nii.gz"))
    np.testing.assert_array_equal(read_volume(tmp_path / "four.nii.gz").hu, control.hu)
    flip = np.diag([-1.0, 1, 1, 1])  # stored left-right flipped, the affine saying so
    flip[0, 3] = hu.shape[2] - 1
    flipped = nib.Nifti1Image(hu.transpose(2, 1, 0)[::-1], qform @ flip)
    nib.save(flipped, str(tmp_path / "flipped.nii.gz"))
    assert nib.aff2axcodes(flipped.affine)[0] == "R"
    np.testing.assert_array_equal(read_volume(tmp_path / "flipped.nii.gz").hu, control.hu)


def test_an_uncompressed_file_named_nii_gz_reads_as_the_control(tmp_path, case):
    hu, labels, spacing = case
    control = read_volume(write_nifti_case(hu, spacing, tmp_path / "control.nii.gz"))
    # as some tools (and a copy that decompresses on the fly) leave it
    write_nifti_case(hu, spacing, tmp_path / "plain.nii").rename(tmp_path / "plain.nii.gz")
    np.testing.assert_array_equal(read_volume(tmp_path / "plain.nii.gz").hu, control.hu)
    write_nifti_case(labels, spacing, tmp_path / "labels.nii").rename(tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(read_labels(tmp_path / "labels.nii.gz", control), labels)


def test_labels_float_255_and_a_tiny_offset_are_accepted_a_gross_one_refused(tmp_path, case):
    hu, labels, spacing = case
    qform = plain_affine(hu.shape, spacing)
    volume = read_volume(write(hu, tmp_path / "ct.nii.gz", qform))
    np.testing.assert_array_equal(read_labels(write(labels.astype(np.float32), tmp_path / "f.nii.gz", qform),
                                              volume), labels)
    np.testing.assert_array_equal(read_labels(write(labels * 255, tmp_path / "w.nii.gz", qform), volume),
                                  labels * 255)
    nudged = qform.copy()
    nudged[:3, 3] += 1e-4
    np.testing.assert_array_equal(read_labels(write(labels, tmp_path / "n.nii.gz", nudged), volume), labels)
    moved = qform.copy()
    moved[:3, 3] += (0, 0, 5.0)
    with pytest.raises(VolumeError, match=r"m\.nii\.gz: origin .* differs from case ct's"):
        read_labels(write(labels, tmp_path / "m.nii.gz", moved), volume)
    with pytest.raises(VolumeError, match=r"nan\.nii\.gz: non-integer label values \(e\.g\. nan\)"):
        read_label_volume(write(np.where(labels > 0, np.nan, 0).astype(np.float32), tmp_path / "nan.nii.gz", qform))


def test_a_prediction_whose_shear_differs_from_its_truth_is_refused_by_the_folder_evaluation(tmp_path, case):
    """Same shape, spacing and rigid grid, but the truth's sform is a 12-degree tilt and the
    prediction's is not: its voxels lie elsewhere in space, so the folder evaluation names it."""
    from aisd_ray.evaluation.evaluate_volumes import evaluate_nifti_folders

    hu, labels, spacing = case
    qform = plain_affine(hu.shape, spacing)
    c, s = np.cos(np.radians(12)), np.sin(np.radians(12))
    tilted = qform.copy()
    tilted[:3, 1] = spacing[1] * np.array([0, -c, s])
    for folder in ("truth", "pred", "same"):
        (tmp_path / folder).mkdir()
    write(labels.astype(np.uint8), tmp_path / "truth" / "0042.nii.gz", qform, 1, tilted, 1)
    rigid = tilted.copy()  # the truth's rigid grid (same axes, origin and spacing along the normal), unsheared
    normal = np.cross(tilted[:3, 0], tilted[:3, 1])
    normal *= np.sign(normal @ tilted[:3, 2]) / np.linalg.norm(normal)
    rigid[:3, 2] = normal * (normal @ tilted[:3, 2])
    write(labels.astype(np.uint8), tmp_path / "pred" / "0042.nii.gz", rigid, 1, rigid, 1)
    with pytest.raises(VolumeError, match=r"pred/0042\.nii\.gz: voxel axes differ from the ground truth"):
        evaluate_nifti_folders(tmp_path / "pred", tmp_path / "truth", str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    write(labels.astype(np.uint8), tmp_path / "same" / "0042.nii.gz", qform, 1, tilted, 1)  # the control: scored
    evaluate_nifti_folders(tmp_path / "same", tmp_path / "truth", str(tmp_path / "ok"), progress=False)
    assert (tmp_path / "ok" / "metrics.json").is_file()
