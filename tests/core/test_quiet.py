"""No TensorFlow C++ start-up lines without -v, whichever command (and module) loads TensorFlow.

Each command runs as a real subprocess of the console script in an environment without
TF_CPP_MIN_LOG_LEVEL (the test process's conftest sets it), as a user's shell would be."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

AISD_RAY = str(Path(sys.executable).parent / "aisd-ray")
# absl's pre-init notice, glog-style lines (I0000 00:00:... cpu_feature_guard.cc, cudart_stub.cc, ...), oneDNN's
CHATTER = re.compile(r"absl::InitializeLog|^[IWEF]\d{4} \d\d:\d\d:\d\d|oneDNN|cpu_feature_guard|cuInit", re.M)
# What a Ray worker process of a job does: Ray runs the setup hook, then the process imports what it
# uses. The hook itself imports neither TensorFlow nor Ray Data (most worker processes use neither).
RAY_WORKER = """
import logging, sys
from aisd_ray.core.quiet import quiet_worker
quiet_worker()
print(sorted(m for m in ("tensorflow", "keras", "ray.data") if m in sys.modules))
import ray.data.context
print(logging.getLogger("ray.data").getEffectiveLevel() >= logging.WARNING)
import tensorflow
print(tensorflow.constant(2).numpy())
"""


@pytest.fixture(scope="module")
def stderr_of(trained_run, synthetic_root, tmp_path_factory):
    """stderr of export, evaluate, infer and TFRecord prepare without -v, and of prepare with -v,
    all started at once on the tiny run and its export."""
    _, shards, run, export_uri = trained_run
    out = tmp_path_factory.mktemp("quiet")
    tfrecord = ["prepare", "--config", "tiny", "--set", "data.shard_format='tfrecord'",
                "--source", str(synthetic_root)]
    commands = {
        "export": ["export", "--run", run, "--output", str(out / "export")],
        "evaluate": ["evaluate", "--model", export_uri, "--data", shards, "--no-overlays", "--output", str(out / "e")],
        "infer": ["infer", "--model", export_uri, "--images", str(synthetic_root / "test" / "images"),
                  "--no-overlays", "--output", str(out / "masks")],
        "prepare tfrecord": [*tfrecord, "--output", str(out / "tfrecord")],
        "prepare tfrecord -v": ["-v", *tfrecord, "--output", str(out / "tfrecord-v")],
    }
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "AISD_RAY_VERBOSE")}
    procs = {name: subprocess.Popen([AISD_RAY, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, argv in commands.items()}
    procs["ray worker"] = subprocess.Popen([sys.executable, "-c", RAY_WORKER], env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
    done = {name: (proc.communicate(timeout=600), proc.returncode) for name, proc in procs.items()}
    STDOUT.update({name: out for name, ((out, _), _) in done.items()})
    return {name: err for name, ((_, err), code) in done.items() if code == 0 or pytest.fail(f"{name}: {err}")}


STDOUT: dict = {}


@pytest.mark.parametrize("command", ["export", "evaluate", "infer", "prepare tfrecord"])
def test_commands_that_load_tensorflow_print_none_of_its_start_up_lines(stderr_of, command):
    assert not CHATTER.search(stderr_of[command]), stderr_of[command]


def test_verbose_keeps_tensorflows_start_up_lines(stderr_of):
    assert CHATTER.search(stderr_of["prepare tfrecord -v"]), stderr_of["prepare tfrecord -v"]


def test_a_ray_worker_loads_tensorflow_and_ray_data_only_when_used_and_then_quietly(stderr_of):
    """``quiet_worker``, Ray's setup hook in every worker process of a job: it imports nothing (a
    Ray Data read task or a Ray Train helper actor never pays for TensorFlow); a later import of
    Ray Data finds its INFO lines off, and of TensorFlow prints none of its start-up lines."""
    assert STDOUT["ray worker"].split() == ["[]", "True", "2"], STDOUT["ray worker"]
    assert not CHATTER.search(stderr_of["ray worker"]), stderr_of["ray worker"]
