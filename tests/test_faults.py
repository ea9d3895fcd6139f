"""Faults: a command killed mid-way and run again, object storage going away mid-run.

Each case runs the real CLI in a subprocess, kills it (SIGKILL: no clean-up code runs) or the
storage it writes to at a point it waits for, then checks what was left and that a rerun
finishes as if nothing had happened."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aisd_ray.config import builtin_config
from aisd_ray.data.store.shards import ShardStore
from aisd_ray.train import checkpoint as ckpt
from tests.conftest import _free_port

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "aisd-ray")
TINY = str(builtin_config("tiny"))


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every 20 ms)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before the kill: {proc.communicate()}"
        assert time.time() < deadline, "the kill point never came"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_a_killed_prepare_leaves_no_store_and_a_rerun_completes(synthetic_root, tmp_path):
    store = tmp_path / "shards"
    args = ["prepare", "--config", TINY, "--source", str(synthetic_root), "--output", str(store), "-q",
            "--set", "data.shard_target_mb=0.02"]  # many small shards: time to land inside the writing
    kill_when(start(*args), lambda: (store / "train").is_dir() and any((store / "train").iterdir()))
    assert not (store / "manifest.json").exists()  # half a store never looks like a store
    assert finish(start(*args))[0] == 0
    opened = ShardStore.open(str(store), checksums=True)
    listed = {shard["name"] for split in opened.manifest["splits"].values() for shard in split["shards"]}
    on_disk = {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == listed  # the killed run's partial shards are gone or rewritten


def test_a_killed_prepare_over_a_good_store_leaves_it_usable(synthetic_root, tmp_path):
    store = tmp_path / "shards"
    args = ["prepare", "--config", TINY, "--source", str(synthetic_root), "--output", str(store), "-q",
            "--set", "data.shard_target_mb=0.02"]
    assert finish(start(*args))[0] == 0
    before = (store / "manifest.json").read_text()
    files = {p for p in store.rglob("*") if p.is_file()}
    # new settings, new shards: killed while they are written beside the old ones
    kill_when(start(*args, "--set", "data.split_seed=7"),
              lambda: len({p for p in store.rglob("*") if p.is_file()}) > len(files))
    assert (store / "manifest.json").read_text() == before
    ShardStore.open(str(store), checksums=True)  # the old store still verifies, shard by shard


def test_a_killed_training_driver_resumes_on_rerun(parquet_store, tmp_path):
    shards = parquet_store[1]
    runs = tmp_path / "runs"
    args = ["train", "--config", TINY, "--data", shards, "--output", str(runs), "--backend", "local", "-q",
            "--set", "train.epochs=6"]
    run = str(runs / "tiny")
    kill_when(start(*args), lambda: any(state.epoch >= 2 for _, state in ckpt.list_checkpoints(run)))
    killed_at = ckpt.list_checkpoints(run)[-1][1].epoch
    assert killed_at < 6
    code, err = finish(start(*args))
    assert code == 0, err
    state = ckpt.list_checkpoints(run)[-1][1]
    assert [row["epoch"] for row in state.history] == [1, 2, 3, 4, 5, 6]  # every epoch once
    assert state.resumes == [killed_at]  # resumed from the last checkpoint the killed run finished
    assert not list(runs.glob("**/.staging-*"))


class Outage:
    """A TCP relay in front of the emulator that can be cut (connections refused, open ones
    dropped) and restored on the same port: storage going away and coming back, data kept."""

    def __init__(self, target: str):
        self.target = ("127.0.0.1", int(target.rsplit(":", 1)[1]))
        self.port = _free_port()
        self.host = f"http://127.0.0.1:{self.port}"
        self._open: list[socket.socket] = []
        self.restore()

    def restore(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        self._listener.close()
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self._open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _gcs_checkpoints(host: str, prefix: str) -> list[int]:
    from google.cloud import storage as gcs

    client = gcs.Client(project="aisd-ray-test", client_options={"api_endpoint": host})
    names = [b.name for b in client.list_blobs("aisd", prefix=prefix)]
    return sorted(int(n.split("checkpoint_")[1][:6]) for n in names if n.endswith(ckpt.CHECKPOINT_INFO))


def test_storage_going_away_mid_run_fails_with_one_line_and_a_rerun_resumes(gcs_emulator, synthetic_root):
    outage = Outage(gcs_emulator)
    env = {"STORAGE_EMULATOR_HOST": outage.host, "AISD_STORAGE_RETRY_SECONDS": "3"}
    code, err = finish(start("prepare", "--config", TINY, "--source", str(synthetic_root), "--output",
                             "gs://aisd/outage/shards", "-q", env=env))
    assert code == 0, err
    args = ["train", "--config", TINY, "--data", "gs://aisd/outage/shards", "--output", "gs://aisd/outage/runs",
            "--backend", "local", "-q", "--set", "train.epochs=3"]
    proc = start(*args, env=env)
    deadline = time.time() + 180
    while not _gcs_checkpoints(gcs_emulator, "outage/runs/tiny/"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    outage.cut()  # the storage goes away mid-run
    stopped = time.time()
    code, err = finish(proc, timeout=120)
    took = time.time() - stopped
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"the emulator at {outage.host}" in lines[0], lines[0]
    assert took < 60, took
    outage.restore()  # the storage is back: the same command resumes
    code, err = finish(start(*args, env=env))
    assert code == 0, err[-3000:]
    assert _gcs_checkpoints(gcs_emulator, "outage/runs/tiny/")[-1] == 3
