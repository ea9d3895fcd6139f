"""``pipeline --folds K``: the whole study in one command (crossval's folds and ensemble, the test
split scored, every test patient segmented), resumable like its parts."""

import csv
import json

import nibabel as nib
import pytest

from aisd_ray.cli import main
from aisd_ray.stages import synthesize
from tests.conftest import volume_config

pytestmark = pytest.mark.slow


def test_pipeline_folds_on_png_slices_is_refused_before_anything_is_written(synthetic_root, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["pipeline", "--config", "tiny", "--folds", "2", "--source", str(synthetic_root),
                 "--output", str(out), "--backend", "local"]) == 2
    err = capsys.readouterr().err
    assert "cross-validation needs CT volumes with their spacing" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_pipeline_folds_3_leaves_folds_ensemble_test_metrics_and_each_test_patient(tmp_path, capsys):
    """On the local backend, as tests/studies/test_crossval.py (the folds one after another here)."""
    cfg = volume_config("nnunet", 9, 2, 64, 4)
    root = synthesize(cfg, str(tmp_path / "src"), progress=False)
    config = tmp_path / "study.toml"
    config.write_text(cfg.to_toml())
    out = tmp_path / "study"
    args = ["pipeline", "--config", str(config), "--source", str(root), "--output", str(out), "--backend", "local",
            "--set", "train.epochs=1"]
    assert main([*args, "--folds", "3"]) == 0
    printed = capsys.readouterr().out

    # the folds: three runs of one epoch, each exported and scored out of fold; the ensemble of the three
    histories = {k: (out / "runs" / f"fold_{k}" / "history.csv").read_text() for k in range(3)}
    assert all(len(h.splitlines()) == 2 for h in histories.values())  # header + 1 epoch
    assert all((out / f"fold_{k}" / "export" / ".complete").exists() for k in range(3))
    assert (out / "ensemble" / ".complete").exists()
    assert len(json.loads((out / "ensemble" / "ensemble.json").read_text())["members"]) == 3
    # the test split scored with the ensemble, one row per test patient (nnU-Net's labelled imagesTs)
    tested = sorted(p.name.removesuffix(".nii.gz") for p in (root / "labelsTs").iterdir())
    metrics = json.loads((out / "ensemble_test" / "metrics.json").read_text())
    assert len(tested) == 2 and sorted(r["case_id"] for r in metrics["cases"]["per_case"]) == tested

    # every test patient segmented by the ensemble: a mask on the patient's own grid, its summary and preview
    infer = out / "infer"
    for case in tested:
        image = nib.load(root / "imagesTs" / f"{case}_0000.nii.gz")
        mask = nib.load(infer / f"{case}.nii.gz")
        assert mask.shape == image.shape and (abs(mask.affine - image.affine) < 1e-4).all()
        assert json.loads((infer / "cases" / case / "summary.json").read_text())["case_id"] == case
        assert (infer / "cases" / case / "preview.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(r["case_id"] for r in csv.DictReader(open(infer / "cases.csv"))) == tested
    summary = json.loads((out / "summary.json").read_text())
    assert summary["figures"]["folds"] == 3 and summary["figures"]["test patients segmented"] == 2
    assert "ensemble test case Dice (mean)" in printed and str(infer) in printed

    # interrupted before its last stage: --set data.folds=3 (the same as --folds 3) continues with it alone
    kept = {p: p.stat().st_mtime_ns for p in [*(out / f"fold_{k}" / "export" / ".complete" for k in range(3)),
                                              *(out / f"fold_{k}" / "validation" / ".complete" for k in range(3)),
                                              out / "ensemble" / ".complete", out / "ensemble_test" / ".complete"]}
    (infer / "cases.csv").unlink()
    assert main([*args, "--set", "data.folds=3"]) == 0
    assert sorted(r["case_id"] for r in csv.DictReader(open(infer / "cases.csv"))) == tested
    assert {k: (out / "runs" / f"fold_{k}" / "history.csv").read_text() for k in range(3)} == histories
    assert {p: p.stat().st_mtime_ns for p in kept} == kept

    # and once complete, a rerun does nothing new: no fold trained, exported or scored, no patient segmented again
    done = {p: p.stat().st_mtime_ns for p in infer.rglob("*") if p.is_file()}
    assert main([*args, "--folds", "3"]) == 0
    assert {p: p.stat().st_mtime_ns for p in infer.rglob("*") if p.is_file()} == done
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
