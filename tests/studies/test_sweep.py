"""`aisd-ray sweep`: the distribution over random seeds, resumed on rerun."""

import json
import math

import pytest

from aisd_ray.cli import main
from aisd_ray.config import builtin_config
from aisd_ray.studies import sweep


def test_sweep_reports_the_spread_and_skips_finished_runs(tmp_path, capsys, monkeypatch):
    args = ["sweep", "--config", str(builtin_config("tiny")), "--set", "train.epochs=1",
            "--train-seeds", "1,2", "--synthetic-seeds", "5", "--ray-train-seeds", "", "--output", str(tmp_path)]
    assert main(args) == 0
    report = json.loads((tmp_path / "sweep.json").read_text())
    runs = report["runs"]
    assert [(r["backend"], r["train_seed"], r["synthetic_seed"]) for r in runs] == [("local", 1, 5), ("local", 2, 5)]
    assert all(r["global_batch"] == 8 for r in runs)  # tiny: 4 per worker x 2 Ray workers
    assert runs[0]["test_lesion_dice"] != runs[1]["test_lesion_dice"]  # the training seed really changes the outcome
    local = report["summary"]["local"]
    assert local["runs"] == 2
    dice = sorted(r["test_lesion_dice"] for r in runs)
    assert local["test_lesion_dice"]["min"] == dice[0] and local["test_lesion_dice"]["max"] == dice[1]
    assert local["collapses"] == sum(r["collapsed"] for r in runs)
    printed = capsys.readouterr().out
    assert "local: 2 runs" in printed
    # calibration and the uncertainty ranking, per run and over the runs' test cases together
    assert all(0 <= r["test_ece_after"] <= 1 and 0 <= r["test_ece_before"] <= 1 and r["temperature"] > 0 for r in runs)
    assert local["test_ece_after"]["median"] == sorted(r["test_ece_after"] for r in runs)[0] + (
        sorted(r["test_ece_after"] for r in runs)[1] - sorted(r["test_ece_after"] for r in runs)[0]) / 2
    assert all(r["test_cases"] == [] for r in runs)  # the tiny config's original layout has no case ids
    assert local["uncertainty_pooled"]["cases"] == 0
    assert "test ECE median" in printed

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sweep.stages, "demo", no_training)
    assert main(args) == 0
    assert json.loads((tmp_path / "sweep.json").read_text())["runs"] == runs


def test_summary_counts_collapses_and_the_backend_gap():
    runs = [{"backend": "local", "test_lesion_dice": d, "test_lesion_dice_per_image": d, "collapsed": d < 0.1,
             "rollbacks": 0} for d in (0.9, 0.85, 0.0)]
    runs += [{"backend": "ray", "test_lesion_dice": 0.8, "test_lesion_dice_per_image": 0.8, "collapsed": False,
              "rollbacks": 1}]
    summary = sweep.summarise(runs)
    assert summary["local"]["collapses"] == 1 and summary["local"]["test_lesion_dice"]["median"] == 0.85
    assert summary["ray"]["rollbacks"] == 1
    assert abs(summary["ray_minus_local_median"] - (-0.05)) < 1e-12


def test_a_diverged_run_is_a_collapsed_row_and_the_sweep_goes_on(tmp_path, capsys):
    """A run the divergence guard stops (exit 1 on its own) is a result of the sweep: counted as
    collapsed with no test figures, and the sweep carries on and reports the rest."""
    args = ["sweep", "--config", str(builtin_config("tiny")), "--set", "train.epochs=3",
            "--set", "train.learning_rate=1e9", "--set", "train.clipvalue=0", "--set", "train.max_rollbacks=0",
            "--train-seeds", "1", "--synthetic-seeds", "5", "--ray-train-seeds", "", "--output", str(tmp_path)]
    assert main(args) == 0
    (run,) = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert run["collapsed"] and run["stop_reason"].count("diverged at epoch") == 1
    assert run["test_lesion_dice"] != run["test_lesion_dice"]  # NaN: nothing was exported or scored
    assert run["epochs_run"] >= 1
    assert "local: 1 runs, 1 collapsed" in capsys.readouterr().out


def test_variant_summary_is_the_spread_and_the_paired_change_from_grey():
    from aisd_ray.studies.sweep_variants import summarise, table

    def run(variant, data, seed, case, pooled=0.5, hd95=4.0, f1=0.8):
        return {"variant": variant, "synthetic_seed": data, "train_seed": seed, "case_dice": case,
                "lesion_dice": pooled, "hd95_mm": hd95, "lesion_f1": f1}

    runs = [run("grey", 7, 1, 0.60), run("grey", 7, 2, 0.70), run("grey", 8, 1, 0.50),
            run("symmetry", 7, 1, 0.65), run("symmetry", 7, 2, 0.68), run("symmetry", 8, 1, 0.62, hd95=float("nan"))]
    s = summarise(runs)
    assert s["grey"]["case_dice_median"] == 0.60 and s["grey"]["case_dice_min"] == 0.50
    assert s["symmetry"]["case_dice_median"] == 0.65 and s["symmetry"]["case_dice_min"] == 0.62
    # paired with the grey run of the same data set and seed: +0.05, -0.02, +0.12
    assert s["symmetry"]["case_dice_vs_grey"] == pytest.approx(0.05)
    assert s["symmetry"]["hd95_mm_median"] == 4.0 and s["symmetry"]["runs"] == 3  # a NaN HD95 left out
    assert math.isnan(s["grey"]["case_dice_vs_grey"])
    lines = table({"summary": s}).splitlines()
    assert lines[2].startswith("grey") and "+0.050" in lines[3]


def test_each_runs_test_cases_come_from_its_metrics_and_are_pooled(tmp_path):
    """A run's test cases (Dice, uncertainty score, review flag) as evaluate wrote them, pooled over runs."""
    rows = [{"case_id": "a", "dice": 0.9, "uncertainty": 0.1, "review": False, "slices": 4},
            {"case_id": "b", "dice": 0.2, "uncertainty": 0.6, "review": True, "slices": 4}]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"cases": {"per_case": rows}}))
    found = sweep._test_cases(str(tmp_path))
    assert found == [{k: r[k] for k in ("case_id", "dice", "uncertainty", "review")} for r in rows]
    assert sweep._test_cases(str(tmp_path / "none")) == []
    more = [{"case_id": "c", "dice": 0.3, "uncertainty": 0.05, "review": False}]
    runs = [{"backend": "local", "test_lesion_dice": 0.5, "test_lesion_dice_per_image": 0.5, "collapsed": False,
             "rollbacks": 0, "test_cases": t} for t in (found, more)]
    pooled = sweep.summarise(runs)["local"]["uncertainty_pooled"]
    # bad cases b (0.6) and c (0.05) against the good a (0.1): b ranks above, c below -> AUROC 1/2
    assert pooled["cases"] == 3 and pooled["bad"] == 2 and pooled["auroc"] == 0.5
    assert pooled["unflagged_dice_mean"] == (0.9 + 0.3) / 2 and pooled["flagged"] == 1
