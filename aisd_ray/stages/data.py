"""synthesize and prepare: a source in, a shard store out; and the demo's synthetic source."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

from aisd_ray.config import VOLUME_LAYOUTS, Config, ConfigError
from aisd_ray.core import storage
from aisd_ray.data.store.prepare import prepare as prepare_store
from aisd_ray.data.store.parallel import local_map

log = logging.getLogger(__name__)


def synthesize(cfg: Config, output: str, as_zip: bool = False, progress: bool = True) -> Path:
    """Write ``synthetic.layout`` under ``output``; return the folder ``prepare`` takes. ``as_zip``:
    the raw layout as ``image.zip``/``mask.zip``."""
    from aisd_ray.data.synthetic.layouts import write_synthetic

    return write_synthetic(output, cfg.synthetic, as_zip=as_zip, progress=progress)


def prepare(cfg: Config, progress: bool = True, verify: bool = False) -> dict[str, Any]:
    """``data.source_dir`` (or ``data.split_dirs``) into the shard store ``data.shards_dir``; its
    manifest. ``verify``: read every shard of an existing store (``prepare --verify``)."""
    if not cfg.data.shards_dir:
        raise ConfigError("give --output or data.shards_dir")
    return prepare_store(cfg, cfg.data.shards_dir, progress=progress, verify=verify, map=case_map(cfg))


def case_map(cfg: Config):
    """How ``prepare`` reads and windows a volume source's cases: with ``train.backend`` "ray", Ray
    tasks when this process is on a Ray cluster already or RAY_ADDRESS names one (a job, the
    pipeline; looked at only once there is a case to read: a no-op prepare touches no Ray), so the
    cluster counts their CPUs; else None (a process pool of ``data.prepare_workers``: no Ray is
    started for them alone). The tasks run on this node: the source (or its copy from a bucket)
    and the slices they write lie on its disk; a node without CPUs for tasks (a cluster's head kept
    free) uses the process pool. At most twice the node's CPUs in tasks are in flight; a refused
    case ends the map once those have finished (none is cancelled: see ``ray_map``), and the
    cases after them are never started."""
    if cfg.train.backend != "ray":
        return None

    def ray_map(fn, items):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from aisd_ray.train.ray_session import ensure_ray

        items = list(items)
        if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
            yield from local_map(cfg.data.prepare_workers)(fn, items)  # no Ray started for this alone
            return
        ensure_ray(cfg.train.num_workers + 2)
        node = ray.get_runtime_context().get_node_id()
        cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
        if cpus < 1:
            yield from local_map(cfg.data.prepare_workers)(fn, items)  # a head node kept free of tasks
            return
        here = NodeAffinitySchedulingStrategy(node, soft=False)
        task = ray.remote(num_cpus=1, max_retries=0)(_apply).options(scheduling_strategy=here)
        window = 2 * int(cpus)  # tasks in flight: the node's CPUs kept busy while the cases are taken in order
        pending = deque(task.remote(fn, item) for item in items[:window])
        try:
            for i in range(len(items)):  # in case order, whatever order they finish in
                ref = pending.popleft()
                if i + window < len(items):
                    pending.append(task.remote(fn, items[i + window]))
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # a case refused: its one line, not Ray's traceback
                    raise exc.cause from None
        finally:
            # the tasks in flight are let finish, never cancelled: ray.cancel of a running task can end
            # this process (Ray 2.60: "Check failed: it != submissible_tasks_.end()", a race with the
            # task's reply, ray-project/ray#54798; it killed a test process); the window keeps them few
            if pending:
                ray.wait(list(pending), num_returns=len(pending))

    return ray_map


def _apply(fn, item):
    """One case's task (``case_map``): Ray takes plain functions only, not a partial."""
    return fn(item)


# where each synthetic layout's source lies under the demo's source folder
_SYNTHETIC_FOLDERS = {"raw": "release", "original": "AISD", "nnunet": "Dataset001_AISDSynthetic", "dicom": "dicom"}


def synthetic_source(cfg: Config, root: str, progress: bool) -> tuple[Path, Path]:
    """The demo's synthetic AISD-like source (``synthetic.layout``), written once per [synthetic]
    settings, and what its last stage segments: one test patient's slices (raw layout), the test
    images (original layout), or one test patient as a DICOM series (volume layouts). Source files
    are local input: in ``root`` for a folder, in a temp folder when the outputs go to gs://."""
    from aisd_ray.data.synthetic.layouts import write_synthetic
    from aisd_ray.data.synthetic.slices import synthetic_case_ids, synthetic_test_cases

    wanted = json.dumps(cfg.to_dict()["synthetic"], sort_keys=True)
    if storage.is_local(root):
        source = Path(storage.resolve(root)[1]) / "source"
    else:
        digest = hashlib.sha256(wanted.encode()).hexdigest()[:12]
        source = Path(tempfile.gettempdir()) / f"aisd-ray-synthetic-{digest}"
    marker = source / "synthetic.json"
    layout = cfg.synthetic.layout
    patient = synthetic_test_cases(cfg.synthetic)[:1] or synthetic_case_ids(cfg.synthetic)[:1]
    infer_input = {"raw": source / "release" / "image" / synthetic_case_ids(cfg.synthetic)[0],
                   "original": source / "AISD" / "test" / "images"}.get(layout, source / "patient" / patient[0])
    if not (marker.is_file() and marker.read_text() == wanted):
        log.info("writing synthetic AISD-like %s (%s layout) to %s", "slices" if layout == "original" else "cases",
                 layout, source)
        if source.exists():
            shutil.rmtree(source)  # another [synthetic] setting's files must not mix in
        write_synthetic(source / "release" if layout == "raw" else source, cfg.synthetic, progress=progress)
        if layout in VOLUME_LAYOUTS:  # the patient the last stage segments, as a scanner gives it
            from aisd_ray.data.synthetic import volumes as synthetic_volumes

            synthetic_volumes.write_patient_series(infer_input, cfg.synthetic, patient[0])
        marker.write_text(wanted)
    return source / _SYNTHETIC_FOLDERS[layout], infer_input
