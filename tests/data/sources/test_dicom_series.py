"""DICOM series as users bring them (issue 28): stripped rescale tags, varying slice spacing, enhanced
CT multi-frame files, dot-named workstation exports, gantry tilt, and the syntaxes and extras that
must stay right (enhanced CT: test_dicom_multiframe.py). Every series is written with pydicom (or SimpleITK for JPEG) and read back; the
right value is the same head read from the plain series (the control)."""

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import RLELossless, generate_uid

from aisd_ray.data.sources.dicom_series import dicom_files
from aisd_ray.data.sources.layout import DataError, is_metadata
from aisd_ray.data.synthetic.volumes import synth_volume, write_dicom_series, write_nifti_case
from aisd_ray.data.sources.volume import is_dicom_series, list_cases, read_volume
from tests.helpers import HEAD_SIZE, HEAD_SLICES, no_case_outputs, refused, same_volume

SIZE, SLICES = HEAD_SIZE, HEAD_SLICES


# case 2: RescaleSlope/RescaleIntercept stripped, stored values HU + 1024 unsigned


def test_a_series_without_rescale_tags_is_refused_by_name(tmp_path, case, control):
    hu, _, spacing = case
    write_dicom_series(hu, spacing, tmp_path / "tagged", "tagged")
    write_dicom_series(hu, spacing, tmp_path / "stripped", "stripped", rescale_tags=False)
    assert all("RescaleIntercept" not in pydicom.dcmread(p) for p in (tmp_path / "stripped").iterdir())
    same_volume(read_volume(tmp_path / "tagged"), control)
    message = refused(tmp_path / "stripped", r"stripped: values \d+\.\.\d+ are not Hounsfield units \(no air below "
                                             r"0 HU: no RescaleIntercept in the DICOM headers")
    assert "restore RescaleSlope/RescaleIntercept" in message


def test_neighbours_of_stripped_rescale_tags_are_refused_too(tmp_path, case):
    hu, _, spacing = case
    # stored HU + 1000, signed: air about 0 with noise either side, so some values lie below 0
    write_dicom_series(hu, spacing, tmp_path / "minus1000", "m", intercept=-1000, rescale_tags=False)
    refused(tmp_path / "minus1000", r"values -\d+\.\.\d+ are not Hounsfield units \(no air: nothing below -500 HU, .*"
                                    r"no RescaleIntercept in the DICOM headers")
    written = write_dicom_series(hu, spacing, tmp_path / "some", "some")  # one file stripped, the others not
    ds = pydicom.dcmread(written[4])
    del ds.RescaleIntercept, ds.RescaleSlope
    ds.save_as(written[4])
    refused(tmp_path / "some", rf"some: 1 of {SLICES} file\(s\) without RescaleIntercept \(e\.g\. {written[4].name}\)")


@pytest.mark.parametrize("name, transform, match", [
    ("unscaled", lambda hu: (hu + 1024).astype(np.uint16), r"no air below 0 HU"),
    ("zscored", lambda hu: ((hu - hu.mean()) / hu.std()).astype(np.float32), r"no air: nothing below -500 HU"),
    ("brain-window", lambda hu: np.clip(hu, 0, 80).astype(np.int16) - 40, r"no air: nothing below -500 HU"),
])
def test_the_hu_check_is_one_for_every_reader(tmp_path, case, name, transform, match):
    hu, _, spacing = case
    refused(write_nifti_case(transform(hu), spacing, tmp_path / f"{name}.nii.gz"), match)
    if np.asarray(transform(hu)).dtype.kind in "iu":  # the same values as a series' HU: refused alike
        write_dicom_series(transform(hu), spacing, tmp_path / name, name, intercept=0)
        refused(tmp_path / name, match + r".*RescaleSlope/RescaleIntercept do not give Hounsfield units")


# case 3: variable slice spacing


def test_variable_slice_spacing_is_refused_with_its_steps(tmp_path, case):
    hu, _, spacing = case
    z = [0, 2.5, 5, 7.5, 12.5, 17.5, 22.5, 27.5]  # 2.5 mm x3, then 5 mm x4: the median step is 5 mm
    write_dicom_series(hu, spacing, tmp_path / "varies", "varies", z_mm=z)
    message = refused(tmp_path / "varies", r"varies: slice spacing varies: 2\.50 mm x3, then 5\.00 mm x4 \(slices "
                                           r"-37\.50 to -10\.00 mm along the slice normal\); one slice spacing "
                                           r"expected: resample the series to one spacing first$")
    assert "missing" not in message


@pytest.mark.parametrize("name, z, steps", [
    ("thick-thin-thick", [0, 5, 10, 12.5, 15, 17.5, 22.5, 27.5], r"5\.00 mm x2, then 2\.50 mm x3, then 5\.00 mm x2"),
    ("odd-step", [0, 5, 10, 15, 22, 27, 32, 37], r"5\.00 mm x3, then 7\.00 mm x1, then 5\.00 mm x3"),
    ("thin-thick-thin", [0, 2.5, 5, 10, 15, 17.5, 20, 22.5], r"2\.50 mm x2, then 5\.00 mm x2, then 2\.50 mm x3"),
    ("drifting", [0, 5, 10.4, 16.2, 22.4, 29, 36, 43.4], r"5\.20 mm x2, then 6\.00 mm x2, then 6\.80 mm x2"),
])
def test_spacing_that_varies_is_never_called_missing_slices(tmp_path, case, name, z, steps):
    hu, _, spacing = case
    write_dicom_series(hu, spacing, tmp_path / name, name, z_mm=z)
    assert "missing" not in refused(tmp_path / name, r"slice spacing varies: .*" + steps)


@pytest.mark.parametrize("lost, between", [([3], r"-27\.50 and -17\.50"), ([2, 5], r"-32\.50 and -22\.50")])
def test_a_real_missing_slice_still_says_missing(tmp_path, case, lost, between):
    hu, _, spacing = case
    written = write_dicom_series(hu, spacing, tmp_path / "gap", "gap")
    for k in lost:
        written[k].unlink()
    more = r"; 1 more gap\(s\)" if len(lost) > 1 else ""
    refused(tmp_path / "gap", r"missing slice\(s\): a gap of 10\.00 mm between the slices at " + between
            + r" mm \(median step 5\.00 mm" + more)


def test_float_jitter_in_positions_still_reads(tmp_path, case, control):
    hu, _, spacing = case
    z = np.arange(SLICES) * spacing[0] + np.random.default_rng(3).normal(0, 0.02, SLICES)
    write_dicom_series(hu, spacing, tmp_path / "jitter", "jitter", z_mm=list(z))
    found = read_volume(tmp_path / "jitter")
    np.testing.assert_array_equal(found.hu, control.hu)
    assert found.spacing[0] == pytest.approx((z[-1] - z[0]) / (SLICES - 1), rel=1e-9)
    assert found.spacing[0] == pytest.approx(spacing[0], abs=0.02)


def test_a_256_slice_thin_series_reads(tmp_path):
    hu, _, spacing = synth_volume(7, "thin", 32, 256, slice_mm=0.625)
    write_dicom_series(hu, spacing, tmp_path / "thin", "thin", shuffle=False)
    found = read_volume(tmp_path / "thin")
    np.testing.assert_array_equal(found.hu, hu)
    assert found.spacing == pytest.approx((0.625, 230 / 32, 230 / 32), rel=1e-9)


# case 9: a workstation export whose file names all start with a dot


def test_dot_named_files_are_dicom_when_they_read_as_dicom(tmp_path, case, control):
    hu, _, spacing = case
    names = [f".CT..0003.{k + 1:04d}.2026.12.06.10.11.12.123456.{k + 100}.IMA" for k in range(SLICES)]
    root = tmp_path / "export"
    write_dicom_series(hu, spacing, root / "ws", "ws", names=names)
    (root / "ws" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "ws" / "._.CT..0003.0001.IMA").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / "ws" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    assert [p.name for p in dicom_files(root / "ws")] == sorted(names)
    same_volume(read_volume(root / "ws"), control)
    assert is_dicom_series(root / "ws") and list_cases(root) == {"ws": root / "ws"}

    from aisd_ray.inference.infer_volumes import is_volume_input

    assert is_volume_input(root / "ws") and is_volume_input(root)  # infer --input picks the DICOM reader
    (root / "ws" / names[3]).unlink()
    refused(root / "ws", r"ws: missing slice\(s\)")  # a refusal that speaks of DICOM, not PNG


def test_a_folder_with_dicom_deeper_is_refused_as_dicom_not_png(tmp_path, case):
    from aisd_ray.inference.infer import _infer

    hu, _, spacing = case
    write_dicom_series(hu, spacing, tmp_path / "PA0" / "ST0" / "SE0", "p", names=[f".IM{k}" for k in range(SLICES)])
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    from pydicom.data import get_testdata_file

    shutil.copy(get_testdata_file("DICOMDIR", download=False), tmp_path / "DICOMDIR")  # a CD's index, not named
    with pytest.raises(DataError, match=r"no images \(\.png, \.jpg, \.\.\.\) and no DICOM series here or one folder "
                                        r"down, but DICOM files deeper \(e\.g\. PA0/ST0/SE0/\.IM0\): give the series"):
        _infer(None, tmp_path, tmp_path, str(tmp_path / "out"), 1, False, False)  # refused before any model use
    assert not (tmp_path / "out").exists()


def test_dot_named_dicom_members_of_a_zip_are_extracted_and_apple_double_is_not(tmp_path, case, control):
    import zipfile

    from aisd_ray.data.sources.aisd_dicom import _series_folder

    hu, _, spacing = case
    written = write_dicom_series(hu, spacing, tmp_path / "src", "z", names=[f".CT.{k}.IMA" for k in range(SLICES)])
    (tmp_path / "release").mkdir()
    with zipfile.ZipFile(tmp_path / "release" / "dicom.zip", "w") as archive:
        for path in written:
            archive.write(path, f"dicom/0073410/{path.name}")
            archive.writestr(f"__MACOSX/dicom/0073410/._{path.name}", b"\x00\x05\x16\x07")
        archive.writestr("dicom/0073410/._.CT.0.IMA", b"\x00\x05\x16\x07")
    folder = _series_folder(tmp_path / "release", tmp_path / "work") / "dicom" / "0073410"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in written)
    same_volume(read_volume(folder), control)


@pytest.mark.parametrize("path, dot_files, metadata", [
    (".CT..0003.0001...IMA", False, False), (".CT..0003.0001...IMA", True, True), ("._x", False, True),
    (".DS_Store", False, True), ("Thumbs.db", False, True), ("desktop.ini", False, True),
    ("__MACOSX/series/1.dcm", False, True), (".Trashes", False, True), ("IM0001", False, False),
])
def test_only_known_metadata_names_are_skipped_where_content_decides(path, dot_files, metadata):
    assert is_metadata(path, dot_files=dot_files) is metadata


# case 5, the reading side: gantry tilt


def test_gantry_tilt_is_a_finding_and_a_log_line(tmp_path, case, caplog):
    hu, _, spacing = case
    write_dicom_series(hu, spacing, tmp_path / "tilt", "tilt", tilt_deg=15.0)
    with caplog.at_level("INFO", logger="aisd_ray.data.sources.dicom_geometry"):
        found = read_volume(tmp_path / "tilt")
    finding, contrast = found.findings  # the reader notes the tilt, and makes the QA gate's contrast check
    assert (contrast.check, contrast.status) == ("contrast_agent", "pass")
    assert (finding.check, finding.status, finding.value, finding.expected) == ("gantry_tilt", "pass", 15.0, None)
    assert finding.message.startswith("gantry tilt 15.00 degrees: ")
    lines = [r.getMessage() for r in caplog.records if "gantry tilt" in r.getMessage()]
    assert len(lines) == 1 and str(tmp_path / "tilt") in lines[0] and "15.00 degrees" in lines[0]
    write_dicom_series(hu, spacing, tmp_path / "flat", "flat")
    assert [f.check for f in read_volume(tmp_path / "flat").findings] == ["contrast_agent"]


# right today and to stay right


def test_rle_jpeg_lossless_and_jpeg_2000_series_read_as_the_plain_one(tmp_path, case, control):
    hu, _, spacing = case
    write_dicom_series(hu, spacing, tmp_path / "rle", "rle", syntax=RLELossless)
    assert pydicom.dcmread(next((tmp_path / "rle").iterdir())).file_meta.TransferSyntaxUID == RLELossless
    same_volume(read_volume(tmp_path / "rle"), control)
    plain = write_dicom_series(hu, spacing, tmp_path / "signed", "signed", intercept=0)  # int16 stored = HU
    for compressor, syntax in (("JPEG", "1.2.840.10008.1.2.4.70"), ("JPEG2000", "1.2.840.10008.1.2.4.90")):
        folder = tmp_path / compressor
        folder.mkdir()
        for path in plain:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.LoadPrivateTagsOn()
            writer = sitk.ImageFileWriter()
            writer.SetFileName(str(folder / f"{path.name}.dcm"))
            writer.KeepOriginalImageUIDOn()
            writer.SetUseCompression(True)
            writer.SetCompressor(compressor)
            writer.Execute(sitk.Cast(reader.Execute(), sitk.sitkInt16))
            encoded, ds = pydicom.dcmread(folder / f"{path.name}.dcm"), pydicom.dcmread(path)
            ds.file_meta.TransferSyntaxUID, ds.PixelData = encoded.file_meta.TransferSyntaxUID, encoded.PixelData
            ds["PixelData"].VR = "OB"  # the plain file's headers, GDCM's encoded pixels
            ds.save_as(folder / f"{path.name}.dcm")
        assert pydicom.dcmread(folder / f"{plain[0].name}.dcm").file_meta.TransferSyntaxUID == syntax
        same_volume(read_volume(folder), control)


def test_files_without_preamble_and_extensionless_names_read(tmp_path, case, control):
    hu, _, spacing = case
    written = write_dicom_series(hu, spacing, tmp_path / "raw", "raw", names=[f"IM{k:04d}" for k in range(SLICES)])
    for path in written:
        ds = pydicom.dcmread(path)
        ds.file_meta, ds.preamble = FileMetaDataset(), None
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
        assert path.read_bytes()[128:132] != b"DICM"
    (tmp_path / "raw" / "DICOMDIR").write_bytes(b"\0" * 200)
    (tmp_path / "raw" / "notes.txt").write_text("not DICOM\n")
    same_volume(read_volume(tmp_path / "raw"), control)


def test_pixel_padding_value_minus_2000_stays_as_written(tmp_path, case):
    hu, _, spacing = case
    padded = hu.copy()
    yy, xx = np.mgrid[:SIZE, :SIZE]
    padded[:, (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 > (SIZE / 2) ** 2] = -2000  # outside the scan circle
    written = write_dicom_series(padded, spacing, tmp_path / "pad", "pad", intercept=0)
    for path in written:
        ds = pydicom.dcmread(path)
        ds.add_new(0x00280120, "SS", -2000)  # PixelPaddingValue, signed as the pixels
        ds.save_as(path)
    np.testing.assert_array_equal(read_volume(tmp_path / "pad").hu, padded)


def test_float_noise_in_orientation_and_spacing_never_splits_a_series(tmp_path, case, control):
    """Headers written by another converter: slices whose ImageOrientationPatient and PixelSpacing
    differ by a few millionths, on either side of a 4th-decimal rounding boundary, are one series."""
    hu, _, spacing = case
    written = write_dicom_series(hu, spacing, tmp_path / "noisy", "noisy")
    for k, path in enumerate(written):
        ds = pydicom.dcmread(path)
        wobble = 0.99995 + (2e-6 if k % 2 else -2e-6)  # 0.999952 and 0.999948: 1.0 and 0.9999 at 4 decimals
        ds.ImageOrientationPatient = [wobble, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1] + (3e-6 if k % 2 else 0), spacing[2]]
        ds.save_as(path)
    found = read_volume(tmp_path / "noisy")
    np.testing.assert_array_equal(found.hu, control.hu)


def test_a_scout_under_the_same_series_uid_is_named_as_another_orientation(tmp_path, case):
    hu, _, spacing = case
    written = write_dicom_series(hu, spacing, tmp_path / "scout", "scout")
    ds = pydicom.dcmread(written[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImageOrientationPatient, ds.ImageType = [0, 1, 0, 0, 0, -1], ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(tmp_path / "scout" / "zz-localizer.dcm")
    refused(tmp_path / "scout", r"scout: 1 of 9 file\(s\) differ from the others in ImageOrientationPatient \(e\.g\. "
                                r"zz-localizer\.dcm\): a localizer \(scout\)")


# the CLI: exit 2, one line naming the folder and the reason, nothing written


@pytest.mark.parametrize("variant, reason", [
    ({"rescale_tags": False}, "no RescaleIntercept in the DICOM headers"),
    ({"z_mm": [0, 2.5, 5, 7.5, 12.5, 17.5, 22.5, 27.5]}, "slice spacing varies: 2.50 mm x3, then 5.00 mm x4"),
])
def test_infer_refuses_the_case_in_one_line_and_writes_nothing_of_it(tmp_path, case, capsys, variant, reason):
    from aisd_ray.cli import main

    hu, _, spacing = case
    names = [f".CT..0003.{k + 1:04d}...IMA" for k in range(SLICES)]  # dot-named: read as DICOM all the same
    write_dicom_series(hu, spacing, tmp_path / "in" / "p1", "p1", names=names, **variant)
    # the cases are read before the export is loaded: a refused case needs no model
    assert main(["infer", "--model", str(tmp_path / "no-model"), "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / 'in' / 'p1'}: " in err[0] and reason in err[0], err
    assert "PNG" not in err[0] and "images (" not in err[0]
    assert no_case_outputs(tmp_path / "out", err[0])  # the case's row alone: whole per case
