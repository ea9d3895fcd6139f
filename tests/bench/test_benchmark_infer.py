"""The infer rows of the benchmark in their tiny mode: each figure is there, and the bytes per added
voxel is the peaks' difference over the voxels' (recomputed here from the two peaks). No timing is
asserted (figures on a shared 2-core machine are noise)."""

import json

import pytest

from aisd_ray.bench import benchmark_infer

pytestmark = pytest.mark.slow


def test_the_infer_rows_in_tiny_mode(tmp_path, capsys):
    report = benchmark_infer.run(str(tmp_path / "infer.json"), tiny=True)
    assert json.loads((tmp_path / "infer.json").read_text()) == report
    rows = {f["name"]: f for f in report["infer_cohort"]}
    small, large = benchmark_infer.MEMORY_SLICES_TINY
    peaks = [rows[f"infer_peak_rss_{n}_slices"]["median"] for n in (small, large)]
    voxels = (large - small) * benchmark_infer.SIZE ** 2
    assert rows["infer_peak_rss_per_added_voxel"]["median"] == pytest.approx((peaks[1] - peaks[0]) * 2 ** 20 / voxels)
    pool, local = rows["infer_cases_per_minute_ray_pool"], rows["infer_cases_per_minute_in_process"]
    assert pool["median"] > 0 and local["median"] > 0 and pool["actors"] >= 1
    assert rows["infer_ray_pool_over_in_process"]["median"] == pytest.approx(pool["median"] / local["median"])
    assert rows["infer_ray_pool_over_in_process_steady"]["median"] > 0
