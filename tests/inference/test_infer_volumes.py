"""infer on patients: a DICOM series or a NIfTI file in, a NIfTI mask in the input's geometry and
the lesion volume in mL out; not-CT input refused by name; no patient data in any output or log."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from aisd_ray.cli import main
from aisd_ray.data.ct import qa
from aisd_ray.data.sources import volume
from aisd_ray.data.synthetic.volumes import synth_volume, write_dicom_series, write_nifti_case
from aisd_ray.inference.infer_volumes import infer_volumes
from aisd_ray.scoring.volume_metrics import volume_ml
from tests.inference.conftest import head_with_block as _head_with_block

SPACING = (5.0, 0.9, 0.8)


class _Probabilities:
    def __init__(self, array):
        self._array = array

    def numpy(self):
        return self._array


class ThresholdModel:
    """A test double of a loaded export: lesion wherever the first channel is bright, through a
    window (level 80, width 20) in which only the test lesion's 86 HU is bright."""

    height = width = 64
    channels = 3
    windows = [(80.0, 20.0)]

    def predict(self, batch):
        lesion = (np.asarray(batch)[..., 0] > 127).astype(np.float32)
        return {"probabilities": _Probabilities(np.stack([1 - lesion, lesion], axis=-1))}



def _layer_ml(truth) -> float:
    """One voxel layer around the lesion, in mL: the tolerance of a resize to the model and back."""
    from scipy import ndimage

    return volume_ml(ndimage.binary_dilation(truth, np.ones((1, 3, 3))) & ~truth, SPACING)


@pytest.fixture
def patient(tmp_path):
    hu, truth = _head_with_block()
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
    assert abs(summary["lesion_ml"] - true_ml) <= _layer_ml(truth)
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
def test_input_that_is_not_one_ct_volume_is_one_line_exit_2_and_nothing_written(make, tmp_path, capsys):
    source, message = make(tmp_path)
    out = tmp_path / "out"
    code = main(["infer", "--model", str(tmp_path / "no-export"), "--input", str(source), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    import re

    assert re.search(message, err[0], re.IGNORECASE), err[0]
    assert not out.exists()


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
    """A NIfTI of ``_head_with_block`` (a 5.4 mL block) plus a 2 x 4 x 4 voxel 86 HU speck (0.23 mL)
    far from it: (path, block, speck)."""
    hu, block = _head_with_block()
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


# --- the QA gate (data/qa.py): summary.json's qa block, cases.csv's qa column, the preview's title,
# one log line per warning, and --strict's one-line refusal

BODY_CT = Path(__file__).parents[1] / "data" / "totalsegmentator_example_ct.nii.gz"


@pytest.fixture(scope="module")
def trained_on(tmp_path_factory):
    """(config, domain): a store prepared from synthetic DICOM patients (5 mm slices) and the
    training domain its manifest records, as an export copies it."""
    from aisd_ray.data.store.prepare import prepare
    from aisd_ray.data.synthetic.layouts import write_synthetic
    from tests.conftest import volume_config

    tmp = tmp_path_factory.mktemp("qa-store")
    cfg = volume_config("dicom", 4, 1, 64, 8)
    cfg.data.source_dir = str(write_synthetic(tmp / "src", cfg.synthetic, progress=False))
    cfg.data.shards_dir = str(tmp / "shards")
    return cfg, prepare(cfg, cfg.data.shards_dir, progress=False)["source"]["domain"]


class DomainModel(ThresholdModel):
    """The threshold double with the training domain an export records (``LoadedExport.domain``)."""

    def __init__(self, domain):
        self.domain = domain


def _patient(cfg, folder, case, slice_mm=None, **series):
    """A new synthetic patient of the training generator as a DICOM series (``slice_mm``: another
    slice spacing, the same head)."""
    s = cfg.synthetic
    slices = s.slices_per_case if slice_mm is None else round(s.slices_per_case * 5.0 / slice_mm)
    hu, _, spacing = synth_volume(s.seed, case, s.size, slices, s.lesion_hu, s.noise_hu,
                                  slice_mm=slice_mm or 5.0)
    write_dicom_series(hu, spacing, folder / case, case, seed=s.seed, **series)
    return folder / case


def _qa_of(out, case):
    import csv

    info = json.loads((out / "cases" / case / "summary.json").read_text())
    row = next(r for r in csv.DictReader((out / "cases.csv").open()) if r["case_id"] == case)
    return {f["check"]: f for f in info["qa"]}, row["qa"], info


def test_a_clean_patient_of_the_training_generator_passes_every_check(trained_on, tmp_path, caplog):
    from aisd_ray.inference.infer_volumes import preview_title

    cfg, domain = trained_on
    source = _patient(cfg, tmp_path / "in", "2000001")
    with caplog.at_level("WARNING"):
        infer_volumes("unused", source, str(tmp_path / "out"), progress=False, model=DomainModel(domain))
    checks, column, info = _qa_of(tmp_path / "out", "2000001")
    assert {c: f["status"] for c, f in checks.items()} == {c: "pass" for c in checks}
    assert set(checks) == {"contrast_agent", "coverage", *qa.DOMAIN_KEYS} and column == "pass"
    assert checks["slice_spacing_mm"]["expected"] == domain["slice_spacing_mm"]
    assert "QA" not in caplog.text and "QA" not in preview_title("2000001", info, True)


def test_a_thin_slice_series_warns_of_its_slice_spacing(trained_on, tmp_path, caplog):
    from aisd_ray.inference.infer_volumes import preview_title

    cfg, domain = trained_on
    source = _patient(cfg, tmp_path / "in", "2000002", slice_mm=0.625)
    with caplog.at_level("WARNING"):
        infer_volumes("unused", source, str(tmp_path / "out"), progress=False, model=DomainModel(domain))
    checks, column, info = _qa_of(tmp_path / "out", "2000002")
    thin = checks["slice_spacing_mm"]
    assert thin["status"] == "warn" and thin["value"] == pytest.approx(0.625) and thin["expected"] == [5.0, 5.0]
    assert column.startswith("warn: ") and "slice_spacing_mm" in column
    assert checks["contrast_agent"]["status"] == checks["coverage"]["status"] == "pass"
    lines = [r.getMessage() for r in caplog.records if "QA" in r.getMessage()]
    assert len(lines) == len([f for f in checks.values() if f["status"] == "warn"])
    assert any("2000002" in line and "slice_spacing_mm 0.625 mm outside the training range 5..5 mm" in line
               for line in lines)
    first = next(f for f in info["qa"] if f["status"] == "warn")
    assert preview_title("2000002", info, True).endswith(f"QA warn: {first['check']}")


def test_a_contrast_tagged_series_warns_and_never_shows_the_agent(trained_on, tmp_path, caplog):
    cfg, domain = trained_on
    source = _patient(cfg, tmp_path / "in", "2000003", contrast_agent="OMNIPAQUE 350")
    with caplog.at_level("DEBUG"):
        infer_volumes("unused", source, str(tmp_path / "out"), progress=False, model=DomainModel(domain))
    checks, column, _ = _qa_of(tmp_path / "out", "2000003")
    assert checks["contrast_agent"]["status"] == "warn" and column == "warn: contrast_agent"
    texts = [caplog.text] + [p.read_text() for p in (tmp_path / "out").rglob("*.json")] + \
        [(tmp_path / "out" / "cases.csv").read_text()]
    assert not any("OMNIPAQUE" in t for t in texts)


def test_a_real_body_ct_is_flagged_by_coverage_and_domain_checks_skip_without_a_domain(tmp_path):
    infer_volumes("unused", BODY_CT, str(tmp_path / "out"), progress=False, model=ThresholdModel())
    checks, column, _ = _qa_of(tmp_path / "out", "totalsegmentator_example_ct")
    assert checks["coverage"]["status"] == "warn" and checks["coverage"]["value"] == 0
    assert checks["domain"]["status"] == "skipped" and column == "warn: coverage"


@pytest.fixture(scope="module")
def export_with_domain(trained_on, tmp_path_factory):
    """An untrained tiny export of the store's config; its domain is the store's (what the export
    copies from the manifest when it is written)."""
    from aisd_ray.inference.export import export_model
    from aisd_ray.model.flexunet import build_flexunet

    cfg, domain = trained_on
    return export_model(cfg, build_flexunet(cfg.model), str(tmp_path_factory.mktemp("qa-export") / "export")), domain


def _with_domain(monkeypatch, module, domain):
    """``module.LoadedExport`` loads the export and gives it ``domain``, as an export that records one."""
    real = module.LoadedExport

    def load(uri, *args, **kwargs):
        model = real(uri, *args, **kwargs)
        model.domain = domain
        return model

    monkeypatch.setattr(module, "LoadedExport", load)


@pytest.mark.parametrize("which", ["thin", "contrast", "body"])
def test_strict_refuses_a_warned_case_with_one_line_and_writes_nothing(trained_on, export_with_domain, tmp_path,
                                                                      monkeypatch, capsys, which):
    import aisd_ray.inference.infer_volumes as infer_module

    cfg, _ = trained_on
    uri, domain = export_with_domain
    _with_domain(monkeypatch, infer_module, domain)
    source, case, check = {
        "thin": lambda: (_patient(cfg, tmp_path / "in", "2000004", slice_mm=0.625), "2000004", "slice_spacing_mm"),
        "contrast": lambda: (_patient(cfg, tmp_path / "in", "2000005", contrast_agent="IOHEXOL"), "2000005",
                             "contrast_agent"),
        "body": lambda: (BODY_CT, "totalsegmentator_example_ct", "coverage")}[which]()
    out = tmp_path / "out"
    assert main(["infer", "--model", uri, "--input", str(source), "--output", str(out)]) == 0  # a warning only
    assert main(["infer", "--model", uri, "--input", str(source), "--output", str(tmp_path / "strict"),
                 "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and "IOHEXOL" not in err[0]
    assert f"case {case}: QA " in err[0] and str(source) in err[0] and "--strict" in err[0]
    found = {f["check"]: f for f in json.loads((out / "cases" / case / "summary.json").read_text())["qa"]}
    first = next(f for f in found.values() if f["status"] == "warn")
    assert f"QA {first['check']} = {first['value']}" in err[0] and check in found
    if first["expected"] is not None:
        assert str(first["expected"]) in err[0]
    assert not (tmp_path / "strict").exists()


def test_evaluate_reports_qa_per_case_and_strict_refuses(trained_on, export_with_domain, tmp_path, monkeypatch,
                                                         capsys):
    import csv

    import aisd_ray.evaluation.evaluate as evaluate_module

    cfg, domain = trained_on
    uri, _ = export_with_domain
    shards = cfg.data.shards_dir
    plain = main(["evaluate", "--model", uri, "--data", shards, "--output", str(tmp_path / "plain"), "--no-overlays"])
    assert plain == 0
    report = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    rows = list(csv.DictReader((tmp_path / "plain" / "per_case.csv").open()))
    assert rows and all(r["qa"] == "pass" for r in rows)  # the export has no domain here: skipped, not warned
    assert all(f[-1]["check"] == "domain" and f[-1]["status"] == "skipped" for f in report["qa"].values())
    thin = dict(domain, slice_spacing_mm=[0.625, 0.625])  # an export trained on thin slices
    _with_domain(monkeypatch, evaluate_module, thin)
    assert main(["evaluate", "--model", uri, "--data", shards, "--output", str(tmp_path / "thin"),
                 "--no-overlays"]) == 0
    rows = list(csv.DictReader((tmp_path / "thin" / "per_case.csv").open()))
    assert rows and all(r["qa"] == "warn: slice_spacing_mm" for r in rows)
    case = rows[0]["case_id"]
    assert {f["check"]: f for f in json.loads((tmp_path / "thin" / "metrics.json").read_text())["qa"][case]}[
        "slice_spacing_mm"]["expected"] == [0.625, 0.625]
    capsys.readouterr()
    assert main(["evaluate", "--model", uri, "--data", shards, "--output", str(tmp_path / "strict"),
                 "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "QA slice_spacing_mm = 5.0, expected [0.625, 0.625]" in err[0]
    assert "manifest.json: case " in err[0] and not (tmp_path / "strict").exists()


@pytest.mark.parametrize("args,line", [
    (["evaluate", "--predictions", "p", "--masks", "m", "--strict", "--output", "{tmp}/out"],
     "aisd-ray evaluate: error: --strict: not used with --predictions (masks are scored as they are)"),
])
def test_strict_where_there_is_no_qa_gate_is_refused(tmp_path, capsys, args, line):
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    assert capsys.readouterr().err.strip() == line.format(tmp=tmp_path)
    assert not (tmp_path / "out").exists()
