"""``infer --dicom-seg``: a DICOM SEG on the source series' own slices, read back with highdicom and
with pydicom and compared voxel for voxel with the NIfTI mask written beside it (each source image
found through its ImagePositionPatient and SOPInstanceUID, never by file order); for a plain, a
shuffled and a gantry-tilted series; its identity is the source's and nothing else of it."""

import gzip

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from aisd_ray.cli import main
from aisd_ray.data.sources.volume import VolumeError, read_volume
from aisd_ray.data.synthetic.volumes import write_dicom_series, write_nifti_case
from aisd_ray.inference.dicom_seg import write_seg
from aisd_ray.inference.infer_volumes import infer_volumes
from tests.helpers import Probabilities, ThresholdModel, head_with_block

SPACING = (5.0, 0.9, 0.8)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# what a SEG carries of its source's identity (DICOM PS3.3 Patient and General Study modules)
IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
            "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")
# identifying values a scanner writes that a SEG must not repeat
OTHER = {"InstitutionName": "St Elsewhere Hospital", "InstitutionAddress": "12 Harbour Road, Portsmouth",
         "StationName": "CTROOM7", "OperatorsName": "Smith^Olivia", "PerformingPhysicianName": "Jones^Peter",
         "DeviceSerialNumber": "SN-99812", "Manufacturer": "ScanCo", "ManufacturerModelName": "Brainview 64",
         "InstitutionalDepartmentName": "Neuroradiology West", "SeriesDescription": "HEAD Doe trauma",
         "AcquisitionDate": "20190412", "AcquisitionTime": "101517", "PatientAge": "054Y",
         "OtherPatientIDs": "OLD-77123", "PatientAddress": "4 Mill Lane, Cowes"}
GIVEN = {"PatientName": "Doe^Jane", "PatientID": "MRN-4452", "PatientBirthDate": "19700101", "PatientSex": "F",
         "StudyDate": "20190411", "StudyTime": "235900", "StudyID": "ST-31", "AccessionNumber": "ACC-5531",
         "ReferringPhysicianName": "Who^Doctor"}


def _series(folder, kind, hu):
    """The head with a block as a DICOM series: "plain" (files 0001.dcm... in position order),
    "shuffled" (file names in an order unrelated to position), "tilted" (a 15 degree gantry tilt,
    shuffled names too); identity and scanner values written into every file."""
    n = hu.shape[0]
    names = {"plain": None, "shuffled": [f"IM{k:04d}" for k in np.random.default_rng(5).permutation(n)],
             "tilted": [f"{k:03d}.dcm" for k in np.random.default_rng(6).permutation(n)]}[kind]
    paths = write_dicom_series(hu, SPACING, folder, folder.name, shuffle=False, names=names, slope=2,
                               tilt_deg=15.0 if kind == "tilted" else 0.0, seed=3)
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in {**GIVEN, **OTHER}.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    return paths


def _expected(mask_path, source):
    """The NIfTI mask on ``source``'s (a pydicom dataset) pixel grid, (Rows, Columns): each pixel's
    patient position (ImagePositionPatient + column x row direction x spacing + row x column
    direction x spacing, LPS) through the NIfTI's sform to its voxel."""
    image = nib.load(str(mask_path))
    data = np.asarray(image.dataobj)
    iop = np.asarray(source.ImageOrientationPatient, float)
    dy, dx = (float(v) for v in source.PixelSpacing)
    r, c = np.meshgrid(np.arange(source.Rows), np.arange(source.Columns), indexing="ij")
    lps = (np.asarray(source.ImagePositionPatient, float)[:, None, None] + iop[:3, None, None] * (c * dx)
           + iop[3:, None, None] * (r * dy))
    ras = np.einsum("ij,jrc->irc", LPS_TO_RAS[:3, :3], lps)
    voxel = np.einsum("ij,jrc->irc", np.linalg.inv(image.get_sform()[:3, :3]), ras - image.get_sform()[:3, 3:4, None])
    index = np.rint(voxel).astype(int)
    assert np.abs(voxel - index).max() < 1e-3  # every source pixel is a voxel centre of the mask
    return data[index[0], index[1], index[2]]


def _by_pydicom(seg_path):
    """{ReferencedSOPInstanceUID: (label map (Rows, Columns), ImagePositionPatient)} from the SEG's
    frames, read with pydicom alone: each frame's source image, segment number and bits."""
    ds = pydicom.dcmread(seg_path)
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    found = {}
    for frame, item in zip(pixels, ds.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        where = item if "SegmentIdentificationSequence" in item else ds.SharedFunctionalGroupsSequence[0]
        segment = int(where.SegmentIdentificationSequence[0].ReferencedSegmentNumber)  # per frame, or shared
        labels, position = found.get(uid, (np.zeros(frame.shape, np.uint8), None))
        assert not (labels[frame > 0]).any()  # segments do not overlap
        labels[frame > 0] = segment
        found[uid] = (labels, [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
    return ds, found


def _check_seg_equals_mask(out, case, paths):
    """The SEG read back (highdicom, pydicom) equals the NIfTI mask on every source image."""
    seg_path, mask_path = out / "cases" / case / "seg.dcm", out / f"{case}.nii.gz"
    seg = hd.seg.segread(seg_path)
    segments = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    raw, frames = _by_pydicom(seg_path)
    total = 0
    for path in paths:
        source = pydicom.dcmread(path)
        expected = _expected(mask_path, source)
        total += int((expected > 0).sum())
        by_hd = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=segments,
                                                  combine_segments=True, relabel=False)[0]
        np.testing.assert_array_equal(by_hd, expected, err_msg=path.name)
        labels, position = frames.get(source.SOPInstanceUID, (np.zeros_like(expected), None))
        np.testing.assert_array_equal(labels, expected, err_msg=path.name)
        if position is not None:
            assert position == pytest.approx([float(v) for v in source.ImagePositionPatient], abs=1e-4)
            orientation = raw.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
            assert [float(v) for v in orientation] == pytest.approx([float(v) for v in source.ImageOrientationPatient])
    return raw, total


@pytest.mark.parametrize("kind", ["plain", "shuffled", "tilted"])
def test_the_seg_read_back_equals_the_nifti_mask_on_each_source_slice(kind, tmp_path):
    hu, truth = head_with_block()
    paths = _series(tmp_path / "in" / "p17", kind, hu)
    out = tmp_path / "out"
    infer_volumes("unused", tmp_path / "in" / "p17", str(out), progress=False, model=ThresholdModel(), dicom_seg=True)
    raw, total = _check_seg_equals_mask(out, "p17", paths)
    assert total == pytest.approx(truth.sum(), rel=0.1)  # the block, found: the comparison is not of empty masks
    assert raw.SegmentationType == "BINARY" and raw.Modality == "SEG"
    [segment] = raw.SegmentSequence
    assert segment.SegmentLabel == "lesion" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # SCT Lesion
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "aisd-ray" and algorithm.AlgorithmVersion
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert raw.FrameOfReferenceUID == pydicom.dcmread(paths[0]).FrameOfReferenceUID
    series = {pydicom.dcmread(p).SeriesInstanceUID for p in paths}
    assert {s.SeriesInstanceUID for s in raw.ReferencedSeriesSequence} == series


class TwoClassModel(ThresholdModel):
    """The lesion split in two classes by its image column: class 1 left of the middle, 2 right."""

    info = {"class_names": ["background", "core", "penumbra"]}

    def predict(self, batch):
        lesion = self.lesion(np.asarray(batch)[..., 0])
        right = np.arange(lesion.shape[-1]) >= lesion.shape[-1] // 2
        classes = np.where(lesion, np.where(right, 2, 1), 0)
        return {"probabilities": Probabilities(np.eye(3, dtype=np.float32)[classes])}


def test_each_lesion_class_is_its_own_segment_named_by_the_export(tmp_path):
    hu, _ = head_with_block()
    paths = _series(tmp_path / "in" / "p17", "shuffled", hu)
    out = tmp_path / "out"
    infer_volumes("unused", tmp_path / "in" / "p17", str(out), progress=False, model=TwoClassModel(), dicom_seg=True)
    raw, _ = _check_seg_equals_mask(out, "p17", paths)
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in raw.SegmentSequence] == [(1, "core"), (2, "penumbra")]
    labels = np.asarray(nib.load(str(out / "p17.nii.gz")).dataobj)
    assert set(np.unique(labels)) == {0, 1, 2}


def _values(ds):
    """Every text value of ``ds`` and its sequences: (keyword, value) pairs."""
    for element in ds.iterall():
        if element.VR in ("PN", "LO", "SH", "LT", "ST", "UT", "DA", "DT", "TM", "AS") and element.value:
            values = element.value if element.VM > 1 else [element.value]
            yield from ((element.keyword, str(v)) for v in values if str(v))


def test_the_seg_carries_the_sources_identity_and_nothing_else_of_it(tmp_path):
    hu, _ = head_with_block()
    paths = _series(tmp_path / "in" / "p17", "tilted", hu)
    out = tmp_path / "out"
    infer_volumes("unused", tmp_path / "in" / "p17", str(out), progress=False, model=ThresholdModel(), dicom_seg=True)
    seg = pydicom.dcmread(out / "cases" / "p17" / "seg.dcm")
    source = pydicom.dcmread(paths[0])
    for keyword in IDENTITY:
        assert str(seg[keyword].value) == str(source[keyword].value), keyword
    text = (out / "cases" / "p17" / "seg.dcm").read_bytes().decode("latin-1")
    others = {(k, v) for k, v in _values(source) if k not in IDENTITY and len(v) >= 4}
    assert {k for k, _ in others} >= set(OTHER)  # the scanner's values are there to leak
    leaked = [(k, v) for k, v in others if v in text]
    assert not leaked, leaked


@pytest.mark.parametrize("dicom_seg", [False, True])
def test_no_output_but_the_seg_holds_patient_data(tmp_path, caplog, capsys, dicom_seg):
    hu, _ = head_with_block()
    paths = _series(tmp_path / "in" / "p17", "plain", hu)
    out = tmp_path / "out"
    with caplog.at_level("DEBUG"):
        infer_volumes("unused", tmp_path / "in", str(out), progress=False, model=ThresholdModel(),
                      probabilities=True, dicom_seg=dicom_seg)
    texts = [caplog.text, *capsys.readouterr()]
    seg = out / "cases" / "p17" / "seg.dcm"
    assert seg.is_file() == dicom_seg
    for path in out.rglob("*"):
        if path.is_file() and path != seg:
            data = path.read_bytes()
            texts.append((gzip.decompress(data) if path.name.endswith(".gz") else data).decode("latin-1"))
    source = pydicom.dcmread(paths[0])
    secrets = {v for k, v in _values(source) if len(v) >= 4 and k != "RescaleType"}
    assert {GIVEN["PatientName"], OTHER["InstitutionName"]} <= secrets
    found = [s for s in secrets if any(s in text for text in texts)]
    assert not found, found


def test_a_nifti_input_gets_one_line_and_no_seg(tmp_path, caplog):
    hu, _ = head_with_block()
    nifti = write_nifti_case(hu, SPACING, tmp_path / "in" / "scan-17.nii.gz")
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        infer_volumes("unused", nifti, str(out), progress=False, model=ThresholdModel(), dicom_seg=True)
    assert not list(out.rglob("*.dcm"))
    lines = [r.getMessage() for r in caplog.records if "SEG" in r.getMessage()]
    assert len(lines) == 1 and "scan-17" in lines[0] and "needs a DICOM series" in lines[0], lines


def test_a_source_image_off_the_volumes_grid_is_one_line_naming_it(tmp_path):
    hu, truth = head_with_block()
    paths = _series(tmp_path / "p17", "plain", hu)
    vol = read_volume(tmp_path / "p17")
    ds = pydicom.dcmread(paths[3])
    ds.ImagePositionPatient = [float(v) + (2.6 if i == 2 else 0) for i, v in enumerate(ds.ImagePositionPatient)]
    ds.save_as(paths[3])  # now half a step from its slice (5 mm apart)
    with pytest.raises(VolumeError, match=rf"{paths[3].name}: not on the series' grid for a DICOM SEG: no slice"):
        write_seg(vol, truth.astype(np.uint8), None, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_infer_dicom_seg_with_a_real_export(trained_run, tmp_path, capsys):
    _, _, _, export_uri = trained_run
    hu, _ = head_with_block()
    paths = _series(tmp_path / "in" / "p17", "tilted", hu)
    for flag, out in (([], tmp_path / "plain"), (["--dicom-seg"], tmp_path / "seg")):
        code = main(["infer", "--model", export_uri, "--input", str(tmp_path / "in" / "p17"), "--output", str(out),
                     *flag])
        assert code == 0, capsys.readouterr().err
    assert not list((tmp_path / "plain").rglob("*.dcm"))
    raw, _ = _check_seg_equals_mask(tmp_path / "seg", "p17", paths)
    assert [s.SegmentLabel for s in raw.SegmentSequence] == ["lesion"]  # the export's class_names[1:]


def test_a_case_without_lesion_gets_a_seg_of_empty_frames_on_every_slice(tmp_path):
    hu, truth = head_with_block()
    paths = _series(tmp_path / "p17", "shuffled", hu)
    path = write_seg(read_volume(tmp_path / "p17"), np.zeros(truth.shape, np.uint8), None, tmp_path / "seg.dcm")
    _, frames = _by_pydicom(path)
    assert set(frames) == {pydicom.dcmread(p).SOPInstanceUID for p in paths}  # "no lesion", said on each slice
    assert not any(labels.any() for labels, _ in frames.values())
