"""data.channels: a CT volume's slices as grey, with their neighbours, through three windows, or
beside their mirror about the head's midline; the midline found from the head; prepare and infer
building the same channels; bad settings refused by key."""

import numpy as np
import pytest
from scipy import ndimage

from aisd_ray.config import ConfigError, builtin_config, load_config
from aisd_ray.data.ct.channels import build_channels, midline, mirror
from aisd_ray.data.ct.windows import window
from aisd_ray.data.sources.layout import DataError
from aisd_ray.data.store.prepare import prepare
from aisd_ray.data.store.shards import iter_records, record_to_arrays
from aisd_ray.data.synthetic.layouts import write_synthetic
from aisd_ray.data.synthetic.slices import Head
from aisd_ray.data.synthetic.volumes import Tissue, synth_hu_slice
from tests.conftest import volume_config

BRAIN = [(40.0, 80.0)]


def test_grey_is_the_window_as_before_and_neighbours_are_the_slices_below_and_above():
    hu = (np.arange(5, dtype=np.int16)[:, None, None] * 15 + np.zeros((5, 8, 6), np.int16))  # slice k: 15k HU
    hu[2, 3, 4] = -1000
    assert np.array_equal(build_channels(hu, "grey", BRAIN, 3), window(hu, BRAIN, 3))
    assert np.array_equal(build_channels(hu, "grey", BRAIN, 1), window(hu, BRAIN, 1))
    grey = window(hu, BRAIN, 1)[..., 0]
    out = build_channels(hu, "neighbours", BRAIN + [(40.0, 400.0)])  # the first window only
    assert out.shape == (5, 8, 6, 3) and out.dtype == np.uint8
    for k in range(5):
        assert np.array_equal(out[k, ..., 0], grey[max(k - 1, 0)])
        assert np.array_equal(out[k, ..., 1], grey[k])
        assert np.array_equal(out[k, ..., 2], grey[min(k + 1, 4)])
    assert out[0, 0, 0].tolist() == [0, 0, 48] and out[4, 0, 0].tolist() == [143, 191, 191]  # edges repeat
    with pytest.raises(ValueError, match="makes 3 channels; the model takes 1"):
        build_channels(hu, "neighbours", BRAIN, 1)
    with pytest.raises(ValueError, match="must be one of"):
        build_channels(hu, "rainbow", BRAIN)


def test_windows_put_one_window_in_each_channel():
    hu = np.random.default_rng(0).integers(-1100, 1500, (3, 16, 12)).astype(np.int16)
    three = [(40.0, 80.0), (32.0, 8.0), (600.0, 2800.0)]
    out = build_channels(hu, "windows", three)
    for c, w in enumerate(three):
        assert np.array_equal(out[..., c], window(hu, [w], 1)[..., 0])
    with pytest.raises(ValueError, match="three windows, one per channel; got 1"):
        build_channels(hu, "windows", BRAIN)


def _truth(size: int, cx_px: float, cy_px: float, deg: float) -> float:
    """x0 of the line through (cx_px, cy_px) at ``deg`` from the vertical, at the middle row."""
    return cx_px + ((size - 1) / 2 - cy_px) * np.tan(np.radians(deg))


@pytest.mark.parametrize("size", [64, 96])
def test_the_midline_is_found_from_the_head_shifted_and_rotated(size):
    """Synthetic heads (asymmetric texture, ventricles and noise) moved by 8 px and turned by 7
    degrees come back within 1.5 px and 2 degrees; a centred head near the image's centre column.
    A head angle of -theta in synthetic's convention leans the midline by +theta here."""
    rng = np.random.default_rng(size)
    for shift, deg in ((8, 7), (-8, -7), (0, 0)):
        head = Head(shift / size, 0.02, 0.36, 0.43, np.radians(-deg), 0.06)
        hu, _ = synth_hu_slice(rng, size, head, Tissue.draw(rng), None)
        x0, angle = midline(hu)
        want = _truth(size, (0.5 + head.cx) * size, (0.5 + head.cy) * size, deg)
        assert abs(x0 - want) < 1.5 and abs(angle - deg) < 2, (shift, deg, x0, want, angle)
        if shift == 0:
            assert abs(x0 - (size - 1) / 2) < 1.5
        # a volume: one midline from its slices, the head shrinking towards the ends
        heads = [Head(head.cx, head.cy, head.ax * f, head.ay * f, head.angle, head.skull_t) for f in (0.5, 0.9, 1, 0.8)]
        vol = np.stack([synth_hu_slice(rng, size, h, Tissue.draw(rng), None)[0] for h in heads])
        x0, angle = midline(vol)
        assert abs(x0 - want) < 1.5 and abs(angle - deg) < 2
    with pytest.raises(ValueError, match="no head"):
        midline(np.full((3, size, size), -1000, np.int16))


def test_a_mirror_puts_each_pixel_where_its_reflection_about_the_line_lies():
    hu = np.random.default_rng(1).integers(-1000, 100, (2, 10, 7)).astype(np.int16)
    assert np.allclose(mirror(hu, 3.0, 0.0), hu[..., ::-1])  # the centre column: a left-right flip
    yy, xx = np.mgrid[0:40, 0:30].astype(np.float64)
    ramp = 3 * xx + 2 * yy  # bilinear sampling is exact on a plane
    x0, deg = 13.4, 9.0
    d = np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))])  # (y, x)
    p = np.stack([yy - 19.5, xx - x0], axis=-1)  # from the line's point on the middle row
    reflected = 2 * (p @ d)[..., None] * d - p + [19.5, x0]
    inside = (reflected[..., 0] >= 0) & (reflected[..., 0] <= 39) & (reflected[..., 1] >= 0) & (reflected[..., 1] <= 29)
    want = 3 * reflected[..., 1] + 2 * reflected[..., 0]
    got = mirror(ramp, x0, deg)
    assert inside.mean() > 0.8 and np.allclose(got[inside], want[inside], atol=1e-3)
    assert (got[~inside & (np.abs(got - want) > 1e-3)] == -1024).all()  # air from outside the image


def _symmetric_head(size: int, cx: float, cy: float, deg: float, lesion_side: int):
    """(HU (Y, X) int16, lesion bool, its mirror place bool): a head symmetric about the line through
    (cx, cy) px at ``deg``, smooth parenchyma and ventricles alike on both sides, a 15 HU-darker
    lesion on one side (u > 0 for lesion_side 1) only."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    a = np.radians(deg)
    along = (yy - cy) * np.cos(a) + (xx - cx) * np.sin(a)  # along the midline
    across = (xx - cx) * np.cos(a) - (yy - cy) * np.sin(a)  # signed distance from it
    u, v = across / (0.36 * size), along / (0.43 * size)
    r = np.hypot(u, v)
    hu = np.full((size, size), -1000.0)
    hu[r < 1] = 1000.0
    brain = r < 0.9
    hu[brain] = (28 + 10 * r**2 + 4 * np.cos(5 * v))[brain]
    ventricles = (np.hypot((np.abs(u) - 0.18) / 0.1, v / 0.3) < 1) & brain
    hu[ventricles] = 6.0
    spot = (np.hypot((np.abs(u) - 0.5) / 0.15, (v - 0.1) / 0.2) < 1) & brain
    lesion, place = spot & (lesion_side * u > 0), spot & (lesion_side * u < 0)
    hu[lesion] -= 15
    return np.rint(hu).astype(np.int16), lesion, place, brain & ~ventricles


@pytest.mark.parametrize("side", [1, -1])
def test_symmetry_shows_a_one_sided_lesion_in_the_difference_channel(side):
    size = 96
    hu, lesion, place, brain = _symmetric_head(size, 52.0, 46.0, 6.0, side)
    vol = np.stack([hu, hu, hu])
    out = build_channels(vol, "symmetry", BRAIN)
    x0, angle = midline(vol)
    assert abs(x0 - _truth(size, 52.0, 46.0, 6.0)) < 1 and abs(angle - 6.0) < 1.5
    assert np.array_equal(out[..., 0], window(vol, BRAIN, 1)[..., 0])
    assert np.array_equal(out[..., 1], window(mirror(vol, x0, angle), BRAIN, 1)[..., 0])
    diff = out[1, ..., 2].astype(float)
    # 15 HU darker: 15/80*255/2 = 24 below 128 on the lesion, 24 above at its mirror place
    inner = ndimage.binary_erosion(lesion, iterations=2)
    assert diff[inner].mean() < 128 - 18 and diff[ndimage.binary_erosion(place, iterations=2)].mean() > 128 + 18
    rest = ndimage.binary_erosion(brain & ~ndimage.binary_dilation(lesion | place, iterations=2), iterations=3)
    assert abs(diff[rest].mean() - 128) < 1 and np.percentile(np.abs(diff[rest] - 128), 95) <= 3
    assert (diff[inner] < 128).all()


def test_config_refuses_an_unknown_mode_a_windows_mode_without_three_and_one_channel():
    tiny = builtin_config("tiny")
    assert load_config(tiny).data.channels == "grey"
    for overrides, key in ((["data.channels='rainbow'"], r"\[data\] channels: must be one of"),
                           (["data.channels='windows'"], r"\[data\] windows: data.channels = 'windows' takes three"),
                           (["data.channels='neighbours'", "model.image_channels=1"], r"\[model\] image_channels")):
        with pytest.raises(ConfigError, match=key):
            load_config(tiny, overrides)
    cfg = load_config(tiny, ["data.channels='windows'", "data.windows=[[40, 80], [35, 40], [40, 400]]"])
    assert cfg.data.channels == "windows"


def _cfg(layout: str, *more: str):
    return volume_config(layout, 4, 1, 64, 4, *more)


def test_prepare_stores_the_neighbours_of_each_slice_and_the_mode_changes_the_store(tmp_path):
    cfg = _cfg("nnunet")
    cfg.data.source_dir = str(write_synthetic(tmp_path / "src", cfg.synthetic, progress=False))
    grey = prepare(cfg, str(tmp_path / "grey"), progress=False)
    cfg.data.channels = "neighbours"
    store = str(tmp_path / "store")
    near = prepare(cfg, store, progress=False)
    assert near["source"]["channels"] == "neighbours" and near["fingerprint"] != grey["fingerprint"]
    case = near["source"]["cases"]["test"][0]
    rows = {r["name"]: record_to_arrays(r)[0] for r in iter_records(store, near, "test")}
    plain = {r["name"]: record_to_arrays(r)[0] for r in iter_records(str(tmp_path / "grey"), grey, "test")}
    for k in range(4):
        image = rows[f"{case}_{k}"]
        assert np.array_equal(image[..., 1], plain[f"{case}_{k}"][..., 0])
        assert np.array_equal(image[..., 0], plain[f"{case}_{max(k - 1, 0)}"][..., 0])
        assert np.array_equal(image[..., 2], plain[f"{case}_{min(k + 1, 3)}"][..., 0])
    assert not np.array_equal(rows[f"{case}_2"][..., 0], rows[f"{case}_2"][..., 1])
    cfg.data.channels = "symmetry"
    assert prepare(cfg, store, progress=False)["fingerprint"] not in (near["fingerprint"], grey["fingerprint"])


def test_png_sources_keep_grey(tmp_path):
    cfg = load_config(builtin_config("tiny"), ["synthetic.num_train=2", "synthetic.num_valid=2", "synthetic.num_test=1",
                                               "synthetic.size=64"])
    cfg.data.source_dir = str(write_synthetic(tmp_path / "src", cfg.synthetic, progress=False))
    cfg.data.channels = "symmetry"
    with pytest.raises(DataError, match="data.channels = 'symmetry' needs CT volumes") as caught:
        prepare(cfg, str(tmp_path / "shards"), progress=False)
    assert "\n" not in str(caught.value) and not (tmp_path / "shards").exists()
