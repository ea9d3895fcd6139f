"""Shared fixtures: tiny configs, synthetic data sharded in both formats, one local Ray cluster."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from aisd_ray.config import builtin_config, load_config  # noqa: E402
from aisd_ray.data.store.prepare import prepare  # noqa: E402
from aisd_ray.data.synthetic.slices import write_synthetic_aisd  # noqa: E402


def pytest_collection_modifyitems(session, config, items):
    """Modules marked slow (Ray, training) first, in their usual order, then the rest: with
    `make test`'s two processes (pytest-xdist, whole modules each, in this order with
    --no-loadscope-reorder) the long ones start early and the short ones fill in at the end, instead
    of one long module running alone last."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow") and item.module is not None}
    items.sort(key=lambda item: item.module is None or item.module.__name__ not in slow)


def one_error_line(capsys) -> str:
    """The one line a refused command wrote to stderr (no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def tiny_config(*overrides: str):
    return load_config(builtin_config("tiny"), list(overrides))


def volume_config(layout: str, cases: int, test_cases: int, size: int, slices: int, *overrides: str):
    """The tiny config on a small synthetic CT layout (``nnunet``, ``dicom``...), its official test
    cases as ``data.test_cases`` (as the demo hands them on)."""
    from aisd_ray.data.synthetic.slices import synthetic_test_cases

    cfg = tiny_config(f"synthetic.layout='{layout}'", f"synthetic.num_cases={cases}",
                      f"synthetic.num_test_cases={test_cases}", f"synthetic.size={size}",
                      f"synthetic.slices_per_case={slices}", *overrides)
    cfg.data.test_cases = tuple(synthetic_test_cases(cfg.synthetic))
    return cfg


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A tiny synthetic AISD tree (64 px): 32 train, 8 valid, 8 test slices."""
    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_aisd(out, tiny_config().synthetic, progress=False)


def _make_store(synthetic_root, tmp_path_factory, fmt: str):
    # TFRecord stores hold raw rows (data.row_encoding): every test run on both stores covers both
    # encodings, the Ray Data reader included
    encoding = "raw" if fmt == "tfrecord" else "png"
    cfg = tiny_config(f"data.source_dir='{synthetic_root}'", f"data.shard_format='{fmt}'",
                      f"data.row_encoding='{encoding}'")
    out = str(tmp_path_factory.mktemp(f"shards-{fmt}"))
    prepare(cfg, out, progress=False)
    return cfg, out


@pytest.fixture(scope="session", params=["parquet", "tfrecord"])
def _shard_store(request, synthetic_root, tmp_path_factory):
    return _make_store(synthetic_root, tmp_path_factory, request.param)


@pytest.fixture
def shard_store(_shard_store):
    """(config, shards folder) for each shard format; the config is the test's own copy."""
    return copy.deepcopy(_shard_store[0]), _shard_store[1]


@pytest.fixture(scope="session")
def _parquet_store(synthetic_root, tmp_path_factory):
    return _make_store(synthetic_root, tmp_path_factory, "parquet")


@pytest.fixture
def parquet_store(_parquet_store):
    return copy.deepcopy(_parquet_store[0]), _parquet_store[1]


def start_local_ray() -> None:
    """The session's in-process local Ray (also restarted by a module that needed Ray elsewhere),
    started as the CLI starts a local Ray: its processes know its address, which matters here, where
    `make test`'s other test process runs its own Ray on the same host."""
    from aisd_ray.train.ray_session import start_local_ray as start

    start(4, log_to_driver=False)


@pytest.fixture(scope="session")
def ray_cluster():
    """One in-process local Ray cluster for the session (stopped with ray.shutdown, never `ray stop`).
    A Ray an earlier test started through the CLI in this process is stopped first."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def trained_run(_parquet_store, tmp_path_factory):
    """A 2-epoch local training run of the tiny config and its export."""
    from aisd_ray import stages

    cfg, shards = copy.deepcopy(_parquet_store[0]), _parquet_store[1]
    cfg.train.backend = "local"
    root = str(tmp_path_factory.mktemp("runs"))
    stages.train(cfg, shards, root)
    run = stages.run_uri(cfg, root)
    export_uri, _ = stages.export(run)
    return cfg, shards, run, export_uri


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    """A real gcp-storage-emulator on a free loopback port with bucket ``aisd``, stopped by PID.

    Sets STORAGE_EMULATOR_HOST, which google-cloud-storage and our pyarrow filesystem both read.
    """
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    exe = shutil.which("gcp-storage-emulator") or str(Path(sys.executable).parent / "gcp-storage-emulator")
    port = _free_port()
    proc = subprocess.Popen([exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
                             "--default-bucket", "aisd", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    host = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{host}/storage/v1/b/aisd", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"gcp-storage-emulator did not start on {host}: "
                                   f"{proc.stderr.read()[-2000:]!r}") from None
            time.sleep(0.2)
    old = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")}
    os.environ["STORAGE_EMULATOR_HOST"], os.environ["GOOGLE_CLOUD_PROJECT"] = host, "aisd-ray-test"
    yield host
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    proc.terminate()
    proc.wait(timeout=10)


def kill_processes_under(marker: str) -> list[int]:
    """Kill (by PID) every process of ours whose command line names ``marker``, e.g. a Ray temp dir,
    so a test's own Ray processes never outlive it; other Ray clusters on the host are untouched."""
    import signal
    from pathlib import Path

    killed = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
            except OSError:
                pass
    return killed
