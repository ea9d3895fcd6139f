"""Enhanced CT multi-frame files (issue 28, case 6): read from their functional groups as the series
they hold, their frames checked as a series' slices, a tilted one's exact affine kept, other
multi-frame objects refused by kind, and pydicom-data's real Enhanced CT file read. The right value
is the same head read from its plain series (``control``, tests/data/conftest.py)."""

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from aisd_ray.data.synthetic.volumes import write_dicom_series, write_enhanced_ct
from aisd_ray.data.sources.volume import read_volume
from tests.helpers import HEAD_SLICES as SLICES
from tests.helpers import refused, same_volume


# case 6: enhanced CT, one multi-frame file


def test_an_enhanced_ct_file_reads_as_its_series(tmp_path, case, control):
    hu, _, spacing = case
    path = write_enhanced_ct(hu, spacing, tmp_path / "ect" / "volume.dcm", "ect")
    ds = pydicom.dcmread(path)
    assert ds.NumberOfFrames == SLICES and "ImageOrientationPatient" not in ds
    positions = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
    assert positions != sorted(positions)  # frames stored out of position order
    found = read_volume(tmp_path / "ect")
    same_volume(found, control)
    assert (found.kind, found.case_id) == ("dicom", "ect")


def test_a_tilted_enhanced_ct_file_keeps_its_frames_exact_affine(tmp_path, case):
    """The frames of a 15-degree tilted enhanced CT: the Volume's exact affine steps from frame to
    frame as their positions do (sheared), so its mask lies on each frame, as a series' does."""
    hu, _, spacing = case
    path = write_enhanced_ct(hu, spacing, tmp_path / "ect" / "volume.dcm", "ect")
    ds = pydicom.dcmread(path)
    c, s = np.cos(np.radians(15)), np.sin(np.radians(15))
    ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, c, -s]
    ds.save_as(path)
    found = read_volume(tmp_path / "ect")
    assert found.gantry_tilt_deg == pytest.approx(15, abs=1e-3)
    frames = np.stack(sorted((np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float)
                              for f in ds.PerFrameFunctionalGroupsSequence), key=lambda p: p[2]))
    np.testing.assert_allclose(found.affine[:3, 2], frames[1] - frames[0], atol=1e-4)
    np.testing.assert_allclose(found.affine[:3, 3], frames[0], atol=1e-4)
    assert [f.check for f in found.findings] == ["gantry_tilt", "contrast_agent"]


def test_enhanced_ct_frames_are_checked_as_a_series_slices(tmp_path, case):
    hu, _, spacing = case
    path = write_enhanced_ct(hu, spacing, tmp_path / "dup" / "volume.dcm", "dup")
    ds = pydicom.dcmread(path)
    frames = ds.PerFrameFunctionalGroupsSequence
    frames[1].PlanePositionSequence[0].ImagePositionPatient = frames[0].PlanePositionSequence[0].ImagePositionPatient
    ds.save_as(path)
    refused(path.parent, r"volume\.dcm: two slices at one position \(.* mm along the slice normal: frame \d, "
                         r"frame \d\)")
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    ds.save_as(path)
    refused(path.parent, r"volume\.dcm: no ImagePositionPatient in the functional groups \(PlanePositionSequence\) "
                         r"of frame 3 \(1 of 8 frames\)")
    shutil.copy(path, tmp_path / "dup" / "again.dcm")
    refused(tmp_path / "dup", r"dup: an enhanced CT file \(again\.dcm\) beside 1 other DICOM file\(s\)")


def test_other_multi_frame_objects_are_refused_by_kind(tmp_path):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # multi-frame grayscale word secondary capture
    meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = generate_uid(), ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.NumberOfFrames, ds.Rows, ds.Columns = "OT", 8, 16, 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored = 1, "MONOCHROME2", 16, 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = np.zeros((8, 16, 16), "<u2").tobytes()
    (tmp_path / "sc").mkdir()
    ds.save_as(tmp_path / "sc" / "capture.dcm", enforce_file_format=True)
    refused(tmp_path / "sc", r"capture\.dcm: a multi-frame Multi-frame Grayscale Word Secondary Capture Image Storage "
                             r"\(8 frames\): not a CT series; .*single-frame CT images")


def test_pydicom_datas_real_enhanced_ct_reads(tmp_path):
    from pydicom.data import get_testdata_file

    source = get_testdata_file("eCT_Supplemental.dcm", download=False)  # from pydicom-data, a test extra
    assert source is not None, "pydicom-data is not installed (make install installs the test extras)"
    (tmp_path / "ect").mkdir()
    shutil.copy(source, tmp_path / "ect" / "eCT_Supplemental.dcm")
    found = read_volume(tmp_path / "ect")
    ds = pydicom.dcmread(source)
    assert found.hu.shape == (ds.NumberOfFrames, ds.Rows, ds.Columns)
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert found.spacing[1:] == pytest.approx([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing])
    rescale = shared.PixelValueTransformationSequence[0]
    expected = ds.pixel_array.astype(np.float64) * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
    assert found.hu.sum(dtype=np.int64) == int(expected.sum())


def test_an_enhanced_ct_file_given_itself_reads_and_a_single_image_is_named(tmp_path, case, control):
    """``infer --input FILE`` of an enhanced CT file reads it as in its folder; one single-frame image
    given on its own is refused as not a series, by name."""
    hu, _, spacing = case
    path = write_enhanced_ct(hu, spacing, tmp_path / "ect" / "volume.dcm", "ect")
    found = read_volume(path)
    same_volume(found, control)
    assert found.case_id == "volume"
    single = write_dicom_series(hu, spacing, tmp_path / "series", "single")[3]
    refused(single, r"one DICOM image, not a series: give the folder that holds the series' files")
