"""``crossval --folds K``: patient folds, the fold runs, out-of-fold figures, the ensemble export
that evaluate and infer take, a rerun that resumes."""

import csv
import json
import logging

import numpy as np
import pytest

from aisd_ray.cli import main
from aisd_ray.config import DataConfig
from aisd_ray.data.sources.layout import DataError
from aisd_ray.data.sources.raw import split_cases
from aisd_ray.inference.export import LoadedExport
from aisd_ray.stages import synthesize
from tests.conftest import volume_config

pytestmark = pytest.mark.slow


def test_folds_partition_the_non_test_patients_and_keep_the_test_split():
    cases = [f"{i:07d}" for i in range(11)]
    splits = [split_cases(cases, DataConfig(test_cases=("0000003",), folds=4, fold=k)) for k in range(4)]
    valid = [set(s["valid"]) for s in splits]
    assert set().union(*valid) == set(cases) - {"0000003"}  # every patient validated once
    assert sum(len(v) for v in valid) == 10 and sorted(len(v) for v in valid) == [2, 2, 3, 3]
    for s in splits:
        assert set(s["train"]) | set(s["valid"]) == set(cases) - {"0000003"} and not set(s["train"]) & set(s["valid"])
        assert s["test"] == ["0000003"]
    with pytest.raises(DataError, match="only 2 non-test case"):
        split_cases(cases[:3], DataConfig(test_cases=("0000000",), folds=3))


@pytest.mark.parametrize("args, message", [
    (["--folds", "1"], "tiny.toml): [data] folds: must be 0 (no folds) or at least 2"),
    (["--folds", "3", "--set", "data.fold=3"], "[data] fold: must lie in 0..2"),
])
def test_bad_fold_settings_exit_2_naming_the_key(args, message, tmp_path, capsys):
    assert main(["crossval", "--config", "tiny", "--output", str(tmp_path / "cv"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cv").exists()


@pytest.mark.parametrize("source, message", [(None, "give --source or data.source_dir"),
                                             ("nothere", "nothere: not found")])
def test_no_source_or_a_missing_one_is_refused_before_anything_is_written(source, message, tmp_path, capsys):
    out = tmp_path / "cv"
    given = ["--source", str(tmp_path / source)] if source else []
    assert main(["crossval", "--config", "tiny", "--folds", "2", "--output", str(out), *given]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_png_slices_are_refused_before_anything_is_written(synthetic_root, tmp_path, capsys):
    out = tmp_path / "cv"
    assert main(["crossval", "--config", "tiny", "--folds", "2", "--source", str(synthetic_root),
                 "--output", str(out), "--backend", "local"]) == 2
    err = capsys.readouterr().err
    assert "cross-validation needs CT volumes with their spacing" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    cfg = volume_config("nnunet", 9, 2, 64, 4)
    root = synthesize(cfg, str(tmp_path_factory.mktemp("cv-src")), progress=False)
    return cfg, root


def test_three_folds_leave_oof_figures_and_an_ensemble_that_infer_uses(volumes, tmp_path, capsys, caplog):
    """On the local backend (the folds one after another in this process), to keep `make test` under
    20 minutes on 2 cores: the same run on Ray (a Tune grid of Ray Train runs, two at once on the
    test cluster's 4 CPUs) took 153 s in the suite at 6706224 and passed; `crossval --backend ray`
    is the default path and `make sweep`'s ensembles use this one."""
    cfg, root = volumes
    config = tmp_path / "cv.toml"
    config.write_text(cfg.to_toml())
    out = tmp_path / "cv"
    args = ["crossval", "--config", str(config), "--folds", "3", "--source", str(root), "--output", str(out),
            "--backend", "local", "--set", "train.epochs=1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "crossval.json").read_text())

    # three fold runs, each validated on its own patients, together every non-test patient once
    histories = {k: (out / "runs" / f"fold_{k}" / "history.csv").read_text() for k in range(3)}
    assert all(len(h.splitlines()) == 2 for h in histories.values())  # header + 1 epoch
    valid = [json.loads((out / f"fold_{k}" / "shards" / "manifest.json").read_text())["source"]["cases"]["valid"]
             for k in range(3)]
    assert sorted(c for v in valid for c in v) == sorted(c for c in json.loads(
        (out / "fold_0" / "shards" / "manifest.json").read_text())["source"]["cases"]["train"] + valid[0])
    assert summary["folds"] == 3 and len(summary["per_fold"]) == 3
    # out-of-fold: every non-test case scored once, in mm and mL, from the fold models' NIfTIs
    oof = json.loads((out / "oof" / "metrics.json").read_text())
    assert oof["cases"] == 7 == summary["out_of_fold"]["cases"]
    assert {r["case_id"] for r in oof["per_case"]} == {c for v in valid for c in v}
    assert len(list(csv.DictReader(open(out / "folds.csv")))) == 3
    assert "out of fold (7 cases)" in printed and "post-processing chosen on them" in printed

    # the ensemble: its members' mean, with the post-processing chosen out of fold
    ensemble = LoadedExport(str(out / "ensemble"))
    assert ensemble.members == 3 and ensemble.postprocess["chosen"] == summary["postprocessing"]["chosen"]
    batch = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    # one temperature, fitted on the out-of-fold cases (each by its own fold model), divides each member's logits
    record = json.loads((out / "ensemble" / "calibration.json").read_text())
    assert ensemble.temperature == record["temperature"] and record["fitted_on"]["cases"] == 7
    assert record["fitted_on"]["predicted_by"].endswith("(out-of-fold)")
    members = [LoadedExport(str(out / "fold_" f"{k}" / "export")).predict(batch, temperature=record["temperature"])
               ["probabilities"].numpy() for k in range(3)]
    got = ensemble.predict(batch)
    np.testing.assert_allclose(got["probabilities"].numpy(), np.mean(members, axis=0), atol=1e-6)
    assert np.array_equal(got["labels"].numpy(), np.argmax(np.mean(members, axis=0), axis=-1))
    assert "ensemble_test" in summary and (out / "ensemble_test" / "metrics.json").exists()

    # infer takes the ensemble like any export: a mask on the patient's grid
    patient = sorted((root / "imagesTs").iterdir())[0]
    assert main(["infer", "--model", str(out / "ensemble"), "--input", str(patient),
                 "--output", str(tmp_path / "masks")]) == 0
    case = json.loads(next((tmp_path / "masks" / "cases").glob("*/summary.json")).read_text())
    assert case["lesion_ml"] >= 0 and list((tmp_path / "masks").glob("*.nii.gz"))

    # the same command again resumes: nothing is retrained, re-exported or re-scored, the figures are the same
    kept = {p: p.stat().st_mtime_ns for k in range(3) for p in (out / f"fold_{k}" / "export" / ".complete",
                                                                out / f"fold_{k}" / "validation" / ".complete")}
    kept.update({p: p.stat().st_mtime_ns for p in (out / "ensemble" / ".complete",
                                                   out / "ensemble_test" / ".complete")})
    with caplog.at_level(logging.INFO, logger="aisd_ray"):
        assert main(args) == 0
    assert {k: (out / "runs" / f"fold_{k}" / "history.csv").read_text() for k in range(3)} == histories
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    again = json.loads((out / "crossval.json").read_text())
    assert again["out_of_fold"] == summary["out_of_fold"]

    # another config in the same folder is refused, naming what changed, before anything runs
    capsys.readouterr()
    assert main([*args, "--set", "data.split_seed=1"]) == 2
    assert "data.split_seed 2024 -> 1" in capsys.readouterr().err
