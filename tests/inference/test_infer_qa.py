"""The QA gate (data/qa.py) through infer and evaluate: summary.json's qa block, cases.csv's qa column,
the preview's title, one log line per warning, and --strict's one-line refusal.

The training domain takes the real path: ``prepare`` computes it into the store's manifest
(``source.domain``), training records it in the run (``training_input.json``), ``stages.export``
copies it into ``export.json``, and infer and evaluate read it from the loaded export. Every expected
range is the manifest's, never written here."""

import csv
import json

import pytest

from aisd_ray.inference import input_kind
from aisd_ray.cli import main
from aisd_ray.data.ct import qa
from aisd_ray.data.synthetic.volumes import synth_volume, write_dicom_series
from aisd_ray.inference.infer_volumes import infer_volumes, preview_title
from tests.helpers import BODY_CT, ThresholdModel, copy_export, no_case_outputs


@pytest.fixture(scope="module")
def trained_on(tmp_path_factory):
    """(config, domain, export): a store prepared from synthetic DICOM patients (5 mm slices), the
    training domain prepare computed into its manifest, and the export of a 1-epoch local run on it."""
    from aisd_ray import stages
    from aisd_ray.data.store.prepare import prepare
    from aisd_ray.data.synthetic.layouts import write_synthetic
    from aisd_ray.inference.export import LoadedExport
    from tests.conftest import volume_config

    tmp = tmp_path_factory.mktemp("qa-store")
    cfg = volume_config("dicom", 4, 1, 64, 8, "train.epochs=1", "train.backend='local'")
    cfg.data.source_dir = str(write_synthetic(tmp / "src", cfg.synthetic, progress=False))
    cfg.data.shards_dir = str(tmp / "shards")
    domain = prepare(cfg, cfg.data.shards_dir, progress=False)["source"]["domain"]
    stages.train(cfg, cfg.data.shards_dir, str(tmp / "runs"))
    export = stages.export(stages.run_uri(cfg, str(tmp / "runs")))[0]
    assert domain and LoadedExport(export).domain == domain  # what infer and evaluate will read
    return cfg, domain, export


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
    info = json.loads((out / "cases" / case / "summary.json").read_text())
    row = next(r for r in csv.DictReader((out / "cases.csv").open()) if r["case_id"] == case)
    return {f["check"]: f for f in info["qa"]}, row["qa"], info


def test_a_clean_patient_of_the_training_generator_passes_every_check(trained_on, tmp_path, caplog):
    cfg, domain, export = trained_on
    source = _patient(cfg, tmp_path / "in", "2000001")
    with caplog.at_level("WARNING"):
        infer_volumes(export, source, str(tmp_path / "out"), progress=False)
    checks, column, info = _qa_of(tmp_path / "out", "2000001")
    assert {c: f["status"] for c, f in checks.items()} == {c: "pass" for c in checks}
    assert set(checks) == {"contrast_agent", "coverage", input_kind.CHECK, *qa.DOMAIN_KEYS} and column == "pass"
    assert checks["slice_spacing_mm"]["expected"] == domain["slice_spacing_mm"]
    assert "QA" not in caplog.text and "QA" not in preview_title("2000001", info, True)


def test_a_thin_slice_series_warns_of_its_slice_spacing(trained_on, tmp_path, caplog):
    cfg, domain, export = trained_on
    lo, hi = domain["slice_spacing_mm"]
    source = _patient(cfg, tmp_path / "in", "2000002", slice_mm=0.625)
    with caplog.at_level("WARNING"):
        infer_volumes(export, source, str(tmp_path / "out"), progress=False)
    checks, column, info = _qa_of(tmp_path / "out", "2000002")
    thin = checks["slice_spacing_mm"]
    assert thin["status"] == "warn" and thin["value"] == pytest.approx(0.625) and thin["expected"] == [lo, hi]
    assert column.startswith("warn: ") and "slice_spacing_mm" in column
    assert checks["contrast_agent"]["status"] == checks["coverage"]["status"] == "pass"
    lines = [r.getMessage() for r in caplog.records if "QA" in r.getMessage()]
    assert len(lines) == len([f for f in checks.values() if f["status"] == "warn"])
    said = f"slice_spacing_mm 0.625 mm outside the training range {lo:g}..{hi:g} mm"
    assert any("2000002" in line and said in line for line in lines), lines
    first = next(f for f in info["qa"] if f["status"] == "warn")
    assert preview_title("2000002", info, True).endswith(f"QA warn: {first['check']}")


def test_a_contrast_tagged_series_warns_and_never_shows_the_agent(trained_on, tmp_path, caplog):
    cfg, _, export = trained_on
    source = _patient(cfg, tmp_path / "in", "2000003", contrast_agent="OMNIPAQUE 350")
    with caplog.at_level("DEBUG"):
        infer_volumes(export, source, str(tmp_path / "out"), progress=False)
    checks, column, _ = _qa_of(tmp_path / "out", "2000003")
    assert checks["contrast_agent"]["status"] == "warn" and column == "warn: contrast_agent"
    texts = [caplog.text] + [p.read_text() for p in (tmp_path / "out").rglob("*.json")] + \
        [(tmp_path / "out" / "cases.csv").read_text()]
    assert not any("OMNIPAQUE" in t for t in texts)


def test_a_real_body_ct_is_flagged_by_coverage_and_domain_checks_skip_without_a_domain(tmp_path):
    """The threshold double records no domain, as an export written before domains were recorded."""
    infer_volumes("unused", BODY_CT, str(tmp_path / "out"), progress=False, model=ThresholdModel())
    checks, column, _ = _qa_of(tmp_path / "out", "totalsegmentator_example_ct")
    assert checks["coverage"]["status"] == "warn" and checks["coverage"]["value"] == 0
    assert checks["domain"]["status"] == "skipped" and column == "warn: coverage"


@pytest.mark.parametrize("which", ["thin", "contrast", "body"])
def test_strict_refuses_a_warned_case_with_one_line_and_writes_nothing(trained_on, tmp_path, capsys, which):
    cfg, _, uri = trained_on
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
    assert no_case_outputs(tmp_path / "strict", err[0])


def _qa_column(folder):
    return [r["qa"] for r in csv.DictReader((folder / "per_case.csv").open())]


def test_evaluate_reports_qa_per_case_and_strict_refuses(trained_on, tmp_path, capsys):
    cfg, domain, uri = trained_on
    shards = cfg.data.shards_dir
    assert main(["evaluate", "--model", uri, "--data", shards, "--output", str(tmp_path / "plain"),
                 "--no-overlays"]) == 0
    report = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert _qa_column(tmp_path / "plain") and set(_qa_column(tmp_path / "plain")) == {"pass"}
    spacing = {case: {f["check"]: f for f in found}["slice_spacing_mm"] for case, found in report["qa"].items()}
    assert all(f["expected"] == domain["slice_spacing_mm"] for f in spacing.values())

    # an export trained on slices an eighth as thick as this store's: a copy of the export whose
    # export.json records the store's domain with its slice spacing divided by 8, which is what an
    # export of such a store writes (training a second one on a second store would cost minutes)
    thin = dict(domain, slice_spacing_mm=[v / 8 for v in domain["slice_spacing_mm"]])
    thin_uri = copy_export(uri, tmp_path / "thin-export", domain=thin)
    assert main(["evaluate", "--model", thin_uri, "--data", shards, "--output", str(tmp_path / "thin"),
                 "--no-overlays"]) == 0
    assert _qa_column(tmp_path / "thin") and set(_qa_column(tmp_path / "thin")) == {"warn: slice_spacing_mm"}
    found = {case: {f["check"]: f for f in checks}["slice_spacing_mm"]
             for case, checks in json.loads((tmp_path / "thin" / "metrics.json").read_text())["qa"].items()}
    assert all(f["expected"] == thin["slice_spacing_mm"] for f in found.values())
    capsys.readouterr()
    assert main(["evaluate", "--model", thin_uri, "--data", shards, "--output", str(tmp_path / "strict"),
                 "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    said = [f"QA slice_spacing_mm = {f['value']}, expected {thin['slice_spacing_mm']}" for f in found.values()]
    assert len(err) == 1 and any(s in err[0] for s in said), err
    assert "manifest.json: case " in err[0] and not (tmp_path / "strict").exists()


@pytest.mark.parametrize("args,line", [
    (["evaluate", "--predictions", "p", "--masks", "m", "--strict", "--output", "{tmp}/out"],
     "aisd-ray evaluate: error: --strict: not used with --predictions (masks are scored as they are)"),
])
def test_strict_where_there_is_no_qa_gate_is_refused(tmp_path, capsys, args, line):
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    assert capsys.readouterr().err.strip() == line.format(tmp=tmp_path)
    assert not (tmp_path / "out").exists()
