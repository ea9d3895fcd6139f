"""Post-processing of 3-D lesion masks, chosen on validation cases as nnU-Net chooses its
"keep the largest component" step: applied only where it improves the validation cases' Dice.

Every label map is a (Z, Y, X) array of class ids (uint8; any non-zero voxel is lesion), slices in
order; ``spacing`` is a voxel's (z, y, x) size in mm. Lesions are the 3-D 26-connected components
of the lesion (``volume_metrics.label_lesions``, the one home of the connectivity); a rule removes
whole components (every class of their voxels set to background) and never adds or relabels one.

Rules (a *choice* is the dict ``{"rule", "min_ml", "min_voxels"}``, as ``choose`` returns it):

- ``none``: the network's mask as it is;
- ``remove_small``: components under ``min_ml`` mL, or, for a store whose spacing is unknown,
  under ``min_voxels`` voxels at model resolution, removed;
- ``keep_largest``: only the largest component kept (the first in C order on a tie).

Where a choice lives: ``postprocess.json`` beside ``export.json`` in the export folder
(``save``/``load``), a file of its own rather than an update of export.json because export.json
records what the export *is* (written once with the SavedModel, its provenance and its
``.complete`` marker), while the choice is a later decision on one validation split that may be
redone, or deleted to go back to ``none``, without rewriting that record. No TensorFlow here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from aisd_ray.core import storage
from aisd_ray.data.sources.layout import DataError
from aisd_ray.scoring import volume_metrics
from aisd_ray.scoring.counts import scores_from_counts

FILE = "postprocess.json"
RULES = ("none", "remove_small", "keep_largest")
NONE: dict[str, Any] = {"rule": "none", "min_ml": None, "min_voxels": None}
THRESHOLDS_ML = (0.1, 0.5, 1.0, 2.0)
# for stores without spacing: about 0.1, 0.5, 1 and 2 mL at the default 128 px model size on AISD
# (512 px at ~0.45 mm shown in 128 px is 1.8 mm a pixel; with 8 mm slices a voxel is ~0.026 mL)
THRESHOLDS_VOXELS = (4, 20, 40, 80)
# a rule is taken only when it beats ``none`` by more than this in mean validation case Dice: chosen
# here (nnU-Net takes any improvement) so that a few voxels' change on a handful of cases is not
# mistaken for a gain
MARGIN = 0.005


def _lesions(labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels as an array, component ids, voxels per component id (index 0: background))."""
    array = np.asarray(labels)
    ids, n = volume_metrics.label_lesions(array)
    return array, ids, volume_metrics.voxel_counts(ids, n)


def _keep(array: np.ndarray, ids: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """``array`` with the voxels of components whose ``kept`` entry is False set to 0."""
    kept = kept.copy()
    kept[0] = True  # background stays as it is
    return np.where(kept[ids], array, 0).astype(array.dtype)


def remove_small(labels: Any, spacing: Sequence[float] | None = None, min_ml: float | None = None, *,
                 min_voxels: int | None = None) -> np.ndarray:
    """``labels`` (Z, Y, X) with every lesion component under ``min_ml`` mL (voxels x prod(spacing
    mm) / 1000, as ``volume_metrics.volume_ml``), or under ``min_voxels`` voxels, set to 0; the
    same dtype. Give one of the two; ``min_ml`` needs ``spacing`` (z, y, x) mm. ValueError
    otherwise, for a mask that is not 3-D, or a bad spacing."""
    if (min_ml is None) == (min_voxels is None):
        raise ValueError("remove_small: give min_ml (with spacing) or min_voxels, not both")
    array, ids, voxels = _lesions(labels)
    if min_ml is not None:
        if spacing is None:
            raise ValueError("remove_small: min_ml needs the voxel spacing (z, y, x) in mm")
        sizes = voxels * volume_metrics.volume_ml(np.ones((1, 1, 1)), spacing)
        return _keep(array, ids, sizes >= min_ml)
    return _keep(array, ids, voxels >= min_voxels)


def keep_largest(labels: Any) -> np.ndarray:
    """``labels`` (Z, Y, X) with only its largest lesion component (most voxels; on a tie the first
    in C order, as ``volume_metrics.components``); an empty mask comes back empty. Same dtype."""
    array, ids, voxels = _lesions(labels)
    if len(voxels) <= 2:  # no component or one: nothing to remove
        return array.copy()
    kept = np.zeros(len(voxels), bool)
    kept[1 + int(np.argmax(voxels[1:]))] = True  # argmax: the first of equal maxima
    return _keep(array, ids, kept)


def check(choice: Any, where: str) -> dict[str, Any]:
    """A choice as read from ``where`` (a file), validated: DataError naming ``where`` and the key."""
    if not isinstance(choice, dict) or choice.get("rule") not in RULES:
        raise DataError(f"{where}: rule must be one of {', '.join(RULES)}, got "
                        f"{choice.get('rule') if isinstance(choice, dict) else choice!r}")
    if choice["rule"] == "remove_small":
        given = [k for k in ("min_ml", "min_voxels") if choice.get(k) is not None]
        if len(given) != 1 or not (isinstance(choice[given[0]], (int, float)) and choice[given[0]] > 0):
            raise DataError(f"{where}: remove_small needs one positive min_ml or min_voxels, got "
                            f"min_ml={choice.get('min_ml')!r}, min_voxels={choice.get('min_voxels')!r}")
    return {**NONE, **choice}


def apply(choice: dict[str, Any], labels: Any, spacing: Sequence[float] | None = None,
          voxel_ml: float | None = None) -> np.ndarray:
    """``labels`` (Z, Y, X) after ``choice``. ``spacing``: (z, y, x) mm of ``labels``' voxels, needed
    by a ``min_ml`` rule. ``voxel_ml``: the mL of one *model-resolution* voxel where ``labels`` are at
    another resolution (a scan's own grid), so that a ``min_voxels`` rule, chosen at model
    resolution, removes the same volume (``min_voxels`` x ``voxel_ml`` mL, with ``spacing``)."""
    rule = choice.get("rule", "none")
    if rule == "none":
        return np.asarray(labels)
    if rule == "keep_largest":
        return keep_largest(labels)
    if choice.get("min_ml") is not None:
        return remove_small(labels, spacing, choice["min_ml"])
    if voxel_ml is not None:
        return remove_small(labels, spacing, choice["min_voxels"] * voxel_ml)
    return remove_small(labels, min_voxels=int(choice["min_voxels"]))


def describe(choice: dict[str, Any]) -> str:
    """One line: ``none``, ``keep_largest``, ``remove_small < 0.5 mL`` or ``remove_small < 20 voxels``."""
    if choice.get("rule") != "remove_small":
        return str(choice.get("rule", "none"))
    return (f"remove_small < {choice['min_ml']:g} mL" if choice.get("min_ml") is not None
            else f"remove_small < {choice['min_voxels']} voxels")


def case_dice(truth: Any, pred: Any) -> float:
    """Lesion Dice of one case's (Z, Y, X) volumes, 2TP / (2TP + FP + FN) over non-zero voxels; NaN
    when both are empty (``counts.scores_from_counts``)."""
    t, p = np.asarray(truth) > 0, np.asarray(pred) > 0
    return scores_from_counts(int(np.sum(t & p)), int(np.sum(~t & p)), int(np.sum(t & ~p)))["dice"]


def candidates(in_ml: bool) -> dict[str, dict[str, Any]]:
    """{name: choice}: none, remove_small at each threshold (mL, else voxels), keep_largest; mildest first."""
    out = {"none": dict(NONE)}
    if in_ml:
        out.update({f"remove_small_{t:g}ml": {**NONE, "rule": "remove_small", "min_ml": t} for t in THRESHOLDS_ML})
    else:
        out.update({f"remove_small_{t}vox": {**NONE, "rule": "remove_small", "min_voxels": t}
                    for t in THRESHOLDS_VOXELS})
    out["keep_largest"] = {**NONE, "rule": "keep_largest"}
    return out


def choose(cases: Sequence[tuple[Any, Any, Sequence[float] | None]], margin: float = MARGIN) -> dict[str, Any]:
    """Pick the post-processing of validation ``cases``: (truth, prediction, spacing or None) each,
    (Z, Y, X) label maps at the same resolution. Every candidate (``candidates``: mL thresholds when
    every case has a spacing, else voxel thresholds) is applied to each prediction and scored by the
    mean case Dice over the cases where it is defined (both empty: left out, as nnU-Net's nanmean);
    the best (the mildest on a tie) is taken only if it beats ``none`` by more than ``margin``, else
    ``none``. Returns the choice (``rule``, ``min_ml``, ``min_voxels``) with ``chosen`` (the
    candidate's name), ``val_case_dice`` ({name: mean case Dice, NaN where no case is defined}),
    ``margin`` and ``cases``. ValueError for no cases."""
    if not cases:
        raise ValueError("choose: no validation cases (post-processing is chosen on per-case volumes)")
    in_ml = all(spacing is not None for _, _, spacing in cases)
    scores = {}
    for name, choice in candidates(in_ml).items():
        dice = [case_dice(t, apply(choice, p, s)) for t, p, s in cases]
        defined = [d for d in dice if not math.isnan(d)]
        scores[name] = float(np.mean(defined)) if defined else math.nan
    rank = {name: (-math.inf if math.isnan(v) else v) for name, v in scores.items()}
    best = max(rank, key=lambda name: rank[name])  # max keeps the first (mildest) of equal scores
    chosen = best if rank[best] > rank["none"] + margin else "none"
    return {**candidates(in_ml)[chosen], "chosen": chosen, "val_case_dice": scores, "margin": margin,
            "cases": len(cases)}


def save(export_uri: str, choice: dict[str, Any]) -> str:
    """Write ``choice`` as ``postprocess.json`` in the export folder, atomically (``storage.write_json``:
    a temporary name and a rename, or an object published whole); its uri."""
    uri = storage.join(export_uri, FILE)
    storage.write_json(uri, choice)
    return uri


def load(folder: Path, where: str) -> dict[str, Any]:
    """The choice in ``folder``'s postprocess.json (``where``: its name for errors), ``NONE`` when the
    export has none. DataError naming the file when it is not JSON or not a valid choice."""
    import json

    path = Path(folder) / FILE
    if not path.is_file():
        return dict(NONE)
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not JSON ({exc.msg}, line {exc.lineno})") from None
    return check(value, where)
