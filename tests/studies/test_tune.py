"""A tiny search end to end: interrupted after its first trial, resumed, the best trial exported
and its config retrained. (ASHA stopping a trial: tests/train/test_multinode.py, across nodes.)"""

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from aisd_ray import stages
from aisd_ray.config import load_config
from aisd_ray.inference.export import LoadedExport
from tests.conftest import kill_processes_under

pytestmark = pytest.mark.slow

# Two trials, one after the other: at lr 1e-7 a trial keeps its initial weights, whose scattered
# lesion guesses score a small non-zero validation Dice; lr 0.05 collapses to all-background (Dice 0).
# The search is interrupted after the first trial and resumed.
# The tiny model reaches no real Dice in 2 epochs: this test is about resume and export, so its
# floor (tune.min_score) is 0 and its trials count as ok.
SEARCH = ["tune.name='tiny-search'", "tune.num_samples=1", "tune.scheduler='fifo'", "tune.min_score=0",
          "tune.space={learning_rate={grid=[1e-7, 0.05]}}", "train.epochs=2", "train.num_workers=1"]


def _tune(config, shards, output, env):
    sets = [arg for item in SEARCH for arg in ("--set", item)]
    return subprocess.Popen([sys.executable, "-m", "aisd_ray.cli", "tune", "--config", str(config), "--data", shards,
                             "--output", str(output), *sets],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _terminated_trials(output) -> int:
    states = glob.glob(str(output / "tune" / "tiny-search" / "experiment_state-*.json"))
    if not states:
        return 0
    try:
        text = open(max(states, key=os.path.getmtime)).read()
    except OSError:
        return 0
    return text.count('\\"status\\": \\"TERMINATED\\"') + text.count('"status": "TERMINATED"')


def test_search_resumes_and_exports_the_best(parquet_store, tmp_path):
    cfg, shards = parquet_store
    config = tmp_path / "base.toml"
    config.write_text(cfg.to_toml())
    output = tmp_path / "search"
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}

    # 1. interrupted (the whole process group killed) once the first trial has finished
    proc = _tune(config, shards, output, env)
    deadline = time.time() + 420
    while _terminated_trials(output) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(1)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_processes_under(ray_tmp)
    first = [d for d in glob.glob(str(output / "trials" / "*")) if os.path.exists(os.path.join(d, "history.csv"))]
    finished = [d for d in first if len(open(os.path.join(d, "history.csv")).read().splitlines()) == 3]
    assert len(finished) == 1, first
    history_before = open(os.path.join(finished[0], "history.csv")).read()
    assert not (output / "leaderboard.csv").exists()  # no summary of a search that has not ended

    # 2. the same command again resumes: the finished trial is kept, the others run
    proc = _tune(config, shards, output, env)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        kill_processes_under(ray_tmp)
    assert proc.returncode == 0, out[-3000:]
    assert open(os.path.join(finished[0], "history.csv")).read() == history_before  # not re-trained

    rows = list(csv.DictReader(open(output / "leaderboard.csv")))
    assert len(rows) == 2 and [r["rank"] for r in rows] == ["1", "2"]
    scores = [float(r["best_val_lesion_dice"]) for r in rows]
    assert scores[0] > scores[1]
    assert float(rows[0]["learning_rate"]) == pytest.approx(1e-7) and rows[0]["epochs_run"] == "2"
    assert float(rows[1]["learning_rate"]) == pytest.approx(0.05) and rows[1]["epochs_run"] == "2"
    assert "best_val_lesion_dice" in out and rows[0]["trial_id"] in out  # the leaderboard is printed
    for name in ("search.png", "curves.png"):
        assert (output / name).stat().st_size > 1000

    model = LoadedExport(str(output / "best_export"))
    probs = model.predict(np.zeros((1, 64, 64, 3), np.uint8))["probabilities"].numpy()
    assert probs.shape == (1, 64, 64, 2)
    meta = json.loads((output / "best_export" / "export.json").read_text())
    assert meta["validation"]["val_lesion_dice"] == pytest.approx(scores[0])

    best = load_config(output / "best_config.toml", ["train.backend='local'", "train.epochs=1"])
    assert best.train.learning_rate == pytest.approx(1e-7)
    stages.train(best, shards, str(tmp_path / "retrain"))
    assert (tmp_path / "retrain" / best.run.name / "history.csv").exists()


def test_a_search_whose_every_trial_collapses_or_diverges_exits_1_naming_them_and_exports_nothing(
        parquet_store, ray_cluster, tmp_path, capsys):
    """Issue 23: an absurd learning rate makes every trial collapse (all background) or diverge (a
    non-finite loss, train.on_collapse = 'stop'); the leaderboard and the one error line name each
    trial and its status, and no export, best config or summary is written."""
    from aisd_ray import cli

    cfg, shards = parquet_store
    config = tmp_path / "base.toml"
    config.write_text(cfg.to_toml())
    output = tmp_path / "search"
    sets = ["tune.name='absurd'", "tune.num_samples=1", "tune.max_concurrent_trials=2", "tune.scheduler='fifo'",
            "tune.space={learning_rate={grid=[1000.0, 10000.0]}}", "train.epochs=1", "train.num_workers=1",
            "train.on_collapse='stop'"]
    rc = cli.main(["tune", "--config", str(config), "--data", shards, "--output", str(output),
                   *[arg for item in sets for arg in ("--set", item)]])
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    rows = list(csv.DictReader(open(output / "leaderboard.csv")))
    assert len(rows) == 2 and all(r["status"] in ("collapsed", "diverged") for r in rows), rows
    lines = [line for line in err.splitlines() if line.startswith("aisd-ray tune: error:")]
    assert len(lines) == 1, err[-3000:]
    for row in rows:
        assert f"{row['trial_id']} {row['status']}" in lines[0]
    assert "nothing exported" in lines[0]
    for name in ("best_export", "best_config.toml", "summary.json", "best_eval", "default_export"):
        assert not (output / name).exists(), name
    assert (output / "search.png").stat().st_size > 1000  # the plots show why
