"""Experiment tracking in MLflow, opt in: ``run.mlflow_tracking_uri`` (``--mlflow URI``).

With no URI (the default) MLflow is never imported: the run folder is the whole record. With one,
each training run is also an MLflow run, so that runs and searches compare side by side:

- ``check``, before anything is written: MLflow's client is installed and the tracker answers,
  else ``ConfigError`` (exit 2), one line naming the URI.
- ``Tracker.start`` (``stages.train``): creates the MLflow run, or reopens it on a rerun of the
  same run folder, with the resolved config as parameters (``section.key``) and
  ``provenance.json`` as tags (``provenance.*``, ``mlflow.source.git.commit``), and writes
  ``mlflow.json`` (URI, experiment, run id) into the run folder. A Tune trial's run is a child of
  the search's (``start_search``; the search's id reaches the trials as ``PARENT_ENV``).
- ``train.epoch_log.EpochLog`` (the chief, rank 0, alone): each epoch's history row as metrics,
  the epoch as step, sent by a background thread once the epoch's checkpoint is reported.
- after training, the run folder's plots, history, config and provenance as artifacts and the
  end status; the pipeline adds the test figures (``test_*``), ``eval/`` (metrics.json, tables,
  plots) and ``export/``. A tracker that stops answering mid-run costs the run nothing: one
  warning naming the URI; the run folder has every figure.

Why MLflow's client (``mlflow.tracking.MlflowClient``, package ``mlflow-skinny``): it is the
tracker people who train on Ray clusters use (Ray's guides log to it from rank 0), and the client
speaks every MLflow store (an HTTP server with auth from ``MLFLOW_TRACKING_TOKEN`` or
``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``, SQL, a folder, Databricks) and artifact store (the
server's proxied ``mlflow-artifacts:``, gs://, s3://), with its own retries. The explicit client,
not the fluent ``mlflow.start_run``: it keeps no process-wide active run, so a Ray worker or a
Tune trial's process logs to exactly the run it was handed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aisd_ray.config import Config, ConfigError
from aisd_ray.core import storage

log = logging.getLogger(__name__)

RECORD = "mlflow.json"  # in the run folder (and a search's folder): which MLflow run it is
PARENT_ENV = "AISD_RAY_MLFLOW_PARENT_RUN"  # a Tune trial's process: the search's MLflow run id
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"  # MLflow's own variable; read where the run is created
DEFAULT_EXPERIMENT = "aisd-ray"
PROBE_SECONDS = 10  # the start-up check's HTTP timeout (one try: a tracker that is down fails fast)
RUN_FOLDER_FILES = ("config.toml", "provenance.json", "history.csv", "train_losses.png", "train_metrics.png")
RUN_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}  # MLflow's variables, where unset
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
BATCH = 100  # MLflow's limit on parameters per log_batch call


def _client(uri: str):
    """MLflow's client for ``uri``; ``ConfigError`` (the one line) when MLflow is not installed."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(f"run.mlflow_tracking_uri {shown(uri)}: tracking needs MLflow's client, which is not "
                          "installed: pip install 'aisd-ray[mlflow]'") from None
    # unless set: the client would print "View run ... at: URL" to stdout when a run ends (``start``
    # logs that link), and retry a call for minutes (7 tries, 120 s timeouts) where a run's own calls
    # get 4 tries of at most 30 s (then ``Tracker``/``EpochLog`` stop calling a tracker that is down)
    for key, value in RUN_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=uri)


def resolve_uri(uri: str) -> str:
    """``uri`` as every process reads it alike: a bare local path becomes an absolute ``file://``
    URI (Ray workers run in another directory); any URI with a scheme is unchanged."""
    if uri and not urlsplit(uri).scheme:
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def shown(uri: str) -> str:
    """``uri`` without a password (for logs, errors and the parameters)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}"
                                     + (f":{parts.port}" if parts.port else "")))


def short_reason(exc: BaseException) -> str:
    """An MLflow or HTTP error as a short phrase ('Connection refused', 'HTTP 404 ...')."""
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno:
        return errno.group(1).strip()
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


@contextmanager
def _fail_fast():
    """MLflow's HTTP calls in this block try once, for at most ``PROBE_SECONDS``; MLflow's
    variables are put back as they were after it."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_SECONDS)}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_answered: set[str] = set()  # tracking URIs this process has checked


def check(cfg: Config) -> None:
    """With tracking on: MLflow is installed and the tracker answers. Call it before anything is
    written; raises ``ConfigError`` (exit 2) naming the URI and what to do."""
    uri = resolve_uri(cfg.run.mlflow_tracking_uri)
    if not uri or uri in _answered:
        return
    client = _client(uri)
    try:
        with _fail_fast():
            client.search_experiments(max_results=1)
    except Exception as exc:  # any failure of the client: refused, DNS, timeout, HTTP error, bad store
        raise ConfigError(f"run.mlflow_tracking_uri {shown(uri)}: the MLflow tracker does not answer "
                          f"({short_reason(exc)}); start it, give another --mlflow URI, or leave "
                          "run.mlflow_tracking_uri empty to run without tracking") from None
    _answered.add(uri)


def config_params(cfg: Config) -> dict[str, str]:
    """The resolved config as MLflow parameters: ``section.key`` -> the value as text (lists and
    tables as Python writes them, at most ``MAX_PARAM_CHARS``; the tracking URI without a password)."""
    params = {f"{section}.{key}": str(value)[:MAX_PARAM_CHARS]
              for section, keys in cfg.to_dict().items() for key, value in keys.items()}
    params["run.mlflow_tracking_uri"] = shown(params["run.mlflow_tracking_uri"])
    return params


def provenance_tags(facts: dict[str, Any]) -> dict[str, str]:
    """``provenance.json`` as MLflow tags (``provenance.packages.ray``, ``provenance.git_commit``,
    ...), and the commit as MLflow's ``mlflow.source.git.commit``."""
    tags: dict[str, str] = {}
    for key, value in facts.items():
        if isinstance(value, dict):
            tags.update({f"provenance.{key}.{k}": str(v) for k, v in value.items() if v is not None})
        elif value is not None:
            tags[f"provenance.{key}"] = str(value)
    if facts.get("git_commit"):
        tags["mlflow.source.git.commit"] = str(facts["git_commit"]).removesuffix("+dirty")
    return tags


def _read_record(folder: str) -> dict[str, str] | None:
    uri = storage.join(folder, RECORD)
    if not storage.exists(uri):
        return None
    try:
        record = json.loads(storage.read_bytes(uri))
    except ValueError:
        return None
    return record if isinstance(record, dict) and {"tracking_uri", "run_id"} <= set(record) else None


def _experiment_id(client, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    name = os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage != "active":
        raise ConfigError(f"run.mlflow_tracking_uri {shown(uri)}: MLflow experiment {name!r} is deleted; restore "
                          f"it or set {EXPERIMENT_ENV} to another name")
    return experiment.experiment_id


class Tracker:
    """One MLflow run, as seen by the process that started it (``start``) or by a later stage of
    the same command (``of_run``). Every call after the start is best effort: a failure is one
    warning naming the URI and what was not logged."""

    def __init__(self, client, uri: str, run_id: str):
        self.client, self.uri, self.run_id = client, uri, run_id
        self._down = False  # a call failed: the rest are skipped

    @classmethod
    def start(cls, cfg: Config, folder: str, facts: dict[str, Any], parent: str | None = None,
              name: str | None = None) -> Tracker | None:
        """The MLflow run of the run folder ``folder`` (a search's folder for a search), created or,
        when ``folder`` already names one on this tracker (``mlflow.json``), reopened; parameters,
        tags and ``mlflow.json`` written. ``parent``: the parent run's id (default: ``PARENT_ENV``,
        set in a Tune trial's process). None with tracking off. Raises ``ConfigError`` naming the
        URI when the tracker refuses."""
        uri = resolve_uri(cfg.run.mlflow_tracking_uri)
        if not uri:
            return None
        parent = parent or os.environ.get(PARENT_ENV) or None
        client = _client(uri)
        try:
            run = cls._reopen(client, uri, folder)
            if run is None:
                experiment = client.get_run(parent).info.experiment_id if parent else _experiment_id(client, uri)
                tags = {"aisd_ray.run_folder": folder, **({"mlflow.parentRunId": parent} if parent else {})}
                run = client.create_run(experiment, run_name=name or cfg.run.name, tags=tags)
                storage.write_text(storage.join(folder, RECORD), json.dumps(
                    {"tracking_uri": uri, "experiment_id": run.info.experiment_id, "run_id": run.info.run_id,
                     "parent_run_id": parent}, indent=2))
            tracker = cls(client, uri, run.info.run_id)
            tracker._log_config(run.data.params, config_params(cfg))
            client.log_batch(tracker.run_id, tags=_run_tags(provenance_tags(facts)))
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"run.mlflow_tracking_uri {shown(uri)}: the MLflow tracker refused the run "
                              f"({short_reason(exc)})") from None
        link = (f"{shown(uri).rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{tracker.run_id}"
                if uri.startswith(("http://", "https://")) else f"{shown(uri)}, run {tracker.run_id}")
        log.info("tracking in MLflow: %s", link)
        return tracker

    @staticmethod
    def _reopen(client, uri: str, folder: str):
        """The run ``folder``'s ``mlflow.json`` names on this tracker, marked running again; None if none."""
        record = _read_record(folder)
        if not record or record["tracking_uri"] != uri:
            return None
        try:
            run = client.get_run(record["run_id"])
        except Exception:  # gone from this tracker (a new database): a new run
            return None
        if run.info.lifecycle_stage != "active":
            return None
        client.update_run(run.info.run_id, status="RUNNING")
        return run

    def _log_config(self, logged: dict[str, str], params: dict[str, str]) -> None:
        """Parameters not yet logged; a reopened run whose config changed (more epochs on resume)
        keeps its first values (MLflow's parameters are fixed) and gets ``config_changed.KEY`` tags."""
        from mlflow.entities import Param

        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + BATCH])
        changed = {f"config_changed.{k}": v for k, v in params.items() if k in logged and logged[k] != v}
        if changed:
            self.client.log_batch(self.run_id, tags=_run_tags(changed))

    @classmethod
    def of_run(cls, cfg: Config, folder: str) -> Tracker | None:
        """The tracker of a run ``start`` opened (from its ``mlflow.json``); None with tracking off."""
        uri = resolve_uri(cfg.run.mlflow_tracking_uri)
        record = _read_record(folder) if uri else None
        if not record:
            return None
        return cls(_client(record["tracking_uri"]), record["tracking_uri"], record["run_id"])

    def _best_effort(self, what: str, fn, *args) -> None:
        """``fn(*args)``; a failure is one warning, and after it nothing more is tried (a tracker
        that is down costs MLflow's retries once, not once per call)."""
        if self._down:
            return
        try:
            fn(*args)
        except Exception as exc:
            self._down = True
            log.warning("MLflow %s: could not log %s to run %s (%s); nothing more is sent to it, the run folder "
                        "has every figure", shown(self.uri), what, self.run_id, short_reason(exc))

    def log_run_folder(self, folder: str) -> None:
        """The run folder's plots, history, config and provenance, and the epoch galleries
        (``epoch_change_infer/``), as artifacts."""
        self._best_effort("the run folder's plots and history", self._upload, folder, RUN_FOLDER_FILES, "")
        gallery = storage.join(folder, "epoch_change_infer")
        self._best_effort("the epoch galleries", self._upload, gallery, storage.list_dir(gallery),
                          "epoch_change_infer")

    def _upload(self, folder: str, names, artifact_path: str) -> None:
        with tempfile.TemporaryDirectory(prefix="aisd-mlflow-") as tmp:
            for name in names:
                uri = storage.join(folder, name)
                if storage.size(uri) is not None:
                    (Path(tmp) / name).write_bytes(storage.read_bytes(uri))
            if any(Path(tmp).iterdir()):
                self.client.log_artifacts(self.run_id, tmp, artifact_path or None)

    def log_test(self, report: dict[str, Any], eval_uri: str, export_uri: str, epoch: int) -> None:
        """The test split's figures as ``test_*`` metrics (step: the exported epoch), the
        evaluation's files (``eval/``: metrics.json, the tables and plots; not the overlays) and
        the export (``export/``) as artifacts."""
        figures = {**report, **report.get("cases", {})}
        self._best_effort("the test metrics", self.log_metrics,
                          {f"test_{k}": v for k, v in figures.items() if is_number(v)}, epoch)
        files = [n for n in storage.list_dir(eval_uri) if n.endswith((".json", ".csv", ".png"))]
        self._best_effort("the evaluation's files", self._upload, eval_uri, files, "eval")
        self._best_effort("the export", self._upload_dir, export_uri, "export")

    def _upload_dir(self, uri: str, artifact_path: str) -> None:
        with storage.local_copy(uri) as local:
            self.client.log_artifacts(self.run_id, str(local), artifact_path)

    def log_metrics(self, figures: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, storable(float(v)), now, step)
                                                    for k, v in figures.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        self._best_effort("tags", lambda: self.client.log_batch(self.run_id, tags=_run_tags(tags)))

    def end(self, status: str, stop_reason: str = "") -> None:
        """Mark the run ended: FINISHED, FAILED (diverged, or an error) or KILLED (interrupted)."""
        if stop_reason:
            self.set_tags({"stop_reason": stop_reason[:5000]})
        self._best_effort(f"the end status ({status})", self.client.set_terminated, self.run_id, status)


def start_search(cfg: Config, output: str) -> Tracker | None:
    """A Tune search's parent run (``output``'s ``mlflow.json``), after ``check``; its id goes to
    the trials' processes as ``PARENT_ENV``, so that each trial's run is its child. None with
    tracking off."""
    from aisd_ray.core import provenance

    check(cfg)
    return Tracker.start(cfg, output, provenance.facts(cfg.to_toml()), name=f"{cfg.tune.name} (search)")


def end_search(search: Tracker, cfg: Config, rows: list[dict[str, Any]], output: str) -> None:
    """The search's leaderboard, plots and best config as artifacts, its best score as a metric;
    each trial's run that did not end itself (stopped by ASHA, or failed) gets its run folder's
    files and ends KILLED with the leaderboard's stop reason; then the search's run ends."""
    from aisd_ray.scoring.metrics import SCORE

    if rows:
        search._best_effort("the best score", search.log_metrics, {f"best_{SCORE}": rows[0][f"best_{SCORE}"]}, 0)
        search.set_tags({"best_trial": str(rows[0]["trial_id"])})
    search._best_effort("the search's files", search._upload, output,
                        ("leaderboard.csv", "search.png", "curves.png", "best_config.toml"), "")
    for row in rows:
        trial = Tracker.of_run(cfg, row["run"])
        try:
            running = trial is not None and trial.client.get_run(trial.run_id).info.status == "RUNNING"
        except Exception:
            running = False
        if running:
            trial.log_run_folder(row["run"])
            trial.end("KILLED", str(row.get("stop_reason", "")))
    search.end("FINISHED")


def _run_tags(tags: dict[str, str]):
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


def storable(value: float) -> float:
    """NaN as it is (MLflow keeps it); +-Inf as the largest float, as MLflow's own stores write it."""
    return value if math.isfinite(value) or math.isnan(value) else math.copysign(1.7976931348623157e308, value)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
