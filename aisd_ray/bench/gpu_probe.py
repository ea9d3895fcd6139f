"""The FlexUNet's GPU cost under plain Keras 3, on whatever backend Keras runs (JAX on a GPU machine
without TensorFlow): ``python -m aisd_ray.bench.gpu_probe --output gpu.json`` or ``aisd-ray gpu-probe``.

It trains the model of a config (default: the original's AISD 512 config) on random batches for
a few timed steps per (precision, batch size) and reports images/s, milliseconds per step and,
on a GPU it knows, the fraction of the device's dense peak (training FLOPs = 3x the forward
convolutions' 2*MACs). It measures the architecture's cost under Keras on that backend, not this
project's TensorFlow training path (no tf.data, no MultiWorkerMirroredStrategy): an upper bound on
what a GPU worker can consume, for sizing the input pipeline and the infra cost notes.

Imports neither TensorFlow nor Ray (only Keras, NumPy and this package's config and model), so
it runs where only ``keras`` and its pure-Python dependencies were carried.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from aisd_ray.config import builtin_config, load_config

# Dense peak tensor throughput (FLOP/s) by GPU name, for the fraction-of-peak figure.
PEAK_FLOPS = {"H100": {"float32": 67e12, "bf16": 989e12}, "H200": {"float32": 67e12, "bf16": 989e12},
              "A100": {"float32": 19.5e12, "bf16": 312e12}, "L4": {"float32": 30e12, "bf16": 121e12},
              "T4": {"float32": 8.1e12, "bf16": 65e12}}
PRECISIONS = {"float32": "float32", "bf16": "mixed_bfloat16"}


def flops_per_image(model) -> float:
    """Forward FLOPs of one image: 2 * MACs of every convolution (transpose included).
    Training costs about 3x this (forward, and backward for inputs and weights)."""
    total = 0.0
    for layer in model.layers:
        if layer.__class__.__name__ in ("Conv2D", "Conv2DTranspose"):
            kh, kw, cin, cout = layer.kernel.shape
            if layer.__class__.__name__ == "Conv2DTranspose":
                kh, kw, cout, cin = layer.kernel.shape
                h, w = layer.input.shape[1:3]  # each input pixel scatters a kh x kw kernel
            else:
                h, w = layer.output.shape[1:3]
            total += 2.0 * h * w * kh * kw * cin * cout
    return total


def device_name() -> str:
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return device.device_kind if device.platform != "cpu" else "CPU"
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else "CPU"
    return "CPU"


def _time_steps(model, batch: int, steps: int, warmup: int, rng: np.random.Generator) -> float:
    """Seconds per training step at ``batch``, after ``warmup`` steps (tracing and compiling)."""
    _, h, w, c = model.input_shape
    classes = model.output_shape[-1]
    x = rng.integers(0, 256, (batch, h, w, c)).astype(np.float32)
    y = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, (batch, h, w))]
    for _ in range(warmup):
        model.train_on_batch(x, y)
    started = time.perf_counter()
    for _ in range(steps):
        loss = model.train_on_batch(x, y)  # returns a host value: each step has finished
    seconds = (time.perf_counter() - started) / steps
    if not np.isfinite(np.asarray(loss, np.float64)).all():
        raise FloatingPointError(f"non-finite loss {loss}")
    return seconds


def probe(config: str = "aisd512", overrides: tuple[str, ...] = (), batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
          precisions: tuple[str, ...] = ("float32", "bf16"), steps: int = 10, warmup: int = 3,
          seed: int = 0) -> dict[str, Any]:
    import keras

    from aisd_ray.model.flexunet import build_flexunet

    cfg = load_config(builtin_config(config) if config in ("aisd512", "demo", "tiny") else config, list(overrides))
    device = device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in device), None)
    forward = flops_per_image(build_flexunet(cfg.model))
    rng = np.random.default_rng(seed)
    figures = []
    for precision in precisions:
        keras.utils.set_random_seed(seed)
        model = build_flexunet(cfg.model, dtype=PRECISIONS[precision])
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy")
        for batch in batch_sizes:
            entry: dict[str, Any] = {"precision": precision, "batch_size": batch}
            try:
                seconds = _time_steps(model, batch, steps, warmup, rng)
            except Exception as exc:  # out of memory at this batch, most often: recorded, the probe goes on
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            else:
                entry.update(ms_per_step=1000 * seconds, images_per_second=batch / seconds)
                if peak:
                    entry["fraction_of_peak"] = batch / seconds * 3 * forward / peak[precision]
            figures.append(entry)
            print(json.dumps(entry), flush=True)
        keras.backend.clear_session()
    return {
        "what": "the FlexUNet's training step under Keras on this backend (random batches), not the TensorFlow "
                "training path: an upper bound on what one GPU worker consumes",
        "config": config, "overrides": list(overrides),
        "image": [cfg.model.image_height, cfg.model.image_width, cfg.model.image_channels],
        "parameters": int(build_flexunet(cfg.model).count_params()),
        "forward_flops_per_image": forward, "train_flops_per_image": 3 * forward,
        "flops_method": "2*MACs of every Conv2D/Conv2DTranspose; training = 3x forward",
        "backend": keras.backend.backend(), "keras": keras.__version__, "device": device,
        "peak_flops": peak, "python": platform.python_version(), "steps": steps, "warmup": warmup,
        "figures": figures,
    }


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="aisd512", help="a shipped config's name or a TOML file "
                        "(default: %(default)s, the original's AISD 512 model)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--tiny", action="store_true", help="the tiny config, batch sizes 1,2, 2 steps: a check that "
                        "runs in seconds on a CPU")
    parser.add_argument("--batch-sizes", type=_ints, default=(1, 2, 4, 8), metavar="N,N,...",
                        help="batch sizes to time (default: 1,2,4,8)")
    parser.add_argument("--precisions", default="float32,bf16", help="float32 and/or bf16 (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting (default: %(default)s)")
    parser.add_argument("--output", default="gpu_probe.json", help="JSON file of figures (default: %(default)s)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"--precisions: unknown {', '.join(unknown)} (known: {', '.join(PRECISIONS)})")
    if args.tiny:
        report = probe("tiny", tuple(args.set), (1, 2), precisions, steps=2, warmup=1)
    else:
        report = probe(args.config, tuple(args.set), args.batch_sizes, precisions, steps=args.steps)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{report['device']} ({report['backend']}): figures in {os.path.abspath(args.output)}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aisd_ray.bench.gpu_probe", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
