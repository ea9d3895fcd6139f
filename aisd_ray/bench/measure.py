"""What the benchmark's sections share (``benchmark.py`` drives them, ``benchmark_runs.py`` runs the
models): the sizes of a mode, a figure from repeated samples, the benchmark's configs and its
synthetic shard stores. Below both, so that neither imports the other for them."""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aisd_ray.config import Config, builtin_config, load_config

# what the benchmark reads: synthetic slices in the original's PNG tree, one window as grey
PNG_INPUT = ["data.channels='grey'", "data.windows=[[40.0, 80.0]]"]
ORIGINAL_CONFIG = ["model.image_width=512", "model.image_height=512", "model.base_filters=8",
                   "model.num_layers=5", "model.base_kernels=[9, 9]", "model.dilation=[3, 3]",
                   "model.input_normalize=false", "train.batch_size=2", "train.loss='ce'"]


@dataclass
class Sizes:
    slices: int  # training slices for throughput runs
    image: int  # input-pipeline image size
    pipeline_slices: int  # the input pipeline's training split: steady state, not start-up
    prepare_slices: int
    repeats: int
    memory_slices: int
    input_repeats: int  # passes over the input split per reader (seconds each: cheap, and noisy)
    training_rounds: int  # interleaved rounds of training runs (a minute each at 512 px)
    epochs: int = 3  # per training run: the last one's steady-state figures (the first traces)

    @classmethod
    def for_mode(cls, tiny: bool) -> "Sizes":
        return cls(8, 64, 16, 16, 1, 8, 1, 1, epochs=2) if tiny else cls(24, 512, 1024, 96, 3, 48, 5, 3)


def figure(name: str, unit: str, samples: list[float], **extra: Any) -> dict[str, Any]:
    return {"name": name, "unit": unit, "median": statistics.median(samples), "min": min(samples),
            "max": max(samples), "samples": samples, **extra}


def repeat(fn: Callable[[], float], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(repeats)]


def slices_source(cfg: Config, root: Path, slices: int, fmt: str) -> Config:
    """A copy of ``cfg`` reading synthetic slices at the model size, written once per (slices, size)."""
    from aisd_ray.data.synthetic.slices import write_synthetic_aisd

    size = cfg.model.image_height
    source = root / f"source-{slices}-{size}"
    if not source.exists():
        synth = copy.deepcopy(cfg.synthetic)
        synth.num_train, synth.num_valid, synth.num_test, synth.size = slices, max(2, slices // 8), 2, size
        write_synthetic_aisd(source, synth, progress=False)
    cfg = copy.deepcopy(cfg)
    cfg.data.source_dir, cfg.data.shard_format, cfg.data.split_dirs = str(source / "AISD"), fmt, {}
    return cfg


def dataset(cfg: Config, root: Path, slices: int, fmt: str, encoding: str | None = None) -> str:
    """Synthetic slices at the model size, sharded once per (slices, size, format, row encoding)."""
    from aisd_ray.data.store.prepare import prepare

    src = slices_source(cfg, root, slices, fmt)
    src.data.row_encoding = encoding or cfg.data.row_encoding
    out = str(root / f"shards-{slices}-{cfg.model.image_height}-{fmt}-{src.data.row_encoding}")
    prepare(src, out, progress=False)
    return out


def demo_config(overrides: list[str] = ()) -> Config:
    """The demo config on the benchmark's input, the original's PNG slices: one brain window as grey
    (``PNG_INPUT``), whatever channel mode the demo's CT volumes take."""
    return load_config(builtin_config("demo"), PNG_INPUT + list(overrides))


def bench_config(tiny: bool, overrides: list[str]) -> Config:
    """Training figures use the original's identical config (tiny: a 64 px, 3-level model)."""
    base = ["model.image_width=64", "model.image_height=64", "model.num_layers=3", "model.base_filters=4",
            "model.base_kernels=[3, 3]", "model.dilation=[1, 1]", "train.batch_size=2"] if tiny else ORIGINAL_CONFIG
    return demo_config(base + list(overrides))
