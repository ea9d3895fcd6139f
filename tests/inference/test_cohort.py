"""infer on a cohort, in this process: each case whole when done, a rerun that does only the missing
cases (an interrupted case folder, a killed command), --redo, a refused case as a row while the
others are done (exit 2), cases.csv and cohort.json."""

import csv
import json
import os
import sys
import time

import numpy as np
import pytest

from aisd_ray.cli import main
from aisd_ray.data.synthetic.volumes import synth_volume, write_nifti_case
from aisd_ray.inference.infer_volumes import infer_volumes
from tests.helpers import ThresholdModel, kill_when_cases_done

SIZE, SLICES = 48, 6


class CountingModel(ThresholdModel):
    """The threshold double, counting the slices it segments."""

    def __init__(self):
        self.slices = 0

    def predict(self, batch):
        self.slices += len(batch)
        return super().predict(batch)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A real (untrained) tiny export: what the CLI loads."""
    from aisd_ray.config import builtin_config, load_config
    from aisd_ray.inference.export import export_model
    from aisd_ray.model.flexunet import build_flexunet

    cfg = load_config(builtin_config("tiny"))
    return export_model(cfg, build_flexunet(cfg.model), str(tmp_path_factory.mktemp("export") / "export"))


LOCAL = ["--set", "train.backend='local'"]  # in this process, whether or not a Ray is up in the session


def write_patients(folder, names, size=SIZE, slices=SLICES):
    """Synthetic patients of the volume generator as NIfTI files: {case ID: path}."""
    out = {}
    for name in names:
        hu, _, spacing = synth_volume(7, name, size, slices)
        out[name] = write_nifti_case(hu, spacing, folder / f"{name}.nii.gz")
    return out


def stamps(out, cases):
    """{case: (mask mtime_ns, summary mtime_ns)}."""
    return {c: ((out / f"{c}.nii.gz").stat().st_mtime_ns, (out / "cases" / c / "summary.json").stat().st_mtime_ns)
            for c in cases}


def test_a_rerun_does_only_the_cases_not_complete_and_redo_does_all(tmp_path):
    cases = write_patients(tmp_path / "in", ["3000001", "3000002", "3000003", "3000004"])
    out = tmp_path / "out"
    model = CountingModel()
    first = infer_volumes("unused", tmp_path / "in", str(out), batch_size=4, progress=False, model=model)
    assert [s["case_id"] for s in first] == sorted(cases) and model.slices == 4 * SLICES
    before = stamps(out, cases)
    # an interrupted run: one case folder without its summary.json (the completion), one case with
    # no folder at all (its mask alone), a temporary folder of a case being written
    (out / "cases" / "3000002" / "summary.json").unlink()
    import shutil

    shutil.rmtree(out / "cases" / "3000003")
    (out / "cases" / ".tmp-3000004-1-x").mkdir()
    (out / "cohort.json").unlink()
    time.sleep(0.01)
    model = CountingModel()
    again = infer_volumes("unused", tmp_path / "in", str(out), batch_size=4, progress=False, model=model)
    assert model.slices == 2 * SLICES  # two cases segmented, two kept
    after = stamps(out, cases)
    assert after["3000001"] == before["3000001"] and after["3000004"] == before["3000004"]
    assert after["3000002"][1] > before["3000002"][1] and after["3000003"][0] > before["3000003"][0]
    assert [s["lesion_ml"] for s in again] == [s["lesion_ml"] for s in first]
    assert not [p for p in (out / "cases").iterdir() if p.name.startswith(".tmp-")]
    cohort = json.loads((out / "cohort.json").read_text())
    assert cohort["cases"] == cohort["done"] == 4 and cohort["skipped"] == 2 and cohort["refused"] == 0
    # --redo: all four again
    model = CountingModel()
    infer_volumes("unused", tmp_path / "in", str(out), batch_size=4, progress=False, model=model, redo=True)
    assert model.slices == 4 * SLICES
    # another setting (a probability map asked for) is another identity: all four again too
    model = CountingModel()
    infer_volumes("unused", tmp_path / "in", str(out), progress=False, model=model, probabilities=True)
    assert model.slices == 4 * SLICES and (out / "cases" / "3000001" / "probabilities.nii.gz").is_file()


def test_another_export_redoes_the_cases(tmp_path, export):
    """The identity is the export's record: a copy of the export with another export.json (another
    provenance) redoes every case; the same export skips them."""
    from tests.helpers import copy_export

    write_patients(tmp_path / "in", ["3100001", "3100002"], size=64, slices=3)
    out = tmp_path / "out"
    args = ["infer", "--model", export, "--input", str(tmp_path / "in"), "--output", str(out), *LOCAL]
    assert main(args) == 0
    first = stamps(out, ["3100001", "3100002"])
    assert main(args) == 0 and stamps(out, ["3100001", "3100002"]) == first
    other = copy_export(export, tmp_path / "other-export", provenance={"commit": "another"})
    assert main(["infer", "--model", other, *args[3:]]) == 0
    assert all(stamps(out, ["3100001", "3100002"])[c][1] > first[c][1] for c in first)
    assert main([*args, "--redo"]) == 0


def test_a_refused_case_is_its_row_the_others_are_done_and_the_command_exits_2(tmp_path, capsys, export):
    cases = write_patients(tmp_path / "in", ["3200001", "3200002", "3200003"], size=64, slices=3)
    # not CT: a volume of 0..255 (a windowed image), between two good cases
    bad = tmp_path / "in" / "3200002.nii.gz"
    hu, _, spacing = synth_volume(7, "3200002", 64, 3)
    write_nifti_case(np.clip(hu.astype(np.int32) + 1024, 0, 255).astype(np.int16) + 1, spacing, bad)
    out = tmp_path / "out"
    code = main(["infer", "--model", export, "--input", str(tmp_path / "in"), "--output", str(out), *LOCAL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert "3200002.nii.gz" in err[0] and "not Hounsfield units" in err[0]
    rows = {r["case_id"]: r for r in csv.DictReader((out / "cases.csv").open())}
    assert list(rows) == sorted(cases)
    assert rows["3200002"]["status"] == "refused" and rows["3200002"]["error"] in err[0]
    assert rows["3200002"]["lesion_ml"] == ""
    assert not (out / "3200002.nii.gz").exists() and not (out / "cases" / "3200002").exists()
    for good in ("3200001", "3200003"):
        summary = json.loads((out / "cases" / good / "summary.json").read_text())
        assert rows[good]["status"] == "done" and float(rows[good]["lesion_ml"]) == summary["lesion_ml"]
        assert (out / f"{good}.nii.gz").is_file() and (out / "cases" / good / "preview.png").is_file()
    cohort = json.loads((out / "cohort.json").read_text())
    done = sorted(float(rows[c]["lesion_ml"]) for c in ("3200001", "3200003"))
    assert cohort["cases"] == 3 and cohort["done"] == 2 and cohort["refused"] == 1
    assert cohort["refused_cases"] == {"3200002": rows["3200002"]["error"]}
    assert cohort["lesion_ml"]["min"] == done[0] and cohort["lesion_ml"]["max"] == done[1]
    assert cohort["lesion_ml"]["median"] == pytest.approx((done[0] + done[1]) / 2, abs=1e-3)
    assert (out / ".complete").is_file()


def test_a_killed_command_keeps_whole_cases_and_its_rerun_does_the_rest(tmp_path, export):
    """``infer`` in a process of its own, killed (SIGKILL) once some cases are complete: every case
    on disk is whole or absent, and the rerun segments only the others."""
    names = [f"33000{i:02d}" for i in range(1, 11)]
    write_patients(tmp_path / "in", names, size=64, slices=6)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "aisd_ray.cli", "infer", "--model", export, "--input", str(tmp_path / "in"),
           "--output", str(out), *LOCAL, "--batch-size", "1"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    kept = kill_when_cases_done(cmd, env, out, 2, 300)
    assert 2 <= len(kept) < len(names), "the command ended before it could be killed half-way"
    assert not (out / "cases.csv").exists()
    before = stamps(out, kept)
    assert main(["infer", "--model", export, "--input", str(tmp_path / "in"), "--output", str(out), *LOCAL]) == 0
    assert stamps(out, kept) == before  # the complete cases were not done again
    cohort = json.loads((out / "cohort.json").read_text())
    assert cohort["done"] == len(names) and cohort["skipped"] == len(kept)
    assert {r["case_id"] for r in csv.DictReader((out / "cases.csv").open())} == set(names)
    assert not [p for p in (out / "cases").iterdir() if p.name.startswith(".tmp-")]


def test_a_new_calibration_or_strict_redoes_the_cases_and_strict_refuses_a_warned_one(export, tmp_path):
    """What decides a case's outputs or its verdict is part of its identity: an export calibrated after
    a first run (calibration.json written beside it) redoes the cases; a --strict rerun does not pass
    a case whose stored QA warned, it refuses it (its row, exit 2)."""
    import shutil

    from aisd_ray.core import storage
    from aisd_ray.inference.export import CALIBRATION

    exp = shutil.copytree(export, tmp_path / "export")
    write_patients(tmp_path / "in", ["3100001", "3100002"])
    out = tmp_path / "out"
    args = ["infer", "--model", str(exp), "--input", str(tmp_path / "in"), "--output", str(out), *LOCAL]
    assert main(args) == 0
    before = stamps(out, ["3100001", "3100002"])
    assert main(args) == 0 and stamps(out, ["3100001", "3100002"]) == before  # the same: skipped
    storage.write_json(str(exp / CALIBRATION), {"temperature": 1.0, "review_threshold": None})
    time.sleep(0.01)
    assert main(args) == 0
    after = stamps(out, ["3100001", "3100002"])
    assert all(after[c][1] > before[c][1] for c in after)  # calibrated since: every case redone
    ids = {c: json.loads((out / "cases" / c / "summary.json").read_text())["export_id"] for c in after}
    # --strict is part of the identity too: the rerun looks at every case again (a stored case whose QA
    # warned is refused, not passed as done), each one either refused with its row or done anew
    time.sleep(0.01)
    code = main(args + ["--strict"])
    rows = {r["case_id"]: r for r in csv.DictReader(open(out / "cases.csv"))}
    refused = {c for c, r in rows.items() if r["status"] == "refused"}
    assert code == (2 if refused else 0)
    for c in set(rows) - refused:
        summary = json.loads((out / "cases" / c / "summary.json").read_text())
        assert summary["export_id"] != ids[c] and stamps(out, [c])[c][1] > after[c][1]


def test_into_a_bucket_a_redone_case_keeps_no_output_of_the_earlier_run(gcs_emulator, tmp_path):
    """gs:// output: each case's files uploaded, summary.json last; a case redone without --uncertainty
    leaves no uncertainty.nii.gz of the run before (a stale map, or a stale SEG, would no longer match
    its mask)."""
    from aisd_ray.core import storage

    write_patients(tmp_path / "in", ["3200001"])
    out = "gs://aisd/cohort/out"
    with_map = infer_volumes("unused", tmp_path / "in", out, progress=False, model=ThresholdModel(), uncertainty=True)
    assert with_map[0]["case_id"] == "3200001"
    assert "uncertainty.nii.gz" in storage.list_dir(f"{out}/cases/3200001")
    infer_volumes("unused", tmp_path / "in", out, progress=False, model=ThresholdModel())
    assert sorted(storage.list_dir(f"{out}/cases/3200001")) == ["preview.png", "summary.json"]
    assert storage.exists(f"{out}/3200001.nii.gz") and storage.exists(f"{out}/cohort.json")
