"""Spacing-aware per-case metrics of 3-D lesion masks: surface distance (HD95), normalised surface
Dice (NSD), volume in mL and lesion-wise detection, in millimetres of the scan, not in voxels.

Every mask is a 3-D array of shape (Z, Y, X): slices, rows, columns, in slice order. Any dtype is
accepted; a voxel is lesion where the value is non-zero (as in ``aisd_ray.scoring.metrics``), so integer
label maps score the combined lesion. ``spacing`` is the voxel size (z, y, x) in mm, e.g.
(5.0, 0.45, 0.45): slice spacing first, then the row and column pixel spacing.

Why scipy and not MONAI: MONAI's metrics need PyTorch, a second framework beside TensorFlow;
``scipy.ndimage`` is already a dependency, is maintained with numpy, and gives the three pieces
the metrics need: ``binary_erosion`` (surfaces), ``distance_transform_edt(..., sampling=spacing)``
(exact anisotropic Euclidean distances in mm) and ``label`` (connected components). The formulas
follow MONAI's so the figures compare with published ones; each function states its convention.

Conventions, stated once:

* Surface: a lesion voxel with at least one of its 6 face neighbours outside the lesion, i.e. the
  mask minus its erosion by the 6-connected cross (``generate_binary_structure(3, 1)``), which is
  what MONAI's ``get_mask_edges`` computes (scipy's default erosion element). Outside the array is
  background, so lesion voxels on the array's border are surface. A mask one voxel thick in any
  axis is all surface; with thick slices every voxel of a lesion's first and last slice is surface.
* Lesions: 3-D connected components with 26-connectivity (face, edge or corner neighbours in
  (z, y, x)), as ``aisd_ray.scoring.metrics.CONNECTIVITY``: with 5..9 mm slices a lesion continues to the
  next slice through face neighbours, and a diagonal step between slices keeps it one lesion.
  6 and 18 are accepted too.
* Empty masks: both empty gives HD95 0.0 mm and NSD 1.0 (the prediction is exactly right); one
  empty gives HD95 NaN (no distance exists; ``summarize_volume_cases`` counts these cases) and NSD
  0.0. Dice keeps ``aisd_ray.scoring.metrics``' rule: NaN when both are empty.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from aisd_ray.scoring.counts import scores_from_counts

SURFACE_STRUCTURE = ndimage.generate_binary_structure(3, 1)  # the 6-connected cross
LESION_CONNECTIVITY = 26
# NSD tolerance, chosen here (no published stroke-NCCT value was found; Nikolov et al. set theirs
# per organ from inter-observer variation): 2 mm is about four in-plane pixels at AISD's 0.44..0.5
# mm, room for an edge drawn a few pixels apart on a faint hypodensity, yet under one slice
# (5..9 mm), so a lesion's first or last slice misplaced by a whole slice is out of tolerance.
DEFAULT_TOLERANCE_MM = 2.0
_STRUCTURES = {6: 1, 18: 2, 26: 3}


def _mask(mask: Any) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"expected a 3-D (Z, Y, X) mask, got shape {m.shape}")
    return m != 0


def _pair(truth: Any, pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t, p = _mask(truth), _mask(pred)
    if t.shape != p.shape:
        raise ValueError(f"truth and prediction differ in shape: {t.shape} vs {p.shape}")
    return t, p


def _spacing(spacing: Any) -> tuple[float, float, float]:
    s = tuple(float(v) for v in spacing)
    if len(s) != 3 or not all(math.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing!r}")
    return s  # type: ignore[return-value]


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in _STRUCTURES:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity!r}")
    return ndimage.generate_binary_structure(3, _STRUCTURES[connectivity])


def surface(mask: Any) -> np.ndarray:
    """Boundary voxels of a (Z, Y, X) mask as a bool array of the same shape: lesion voxels with a
    face (6-) neighbour outside the lesion or outside the array (mask XOR its erosion by the
    6-connected cross, with background beyond the border; MONAI's ``get_mask_edges``)."""
    m = _mask(mask)
    return m & ~ndimage.binary_erosion(m, structure=SURFACE_STRUCTURE, border_value=0)


def _directed(surf_a: np.ndarray, surf_b: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    if not surf_a.any():
        return np.zeros(0, np.float64)
    if not surf_b.any():
        return np.full(int(surf_a.sum()), np.inf)
    # Distances only need the box holding both surfaces: the nearest surface voxel of b is in it.
    both = np.argwhere(surf_a | surf_b)
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(both.min(axis=0), both.max(axis=0)))
    dist = ndimage.distance_transform_edt(~surf_b[box], sampling=spacing)
    return np.asarray(dist[surf_a[box]], np.float64)


def surface_distances(a: Any, b: Any, spacing: Any) -> np.ndarray:
    """Distances in mm (float64, 1-D, one per surface voxel of ``a`` in C order) from each surface
    voxel of ``a`` to the nearest surface voxel of ``b``: the Euclidean distance transform of
    ``~surface(b)`` with ``sampling=spacing``, read at ``surface(a)`` (MONAI's
    ``get_surface_distance``). Empty when ``a`` is empty; all ``inf`` when only ``b`` is empty."""
    s = _spacing(spacing)
    sa, sb = _pair(a, b)
    return _directed(surface(sa), surface(sb), s)


def _both_ways(truth: Any, pred: Any, spacing: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(truth->pred, pred->truth) distances, or None when either mask is empty."""
    s = _spacing(spacing)
    t, p = _pair(truth, pred)
    if not t.any() or not p.any():
        return None
    st, sp = surface(t), surface(p)
    return _directed(st, sp, s), _directed(sp, st, s)


def hd95(truth: Any, pred: Any, spacing: Any, percentile: float = 95.0) -> float:
    """95th-percentile Hausdorff distance in mm between two (Z, Y, X) masks.

    MONAI's ``compute_hausdorff_distance(percentile=95, directed=False)`` convention: the
    percentile (numpy's linear interpolation) of each directed set of surface distances, truth to
    prediction and prediction to truth, then the larger of the two (not the percentile of the
    pooled distances). Symmetric in its arguments. Both masks empty: 0.0; one empty: NaN."""
    t, p = _pair(truth, pred)
    if not t.any() and not p.any():
        _spacing(spacing)
        return 0.0
    ways = _both_ways(t, p, spacing)
    if ways is None:
        return math.nan
    return float(max(np.percentile(d, percentile) for d in ways))


def nsd(truth: Any, pred: Any, spacing: Any, tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> float:
    """Normalised surface Dice in [0, 1] at ``tolerance_mm`` between two (Z, Y, X) masks.

    Nikolov et al. 2021, "Clinically applicable segmentation of head and neck anatomy for
    radiotherapy" (J Med Internet Res 23(7):e26151), in its voxel-surface form as MONAI's
    ``compute_surface_dice(use_subvoxels=False)``: the surface voxels of both masks whose distance
    to the other surface is at most ``tolerance_mm`` (inclusive), over all surface voxels of both.
    Symmetric in its arguments. Both masks empty: 1.0; one empty: 0.0."""
    if not tolerance_mm >= 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm!r}")
    t, p = _pair(truth, pred)
    if not t.any() and not p.any():
        _spacing(spacing)
        return 1.0
    ways = _both_ways(t, p, spacing)
    if ways is None:
        return 0.0
    d_tp, d_pt = ways
    return float((np.sum(d_tp <= tolerance_mm) + np.sum(d_pt <= tolerance_mm)) / (len(d_tp) + len(d_pt)))


def volume_ml(mask: Any, spacing: Any) -> float:
    """Lesion volume of a (Z, Y, X) mask in mL: voxels x prod(spacing in mm) / 1000 (0.0 if empty)."""
    s = _spacing(spacing)
    return float(np.count_nonzero(_mask(mask)) * math.prod(s) / 1000.0)


def avd_ml(truth: Any, pred: Any, spacing: Any) -> float:
    """Absolute volume difference |V(pred) - V(truth)| in mL (0.0 when both are empty)."""
    t, p = _pair(truth, pred)
    return abs(volume_ml(p, spacing) - volume_ml(t, spacing))


def _slice_ranges(labels: np.ndarray, n: int) -> list[tuple[int, int]]:
    return [(int(sl[0].start), int(sl[0].stop) - 1) for sl in ndimage.find_objects(labels, n)]


def voxel_counts(ids: np.ndarray, n: int) -> np.ndarray:
    """Voxels per component id 0..n (0: background) of a label array, counted slice by slice (a
    bincount of the whole int32 volume would copy it as int64): int64 (n + 1,)."""
    ids = np.asarray(ids)
    if ids.ndim < 2:
        return np.bincount(ids.ravel(), minlength=n + 1)
    return sum(np.bincount(part.ravel(), minlength=n + 1) for part in ids) if len(ids) else np.zeros(n + 1, np.int64)


def label_lesions(mask: Any, connectivity: int = LESION_CONNECTIVITY) -> tuple[np.ndarray, int]:
    """The lesions of a (Z, Y, X) mask (non-zero voxels) as 3-D connected components: (int32 array of
    the mask's shape, 0 outside any lesion and 1..n in C order of each one's first voxel, n). The one
    home of the lesion connectivity (``scipy.ndimage.label``); ValueError for a mask that is not 3-D
    or a connectivity other than 6, 18 or 26."""
    labels, n = ndimage.label(_mask(mask), _structure(connectivity))
    return labels.astype(np.int32, copy=False), int(n)


def components(mask: Any, spacing: Any, connectivity: int = LESION_CONNECTIVITY) -> list[dict[str, Any]]:
    """The 3-D connected components of a (Z, Y, X) mask, largest first (ties in label order, i.e.
    first voxel in C order first); [] for an empty mask. Each is a dict: ``volume_ml`` (float, mL),
    ``voxels`` (int), ``z_min`` and ``z_max`` (ints, first and last slice index, inclusive) and
    ``centroid`` ((z, y, x) floats, in voxel indices, unweighted)."""
    s = _spacing(spacing)
    labels, n = label_lesions(mask, connectivity)
    if n == 0:
        return []
    # per component, inside its bounding box: no float64 or int64 copy of the volume
    voxels, ranges, centroids = [], [], []
    for i, box in enumerate(ndimage.find_objects(labels, n), start=1):
        inside = labels[box] == i
        profiles = [inside.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64) for axis in range(3)]
        count = int(profiles[0].sum())
        voxels.append(count)
        ranges.append((int(box[0].start), int(box[0].stop) - 1))
        centroids.append(tuple(float(np.dot(np.arange(sl.start, sl.stop, dtype=np.float64), p)) / count
                               for p, sl in zip(profiles, box)))
    voxel_ml = math.prod(s) / 1000.0
    out = [{"volume_ml": float(v * voxel_ml), "voxels": int(v), "z_min": z[0], "z_max": z[1],
            "centroid": tuple(float(c) for c in cen)} for v, z, cen in zip(voxels, ranges, centroids)]
    order = sorted(range(n), key=lambda i: -voxels[i])  # sorted() is stable: ties by label
    return [out[i] for i in order]


def detection_f1(found: int, missed: int, false: int) -> float:
    """Lesion-wise F1 = 2 found / (2 found + missed + false); 1.0 when all three are 0."""
    denom = 2 * found + missed + false
    return 1.0 if denom == 0 else float(2 * found / denom)


def lesion_detection(truth: Any, pred: Any, spacing: Any = None, connectivity: int = LESION_CONNECTIVITY,
                     per_lesion: bool = False) -> dict[str, Any]:
    """Lesion-wise detection between two (Z, Y, X) masks, lesions being 3-D connected components.

    Matching rule ("any overlap", as ISLES'22's lesion-wise F1): a true lesion is *found* when any
    predicted voxel overlaps it, else *missed*; a predicted component overlapping no true lesion
    is *false*. Matching is many-to-many: one predicted component touching two true lesions finds
    both, and two predicted components on one true lesion find it once and are neither false.
    F1 = 2 found / (2 found + missed + false), found counted on true lesions; 1.0 when neither
    mask has a lesion. Returns ints ``found``, ``missed``, ``false``, ``true_lesions``,
    ``pred_lesions`` and float ``f1``; with ``per_lesion``, ``lesions``: one dict per true lesion
    in label order with ``found`` (bool), ``voxels``, ``volume_ml`` (NaN without ``spacing``),
    ``z_min`` and ``z_max`` (first and last slice index)."""
    t, p = _pair(truth, pred)
    true_labels, n_true = label_lesions(t, connectivity)
    pred_labels, n_pred = label_lesions(p, connectivity)
    overlap = t & p
    hit_true = np.unique(true_labels[overlap])
    found = len(hit_true)
    false = n_pred - len(np.unique(pred_labels[overlap]))
    out: dict[str, Any] = {"found": found, "missed": n_true - found, "false": int(false),
                           "true_lesions": int(n_true), "pred_lesions": int(n_pred),
                           "f1": detection_f1(found, n_true - found, false)}
    if per_lesion:
        voxel_ml = math.prod(_spacing(spacing)) / 1000.0 if spacing is not None else math.nan
        voxels = np.bincount(true_labels.ravel(), minlength=n_true + 1)[1:]
        hit = set(int(i) for i in hit_true)
        out["lesions"] = [{"found": i + 1 in hit, "voxels": int(v), "volume_ml": float(v * voxel_ml),
                           "z_min": z[0], "z_max": z[1]}
                          for i, (v, z) in enumerate(zip(voxels, _slice_ranges(true_labels, n_true)))]
    return out


def case_volume_scores(truth: Any, pred: Any, spacing: Any,
                       tolerance_mm: float = DEFAULT_TOLERANCE_MM,
                       connectivity: int = LESION_CONNECTIVITY) -> dict[str, float]:
    """Every volume metric of one case from its (Z, Y, X) truth and prediction masks.

    Keys: ``dice`` (NaN when both empty), ``hd95_mm``, ``nsd`` (at ``nsd_tolerance_mm``, also
    returned, so the row says which tolerance it used), ``true_ml``, ``pred_ml``, ``avd_ml``,
    ``lesion_found``, ``lesion_missed``, ``lesion_false`` (as floats) and ``lesion_f1``."""
    t, p = _pair(truth, pred)
    s = _spacing(spacing)
    tp, fp, fn = int(np.sum(t & p)), int(np.sum(~t & p)), int(np.sum(t & ~p))
    det = lesion_detection(t, p, connectivity=connectivity)
    true_ml, pred_ml = volume_ml(t, s), volume_ml(p, s)
    return {"dice": scores_from_counts(tp, fp, fn)["dice"], "hd95_mm": hd95(t, p, s),
            "nsd": nsd(t, p, s, tolerance_mm), "nsd_tolerance_mm": float(tolerance_mm),
            "true_ml": true_ml, "pred_ml": pred_ml, "avd_ml": abs(pred_ml - true_ml),
            "lesion_found": float(det["found"]), "lesion_missed": float(det["missed"]),
            "lesion_false": float(det["false"]), "lesion_f1": det["f1"]}


SUMMARY_KEYS = ("dice", "hd95_mm", "nsd", "true_ml", "pred_ml", "avd_ml", "lesion_f1")


def summarize_volume_cases(rows: list[dict[str, float]]) -> dict[str, float]:
    """Split figures from ``case_volume_scores`` rows.

    For each of ``SUMMARY_KEYS``: ``<key>_mean`` and ``<key>_median`` over the cases where it is
    not NaN (NaN when none is). ``hd95_mm_nan_cases``: cases whose HD95 is NaN (one mask empty),
    left out of the HD95 mean and median, which they would otherwise worsen; ``dice_nan_cases``
    likewise. ``lesion_found``/``_missed``/``_false``: sums over cases, and ``lesion_f1_pooled``
    the F1 of those sums (1.0 when all are 0). ``nsd_tolerance_mm``: the rows' common tolerance
    (a ValueError if they differ). ``cases``: the number of rows."""
    tolerances = {r["nsd_tolerance_mm"] for r in rows}
    if len(tolerances) > 1:
        raise ValueError(f"rows use different NSD tolerances: {sorted(tolerances)}")
    out: dict[str, float] = {"cases": len(rows)}
    for key in SUMMARY_KEYS:
        values = np.array([r[key] for r in rows], np.float64)
        defined = values[~np.isnan(values)]
        out[f"{key}_mean"] = float(defined.mean()) if len(defined) else math.nan
        out[f"{key}_median"] = float(np.median(defined)) if len(defined) else math.nan
    out["hd95_mm_nan_cases"] = int(sum(math.isnan(r["hd95_mm"]) for r in rows))
    out["dice_nan_cases"] = int(sum(math.isnan(r["dice"]) for r in rows))
    found, missed, false = (int(sum(r[k] for r in rows)) for k in ("lesion_found", "lesion_missed", "lesion_false"))
    out.update({"lesion_found": found, "lesion_missed": missed, "lesion_false": false,
                "lesion_f1_pooled": detection_f1(found, missed, false),
                "nsd_tolerance_mm": tolerances.pop() if tolerances else math.nan})
    return out
