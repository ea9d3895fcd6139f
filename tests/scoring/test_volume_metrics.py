"""volume_metrics against independent computations: surfaces by explicit 6-neighbour checks,
distances by brute-force pairwise Euclidean distances in mm, components by a breadth-first
search written here, and analytic values on hand-made anisotropic volumes."""

import itertools
import math
import subprocess
import sys
from collections import deque

import numpy as np
import pytest

from aisd_ray.scoring import volume_metrics as vm

THICK = (5.0, 0.45, 0.45)  # AISD-like: thick slices, fine pixels
ANISO = (2.0, 1.0, 0.5)
FACES = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
ALL26 = [d for d in itertools.product((-1, 0, 1), repeat=3) if d != (0, 0, 0)]


# ---- independent references ---------------------------------------------------------------

def ref_surface(mask):
    """Lesion voxels with at least one face neighbour outside the lesion or the array."""
    m = np.pad(np.asarray(mask) != 0, 1)
    out = np.zeros_like(m)
    for z, y, x in np.argwhere(m):
        out[z, y, x] = any(not m[z + dz, y + dy, x + dx] for dz, dy, dx in FACES)
    return out[1:-1, 1:-1, 1:-1]


def ref_directed(a, b, spacing):
    pa = np.argwhere(ref_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(ref_surface(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return d.min(axis=1)


def ref_hd95(t, p, spacing, q=95):
    return max(np.percentile(ref_directed(t, p, spacing), q), np.percentile(ref_directed(p, t, spacing), q))


def ref_nsd(t, p, spacing, tol):
    d1, d2 = ref_directed(t, p, spacing), ref_directed(p, t, spacing)
    return ((d1 <= tol).sum() + (d2 <= tol).sum()) / (len(d1) + len(d2))


def ref_components(mask, neighbours=ALL26):
    """Lists of voxel coordinates of each component, by breadth-first search."""
    m = np.asarray(mask) != 0
    seen = np.zeros_like(m)
    comps = []
    for start in map(tuple, np.argwhere(m)):
        if seen[start]:
            continue
        seen[start] = True
        queue, comp = deque([start]), []
        while queue:
            v = queue.popleft()
            comp.append(v)
            for d in neighbours:
                w = tuple(np.add(v, d))
                if all(0 <= w[i] < m.shape[i] for i in range(3)) and m[w] and not seen[w]:
                    seen[w] = True
                    queue.append(w)
        comps.append(comp)
    return comps


def ref_detection(t, p):
    tc, pc = ref_components(t), ref_components(p)
    found = sum(any(p[v] for v in comp) for comp in tc)
    false = sum(not any(t[v] for v in comp) for comp in pc)
    return found, len(tc) - found, false


# ---- volumes --------------------------------------------------------------------------------

def box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def ellipsoid(shape, spacing, centre_mm, radius_mm):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= radius_mm ** 2


def random_blobs(seed, shape=(8, 14, 14)):
    rng = np.random.default_rng(seed)
    from scipy import ndimage  # smoothing only, to make blob-like shapes
    noise = ndimage.uniform_filter(rng.random(shape), size=3)
    return noise > np.quantile(noise, rng.uniform(0.75, 0.92))


# ---- surface --------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_surface_matches_six_neighbour_definition(seed):
    mask = random_blobs(seed)
    mask[0, :3, :3] = True  # voxels on the array's border are surface
    np.testing.assert_array_equal(vm.surface(mask), ref_surface(mask))


def test_one_voxel_thick_masks_are_all_surface_and_a_solid_cube_is_not():
    plate = box((3, 10, 10), (1, 2, 2), (2, 8, 8))
    line = box((5, 5, 9), (2, 2, 1), (3, 3, 8))
    assert np.array_equal(vm.surface(plate), plate) and np.array_equal(vm.surface(line), line)
    cube = box((7, 7, 7), (1, 1, 1), (6, 6, 6))
    surf = vm.surface(cube)
    assert surf.sum() == 5 ** 3 - 3 ** 3 and not surf[3, 3, 3]
    assert vm.surface(np.zeros((3, 3, 3), np.uint8)).sum() == 0


# ---- distances, HD95 and NSD ----------------------------------------------------------------

@pytest.mark.parametrize("spacing", [THICK, ANISO])
def test_surface_distances_match_brute_force(spacing):
    a, b = random_blobs(1), random_blobs(2)
    got = vm.surface_distances(a, b, spacing)
    np.testing.assert_allclose(got, ref_directed(a, b, spacing), rtol=1e-12, atol=1e-12)
    assert vm.surface_distances(np.zeros_like(a), b, spacing).shape == (0,)
    assert np.all(np.isinf(vm.surface_distances(a, np.zeros_like(b), spacing)))


@pytest.mark.parametrize("spacing,slices", [(THICK, 1), (ANISO, 2), ((8.0, 0.5, 0.5), 1)])
def test_plate_shifted_through_plane_has_exact_hd95_and_nsd(spacing, slices):
    """A thin plate is all surface: every voxel's nearest counterpart is straight above it."""
    truth = box((8, 12, 12), (2, 3, 3), (3, 9, 9))
    pred = np.roll(truth, slices, axis=0)
    shift_mm = slices * spacing[0]
    assert vm.hd95(truth, pred, spacing) == shift_mm
    assert vm.nsd(truth, pred, spacing, tolerance_mm=shift_mm) == 1.0
    assert vm.nsd(truth, pred, spacing, tolerance_mm=shift_mm - 0.01) == 0.0


def test_cube_shifted_in_plane_max_distance_is_the_shift():
    truth = box((10, 30, 30), (2, 5, 5), (8, 25, 25))
    pred = np.roll(truth, 3, axis=2)  # 3 columns = 1.5 mm at 0.5 mm pixels
    assert vm.hd95(truth, pred, ANISO, percentile=100) == 1.5
    assert vm.hd95(truth, pred, ANISO) == pytest.approx(ref_hd95(truth, pred, ANISO), abs=1e-12)
    assert vm.hd95(truth, pred, ANISO) <= 1.5
    # A one-column shift: every surface voxel is within one column (0.5 mm) of the other surface.
    one = np.roll(truth, 1, axis=2)
    assert vm.nsd(truth, one, ANISO, tolerance_mm=0.5) == 1.0
    partial = vm.nsd(truth, one, ANISO, tolerance_mm=0.4)
    assert 0.0 < partial < 1.0 and partial == pytest.approx(ref_nsd(truth, one, ANISO, 0.4), abs=1e-12)


@pytest.mark.parametrize("spacing", [THICK, ANISO])
def test_sphere_vs_smaller_sphere_matches_brute_force(spacing):
    shape = (12, 40, 40) if spacing == ANISO else (6, 40, 40)
    extent = np.array(shape) * spacing
    centre = extent / 2
    truth = ellipsoid(shape, spacing, centre, 0.4 * min(extent))
    pred = ellipsoid(shape, spacing, centre + [0, 0.9, 0.0], 0.3 * min(extent))
    assert vm.hd95(truth, pred, spacing) == pytest.approx(ref_hd95(truth, pred, spacing), abs=1e-9)
    for tol in (0.5, 2.0, 5.0):
        assert vm.nsd(truth, pred, spacing, tol) == pytest.approx(ref_nsd(truth, pred, spacing, tol), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_hd95_and_nsd_are_symmetric_and_match_brute_force(seed):
    t, p = random_blobs(10 + seed), random_blobs(20 + seed)
    for spacing in (THICK, ANISO):
        h = vm.hd95(t, p, spacing)
        assert h == vm.hd95(p, t, spacing)
        assert h == pytest.approx(ref_hd95(t, p, spacing), abs=1e-9)
        assert vm.nsd(t, p, spacing, 2.0) == vm.nsd(p, t, spacing, 2.0)
        assert vm.nsd(t, p, spacing, 2.0) == pytest.approx(ref_nsd(t, p, spacing, 2.0), abs=1e-12)
    assert vm.hd95(t, t, THICK) == 0.0 and vm.nsd(t, t, THICK, 0.0) == 1.0


def test_empty_mask_rules():
    empty, blob = np.zeros((4, 8, 8), bool), box((4, 8, 8), (1, 2, 2), (3, 5, 5))
    assert vm.hd95(empty, empty, THICK) == 0.0 and vm.nsd(empty, empty, THICK) == 1.0
    for t, p in ((empty, blob), (blob, empty)):
        assert math.isnan(vm.hd95(t, p, THICK)) and vm.nsd(t, p, THICK) == 0.0
    det = vm.lesion_detection(empty, empty)
    assert (det["found"], det["missed"], det["false"], det["f1"]) == (0, 0, 0, 1.0)
    assert vm.lesion_detection(blob, empty)["f1"] == 0.0 and vm.lesion_detection(empty, blob)["false"] == 1


def test_bad_input_is_refused():
    m = np.zeros((3, 4, 4))
    for spacing in ((1.0, 1.0), (0.0, 1.0, 1.0), (1.0, -1.0, 1.0), (1.0, math.nan, 1.0)):
        with pytest.raises(ValueError):
            vm.hd95(m, m, spacing)
    with pytest.raises(ValueError):
        vm.hd95(np.zeros((4, 4)), np.zeros((4, 4)), THICK)
    with pytest.raises(ValueError):
        vm.nsd(m, np.zeros((3, 4, 5)), THICK)
    with pytest.raises(ValueError):
        vm.lesion_detection(m, m, connectivity=8)


# ---- volumes --------------------------------------------------------------------------------

def test_volume_ml_of_known_blocks():
    block = box((12, 24, 24), (1, 2, 2), (11, 22, 22))  # 10 x 20 x 20 voxels
    assert vm.volume_ml(block, (5.0, 0.5, 0.5)) == 5.0
    assert vm.volume_ml(block.astype(np.uint8) * 254, (5.0, 0.5, 0.5)) == 5.0  # AISD's {0, 254}
    assert vm.volume_ml(np.zeros((2, 2, 2)), THICK) == 0.0
    smaller = box((12, 24, 24), (1, 2, 2), (6, 22, 22))  # half the slices: 2.5 mL
    assert vm.avd_ml(block, smaller, (5.0, 0.5, 0.5)) == 2.5 == vm.avd_ml(smaller, block, (5.0, 0.5, 0.5))


# ---- lesions --------------------------------------------------------------------------------

def test_two_true_blobs_one_predicted():
    truth = box((6, 20, 20), (1, 2, 2), (3, 6, 6)) | box((6, 20, 20), (2, 12, 12), (5, 16, 16))
    pred = box((6, 20, 20), (1, 3, 3), (2, 5, 5))
    det = vm.lesion_detection(truth, pred, THICK, per_lesion=True)
    assert (det["found"], det["missed"], det["false"]) == (1, 1, 0)
    assert det["f1"] == pytest.approx(2 / 3) and (det["true_lesions"], det["pred_lesions"]) == (2, 1)
    first, second = det["lesions"]
    assert first["found"] and not second["found"]
    assert (first["z_min"], first["z_max"], second["z_min"], second["z_max"]) == (1, 2, 2, 4)
    assert first["voxels"] == 32 and first["volume_ml"] == pytest.approx(32 * 5.0 * 0.45 * 0.45 / 1000)
    assert math.isnan(vm.lesion_detection(truth, pred, per_lesion=True)["lesions"][0]["volume_ml"])


def test_prediction_with_an_extra_false_blob():
    truth = box((6, 20, 20), (1, 2, 2), (3, 6, 6)) | box((6, 20, 20), (2, 12, 12), (5, 16, 16))
    pred = truth.copy()
    pred[0, 10:12, 0:3] = True  # far from both lesions
    det = vm.lesion_detection(truth, pred)
    assert (det["found"], det["missed"], det["false"]) == (2, 0, 1) and det["f1"] == pytest.approx(0.8)


def test_one_prediction_bridging_two_lesions_finds_both():
    truth = box((3, 10, 20), (1, 2, 2), (2, 6, 6)) | box((3, 10, 20), (1, 2, 12), (2, 6, 16))
    pred = box((3, 10, 20), (1, 4, 4), (2, 5, 14))
    det = vm.lesion_detection(truth, pred)
    assert (det["found"], det["missed"], det["false"], det["f1"]) == (2, 0, 0, 1.0)


def test_connectivity_across_slices():
    """Two voxels diagonal across slices: one lesion with 26-connectivity, two with 6."""
    m = np.zeros((3, 4, 4), bool)
    m[0, 1, 1] = m[1, 2, 2] = True
    assert vm.lesion_detection(m, m)["true_lesions"] == 1
    assert vm.lesion_detection(m, m, connectivity=6)["true_lesions"] == 2
    assert len(vm.components(m, THICK, connectivity=6)) == 2


@pytest.mark.parametrize("seed", range(4))
def test_lesion_detection_matches_breadth_first_search(seed):
    rng = np.random.default_rng(seed)
    t = rng.random((5, 9, 9)) < 0.12
    p = rng.random((5, 9, 9)) < 0.12
    det = vm.lesion_detection(t, p)
    found, missed, false = ref_detection(t, p)
    assert (det["found"], det["missed"], det["false"]) == (found, missed, false)
    assert det["f1"] == pytest.approx(2 * found / (2 * found + missed + false))


def test_components_sorted_with_volume_slices_and_centroid():
    mask = box((8, 20, 20), (0, 0, 0), (2, 3, 3)) | box((8, 20, 20), (3, 10, 10), (7, 15, 14))
    comps = vm.components(mask, THICK)
    refs = sorted(ref_components(mask), key=len, reverse=True)
    assert [c["voxels"] for c in comps] == [len(r) for r in refs] == [80, 18]
    for c, r in zip(comps, refs):
        zyx = np.array(r)
        assert c["volume_ml"] == pytest.approx(len(r) * 5.0 * 0.45 * 0.45 / 1000)
        assert (c["z_min"], c["z_max"]) == (zyx[:, 0].min(), zyx[:, 0].max())
        np.testing.assert_allclose(c["centroid"], zyx.mean(axis=0))
    assert comps[0]["centroid"] == pytest.approx((4.5, 12.0, 11.5))
    assert vm.components(np.zeros((2, 3, 3)), THICK) == []


# ---- per case and per split -----------------------------------------------------------------

def test_case_volume_scores_and_summary():
    shape = (8, 12, 12)
    truth = box(shape, (2, 3, 3), (3, 9, 9))
    shifted = np.roll(truth, 1, axis=0)  # 5 mm off: dice 0, hd95 5, nsd 0 at 2 mm
    row = vm.case_volume_scores(truth, shifted, THICK)
    assert row["dice"] == 0.0 and row["hd95_mm"] == 5.0 and row["nsd"] == 0.0
    assert row["nsd_tolerance_mm"] == vm.DEFAULT_TOLERANCE_MM == 2.0
    assert row["true_ml"] == row["pred_ml"] == pytest.approx(36 * 5.0 * 0.45 * 0.45 / 1000) and row["avd_ml"] == 0
    assert (row["lesion_found"], row["lesion_missed"], row["lesion_false"], row["lesion_f1"]) == (0, 1, 1, 0.0)
    perfect = vm.case_volume_scores(truth, truth, THICK)
    assert (perfect["dice"], perfect["hd95_mm"], perfect["nsd"], perfect["lesion_f1"]) == (1.0, 0.0, 1.0, 1.0)
    empty = np.zeros(shape, bool)
    missed = vm.case_volume_scores(truth, empty, THICK)
    assert math.isnan(missed["hd95_mm"]) and missed["nsd"] == 0.0 and missed["lesion_missed"] == 1
    both_empty = vm.case_volume_scores(empty, empty, THICK)
    assert math.isnan(both_empty["dice"]) and both_empty["hd95_mm"] == 0.0 and both_empty["nsd"] == 1.0

    s = vm.summarize_volume_cases([row, perfect, missed, both_empty])
    assert s["cases"] == 4 and s["hd95_mm_nan_cases"] == 1 and s["dice_nan_cases"] == 1
    assert s["hd95_mm_mean"] == pytest.approx(5 / 3) and s["hd95_mm_median"] == 0.0
    assert s["dice_mean"] == pytest.approx(1 / 3) and s["nsd_mean"] == 0.5 and s["nsd_median"] == 0.5
    assert (s["lesion_found"], s["lesion_missed"], s["lesion_false"]) == (1, 2, 1)
    assert s["lesion_f1_pooled"] == pytest.approx(2 / (2 + 2 + 1)) and s["nsd_tolerance_mm"] == 2.0
    with pytest.raises(ValueError):
        vm.summarize_volume_cases([row, vm.case_volume_scores(truth, truth, THICK, tolerance_mm=1.0)])
    assert math.isnan(vm.summarize_volume_cases([])["dice_mean"])


def test_module_imports_neither_tensorflow_nor_ray():
    code = ("import sys, aisd_ray.scoring.volume_metrics; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'ray', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_hd95_takes_the_larger_directed_percentile_not_the_pooled_one():
    """MONAI's convention: a small distant blob missed by the prediction is over 5% of the truth's
    surface (so it sets the truth->prediction 95th percentile) but under 5% of both surfaces."""
    pred = box((3, 30, 30), (1, 2, 2), (2, 12, 12))  # a 10 x 10 plate: 100 surface voxels
    truth = pred | box((3, 30, 30), (1, 25, 25), (2, 28, 28))  # and a distant 3 x 3 one: 9 more
    d_tp, d_pt = ref_directed(truth, pred, THICK), ref_directed(pred, truth, THICK)
    pooled = np.percentile(np.concatenate([d_tp, d_pt]), 95)
    assert vm.hd95(truth, pred, THICK) == pytest.approx(np.percentile(d_tp, 95), abs=1e-12)
    assert vm.hd95(truth, pred, THICK) > 3.0 and pooled == 0.0
