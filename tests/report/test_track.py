"""MLflow tracking (``aisd_ray/report/track.py``) against a real ``mlflow server``: SQLite backend store,
artifacts served by the server (``--serve-artifacts``, as on a cluster), on a free loopback port,
read back through MLflow's client."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from aisd_ray.cli import main
from aisd_ray.config import ConfigError
from aisd_ray.core import provenance
from aisd_ray.report import track
from tests.conftest import _free_port, tiny_config


@pytest.fixture(scope="module", autouse=True)
def _mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` for this module (one worker, no job runner), stopped by PID. It is
    started first and waited for only by the tests that need it (``mlflow_uri``): the tests
    without a tracker run while it starts."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--serve-artifacts", "--artifacts-destination", (root / "artifacts").as_uri(), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    yield proc, f"http://127.0.0.1:{port}", root / "server.log"
    proc.terminate()  # the mlflow CLI forwards it to its uvicorn worker
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:  # uvicorn waits for the client's kept-alive connections
        os.killpg(proc.pid, signal.SIGKILL)  # the session it was started in: the CLI and its worker
        proc.wait()
    log.close()


@pytest.fixture
def mlflow_uri(_mlflow_server):
    """The module's ``mlflow server``, once it answers."""
    proc, uri, log = _mlflow_server
    deadline = time.time() + 180  # two Python start-ups (the CLI, then its uvicorn worker) on a loaded host
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            return uri
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start on {uri}: {log.read_text()[-2000:]}") from None
            time.sleep(0.25)


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _artifacts(client, run_id, path=None) -> set[str]:
    found = set()
    for entry in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


@pytest.mark.parametrize("command", ["train", "pipeline", "demo", "tune"])
def test_unreachable_tracker_is_refused_before_anything_is_written(command, parquet_store, synthetic_root,
                                                                    tmp_path, capsys):
    """A tracker that does not answer: exit 2 and one line naming its URI, at the start, nothing written."""
    _, shards = parquet_store
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    out = tmp_path / "out"
    args = {"train": ["--data", shards, "--output", str(out), "--backend", "local"],
            "pipeline": ["--source", str(synthetic_root), "--output", str(out), "--backend", "local"],
            "demo": ["--output", str(out), "--backend", "local"],
            "tune": ["--data", shards, "--output", str(out)]}[command]
    capsys.readouterr()
    assert main([command, "--config", "tiny", *args, "--mlflow", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"aisd-ray {command}: error: run.mlflow_tracking_uri {uri}: the MLflow tracker "
                             "does not answer (") and "Connection refused" in err[0]
    assert not out.exists()


def test_tracker_check_tries_once(monkeypatch):
    """The start-up check tries once, whatever MLflow's retry settings (its client alone would
    retry for minutes), and leaves those settings as they were for the run's own calls."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")  # would back off 2+4+8+16+32 s
    cfg = tiny_config(f"run.mlflow_tracking_uri='http://127.0.0.1:{_free_port()}'")
    started = time.time()
    with pytest.raises(ConfigError, match="does not answer"):
        track.check(cfg)
    assert time.time() - started < 60
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"


def test_tracker_gone_mid_run_costs_one_warning(mlflow_uri, tmp_path, monkeypatch, caplog):
    """A tracker that goes away after the run started: one warning naming it, no error, and no
    further call (the driver's files and end status, the chief's later epochs)."""
    from aisd_ray.train.epoch_log import EpochLog

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = tiny_config(f"run.mlflow_tracking_uri='{mlflow_uri}'")
    run = track.Tracker.start(cfg, str(tmp_path / "run"), provenance.facts(cfg.to_toml()))
    gone = f"http://127.0.0.1:{_free_port()}"
    record = json.loads((tmp_path / "run" / track.RECORD).read_text())
    (tmp_path / "run" / track.RECORD).write_text(json.dumps({**record, "tracking_uri": gone}))
    (tmp_path / "run" / "history.csv").write_text("epoch,loss\n1,0.5\n")
    caplog.clear()
    later = track.Tracker.of_run(cfg, str(tmp_path / "run"))
    later.log_run_folder(str(tmp_path / "run"))
    later.end("FINISHED", "reached 2 epochs")
    epochs = EpochLog.for_run(cfg, str(tmp_path / "run"))
    for epoch in (1, 2):
        epochs.log({"epoch": epoch, "loss": 0.5})
    epochs.close(timeout=30)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all(gone in w and "Connection refused" in w for w in warnings), warnings
    assert "could not log the run folder's plots and history" in warnings[0]
    assert "could not log epoch 1" in warnings[1]
    assert _client(mlflow_uri).get_run(run.run_id).info.status == "RUNNING"  # nothing reached it


def test_missing_mlflow_names_the_extra(parquet_store, tmp_path, capsys, monkeypatch):
    """Tracking asked for without MLflow installed: exit 2, one line naming the extra to install."""
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")] or ["mlflow"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    _, shards = parquet_store
    uri = f"http://127.0.0.1:{_free_port()}"
    capsys.readouterr()
    assert main(["train", "--config", "tiny", "--data", shards, "--output", str(tmp_path / "out"), "--backend",
                 "local", "--mlflow", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"aisd-ray train: error: run.mlflow_tracking_uri {uri}: tracking needs MLflow's client, which "
                   "is not installed: pip install 'aisd-ray[mlflow]'"]
    assert not (tmp_path / "out").exists()


def test_tracking_off_imports_no_mlflow():
    """No URI: nothing is tracked and MLflow is never imported (users without it are unaffected)."""
    code = ("import sys; from aisd_ray import stages; from aisd_ray.report import track; "
            "from aisd_ray.config import Config; "
            "cfg = Config(); track.check(cfg); assert track.Tracker.start(cfg, '/nonexistent', {}) is None; "
            "from aisd_ray.train.epoch_log import EpochLog; assert EpochLog.for_run(cfg, '/nonexistent') is None; "
            "assert not [m for m in sys.modules if m.startswith('mlflow')], 'mlflow imported'")
    here = str(Path(track.__file__).parents[2])  # this tree's aisd_ray
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": here})


def test_search_run_is_the_parent_of_its_trials(mlflow_uri, tmp_path, monkeypatch):
    """Tune's side without Ray: the search's run, a trial's run as its child (the search's id in
    PARENT_ENV, as ``tune.search`` hands it to each trial's process); at the search's end a trial
    that did not end itself (ASHA) ends KILLED with its stop reason; a rerun reopens the same runs."""
    cfg = tiny_config(f"run.mlflow_tracking_uri='{mlflow_uri}'")
    search_dir = tmp_path / "search"
    search = track.start_search(cfg, str(search_dir))
    monkeypatch.setenv(track.PARENT_ENV, search.run_id)
    trial_dir = search_dir / "trials" / "t1"
    cfg.run.name = "t1"
    trial = track.Tracker.start(cfg, str(trial_dir), provenance.facts(cfg.to_toml()))
    client = _client(mlflow_uri)
    child, parent = client.get_run(trial.run_id), client.get_run(search.run_id)
    assert child.data.tags["mlflow.parentRunId"] == search.run_id
    assert child.info.experiment_id == parent.info.experiment_id
    assert child.info.status == parent.info.status == "RUNNING"

    (search_dir / "leaderboard.csv").write_text("rank,trial_id\n1,t1\n")
    rows = [{"trial_id": "t1", "run": str(trial_dir), "best_val_score": 0.25,
             "stop_reason": "stopped by ASHA after epoch 1"}]
    track.end_search(search, cfg, rows, str(search_dir))
    child, parent = client.get_run(trial.run_id), client.get_run(search.run_id)
    assert (child.info.status, child.data.tags["stop_reason"]) == ("KILLED", "stopped by ASHA after epoch 1")
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_val_score"] == 0.25
    assert parent.data.tags["best_trial"] == "t1"
    assert "leaderboard.csv" in _artifacts(client, search.run_id)

    # a rerun (more epochs: MLflow's parameters are fixed) reopens both runs
    monkeypatch.delenv(track.PARENT_ENV)
    cfg.train.epochs = 3
    again = track.start_search(cfg, str(search_dir))
    assert again.run_id == search.run_id and client.get_run(search.run_id).info.status == "RUNNING"
    reopened = client.get_run(search.run_id)
    assert reopened.data.params["train.epochs"] == "2" and reopened.data.tags["config_changed.train.epochs"] == "3"


def test_pipeline_run_reaches_the_tracker(mlflow_uri, synthetic_root, tmp_path):
    """A tiny pipeline with --mlflow: the resolved config as parameters, every epoch's figures with
    the epoch as step, the test figures, provenance as tags, and the plots, metrics.json and the
    export as artifacts, each equal to what the run folder holds."""
    out = tmp_path / "out"
    assert main(["pipeline", "--config", "tiny", "--source", str(synthetic_root), "--output", str(out),
                 "--backend", "local", "--mlflow", mlflow_uri, "-q"]) == 0
    run_dir = out / "tiny"
    record = json.loads((run_dir / track.RECORD).read_text())
    assert record["tracking_uri"] == mlflow_uri
    client = _client(mlflow_uri)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert client.get_experiment(run.info.experiment_id).name == track.DEFAULT_EXPERIMENT

    # parameters: the resolved config, section.key, every key
    cfg = tiny_config(f"data.source_dir='{synthetic_root}'", "data.split_dirs={}", "train.backend='local'",
                      f"run.mlflow_tracking_uri='{mlflow_uri}'")
    assert run.data.params == track.config_params(cfg)
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.image_width"] == "64"

    # per-epoch metrics, the epoch as step, the figures of history.csv
    with open(run_dir / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in history] == [1, 2]
    for key in ("loss", "val_loss", "val_lesion_dice", "val_score", "learning_rate"):
        logged = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in logged] == [(int(r["epoch"]), pytest.approx(float(r[key]), rel=1e-12))
                                                       for r in history], key

    # the test split's figures, at the exported epoch
    report = json.loads((run_dir / "eval" / "metrics.json").read_text())
    export = json.loads((run_dir / "export" / "export.json").read_text())
    test_dice = client.get_metric_history(run.info.run_id, "test_lesion_dice")
    assert [(m.step, m.value) for m in test_dice] == [(export["validation"]["epoch"],
                                                       pytest.approx(report["lesion_dice"]))]
    assert run.data.metrics["test_images"] == report["images"] == 8

    # provenance as tags
    facts = json.loads((run_dir / "provenance.json").read_text())
    tags = run.data.tags
    assert tags["provenance.config_sha256"] == facts["config_sha256"]
    assert tags["provenance.packages.tensorflow"] == facts["packages"]["tensorflow"]
    assert tags["provenance.machine.host"] == facts["machine"]["host"]
    if facts["git_commit"]:
        assert tags["provenance.git_commit"] == facts["git_commit"]
        assert tags["mlflow.source.git.commit"] == facts["git_commit"].removesuffix("+dirty")
    assert tags["stop_reason"] == "reached 2 epochs" and tags["aisd_ray.run_folder"] == str(run_dir)

    # artifacts: plots, history, config, galleries, metrics.json, the export
    names = _artifacts(client, run.info.run_id)
    assert {"train_losses.png", "train_metrics.png", "history.csv", "config.toml", "provenance.json",
            "epoch_change_infer/Epoch_1.png", "epoch_change_infer/Epoch_2.png", "eval/metrics.json",
            "export/export.json", "export/saved_model/saved_model.pb"} <= names
    assert not any(n.startswith("eval/overlays") for n in names)
    for name, local in (("eval/metrics.json", run_dir / "eval" / "metrics.json"),
                        ("export/export.json", run_dir / "export" / "export.json"),
                        ("train_losses.png", run_dir / "train_losses.png")):
        fetched = client.download_artifacts(run.info.run_id, name, str(tmp_path))
        assert Path(fetched).read_bytes() == local.read_bytes(), name
