"""The QA gate's checks (``aisd_ray.data.ct.qa``) on real files: the domain ranges and their
tolerances, the contrast tag of a DICOM series (named, never its text), coverage of a real body CT,
the reader's findings first, and what ``prepare`` from volumes records in the manifest."""

import dataclasses
import json
from pathlib import Path

import pytest

from aisd_ray.data.ct import qa
from aisd_ray.data.sources import volume
from aisd_ray.data.ct.head import head_model
from aisd_ray.data.synthetic.volumes import synth_volume, write_dicom_series, write_nifti_case
from aisd_ray.data.sources.volume_base import Finding
from tests.helpers import BODY_CT


def _checked(path, domain=None):
    vol = volume.read_volume(path)
    return vol, qa.check_case(vol, head_model(vol.hu, vol.spacing), domain)


def _by_check(findings):
    return {f.check: f for f in findings}


@pytest.fixture
def series(tmp_path):
    hu, _, spacing = synth_volume(5, "1000001", 64, 6)
    write_dicom_series(hu, spacing, tmp_path / "plain", "1000001", seed=5)
    write_dicom_series(hu, spacing, tmp_path / "contrast", "1000001", seed=5, contrast_agent="IOHEXOL 350 BOLUS")
    return tmp_path / "plain", tmp_path / "contrast"


def test_the_domain_is_the_union_of_the_cases_values_and_a_case_inside_it_passes(series):
    vol, _ = _checked(series[0])
    values = qa.case_domain(vol, head_model(vol.hu, vol.spacing))
    assert values["slice_spacing_mm"] == pytest.approx(vol.spacing[0])
    assert values["in_plane_spacing_mm"] == pytest.approx((vol.spacing[1] + vol.spacing[2]) / 2)
    assert values["image_size_px"] == 64 and values["gantry_tilt_deg"] == 0
    other = dict(values, slice_spacing_mm=2.5, parenchyma_hu_median=None)
    domain = qa.union_domain([values, other])
    assert domain["slice_spacing_mm"] == [2.5, values["slice_spacing_mm"]] and domain["cases"] == 2
    assert domain["parenchyma_hu_median"] == [values["parenchyma_hu_median"]] * 2
    assert qa.union_domain([domain, domain])["cases"] == 4  # an ensemble's members
    found = qa.check_case(vol, head_model(vol.hu, vol.spacing), domain)
    assert [f.status for f in found] == ["pass"] * len(found) and qa.label(found) == "pass"
    assert {f.check for f in found} == {"contrast_agent", "coverage", *qa.DOMAIN_KEYS}


@pytest.mark.parametrize("key", qa.DOMAIN_KEYS)
def test_each_domain_value_warns_just_outside_its_tolerance_and_passes_just_inside(key):
    lo, hi = 10.0, 20.0
    _, kind, tol, _ = qa.TOLERANCES[key]
    edge = hi * (1 + tol) if kind == "relative" else hi + tol
    domain = {key: [lo, hi], "cases": 3}
    [inside] = [f for f in qa.domain_findings({key: edge - 1e-6}, domain) if f.check == key]
    [outside] = [f for f in qa.domain_findings({key: edge + 1e-3}, domain) if f.check == key]
    assert inside.status == "pass" and outside.status == "warn"
    assert outside.expected == [lo, hi] and outside.value == pytest.approx(edge + 1e-3)
    assert "outside the training range 10..20" in outside.message and "\n" not in outside.message


def test_without_a_domain_the_domain_checks_are_one_skipped_finding(series):
    _, found = _checked(series[0])
    [skipped] = [f for f in found if f.status == "skipped"]
    assert skipped.check == "domain" and "skipped" in skipped.message
    assert not any(f.check in qa.DOMAIN_KEYS for f in found)


def test_a_contrast_agent_named_in_the_header_warns_without_its_text(series):
    _, plain = _checked(series[0])
    _, tagged = _checked(series[1])
    assert _by_check(plain)["contrast_agent"].status == "pass"
    contrast = _by_check(tagged)["contrast_agent"]
    assert contrast.status == "warn" and contrast.value is True and contrast.expected is False
    assert "IOHEXOL" not in json.dumps(qa.as_json(tagged)) and qa.label(tagged) == "warn: contrast_agent"


def test_nifti_has_no_contrast_header_to_check(tmp_path):
    hu, _, spacing = synth_volume(5, "1000002", 64, 6)
    _, found = _checked(write_nifti_case(hu, spacing, tmp_path / "x.nii.gz"))
    assert _by_check(found)["contrast_agent"].status == "skipped"
    assert _by_check(found)["coverage"].status == "pass"


def test_a_real_body_ct_is_flagged_by_coverage():
    _, found = _checked(BODY_CT)
    coverage = _by_check(found)["coverage"]
    assert coverage.status == "warn" and coverage.value == 0 and "not a head" in coverage.message
    assert qa.label(found) == "warn: coverage"


def test_the_readers_own_findings_come_first(series):
    vol = volume.read_volume(series[0])
    nan = Finding("non_finite_voxels", "warn", 12, 0, "12 non-finite voxels set to air (-1024 HU)")
    found = qa.check_case(dataclasses.replace(vol, findings=(nan,)), head_model(vol.hu, vol.spacing))
    assert found[0] == nan and qa.label(found) == "warn: non_finite_voxels"


def test_strict_refuses_the_first_warning_in_one_line(series):
    _, tagged = _checked(series[1])
    qa.refuse_if_strict(False, series[1], "1000001", tagged)  # not strict: nothing
    with pytest.raises(volume.VolumeError) as refused:
        qa.refuse_if_strict(True, series[1], "1000001", tagged)
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"{series[1]}: case 1000001: QA contrast_agent = True")


def test_prepare_from_volumes_records_each_cases_values_and_findings_and_the_training_domain(tmp_path, caplog):
    from aisd_ray.data.store.prepare import prepare
    from aisd_ray.data.synthetic.layouts import write_synthetic
    from tests.conftest import volume_config

    cfg = volume_config("dicom", 4, 1, 64, 4)
    cfg.data.source_dir = str(write_synthetic(tmp_path / "src", cfg.synthetic, progress=False))
    manifest = prepare(cfg, str(tmp_path / "shards"), progress=False)
    source = manifest["source"]
    assert set(source["qa"]) == set(source["geometry"])
    for case, record in source["qa"].items():
        vol = volume.read_volume(Path(cfg.data.source_dir) / case)
        assert record["values"] == qa.case_domain(vol, head_model(vol.hu, vol.spacing))
        assert [f["check"] for f in record["findings"]] == ["contrast_agent", "coverage"]
        assert all(f["status"] == "pass" for f in record["findings"])
    trained = source["cases"]["train"]
    assert source["domain"] == qa.union_domain(source["qa"][c]["values"] for c in trained)
    assert source["domain"]["cases"] == len(trained) and "QA" not in caplog.text
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["source"]["domain"] == source["domain"]
