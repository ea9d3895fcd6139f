"""The benchmark's runs that train or serve a model (``aisd_ray.bench.benchmark`` drives them): training
throughput, the compiled step alone, peak memory of short runs in processes of their own,
inference, and the GPU variants. Each returns figures (``measure.figure``)."""

from __future__ import annotations

import copy
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from aisd_ray.bench.gpu_probe import PEAK_FLOPS, flops_per_image
from aisd_ray.bench.measure import Sizes, bench_config, dataset, demo_config, figure, repeat
from aisd_ray.config import Config, builtin_config, load_config
from aisd_ray.core import storage

# --------------------------------------------------------------------------- training


def train_run(cfg: Config, store: str, root: Path, backend: str, workers: int, epochs: int = 3
              ) -> dict[str, Any]:
    """A 3-epoch run (2 in the tiny mode); the last epoch's steady-state figures (the first one
    traces; the second trains while the first epoch's artifacts, matplotlib's first import among
    them, are drawn on the background thread)."""
    from aisd_ray import stages

    cfg = copy.deepcopy(cfg)
    cfg.train.backend, cfg.train.num_workers, cfg.train.epochs = backend, workers, epochs
    cfg.train.epoch_change_infer = False
    cfg.run.name = f"{backend}-{workers}-{cfg.train.mixed_precision}-{int(cfg.train.jit_compile)}"
    out = root / "runs"
    storage.delete(stages.run_uri(cfg, str(out)))
    return stages.train(cfg, store, str(out))


def training(cfg: Config, root: Path, sizes: Sizes) -> list[dict[str, Any]]:
    """Images/s of one config with the local backend, Ray Train with 1 and with 2 workers, and the
    bare compiled step, in interleaved rounds (local, bare, Ray 1 worker; then Ray 2 workers once)
    so that a slow spell of the machine does not land on one side of a ratio."""
    store = dataset(cfg, root, sizes.slices, "parquet")
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {("local", 1): [], ("ray", 1): [], ("ray", 2): []}
    bare = []
    for _ in range(sizes.training_rounds):
        runs["local", 1].append(train_run(cfg, store, root, "local", 1, sizes.epochs))
        bare.append(bare_step(cfg, sizes.slices))
        runs["ray", 1].append(train_run(cfg, store, root, "ray", 1, sizes.epochs))
    runs["ray", 2].append(train_run(cfg, store, root, "ray", 2, sizes.epochs))
    out = []
    for (backend, workers), rows in runs.items():
        threads = max(1, (os.cpu_count() or 1) // workers)  # what each Ray worker gets (ray_train._worker)
        out.append(figure(f"train_{backend}_{workers}w", "images/s", [r["train_images_per_second"] for r in rows],
                          input_wait_fraction=statistics.median(r["input_wait_fraction"] for r in rows),
                          steps_timed=sizes.slices // (cfg.train.batch_size * workers) - 1,
                          threads_per_worker=threads if backend == "ray" else "TensorFlow's default (all cores)"))
    out.append(figure("train_bare_step", "images/s", bare,
                      what="the same model, optimizer and loss in one tf.function on a fixed batch: no input, "
                           "metrics, checkpoints or artifacts (the loop's ceiling)"))
    return out


def bare_step(cfg: Config, slices: int) -> float:
    """Images/s of the compiled train step alone: the loop's own step (``steps.compile_steps``, one
    replica), model, optimizer and loss, on one fixed random batch, after two untimed steps; as many
    steps as an epoch of ``slices``, the totals read once at the end as the loop reads them."""
    import tensorflow as tf

    from aisd_ray.model.flexunet import build_flexunet
    from aisd_ray.model.losses import get_loss
    from aisd_ray.train.loop import set_seed
    from aisd_ray.train.optim import build_optimizer
    from aisd_ray.train.steps import compile_steps

    t, m = cfg.train, cfg.model
    set_seed(t.seed, t.deterministic)
    strategy = tf.distribute.get_strategy()
    model = build_flexunet(m)
    optimizer = build_optimizer(t)
    optimizer.build(model.trainable_variables)
    steps = compile_steps(model, optimizer, strategy, get_loss(t.loss), t.batch_size, m.num_classes, t.jit_compile)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 256, (t.batch_size, m.image_height, m.image_width, m.image_channels)), tf.float32)
    y = tf.one_hot(rng.integers(0, m.num_classes, (t.batch_size, m.image_height, m.image_width)), m.num_classes)
    lr = tf.constant(t.learning_rate, optimizer.learning_rate.dtype)
    for _ in range(2):
        steps.train_step(x, y, lr)
    steps.totals.numpy()
    n = max(1, slices // t.batch_size - 1)  # as many as the loop times in an epoch
    started = time.perf_counter()
    for _ in range(n):
        steps.train_step(x, y, lr)
    steps.totals.numpy()  # the loop reads its totals once, at the end of the epoch
    return n * t.batch_size / (time.perf_counter() - started)


# --------------------------------------------------------------------------- memory


def memory_child(slices: int, workdir: str, tiny: bool) -> None:
    """Run in a subprocess: a short local training run at the demo config; print its peak RSS."""
    cfg = bench_config(True, []) if tiny else demo_config()
    store = dataset(cfg, Path(workdir), slices, "parquet")
    last = train_run(cfg, store, Path(workdir) / f"mem-{slices}", "local", 1, Sizes.for_mode(tiny).epochs)
    print(json.dumps({"peak_rss_mib": _peak_rss_mib(), "epoch_seconds": last["epoch_seconds"]}))


def _peak_rss_mib() -> float:
    """This process's own peak RSS. Linux's ``ru_maxrss`` survives ``exec``: a child started by a
    2 GB parent reports at least 2 GB whatever it uses (the memory figures of earlier runs were
    the benchmark process's own size); ``VmHWM`` belongs to the running program."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(root: Path, sizes: Sizes, tiny: bool) -> list[dict[str, Any]]:
    """Peak RSS and (second) epoch time of short local runs on N, 2N and 4N slices, each in a
    process of its own: memory should stay flat and time grow linearly as the split grows. The
    full mode runs them one at a time, twice; the tiny mode (a check that the section works) runs
    the three side by side, once, so its epoch times are not comparable."""
    counts = (sizes.memory_slices, 2 * sizes.memory_slices, 4 * sizes.memory_slices)
    samples: dict[int, list[dict[str, float]]] = {n: [] for n in counts}

    def child(n: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "aisd_ray.bench.benchmark_runs", "memory-child", str(n),
                                 str(root), "--tiny" if tiny else "--full"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def collect(n: int, proc: subprocess.Popen) -> None:
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"memory child on {n} slices failed (exit {proc.returncode}): {err[-2000:]}")
        samples[n].append(json.loads(out.strip().splitlines()[-1]))

    if tiny:
        for n, proc in [(n, child(n)) for n in counts]:
            collect(n, proc)
    else:
        for n in counts:
            for _ in range(2):
                collect(n, child(n))
    out = []
    for n in counts:
        out.append(figure(f"peak_rss_{n}_slices", "MiB", [c["peak_rss_mib"] for c in samples[n]]))
        out.append(figure(f"epoch_seconds_{n}_slices", "s", [c["epoch_seconds"] for c in samples[n]]))
    return out


# --------------------------------------------------------------------------- inference


def _predict_rate(fn, batch: int, calls: int = 3) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return calls * batch / (time.perf_counter() - started)


def inference(cfg: Config, root: Path, sizes: Sizes) -> list[dict[str, Any]]:
    """Images/s of the exported SavedModel against Keras ``predict`` on the same weights."""
    from aisd_ray.inference.export import LoadedExport, export_model
    from aisd_ray.model.flexunet import build_flexunet

    m = cfg.model
    model = build_flexunet(m)
    export_model(cfg, model, str(root / "export"))
    served = LoadedExport(str(root / "export"), tta=False)  # one forward pass: the signature against Keras
    out = []
    for batch in (1, 8):
        images = np.random.default_rng(0).integers(0, 256, (batch, m.image_height, m.image_width, m.image_channels),
                                                   dtype=np.uint8)
        saved = functools.partial(served.predict, images)
        keras_call = functools.partial(model.predict, images.astype(np.float32), verbose=0)
        out.append(figure(f"infer_savedmodel_b{batch}", "images/s",
                          repeat(functools.partial(_predict_rate, saved, batch), sizes.repeats)))
        out.append(figure(f"infer_keras_predict_b{batch}", "images/s",
                          repeat(functools.partial(_predict_rate, keras_call, batch), sizes.repeats)))
    return out


# --------------------------------------------------------------------------- GPU


def gpu(root: Path, sizes: Sizes, gpus: list[str], tiny: bool) -> dict[str, Any]:
    """The original's AISD 512 config training in float32, bf16 and bf16+XLA, with the fraction of
    peak compute and the share of step time spent waiting for input. Without a GPU the tiny mode
    still runs the three variants on a tiny model (a check of the code path, not a GPU figure)."""
    from aisd_ray.model.flexunet import build_flexunet

    cfg = bench_config(True, []) if tiny else load_config(builtin_config("aisd512"), ["train.num_workers=1"])
    forward = flops_per_image(build_flexunet(cfg.model))
    result: dict[str, Any] = {"config": "tiny" if tiny else "aisd512", "forward_flops_per_image": forward,
                              "train_flops_per_image": 3 * forward,
                              "flops_method": "2*MACs of every Conv2D/Conv2DTranspose; training = 3x forward",
                              "device": gpus[0] if gpus else "CPU"}
    if not gpus and not tiny:
        result["skipped"] = "no GPU visible to TensorFlow on this machine"
        return result
    store = dataset(cfg, root, max(sizes.slices, 64 if gpus else 8), "parquet")
    peak = next((v for k, v in PEAK_FLOPS.items() if gpus and k in gpus[0]), None)
    figures = []
    for precision, jit in (("none", False), ("bf16", False), ("bf16", True)):
        run = copy.deepcopy(cfg)
        run.train.mixed_precision, run.train.jit_compile, run.train.use_gpu = precision, jit, bool(gpus)
        run.train.deterministic = False
        last = train_run(run, store, root, "local", 1, sizes.epochs)
        ips = last["train_images_per_second"]
        entry = figure(f"gpu_train_{precision}{'_xla' if jit else ''}", "images/s", [ips],
                       input_wait_fraction=last["input_wait_fraction"])
        if peak:
            entry["fraction_of_peak"] = ips * 3 * forward / peak["float32" if precision == "none" else "bf16"]
        figures.append(entry)
    result["figures"] = figures
    return result


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "memory-child":
    memory_child(int(sys.argv[2]), sys.argv[3], sys.argv[4] == "--tiny")
