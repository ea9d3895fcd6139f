"""The normal-head check's converter (``bench.normal_head``) on small InVesalius-like projects built
here (no GPL file in the tests): the coronal raw volume into canonical geometry, RAS NIfTI, the
clinical 5 mm series, one line for a project it cannot read; and the check end to end on a tiny
export, its false-positive mL that of the mask it wrote."""

import io
import json
import plistlib
import tarfile

import nibabel as nib
import numpy as np
import pytest

from aisd_ray.bench import normal_head
from aisd_ray.data.sources.layout import DataError
from aisd_ray.data.sources.volume import read_labels, read_volume


def _inv3(path, volume, spacing_xyz=(0.5, 0.5, 1.5), orientation=1, raw=None, plist=True):
    """An .inv3: a tar.gz of <folder>/main.plist and <folder>/matrix.dat, as InVesalius 3 writes."""
    main = {"format_version": 1, "modality": "CT", "orientation": orientation, "spacing": list(spacing_xyz),
            "matrix": {"filename": "matrix.dat", "dtype": "int16", "shape": list(volume.shape)}}
    with tarfile.open(path, "w:gz") as tar:
        files = {"matrix.dat": raw if raw is not None else volume.astype("<i2").tobytes()}
        if plist:
            files["main.plist"] = plistlib.dumps(main)
        for name, data in files.items():
            info = tarfile.TarInfo(f"tmpproject/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_coronal_project_is_read_into_canonical_geometry(tmp_path):
    rng = np.random.default_rng(0)
    coronal = rng.integers(-1000, 1000, (6, 8, 10)).astype(np.int16)  # (anterior..posterior, sup..inf, R..L)
    hu, spacing = normal_head.read_inv3(_inv3(tmp_path / "a.inv3", coronal))
    assert hu.shape == (8, 6, 10) and hu.dtype == np.int16 and spacing == (0.5, 1.5, 0.5)
    for a, s, x in [(0, 0, 0), (5, 7, 9), (2, 3, 4), (1, 6, 0)]:  # canonical z counts up from the lowest row
        assert hu[7 - s, a, x] == coronal[a, s, x]


def test_written_as_ras_nifti_it_reads_back_the_same_head(tmp_path):
    coronal = (np.arange(6 * 8 * 10) - 1000).astype(np.int16).reshape(6, 8, 10)  # air to soft tissue
    sample = _inv3(tmp_path / "a.inv3", coronal)
    written = normal_head.write_normal_head(sample, tmp_path / "head.nii.gz", slice_mm=None)
    assert nib.aff2axcodes(nib.load(tmp_path / "head.nii.gz").affine) == ("R", "A", "S")
    vol = read_volume(tmp_path / "head.nii.gz")
    np.testing.assert_array_equal(vol.hu, normal_head.read_inv3(sample)[0])
    assert vol.spacing == pytest.approx((0.5, 1.5, 0.5)) and written["shape_zyx"] == [8, 6, 10]


def test_the_clinical_series_averages_5_mm_slabs_and_resamples_in_plane():
    z_mm = (np.arange(60) + 0.5) * 0.5  # a ramp: each voxel's HU its height in mm, 0.5 mm samples
    hu = np.broadcast_to(np.rint(z_mm)[:, None, None], (60, 12, 16)).astype(np.int16)
    series, spacing = normal_head.clinical_series(hu, (0.5, 1.5, 0.5), slice_mm=5.0, pixel_mm=1.0)
    assert spacing == pytest.approx((5.0, 1.0, 1.0))  # 18 mm and 8 mm across, in 1 mm pixels
    assert series.shape == (6, 18, 8)
    for k in range(1, 5):  # inside the volume, slab k's mean height: its centre, (k + 0.5) * 5 mm
        assert series[k].mean() == pytest.approx((k + 0.5) * 5.0, abs=0.6)
        assert series[k].std() == 0  # the ramp has no in-plane variation to add


@pytest.mark.parametrize("build,message", [
    (lambda p, v: p.write_bytes(b"not a tar file") and p, "not a readable InVesalius project"),
    (lambda p, v: _inv3(p, v, plist=False), "no main.plist inside"),
    (lambda p, v: _inv3(p, v, raw=b"\0" * 10), "holds 10 bytes"),
    (lambda p, v: _inv3(p, v, orientation=0), "only coronal projects"),
])
def test_a_project_it_cannot_read_is_one_line_naming_the_file(tmp_path, build, message):
    path = tmp_path / "bad.inv3"
    build(path, np.zeros((2, 3, 4), np.int16))
    with pytest.raises(DataError, match=message) as err:
        normal_head.read_inv3(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_the_check_reports_the_false_positive_ml_of_the_mask_it_wrote(trained_run, tmp_path, capsys):
    """A synthetic head (realistic anatomy) stored as a coronal project stands in for Cranium.inv3."""
    from aisd_ray.data.synthetic.volumes import synth_volume

    hu, _, spacing = synth_volume(3, "1000001", 64, 6)  # canonical (Z, Y, X)
    coronal = np.ascontiguousarray(hu[::-1].transpose(1, 0, 2))
    sample = _inv3(tmp_path / "head.inv3", coronal, (spacing[2], spacing[0], spacing[1]))
    export = trained_run[3]
    assert normal_head.main(["--model", export, "--output", str(tmp_path / "out"), "--sample", str(sample),
                             "--native"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["series"]["orientation"] == "RAS" and result["runs"]
    vol = read_volume(tmp_path / "out" / "normal_head.nii.gz")
    for run in result["runs"]:
        name = {True: "mask_on", False: "mask_off", None: "as_exported"}[run["brain_mask"]]
        mask = read_labels(tmp_path / "out" / name / "normal_head.nii.gz", vol)
        assert run["false_positive_ml"] == pytest.approx(np.count_nonzero(mask) * np.prod(vol.spacing) / 1000,
                                                         abs=1e-3)
