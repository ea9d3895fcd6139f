"""``prepare`` at cohort scale, measured: CT cases per minute read and windowed by 1 and 2 worker
processes, and a no-op ``prepare`` (nothing changed: decided from file stamps) against a full one.

The source is the demo's: synthetic patients as an nnU-Net dataset (``synthetic.layout = "nnunet"``,
the demo's 44 patients of 8 slices at 512x512, model 128 px, three windows); ``tiny``: 12 patients
at 128x128, model 64 px. Every full prepare writes a fresh store; the no-op runs on the last one.
Part of ``aisd-ray benchmark`` (section ``prepare_volumes``), or alone:

    python -m aisd_ray.bench.prepare_cohort --output prepare_cohort.json [--tiny]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from aisd_ray.bench.measure import figure, repeat
from aisd_ray.config import Config, builtin_config, load_config

log = logging.getLogger(__name__)


def cohort_config(tiny: bool, overrides: list[str] = ()) -> Config:
    """The demo config (its CT source and windows), smaller when ``tiny``; the local backend (a
    process pool reads the cases)."""
    small = ["synthetic.num_cases=12", "synthetic.num_test_cases=2", "synthetic.size=128", "model.image_width=64",
             "model.image_height=64"] if tiny else []
    return load_config(builtin_config("demo"), small + ["train.backend='local'", *overrides])


def prepare_volumes(root: Path, tiny: bool, overrides: list[str] = ()) -> list[dict[str, Any]]:
    """Figures: ``prepare_volumes_{1,2}w`` (cases/min of a full prepare with 1 and 2 worker
    processes), ``prepare_volumes_full`` and ``prepare_volumes_noop`` (seconds of a full prepare at
    the default worker count and of a no-op one on its store)."""
    from aisd_ray.data.store.prepare import prepare
    from aisd_ray.stages.data import synthetic_source

    cfg = cohort_config(tiny, overrides)
    source, _ = synthetic_source(cfg, str(root / "cohort"), progress=False)
    cfg.data.source_dir = str(source)
    cases = cfg.synthetic.num_cases
    repeats = 1 if tiny else 2
    runs = itertools.count()
    last: dict[str, str] = {}

    def full(workers: int) -> float:
        cfg.data.prepare_workers = workers
        out = last["store"] = str(root / f"cohort-store-{next(runs)}")
        started = time.perf_counter()
        prepare(cfg, out, progress=False)
        return time.perf_counter() - started

    out = []
    for workers in (1, 2):
        seconds = repeat(lambda w=workers: full(w), repeats, warmup=0)
        out.append(figure(f"prepare_volumes_{workers}w", "cases/min", [cases * 60 / s for s in seconds],
                          cases=cases, slices_per_case=cfg.synthetic.slices_per_case, size=cfg.synthetic.size,
                          workers=workers, what="a full prepare of a CT source (nnU-Net layout): list, read and "
                                                "window every case, write shards and manifest"))
    full_seconds = repeat(lambda: full(0), repeats, warmup=0)
    out.append(figure("prepare_volumes_full", "s", full_seconds, cases=cases, workers="default (CPU count)"))

    def noop() -> float:
        started = time.perf_counter()
        prepare(cfg, last["store"], progress=False)
        return time.perf_counter() - started

    out.append(figure("prepare_volumes_noop", "s", repeat(noop, 5), cases=cases,
                      what="prepare again with nothing changed: source and shards compared by file stamps, "
                           "no volume or shard read"))
    return out


def ratios(figures: list[dict[str, Any]]) -> dict[str, float]:
    med = {f["name"]: f["median"] for f in figures}
    return {"prepare_volumes_2w_over_1w": med["prepare_volumes_2w"] / med["prepare_volumes_1w"],
            "prepare_noop_over_full": med["prepare_volumes_noop"] / med["prepare_volumes_full"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m aisd_ray.bench.prepare_cohort", description=__doc__.split("\n")[0])
    p.add_argument("--output", default="prepare_cohort.json", help="JSON file of figures")
    p.add_argument("--tiny", action="store_true", help="12 small patients (seconds)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import os
    import platform

    with tempfile.TemporaryDirectory(prefix="aisd-bench-prepare-") as tmp:
        figures = prepare_volumes(Path(tmp), args.tiny, args.set)
    report = {"mode": "tiny" if args.tiny else "full", "machine": {"cpu_count": os.cpu_count(),
                                                                   "platform": platform.platform()},
              "prepare_volumes": figures, "ratios": ratios(figures)}
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
