"""Helpers shared by test modules (one home each): the vendored body CT, the LPS -> RAS matrix, a
rigid RAS transform, the one-line read refusal, a head with a lesion block, and the threshold test
doubles of a loaded export, a copy of an export that records other facts, and a real export that
predicts lesion everywhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

# a real abdomen/pelvis CT (tests/data/README.md): the non-head CT the QA gate's coverage check flags
BODY_CT = Path(__file__).parent / "data" / "totalsegmentator_example_ct.nii.gz"

# the reader tests' synthetic head (tests/data/conftest.py: ``case``, ``control``): 64 px, 8 slices
HEAD_SIZE, HEAD_SLICES = 64, 8

# DICOM's LPS world to NIfTI's RAS world (x and y flipped), as a 4 x 4 affine
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def rigid(degrees, axis, shift):
    """A RAS world transform: a rotation by ``degrees`` about ``axis``, then a shift (mm)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(degrees)
    out = np.eye(4)
    out[:3, :3] = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k
    out[:3, 3] = shift
    return out


def refused(path, match):
    """The VolumeError ``read_volume`` raises for ``path``: one line, naming the path, a DataError."""
    from aisd_ray.data.sources.layout import DataError
    from aisd_ray.data.sources.volume import VolumeError, read_volume

    with pytest.raises(VolumeError, match=match) as info:
        read_volume(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value, DataError)
    return str(info.value)


def head_with_block():
    """(HU (7, 80, 72) int16, truth bool): air, a 36 HU head, an 86 HU block on slices 2..4 (even
    values: a series of it may be stored with RescaleSlope 2)."""
    hu = np.full((7, 80, 72), -1000, np.int16)
    hu[:, 8:72, 6:66] = 36
    truth = np.zeros(hu.shape, bool)
    truth[2:5, 20:40, 30:50] = True
    hu[truth] = 86
    return hu, truth


def layer_ml(truth, spacing) -> float:
    """One in-plane voxel layer around the lesion, in mL: the tolerance of a resize to the model and back."""
    from scipy import ndimage

    from aisd_ray.scoring.volume_metrics import volume_ml

    return volume_ml(ndimage.binary_dilation(truth, np.ones((1, 3, 3))) & ~truth, spacing)


class Probabilities:
    """What a SavedModel's output tensor offers the caller: ``numpy()``."""

    def __init__(self, array):
        self._array = array

    def numpy(self):
        return self._array


class ThresholdModel:
    """A test double of a loaded export: lesion wherever channel 0, through ``windows[0]``, is brighter
    than ``threshold`` grey. Here the window (level 80, width 20) makes only the test lesion's 86 HU
    bright."""

    height = width = 64
    channels = 3
    windows = [(80.0, 20.0)]
    threshold = 127

    def lesion(self, grey):
        return grey > self.threshold

    def predict(self, batch):
        lesion = self.lesion(np.asarray(batch)[..., 0]).astype(np.float32)
        return {"probabilities": Probabilities(np.stack([1 - lesion, lesion], axis=-1))}


def copy_export(export_uri, to: Path, **changes) -> str:
    """A copy of the export at ``to`` whose export.json has ``changes`` (a value None: the key left
    out, as an export written before it was recorded)."""
    from aisd_ray.inference.export import INFO

    shutil.copytree(export_uri, to)
    info = json.loads((to / INFO).read_text())
    info.update(changes)
    (to / INFO).write_text(json.dumps({k: v for k, v in info.items() if v is not None}))
    return str(to)


def same_volume(found, control):
    """``found`` (a Volume) holds ``control``'s HU, spacing, origin and direction."""
    np.testing.assert_array_equal(found.hu, control.hu)
    assert found.spacing == pytest.approx(control.spacing, rel=1e-6)
    assert found.canonical_geometry.origin == pytest.approx(control.canonical_geometry.origin, abs=1e-4)
    assert found.canonical_geometry.direction == pytest.approx(control.canonical_geometry.direction, abs=1e-6)


def lesion_everywhere_export(cfg, to: Path) -> str:
    """A real export (SavedModel, reloaded by ``LoadedExport``) of ``cfg``'s untrained FlexUNet whose
    output layer predicts lesion at every pixel (its kernel zero, its bias 10 for class 1 and -10 for
    background): what a step after the network leaves of it is then that step's own mask."""
    from aisd_ray.inference.export import export_model
    from aisd_ray.model.flexunet import build_flexunet

    model = build_flexunet(cfg.model)
    head = model.get_layer("head")
    kernel, bias = head.get_weights()
    head.set_weights([np.zeros_like(kernel), np.array([-10.0] + [10.0] * (len(bias) - 1), bias.dtype)])
    return export_model(cfg, model, str(to))


def no_case_outputs(out: Path, reason: str) -> bool:
    """``out`` (an ``infer --input`` folder) holds no mask and no case folder, and every row of its
    cases.csv is refused with its reason inside ``reason`` (the command's error line)."""
    import csv

    rows = list(csv.DictReader((out / "cases.csv").open()))
    no_masks = not list(out.glob("*.nii.gz"))
    no_cases = not (out / "cases").exists() or not any((out / "cases").iterdir())
    return no_masks and no_cases and bool(rows) and all(
        r["status"] == "refused" and r["error"] and r["error"] in reason for r in rows)


def kill_when_cases_done(cmd: list[str], env: dict[str, str], out: Path, cases: int, timeout: float) -> set[str]:
    """Run ``cmd`` (an ``infer --input`` command line writing into ``out``) as a process of its own, kill
    it (SIGKILL) as soon as ``cases`` cases are complete (their summary.json written), or at ``timeout``
    seconds; the complete cases' IDs."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(list(out.glob("cases/*/summary.json"))) >= cases:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {p.parent.name for p in out.glob("cases/*/summary.json")}


def join_test_cluster(address: str, **env: str) -> None:
    """``ray.init`` this test process on the local test cluster at ``address``: driver logs off, the
    workers given RAY_ADDRESS, quiet TensorFlow, the local Ray's environment (``local_ray_env``: Ray
    Train's preemption watcher off on one host) and ``env``, and the quiet worker set-up hook."""
    import ray

    from aisd_ray.train.ray_session import local_ray_env

    ray.init(address=address, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_ADDRESS": address, "TF_CPP_MIN_LOG_LEVEL": "2", **env, **local_ray_env()},
                          "worker_process_setup_hook": "aisd_ray.core.quiet.quiet_worker"})


def leave_test_cluster(cluster, temp: str) -> None:
    """Tear down what ``join_test_cluster`` joined: this process's Ray, the ``cluster`` (a
    ``ray.cluster_utils.Cluster`` or None) and every process still running under its ``temp`` folder,
    which is then removed (a process that was dying may still write into it: three tries)."""
    import os
    import shutil
    import time

    import ray

    from tests.conftest import kill_processes_under

    ray.shutdown()
    if cluster is not None:
        try:
            cluster.shutdown()
        except Exception:  # noqa: BLE001 - whatever is left is killed by PID below
            pass
    for _ in range(3):
        kill_processes_under(temp)
        shutil.rmtree(temp, ignore_errors=True)
        if not os.path.exists(temp):
            break
        time.sleep(1)


def ray_worker_pids(title: str, temp: str) -> list[int]:
    """PIDs of the Ray worker processes whose title (``ray::CaseWorker.run`` while an actor runs that
    method) starts with ``title``, of the test cluster whose raylets were started under ``temp``
    only (the other test process's Ray may run the same actors)."""
    from pathlib import Path

    def processes():
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                yield int(proc.name), ppid, cmd

    listed = list(processes())
    raylets = {pid for pid, _, cmd in listed if "raylet" in cmd.split(" ")[0] and temp in cmd}
    return [pid for pid, ppid, cmd in listed if cmd.startswith(title) and ppid in raylets]
