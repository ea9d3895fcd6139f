"""`ray job submit` against a real Ray head started on free ports with its own temp dir and token,
stopped by PID (never `ray stop`, which would kill every Ray process on the host)."""

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from aisd_ray.inference.export import LoadedExport
from aisd_ray.train.ray_session import local_ray_env
from tests.conftest import _free_port, kill_processes_under

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RAY = shutil.which("ray") or str(Path(sys.executable).parent / "ray")


def _start_head():
    """A Ray head on free ports with its own temp dir and token: (process, temp dir, address, env),
    or the reason it did not come up."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit
    token = Path(temp) / "token"
    token.write_text(secrets.token_hex(32))
    # one host: Ray Train's preemption watcher off, as for any local Ray (local_ray_env)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), **local_ray_env()}
    dashboard = _free_port()
    ports = {"--port": _free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": _free_port(),
             "--node-manager-port": _free_port(), "--object-manager-port": _free_port(),
             "--metrics-export-port": _free_port(), "--dashboard-agent-listen-port": _free_port(),
             "--dashboard-agent-grpc-port": _free_port(), "--runtime-env-agent-port": _free_port()}
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--num-cpus=4", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats",
                             *[f"{k}={v}" for k, v in ports.items()]],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
        if head.poll() is not None or time.time() > deadline:
            with contextlib.suppress(ProcessLookupError):  # exited already: its stderr says why
                os.killpg(head.pid, signal.SIGKILL)
            kill_processes_under(temp)
            shutil.rmtree(temp, ignore_errors=True)
            return f"exit {head.poll()}: {head.stderr.read()[-3000:]!r}"
        time.sleep(2)
    return head, temp, address, env


@pytest.fixture(scope="module")
def ray_head():
    # A port picked free can be taken before Ray binds it (the suite runs other servers): one
    # more try on fresh ports, and both reasons if that fails too.
    started = _start_head()
    if isinstance(started, str):
        again = _start_head()
        if isinstance(again, str):
            pytest.fail(f"ray head did not come up: {started} / then: {again}")
        started = again
    head, temp, address, env = started
    yield address, env
    os.killpg(head.pid, signal.SIGKILL)  # the head's whole process group, then any straggler of its temp dir
    head.wait()
    kill_processes_under(temp)
    shutil.rmtree(temp, ignore_errors=True)


def submit(address, env, *args) -> tuple[str, str, float]:
    """Submit jobs/pipeline.py the documented way; wait for a terminal state; (state, logs, seconds)."""
    started = time.time()
    job_id = f"aisd-{secrets.token_hex(4)}"
    out = subprocess.run([RAY, "job", "submit", "--address", address, "--no-wait", "--submission-id", job_id,
                          "--runtime-env", "jobs/runtime_env.yaml", "--working-dir", ".", "--",
                          sys.executable, "jobs/pipeline.py", *args],
                         env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    state = ""
    deadline = time.time() + 600
    while time.time() < deadline:
        status = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=env,
                                capture_output=True, text=True).stdout
        found = re.search(rf"Job '{job_id}' (succeeded|failed|stopped)", status)  # Ray 2.60's wording
        if found:
            state = found.group(1).upper()
            break
        time.sleep(2)
    elapsed = time.time() - started
    logs = subprocess.run([RAY, "job", "logs", "--address", address, job_id], env=env,
                          capture_output=True, text=True).stdout
    return state, logs, elapsed


def test_pipeline_job_succeeds_and_leaves_a_savedmodel(ray_head, synthetic_root, tmp_path):
    address, env = ray_head
    output = tmp_path / "out"
    args = ["--config", "aisd_ray/configs/tiny.toml", "--source", str(synthetic_root), "--output", str(output),
            "--images", str(synthetic_root / "test" / "images"), "--set", "train.num_workers=1"]
    state, logs, seconds = submit(address, env, *args)
    assert state == "SUCCEEDED", logs[-4000:]
    for stage in ("stage 1/5: prepare", "stage 2/5: train", "stage 3/5: export", "stage 4/5: evaluate",
                  "stage 5/5: infer", "epoch 2/2  loss "):
        assert stage in logs
    assert logs.count("epoch 2/2  loss ") == 1  # once, not again through Ray's own handler
    assert "TrainingReport(" not in logs  # Ray Train's per-report dicts stay out of the job log
    assert "Collective all_reduce tensors" not in logs and "CollectiveAllReduceStrategy eagerly" not in logs
    assert "(RayTrainWorker pid=" in logs and "\x1b[36m(RayTrainWorker" not in logs  # no colour codes
    for chatter in ("oneDNN custom operations", "cudart_stub", "failed call to cuInit", "absl::InitializeLog"):
        assert chatter not in logs  # TensorFlow's C++ start-up notices, in the driver and every worker
    assert "evaluate on the test split (a Ray task)" in logs  # on a training node, not the head
    print(f"submission to SUCCEEDED: {seconds:.0f} s")
    model = LoadedExport(str(output / "tiny" / "export"))
    assert model.predict(np.zeros((2, 64, 64, 3), np.uint8))["labels"].shape == (2, 64, 64)
    assert len(list((output / "tiny" / "infer").glob("*.png"))) == 8



def test_a_bad_config_fails_the_job_with_the_reason_in_its_logs(ray_head, tmp_path):
    address, env = ray_head
    state, logs, _ = submit(address, env, "--config", "aisd_ray/configs/tiny.toml", "--output", str(tmp_path),
                            "--set", "train.epochs=0")
    assert state == "FAILED"
    assert "aisd-ray pipeline: error:" in logs and "[train] epochs: must be >= 1, got 0" in logs
