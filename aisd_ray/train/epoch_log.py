"""The chief's epoch figures to an MLflow run (``run.mlflow_tracking_uri``; see ``aisd_ray.report.track``).

Beside ``Artifacts``, and like it off the training thread: the loop hands over each epoch's
history row once the epoch's checkpoint is reported, and a daemon thread sends it, so the
training step and the other workers never wait for the tracker, and a resumed run sends each
epoch once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from aisd_ray.config import Config, ConfigError
from aisd_ray.report import track

log = logging.getLogger(__name__)


class EpochLog:
    """The chief's epoch figures to the tracker: ``log(row)`` queues a history row and returns at
    once; a daemon thread sends each row as metrics with the epoch as step. The first failure is
    one warning and later rows are dropped (they are in history.csv); ``close`` waits at most
    ``timeout`` seconds for the queue to drain."""

    def __init__(self, client, uri: str, run_id: str):
        self.client, self.uri, self.run_id = client, uri, run_id
        self._queue: queue.Queue = queue.Queue()
        self._failed = False
        self._thread = threading.Thread(target=self._send, name="aisd-mlflow", daemon=True)
        self._thread.start()

    @classmethod
    def for_run(cls, cfg: Config, run_uri: str) -> EpochLog | None:
        """The epoch log of the MLflow run ``stages.train`` opened for ``run_uri`` (its
        ``mlflow.json``); None with tracking off, or (with a warning) when that run is unknown or
        MLflow's client is missing on this node."""
        if not cfg.run.mlflow_tracking_uri:
            return None
        try:
            tracker = track.Tracker.of_run(cfg, run_uri)
        except (ConfigError, OSError) as exc:  # MLflow missing on this node, the run folder unreadable
            tracker, why = None, str(exc)
        else:
            why = f"{run_uri} has no {track.RECORD} (the run was not started by stages.train)"
        if tracker is None:
            log.warning("MLflow: the epochs are not tracked: %s", why)
            return None
        return cls(tracker.client, tracker.uri, tracker.run_id)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["epoch"])
        figures = {k: float(v) for k, v in row.items() if k != "epoch" and track.is_number(v)}
        self._queue.put((step, figures, int(time.time() * 1000)))

    def _send(self) -> None:
        from mlflow.entities import Metric

        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._failed:
                continue
            step, figures, stamp = item
            try:
                self.client.log_batch(self.run_id, metrics=[Metric(k, track.storable(v), stamp, step)
                                                            for k, v in figures.items()])
            except Exception as exc:
                self._failed = True
                log.warning("MLflow %s: could not log epoch %d to run %s (%s); later epochs are not sent "
                            "either, history.csv has them all", track.shown(self.uri), step, self.run_id,
                            track.short_reason(exc))

    def close(self, timeout: float = 60.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("MLflow %s: epochs still unsent after %g s; history.csv has them all",
                        track.shown(self.uri), timeout)
