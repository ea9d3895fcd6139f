"""The demo on CT volumes: synthetic patients in HU (nnU-Net's layout) in, per-case figures in mm and mL
out, and one test patient given as a DICOM series segmented into a NIfTI mask with its volume."""

import json

import numpy as np

from aisd_ray.cli import main
from aisd_ray.config import AISD_TEST_CASES, builtin_config, load_config
from aisd_ray.data.synthetic.slices import synth_case, synthetic_case_ids
from aisd_ray.inference.postprocess import describe

VOLUMES = ["synthetic.layout='nnunet'", "synthetic.num_cases=10", "synthetic.slices_per_case=6",
           "synthetic.num_test_cases=2", "synthetic.size=96", "train.backend='local'", "train.epochs=1"]


def test_the_shipped_demo_uses_ct_volumes():
    s = load_config(builtin_config("demo")).synthetic
    assert s.layout == "nnunet" and synthetic_case_ids(s)[:s.num_test_cases] == list(AISD_TEST_CASES[:s.num_test_cases])


def test_a_synthetic_patient_has_one_lesion_through_neighbouring_slices():
    slices = synth_case(2024, "1000003", 64, 8)
    with_lesion = [k for k, (_, mask) in enumerate(slices) if mask.any()]
    assert with_lesion and with_lesion == list(range(with_lesion[0], with_lesion[-1] + 1))
    assert 0 < with_lesion[0] and with_lesion[-1] < 7  # the first and last slice are lesion-free
    masks = [slices[k][1] for k in with_lesion]
    assert all((a & b).any() for a, b in zip(masks, masks[1:]))  # neighbours overlap: one 3-D lesion
    heads = [np.count_nonzero(image > 200) for image, _ in slices]  # the skull ring shrinks at the ends
    assert heads[0] < max(heads) and heads[-1] < max(heads)


def test_demo_on_ct_volumes_reports_per_case_mm_and_ml_and_segments_a_dicom_patient(tmp_path, capsys):
    import SimpleITK as sitk

    out = tmp_path / "demo"
    args = [a for s in VOLUMES for a in ("--set", s)]
    assert main(["demo", "--config", "tiny", "--output", str(out), "-q", *args]) == 0
    report = json.loads((out / "tiny" / "eval" / "metrics.json").read_text())
    cases = report["cases"]
    assert [row["case_id"] for row in cases["per_case"]] == sorted(AISD_TEST_CASES[:2])
    assert cases["cases"] == 2 and cases["lesions_true"] >= 2 and all(row["slices"] == 6 for row in cases["per_case"])
    assert all("true_ml" in row and "hd95_mm" in row for row in cases["per_case"])
    assert cases["per_case"][0]["true_ml"] > 0
    summary = json.loads((out / "summary.json").read_text())["figures"]
    assert summary["test cases"] == 2 and summary["test case Dice (mean)"] == cases["case_dice_mean"]
    assert "test case HD95 (median, mm)" in summary and "test case volume error (median, mL)" in summary
    assert (out / "tiny" / "eval" / "volume_agreement.png").is_file()
    # post-processing chosen on the valid split's patients, saved with the export, applied on test
    choice = json.loads((out / "tiny" / "export" / "postprocess.json").read_text())
    valid = json.loads((out / "tiny" / "eval-valid" / "metrics.json").read_text())
    assert valid["split"] == "valid" and valid["postprocessing"]["chosen"] == choice["chosen"]
    assert report["postprocessing"]["rule"] == choice["rule"]
    assert summary["post-processing (chosen on valid)"] == describe(choice)
    # the last stage segmented the first test patient, given as a DICOM series, on the series' grid
    patient = AISD_TEST_CASES[0]
    mask = sitk.ReadImage(str(out / "tiny" / "infer" / f"{patient}.nii.gz"))
    assert mask.GetSize() == (96, 96, 6)
    case = json.loads((out / "tiny" / "infer" / "cases" / patient / "summary.json").read_text())
    assert case["input"] == "dicom" and case["lesion_ml"] >= 0
    assert report["brain_mask"]["applied"] and case["brain_mask"]["applied"]  # on by default, both ways
    assert (out / "tiny" / "infer" / "cases" / patient / "preview.png").is_file()
    # calibrated on the valid split's patients: ECE before and after on test, each case's review flag
    calibration = json.loads((out / "tiny" / "export" / "calibration.json").read_text())
    assert calibration["fitted_on"]["split"] == "valid" and calibration["fitted_on"]["cases"] >= 1
    assert report["temperature"] == calibration["temperature"]
    assert summary["test ECE after temperature scaling"] == report["ece_after"] >= 0
    assert (out / "tiny" / "eval" / "reliability.png").is_file()
    assert all(isinstance(row["review"], bool) for row in cases["per_case"])
    assert case["uncertainty"]["threshold"] == calibration["review_threshold"]
    assert case["uncertainty"]["review"] is (case["uncertainty"]["case_score"] >= calibration["review_threshold"])
    assert "test case Dice (median)" in capsys.readouterr().out
    # the demo told prepare which official test cases its synthetic release holds
    source = json.loads((out / "shards" / "manifest.json").read_text())["source"]
    assert source["layout"] == "nnunet" and source["cases"]["test"] == sorted(AISD_TEST_CASES[:2])
    assert source["geometry"][patient]["spacing_mm"][0] == 5.0


def test_synthesize_writes_each_layout(tmp_path, capsys):
    args = ["synthesize", "--config", "tiny", "--set", "synthetic.num_train=2", "--set", "synthetic.num_valid=1",
            "--set", "synthetic.num_test=1"]
    assert main([*args, "--output", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o" / "AISD" / "train" / "images").glob("*.png"))) == 2
    assert main([*args, "--output", str(tmp_path / "z"), "--layout", "raw-zip", "--cases", "3", "--slices", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == ["image.zip", "mask.zip"]
    assert main([*args, "--output", str(tmp_path / "r"), "--layout", "raw", "--cases", "3", "--slices", "2"]) == 0
    cases = sorted(p.name for p in (tmp_path / "r" / "image").iterdir())
    assert cases[0] == AISD_TEST_CASES[0] and len(cases) == 3
    assert main([*args, "--output", str(tmp_path / "v"), "--layout", "dicom", "--cases", "3", "--slices", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "v" / "dicom").iterdir()) == sorted([*cases, "labels"])
    printed = capsys.readouterr().out
    assert "(raw layout) written to" in printed and "(dicom layout) written to" in printed
