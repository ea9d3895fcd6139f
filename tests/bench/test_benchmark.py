"""The benchmark in its tiny mode: every section runs and every figure is in the JSON. No test
asserts a timing (figures on a shared 2-core machine are noise)."""

import json

import pytest

from aisd_ray.cli import main

pytestmark = pytest.mark.slow


SECTIONS = ("input_pipeline", "prepare", "prepare_volumes", "memory", "training", "inference", "infer_cohort")


def test_tiny_benchmark_writes_every_figure(tmp_path, capsys, gcs_emulator):
    out = tmp_path / "bench.json"
    assert main(["benchmark", "--tiny", "--output", str(out), "--object-store", "gs://aisd/bench"]) == 0
    report = json.loads(out.read_text())
    names = {f["name"] for section in SECTIONS for f in report[section]}
    assert {"input_tfrecord_direct", "input_parquet_direct", "input_tfrecord_ray_data", "input_parquet_ray_data",
            "input_tfrecord_raw_direct", "input_parquet_raw_direct", "input_parquet_raw_ray_data",
            "shard_bytes_per_slice_parquet", "shard_bytes_per_slice_parquet_raw", "first_batch_parquet_raw_ray_data",
            "first_batch_parquet_ray_data", "input_naive_in_memory", "train_local_1w", "train_ray_1w",
            "train_ray_2w", "train_bare_step", "infer_savedmodel_b1", "infer_keras_predict_b8", "prepare_parquet_local",
            "prepare_tfrecord_local", "prepare_parquet_object_store", "prepare_tfrecord_object_store",
            "prepare_volumes_1w", "prepare_volumes_2w", "prepare_volumes_full", "prepare_volumes_noop",
            "infer_peak_rss_per_added_voxel", "infer_cases_per_minute_in_process", "infer_cases_per_minute_ray_pool",
            "infer_ray_pool_over_in_process", "infer_ray_pool_over_in_process_steady"} <= names
    first = next(f for f in report["input_pipeline"] if f["name"] == "first_batch_parquet_ray_data")
    assert first["first_epoch_seconds"] > 0  # the first epoch apart from the later ones' start-up
    assert len([n for n in names if n.startswith("peak_rss_")]) == 3  # N, 2N, 4N slices
    assert len([n for n in names if n.startswith("epoch_seconds_")]) == 3
    for section in SECTIONS:
        for f in report[section]:
            assert f["unit"] and f["min"] <= f["median"] <= f["max"] and f["median"] > 0
    assert {"cpu_count", "gpus", "tensorflow", "ray"} <= set(report["machine"])
    assert set(report["section_seconds"]) == {*SECTIONS, "gpu"}
    gpu = report["gpu"]
    assert gpu["forward_flops_per_image"] > 0
    # the float32 / bf16 / bf16+XLA variants run (on a tiny model when there is no GPU)
    assert [f["name"] for f in gpu["figures"]] == ["gpu_train_none", "gpu_train_bf16", "gpu_train_bf16_xla"]
    assert all(f["median"] > 0 and 0 <= f["input_wait_fraction"] < 1 for f in gpu["figures"])
    for key in ("input_ray_data_best_over_naive", "prepare_object_store_over_local", "peak_rss_4n_over_n",
                "epoch_seconds_4n_over_n", "ray_data_over_direct_parquet_raw", "raw_over_png_direct_parquet",
                "raw_over_png_bytes_tfrecord", "ray_1_worker_over_local", "loop_over_bare_step",
                "savedmodel_over_keras_b1", "savedmodel_over_keras_b8", "prepare_volumes_2w_over_1w",
                "prepare_noop_over_full", "infer_ray_pool_over_in_process",
                "infer_peak_rss_bytes_per_added_voxel"):
        assert report["ratios"][key] > 0
    # the original's figure, taken elsewhere, is a reference with its source, never a ratio of this run
    assert not any("original" in key for key in report["ratios"])
    assert report["original_reference"]["measured"].startswith("Nov 2026")
    out = capsys.readouterr().out
    assert "train_ray_2w" in out and "reference, not measured here: the original trained 0.87 images/s" in out


def test_flops_count_matches_hand_count():
    from aisd_ray.bench.gpu_probe import flops_per_image
    from aisd_ray.config import ModelConfig
    from aisd_ray.model.flexunet import build_flexunet

    cfg = ModelConfig(image_width=8, image_height=8, image_channels=1, base_filters=2, num_layers=2,
                      base_kernels=(3, 3), num_classes=2)
    # enc0: 3x3 1->2, 2->2 at 8x8; enc1: 3x3 2->4, 4->4 at 4x4; up: 2x2 4->2 scattered from 4x4;
    # dec0: 3x3 4->2, 2->2 at 8x8; head 1x1 2->2 at 8x8
    macs = 64 * 9 * (1 * 2 + 2 * 2) + 16 * 9 * (2 * 4 + 4 * 4) + 16 * 4 * 4 * 2 + 64 * 9 * (4 * 2 + 2 * 2) + 64 * 2 * 2
    assert flops_per_image(build_flexunet(cfg)) == 2 * macs
