"""``aisd-ray benchmark``: what a run costs on this machine, as one JSON file of figures.

Every figure is measured after a warm-up, repeated, and reported as the median with its
spread (min..max); comparisons are ratios of figures taken side by side in the same run.
Sections: input pipeline, prepare (into a folder and, if given, object storage; from CT volumes at 1
and 2 workers, and a no-op prepare: ``prepare_cohort.py``), memory,
training throughput (local / Ray 1 worker / Ray 2 workers, against the original FlexUNet's
figure), inference (SavedModel against Keras), infer on CT patients (peak memory per added input
voxel, the Ray actor pool against the in-process loop: ``benchmark_infer.py``), and on a GPU the original's AISD 512 config in
float32, bf16 and bf16+XLA.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from aisd_ray.bench import prepare_cohort
from aisd_ray.bench.measure import Sizes, bench_config, dataset, demo_config, figure, repeat, slices_source
from aisd_ray.config import Config
from aisd_ray.core import storage

log = logging.getLogger(__name__)

# The original FlexUNet as measured once, elsewhere: a reference printed with where it came from,
# never divided into a figure of this run (another machine, another day).
ORIGINAL_REFERENCE = {
    "train_images_per_second": 0.87,
    "measured": "Nov 2026 on a 2-vCPU reference machine, not in this run: the original's code unchanged on "
                "Python 3.10 + tensorflow-cpu 2.10, one thread, 512x512x3, base_filters 8, 5 levels, kernels 9, "
                "dilation 3, batch 2",
}


def machine() -> dict[str, Any]:
    import pyarrow
    import ray
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    names = [tf.config.experimental.get_device_details(g).get("device_name", "GPU") for g in gpus]
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "gpus": names, "tensorflow": tf.__version__, "keras": __import__("keras").__version__,
            "ray": ray.__version__, "pyarrow": pyarrow.__version__, "numpy": np.__version__}


# --------------------------------------------------------------------------- data


def prepare_speed(cfg: Config, root: Path, sizes: Sizes, object_store: str | None) -> list[dict[str, Any]]:
    """Slices/s of ``prepare`` (read PNGs, encode, write shards and manifest) into a local folder
    and, when given, an object-store prefix; every repeat writes a fresh store."""
    from aisd_ray.data.store.prepare import prepare

    targets = {"local": str(root / "prepare-speed")} | ({"object_store": object_store} if object_store else {})
    out, runs = [], itertools.count()
    for fmt in ("parquet", "tfrecord"):
        src = slices_source(cfg, root, sizes.prepare_slices, fmt)
        for target, base in targets.items():
            def once(base=base, src=src) -> float:
                started = time.perf_counter()
                manifest = prepare(src, storage.join(base, f"{src.data.shard_format}-{next(runs)}"),
                                   progress=False)
                return sum(e["records"] for e in manifest["splits"].values()) / (time.perf_counter() - started)

            out.append(figure(f"prepare_{fmt}_{target}", "slices/s", repeat(once, sizes.repeats),
                              destination=base.split("://")[0] if "://" in base else "local folder"))
    return out


def _throughput(batches, first: list[float] | None = None) -> float:
    """Images/s of iterating ``batches`` (a fresh iterable); optionally note time to first batch."""
    started = time.perf_counter()
    n = 0
    for x, _ in batches:
        if not n and first is not None:
            first.append(time.perf_counter() - started)
        n += int(x.shape[0])
    return n / (time.perf_counter() - started)


def _naive_load(folder: Path, cfg: Config) -> int:
    """The original's loader: every PNG pair read, nearest-colour mapped, one-hot, all in RAM."""
    from aisd_ray.data.sources import layout

    m = cfg.model
    images, masks = [], []
    for _, image_path, mask_path in layout.pair_by_name(folder / "images", folder / "masks"):
        images.append(layout.read_image(image_path, m.image_channels))
        labels = layout.categorize(layout.read_image(mask_path, 3), cfg.data.rgb_map)
        masks.append(np.eye(m.num_classes, dtype=np.int8)[labels])
    np.stack(masks)
    return len(np.stack(images))


def input_pipeline(cfg: Config, root: Path, sizes: Sizes) -> list[dict[str, Any]]:
    """Decoded training batches per second from each shard format and row encoding through the
    readers training uses, against the original's load-everything approach. Ray Data is read as a
    training worker reads it: the training split's dataset (``train_dataset``), one worker's
    ``streaming_split`` iterator and its epoch stream (``RayEpochs``), epoch after epoch; the first
    epoch is the warm-up, the later ones are timed whole, start-up included."""
    from aisd_ray.data.store import pipeline, shards
    from aisd_ray.data.store.ray_data import RayEpochs, train_dataset
    from aisd_ray.train.ray_session import ensure_ray

    m, batch = cfg.model, cfg.train.batch_size
    ensure_ray(4)
    out = []
    for fmt, encoding in itertools.product(("tfrecord", "parquet"), ("png", "raw")):
        store = dataset(cfg, root, sizes.pipeline_slices, fmt, encoding)
        manifest = shards.read_manifest(store)
        entry = manifest["splits"]["train"]
        name = f"{fmt}{'' if encoding == 'png' else '_raw'}"
        out.append(figure(f"shard_bytes_per_slice_{name}", "bytes",
                          [sum(sh["bytes"] for sh in entry["shards"]) / entry["records"]], row_encoding=encoding))
        rows = pipeline.ShardRows(store, manifest, "train")
        kwargs = {"encoding": encoding, "height": m.image_height, "width": m.image_width}
        direct = functools.partial(pipeline.batches, rows, m.image_channels, m.num_classes, batch, **kwargs)
        out.append(figure(f"input_{name}_direct", "images/s",
                          repeat(lambda f=direct: _throughput(f()), sizes.input_repeats),
                          reader="shard files -> tf.data decode (training on every backend, validation)",
                          row_encoding=encoding, slices=entry["records"]))
        epochs = RayEpochs(train_dataset(cfg, store, manifest).streaming_split(1, equal=True)[0])
        ray_fed = functools.partial(pipeline.batches, epochs.epoch, m.image_channels, m.num_classes, batch, **kwargs)
        first: list[float] = []
        samples = repeat(lambda f=ray_fed, first=first: _throughput(f(), first), sizes.input_repeats)
        epochs.close()
        out.append(figure(f"input_{name}_ray_data", "images/s", samples, row_encoding=encoding, slices=entry["records"],
                          reader="Ray Data read tasks -> a worker's streaming_split iterator, read ahead across "
                                 "epochs -> tf.data decode (train.reader = ray_data); epochs after the first, "
                                 "start-up included"))
        out.append(figure(f"first_batch_{name}_ray_data", "s", first[1:], first_epoch_seconds=first[0],
                          what="time to the first batch of every epoch after the first"))
    # the original's loader holds the whole split in memory: timed on the smaller prepare split
    source = Path(slices_source(cfg, root, sizes.prepare_slices, "parquet").data.source_dir) / "train"

    def naive() -> float:
        started = time.perf_counter()
        return _naive_load(source, cfg) / (time.perf_counter() - started)

    out.append(figure("input_naive_in_memory", "images/s", repeat(naive, sizes.repeats),
                      reader="the original's loader: PIL read, nearest-colour map, one-hot, all in RAM"))
    return out


# --------------------------------------------------------------------------- driver


def _at_size(cfg: Config, size: int) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.model.image_width = cfg.model.image_height = size
    return cfg


def run(output: str, tiny: bool = False, overrides: list[str] = (), object_store: str | None = None
        ) -> dict[str, Any]:
    """Run every section and write the JSON report to ``output``; ``object_store`` (a gs:// prefix)
    adds prepare figures into object storage beside the local ones."""
    from aisd_ray.bench.benchmark_runs import gpu, inference, memory, train_run, training

    sizes = Sizes.for_mode(tiny)
    cfg = bench_config(tiny, list(overrides))
    demo = cfg if tiny else demo_config(list(overrides))
    info = machine()
    report: dict[str, Any] = {"mode": "tiny" if tiny else "full", "machine": info,
                              "training_config": cfg.to_dict()["model"] | {"batch_size": cfg.train.batch_size}}
    seconds: dict[str, float] = {}
    report["section_seconds"] = seconds  # where the benchmark's own time goes

    @contextlib.contextmanager
    def section(name: str, what: str):
        log.info("%s", what)
        started = time.perf_counter()
        yield
        seconds[name] = round(time.perf_counter() - started, 1)

    with tempfile.TemporaryDirectory(prefix="aisd-bench-") as tmp:
        root = Path(tmp)
        with section("input_pipeline", f"input pipeline at {sizes.image} px"):
            report["input_pipeline"] = input_pipeline(_at_size(demo, sizes.image), root, sizes)
        with section("prepare", "prepare throughput"):
            report["prepare"] = prepare_speed(_at_size(demo, sizes.image), root, sizes, object_store)
        with section("prepare_volumes", "prepare from CT volumes: cases/min at 1 and 2 workers, a no-op prepare"):
            report["prepare_volumes"] = prepare_cohort.prepare_volumes(root, tiny, list(overrides))
        with section("memory", "memory: peak RSS of short runs on N, 2N and 4N slices"):
            report["memory"] = memory(root, sizes, tiny)
        with section("training", "training throughput"):
            report["training"] = training(cfg, root, sizes)
            if tiny:  # the demo config is the training config: its local run's figure
                local = next(f for f in report["training"] if f["name"] == "train_local_1w")
                report["demo_worker"] = figure("train_demo_local_1w", "images/s", local["samples"])
            else:
                demo_store = dataset(demo, root, sizes.slices * 2, "parquet")
                demo_run = train_run(demo, demo_store, root, "local", 1)
                report["demo_worker"] = figure("train_demo_local_1w", "images/s", [demo_run["train_images_per_second"]])
        with section("inference", "inference"):
            report["inference"] = inference(cfg, root, sizes)
        with section("infer_cohort", "infer on CT patients: peak memory per voxel, Ray actor pool against in-process"):
            from aisd_ray.bench.benchmark_infer import infer_cohort_speed, infer_memory

            report["infer_cohort"] = infer_memory(root, tiny) + infer_cohort_speed(root, tiny)
        with section("gpu", "GPU"):
            report["gpu"] = gpu(root, sizes, info["gpus"], tiny)
    report["ratios"] = ratios(report)
    report["original_reference"] = ORIGINAL_REFERENCE
    storage.write_text(output, json.dumps(report, indent=2))
    return report


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    def med(section: str, name: str) -> float:
        return next(f["median"] for f in report[section] if f["name"] == name)

    names = [f"{f}{e}" for f in ("tfrecord", "parquet") for e in ("", "_raw")]
    best_input = max(med("input_pipeline", f"input_{n}_ray_data") for n in names)
    demo_consumption = report["demo_worker"]["median"]
    n = report["memory"]
    return {
        **prepare_cohort.ratios(report["prepare_volumes"]),
        **({"prepare_object_store_over_local": med("prepare", "prepare_parquet_object_store")
            / med("prepare", "prepare_parquet_local")}
           if any(f["name"] == "prepare_parquet_object_store" for f in report["prepare"]) else {}),
        "input_ray_data_best_over_naive": best_input / med("input_pipeline", "input_naive_in_memory"),
        "input_ray_data_best_over_demo_worker_consumption": best_input / demo_consumption,
        "parquet_over_tfrecord_ray_data": med("input_pipeline", "input_parquet_ray_data")
        / med("input_pipeline", "input_tfrecord_ray_data"),
        **{f"ray_data_over_direct_{n}": med("input_pipeline", f"input_{n}_ray_data")
           / med("input_pipeline", f"input_{n}_direct") for n in names},
        **{f"raw_over_png_direct_{f}": med("input_pipeline", f"input_{f}_raw_direct")
           / med("input_pipeline", f"input_{f}_direct") for f in ("tfrecord", "parquet")},
        **{f"raw_over_png_bytes_{f}": med("input_pipeline", f"shard_bytes_per_slice_{f}_raw")
           / med("input_pipeline", f"shard_bytes_per_slice_{f}") for f in ("tfrecord", "parquet")},
        "peak_rss_4n_over_n": n[4]["median"] / n[0]["median"],
        "epoch_seconds_2n_over_n": n[3]["median"] / n[1]["median"],
        "epoch_seconds_4n_over_n": n[5]["median"] / n[1]["median"],
        "ray_1_worker_over_local": med("training", "train_ray_1w") / med("training", "train_local_1w"),
        "loop_over_bare_step": med("training", "train_local_1w") / med("training", "train_bare_step"),
        "ray_2_workers_over_local": med("training", "train_ray_2w") / med("training", "train_local_1w"),

        **{f"savedmodel_over_keras_b{b}": med("inference", f"infer_savedmodel_b{b}")
           / med("inference", f"infer_keras_predict_b{b}") for b in (1, 8)},
        **({"infer_ray_pool_over_in_process": med("infer_cohort", "infer_ray_pool_over_in_process"),
            "infer_peak_rss_bytes_per_added_voxel": med("infer_cohort", "infer_peak_rss_per_added_voxel")}
           if "infer_cohort" in report else {}),
    }


def table(report: dict[str, Any]) -> str:
    """The figures as a readable table: name, median, spread, unit."""
    lines = [f"{'figure':<34} {'median':>10} {'min..max':>21}  unit"]
    for section in ("input_pipeline", "prepare", "prepare_volumes", "memory", "training", "inference",
                    "infer_cohort"):
        for f in report.get(section, []):
            lines.append(f"{f['name']:<34} {f['median']:>10.3f} {f['min']:>10.3f}..{f['max']:<10.3f} {f['unit']}")
    f = report["demo_worker"]
    lines.append(f"{f['name']:<34} {f['median']:>10.3f} {'':>21}  {f['unit']}")
    for f in report["gpu"].get("figures", []):
        lines.append(f"{f['name']:<34} {f['median']:>10.3f} {'':>21}  {f['unit']}")
    if "skipped" in report["gpu"]:
        lines.append(f"GPU figures skipped: {report['gpu']['skipped']}")
    lines.append("")
    lines += [f"{k:<48} {v:.3f}" if isinstance(v, float) else f"{k:<48} {v}" for k, v in report["ratios"].items()]
    ref = report.get("original_reference", ORIGINAL_REFERENCE)
    lines += ["", f"reference, not measured here: the original trained {ref['train_images_per_second']} images/s "
                  f"({ref['measured']})"]
    return "\n".join(lines)
