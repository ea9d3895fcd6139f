"""The benchmark's figures of ``infer`` on CT patients (issue 32): peak memory per added input voxel,
and cases per minute through the Ray actor pool against the in-process loop on one machine.

- ``infer_memory``: ``infer`` of one synthetic 512 x 512 DICOM series (0.625 mm slices, the demo's
  windows channels, a small untrained export at the demo's 128 px) in a process of its own, at a
  small and a large slice count; its peak RSS (``VmHWM``: the running program's own, see
  ``benchmark_runs._peak_rss_mib``) at each. The figure is the difference of the peaks over the
  difference of the input voxels: what each added voxel costs beyond the fixed footprint
  (TensorFlow, the export). Default outputs only (mask, summary, preview).
- ``infer_cohort_speed``: the same cohort of synthetic patients (NIfTI) segmented in this process
  and through a pool of Ray actors (``cohort_ray.run_pool``) on a local Ray started first (a
  cluster that is up, as on a real one), alternately, each run into a fresh folder: cases per
  minute of each over the whole command (the actors' start-up, a TensorFlow import and the export
  loaded in each, included) and their ratio, and the ratio after start-up (from the first case's
  completion to the last's: what the pool costs per case).

``python -m aisd_ray.bench.benchmark_infer --output infer.json [--tiny]`` runs these figures alone
(``aisd-ray benchmark`` runs them among the others, section ``infer_cohort``).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aisd_ray.bench.measure import figure

MEMORY_SLICES = (8, 256)  # the small and large series, 512 x 512
MEMORY_SLICES_TINY = (8, 32)
COHORT = (8, 512, 16)  # cases, size, slices per case (full); tiny below
COHORT_TINY = (3, 96, 6)
SIZE = 512


def _export(root: Path) -> str:
    """A small untrained export with the demo's input (128 px, three windows), written once."""
    from aisd_ray.config import builtin_config, load_config
    from aisd_ray.inference.export import export_model
    from aisd_ray.model.flexunet import build_flexunet

    uri = root / "export"
    if not uri.exists():
        cfg = load_config(builtin_config("demo"), ["model.base_filters=4", "model.num_layers=3"])
        export_model(cfg, build_flexunet(cfg.model), str(uri))
    return str(uri)


def _series(root: Path, slices: int, size: int = SIZE) -> Path:
    from aisd_ray.data.synthetic.volumes import synth_volume, write_dicom_series

    folder = root / f"series-{slices}"
    if not folder.exists():
        hu, _, spacing = synth_volume(5, f"40{slices:05d}", size, slices, slice_mm=0.625)
        write_dicom_series(hu, spacing, folder, f"40{slices:05d}", seed=5)
    return folder


def memory_child(export: str, series: str, out: str) -> None:
    """Run in a subprocess: ``infer`` of one series, in this process; print its peak RSS (MiB)."""
    from aisd_ray.bench.benchmark_runs import _peak_rss_mib
    from aisd_ray.inference.infer_volumes import infer_volumes

    started = time.perf_counter()
    infer_volumes(export, series, out, batch_size=4, progress=False)
    print(json.dumps({"peak_rss_mib": _peak_rss_mib(), "seconds": time.perf_counter() - started}))


def infer_memory(root: Path, tiny: bool = False) -> list[dict[str, Any]]:
    """Peak RSS of ``infer`` on a small and a large 512 x 512 series, and the bytes per added input
    voxel between them (module)."""
    export = _export(root)
    small, large = MEMORY_SLICES_TINY if tiny else MEMORY_SLICES
    peaks = {}
    for slices in (small, large):
        series = _series(root, slices)
        proc = subprocess.run([sys.executable, "-m", "aisd_ray.bench.benchmark_infer", "memory-child", export,
                               str(series), str(root / f"mem-out-{slices}")], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"infer memory child on {slices} slices failed (exit {proc.returncode}): "
                               f"{proc.stderr[-2000:]}")
        peaks[slices] = json.loads(proc.stdout.strip().splitlines()[-1])
    per_voxel = (peaks[large]["peak_rss_mib"] - peaks[small]["peak_rss_mib"]) * 2 ** 20 / ((large - small) * SIZE ** 2)
    return [figure(f"infer_peak_rss_{n}_slices", "MiB", [peaks[n]["peak_rss_mib"]], seconds=round(peaks[n]["seconds"], 1),
                   input=f"DICOM series {n} x {SIZE} x {SIZE}, 0.625 mm") for n in (small, large)] + [
        figure("infer_peak_rss_per_added_voxel", "bytes/voxel", [per_voxel], goal="<= 12",
               what=f"(peak at {large} slices - peak at {small}) / ({large - small} x {SIZE} x {SIZE} voxels)")]


def infer_cohort_speed(root: Path, tiny: bool = False, rounds: int = 2) -> list[dict[str, Any]]:
    """Cases per minute of one cohort through the in-process loop and through the Ray actor pool
    (as many actors as ``cohort_ray.default_workers`` gives on this machine), alternately, ``rounds``
    times each (module)."""
    import ray

    from aisd_ray.data.synthetic.volumes import synth_volume, write_nifti_case
    from aisd_ray.inference.cohort_ray import default_workers, run_pool
    from aisd_ray.inference.infer_volumes import infer_volumes
    from aisd_ray.train.ray_session import ensure_ray

    cases, size, slices = COHORT_TINY if tiny else COHORT
    export = _export(root)
    folder = root / f"cohort-{cases}-{size}-{slices}"
    for i in range(cases):
        path = folder / f"41{i:05d}.nii.gz"
        if not path.exists():
            hu, _, spacing = synth_volume(5, path.name[:7], size, slices)
            write_nifti_case(hu, spacing, path)
    ours = not ray.is_initialized()
    ensure_ray(2)
    workers = default_workers(cases)
    rounds = 1 if tiny else rounds
    rates: dict[str, list[float]] = {"in_process": [], "ray_pool": []}
    steady: dict[str, list[float]] = {"in_process": [], "ray_pool": []}
    for r in range(rounds):
        for name, pool in (("in_process", None), ("ray_pool", functools.partial(run_pool, workers))):
            out = root / f"cohort-out-{name}-{r}"
            started = time.perf_counter()
            infer_volumes(export, folder, str(out), batch_size=4, progress=False, pool=pool, redo=True)
            rates[name].append(cases * 60 / (time.perf_counter() - started))
            # after start-up: from the first case's completion to the last's (summary.json written last)
            done = sorted(p.stat().st_mtime for p in out.glob("cases/*/summary.json"))
            steady[name].append((len(done) - 1) * 60 / max(done[-1] - done[0], 1e-6))
    if ours:
        ray.shutdown()
    what = f"{cases} synthetic patients {slices} x {size} x {size} (NIfTI), whole command, export loaded per run"
    after = "from the first case's completion to the last: the pool's start-up (actors importing TensorFlow " \
            "and loading the export) left out"
    return [figure("infer_cases_per_minute_in_process", "cases/min", rates["in_process"], input=what),
            figure("infer_cases_per_minute_ray_pool", "cases/min", rates["ray_pool"], input=what, actors=workers),
            figure("infer_ray_pool_over_in_process", "ratio",
                   [p / i for p, i in zip(rates["ray_pool"], rates["in_process"])], goal=">= 0.9", what=what),
            figure("infer_ray_pool_over_in_process_steady", "ratio",
                   [p / i for p, i in zip(steady["ray_pool"], steady["in_process"])], goal=">= 0.9", what=after)]


def run(output: str, tiny: bool = False) -> dict[str, Any]:
    from aisd_ray.core import storage

    with tempfile.TemporaryDirectory(prefix="aisd-bench-infer-") as tmp:
        report = {"infer_cohort": infer_memory(Path(tmp), tiny) + infer_cohort_speed(Path(tmp), tiny)}
    storage.write_text(output, json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["memory-child"]:
        memory_child(*sys.argv[2:5])
    else:
        parser = argparse.ArgumentParser(prog="python -m aisd_ray.bench.benchmark_infer")
        parser.add_argument("--output", default="benchmark-infer.json")
        parser.add_argument("--tiny", action="store_true")
        args = parser.parse_args()
        print(json.dumps(run(args.output, args.tiny), indent=2))
