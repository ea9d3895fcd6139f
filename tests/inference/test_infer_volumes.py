"""infer on patients: a DICOM series or a NIfTI file in, a NIfTI mask in the input's geometry and
the lesion volume in mL out; not-CT input refused by name; no patient data in any output or log."""

import gzip
import json

import numpy as np
import pytest
import SimpleITK as sitk

from aisd_ray.cli import main
from aisd_ray.data.sources import volume
from aisd_ray.data.synthetic.volumes import synth_volume, write_dicom_series, write_nifti_case
from aisd_ray.inference.infer_volumes import infer_volumes
from aisd_ray.scoring.volume_metrics import volume_ml
from tests.helpers import ThresholdModel, no_case_outputs, head_with_block, layer_ml

SPACING = (5.0, 0.9, 0.8)


@pytest.fixture
def patient(tmp_path):
    hu, truth = head_with_block()
    series = tmp_path / "in" / "patient-17"
    write_dicom_series(hu, SPACING, series, "patient-17", patient_name="Doe^Jane", birth_date="19700101",
                       patient_id="MRN-4452", slope=2, intercept=-1024, seed=3)
    nifti = write_nifti_case(hu, SPACING, tmp_path / "in" / "scan-17.nii.gz", orientation="RPI")
    return series, nifti, truth


@pytest.mark.parametrize("which", ["dicom", "nifti"])
def test_a_known_lesion_comes_back_in_the_inputs_geometry_with_its_ml(patient, tmp_path, which):
    series, nifti, truth = patient
    source = series if which == "dicom" else nifti
    out = tmp_path / "out"
    [summary] = infer_volumes("unused", source, str(out), batch_size=3, progress=False, model=ThresholdModel())
    case = "patient-17" if which == "dicom" else "scan-17"
    mask_path = out / f"{case}.nii.gz"
    written = sitk.ReadImage(str(mask_path))
    if which == "dicom":
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
        given = reader.Execute()  # ITK's own reading of the series, ordered by position
    else:
        given = sitk.ReadImage(str(nifti))
    assert written.GetSize() == given.GetSize()
    assert np.allclose(written.GetSpacing(), given.GetSpacing(), rtol=1e-5)
    assert np.allclose(written.GetOrigin(), given.GetOrigin(), atol=1e-3)
    assert np.allclose(written.GetDirection(), given.GetDirection(), atol=1e-6)
    assert written.GetPixelID() == sitk.sitkUInt8
    # voxel for voxel on the input's grid: the mask over the input's own array is the block
    labels = volume.read_labels(mask_path, like=volume.read_volume(source))
    dice = 2 * np.sum((labels > 0) & truth) / (np.sum(labels > 0) + truth.sum())
    assert dice > 0.9, dice
    true_ml = volume_ml(truth, SPACING)
    assert true_ml == pytest.approx(1200 * 5 * 0.9 * 0.8 / 1000)
    assert abs(summary["lesion_ml"] - true_ml) <= layer_ml(truth, SPACING)
    assert summary["lesion_count"] == 1 and summary["lesions"][0]["slices"] == [2, 4]
    assert summary["spacing_mm_zyx"] == pytest.approx(list(SPACING))
    on_disk = json.loads((out / "cases" / case / "summary.json").read_text())
    assert on_disk["lesion_ml"] == summary["lesion_ml"] and on_disk["input"] == which
    assert (out / "cases" / case / "preview.png").stat().st_size > 1000
    assert (out / "cases.csv").read_text().splitlines()[1].startswith(f"{case},{summary['lesion_ml']}")


def test_no_patient_data_reaches_an_output_or_a_log(patient, tmp_path, caplog, capsys):
    series, _, _ = patient
    out = tmp_path / "out"
    with caplog.at_level("DEBUG"):
        infer_volumes("unused", series.parent, str(out), progress=False, model=ThresholdModel(),
                      probabilities=True)
    texts = [caplog.text, *capsys.readouterr()]
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            texts.append((gzip.decompress(data) if path.name.endswith(".gz") else data).decode("latin-1"))
    for secret in ("Doe", "Jane", "19700101", "1970", "MRN-4452"):
        assert not any(secret in text for text in texts), secret
    assert (out / "cases" / "patient-17" / "probabilities.nii.gz").is_file()


def _series(tmp_path, **kwargs):
    hu, _, spacing = synth_volume(1, "1000001", 48, 6)
    return write_dicom_series(hu, spacing, tmp_path / "series", "1000001", seed=1, **kwargs)


def _not_ct(tmp_path):
    import pydicom

    files = _series(tmp_path)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    return tmp_path / "series", r"series: modality MR"


def _missing_slice(tmp_path):
    files = _series(tmp_path)
    files[3].unlink()
    return tmp_path / "series", r"series: .*missing slice"


def _four_d(tmp_path):
    from pathlib import Path

    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz", r"example4d.nii.gz: a 4-D NIfTI"


@pytest.mark.parametrize("make", [_not_ct, _missing_slice, _four_d])
def test_input_that_is_not_one_ct_volume_is_one_line_exit_2_and_only_its_row_written(make, tmp_path, capsys):
    """The refused case's row in cases.csv with its reason; no mask, no case folder."""
    source, message = make(tmp_path)
    out = tmp_path / "out"
    code = main(["infer", "--model", str(tmp_path / "no-export"), "--input", str(source), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    import re

    assert re.search(message, err[0], re.IGNORECASE), err[0]
    assert no_case_outputs(out, err[0])


class NeighbourModel(ThresholdModel):
    """Trained with data.channels = 'neighbours': channel 0 is the slice below."""

    channel_mode = "neighbours"


def test_infer_builds_the_channels_the_model_was_trained_with(patient, tmp_path):
    """The threshold double looks at channel 0 only: with neighbours that is the slice below, so
    the block on slices 2..4 is found on slices 3..5."""
    _, nifti, truth = patient
    [summary] = infer_volumes("unused", nifti, str(tmp_path / "out"), batch_size=3, progress=False,
                              model=NeighbourModel())
    assert summary["lesions"][0]["slices"] == [3, 5] and summary["channels"] == "neighbours"
    labels = volume.read_labels(tmp_path / "out" / "scan-17.nii.gz", like=volume.read_volume(nifti))
    assert not labels[:3].any()
    assert 2 * np.sum((labels[3:6] > 0) & truth[2:5]) / (np.sum(labels > 0) + truth.sum()) > 0.9


def test_an_export_records_its_channel_mode_and_infer_reads_it(patient, tmp_path):
    """A real (untrained) tiny export: export.json's "channels", LoadedExport.channel_mode, and a
    case through the SavedModel with the channels built that way."""
    from aisd_ray.config import builtin_config, load_config
    from aisd_ray.inference.export import LoadedExport, export_model
    from aisd_ray.model.flexunet import build_flexunet

    cfg = load_config(builtin_config("tiny"), ["data.channels='neighbours'"])
    uri = export_model(cfg, build_flexunet(cfg.model), str(tmp_path / "export"))
    model = LoadedExport(uri)
    assert model.info["channels"] == model.channel_mode == "neighbours"
    [summary] = infer_volumes(uri, patient[1], str(tmp_path / "out"), progress=False, model=model)
    assert summary["channels"] == "neighbours" and summary["shape_zyx"] == [7, 80, 72]


class PostprocessedModel(ThresholdModel):
    """The threshold double carrying an export's post-processing choice, as ``LoadedExport`` does."""

    def __init__(self, choice):
        self.postprocess = choice


def _head_with_block_and_speck(tmp_path):
    """A NIfTI of ``head_with_block`` (a 5.4 mL block) plus a 2 x 4 x 4 voxel 86 HU speck (0.23 mL)
    far from it: (path, block, speck)."""
    hu, block = head_with_block()
    speck = np.zeros(hu.shape, bool)
    speck[4:6, 56:60, 54:58] = True
    hu[speck] = 86
    return write_nifti_case(hu, SPACING, tmp_path / "in" / "two.nii.gz"), block, speck


@pytest.mark.parametrize("how", ["model", "argument", "voxels"])
def test_the_exports_postprocessing_is_applied_per_case_before_the_mask_and_summary(tmp_path, how):
    path, block, speck = _head_with_block_and_speck(tmp_path)
    assert volume_ml(speck, SPACING) == pytest.approx(32 * 5 * 0.9 * 0.8 / 1000)
    plain = infer_volumes("unused", path, str(tmp_path / "plain"), progress=False, model=ThresholdModel())[0]
    assert plain["lesion_count"] == 2 and plain["postprocessing"]["rule"] == "none"
    # a model-resolution voxel of this scan: 5 mm x (0.9 x 80/64) x (0.8 x 72/64) = 5.0625 mm3; the
    # speck (~0.23 mL) is about 46 of them, the block (~5.4 mL) over a thousand
    choice = {"rule": "remove_small", "min_ml": 1.0, "min_voxels": None}
    model, argument = PostprocessedModel(choice), None
    if how == "argument":
        model, argument = PostprocessedModel(dict(choice, min_ml=100.0)), choice  # the argument wins
    elif how == "voxels":
        model = PostprocessedModel({"rule": "remove_small", "min_ml": None, "min_voxels": 100})
    out = tmp_path / "out"
    [summary] = infer_volumes("unused", path, str(out), progress=False, model=model, postprocessing=argument)
    labels = volume.read_labels(out / "two.nii.gz", like=volume.read_volume(path))
    assert not labels[speck].any() and labels[block].mean() > 0.9
    assert summary["lesion_count"] == 1 and summary["lesions"][0]["slices"] == [2, 4]
    assert summary["lesion_ml"] == plain["lesions"][0]["volume_ml"]
    assert summary["postprocessing"]["rule"] == "remove_small" and summary["tta"] is False
    assert summary["postprocessing"]["removed_ml"] == pytest.approx(plain["lesions"][1]["volume_ml"], abs=1e-3)
    assert json.loads((out / "cases" / "two" / "summary.json").read_text())["postprocessing"] == \
        summary["postprocessing"]


def test_evaluating_an_export_on_a_store_windowed_otherwise_is_refused(tmp_path):
    """An export trained through a stroke window, evaluated on brain-window rows: one line naming
    the store's manifest, before any slice is scored."""
    from aisd_ray.config import builtin_config, load_config
    from aisd_ray.data.sources.layout import DataError
    from aisd_ray.data.store.prepare import prepare
    from aisd_ray.data.synthetic.layouts import write_synthetic
    from aisd_ray.data.synthetic.slices import synthetic_test_cases
    from aisd_ray.evaluation.evaluate import evaluate_export
    from aisd_ray.inference.export import export_model
    from aisd_ray.model.flexunet import build_flexunet

    cfg = load_config(builtin_config("tiny"), ["synthetic.layout='nnunet'", "synthetic.num_cases=3",
                                               "synthetic.num_test_cases=1", "synthetic.size=64",
                                               "synthetic.slices_per_case=3"])
    cfg.data.source_dir = str(write_synthetic(tmp_path / "src", cfg.synthetic, progress=False))
    cfg.data.test_cases = tuple(synthetic_test_cases(cfg.synthetic))
    prepare(cfg, str(tmp_path / "shards"), progress=False)
    cfg.data.windows = ((32.0, 8.0),)
    uri = export_model(cfg, build_flexunet(cfg.model), str(tmp_path / "export"))
    refused = r"windowed with \[\[40.0, 80.0\]\] HU but the export .* takes \[\[32.0, 8.0\]\]"
    with pytest.raises(DataError, match=refused):
        evaluate_export(uri, str(tmp_path / "shards"), str(tmp_path / "eval"), progress=False)
    assert not (tmp_path / "eval").exists()
