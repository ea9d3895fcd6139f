"""Lesions inside the brain: predicted lesion voxels outside the intracranial space are removed.

The mask is the head model's (``data/ct/head.py`` ``brain_mask``: the skull's enclosed intracranial
regions from HU alone, less air and bone; its docstring says why it is that and not the narrower
soft-tissue intracranial space). It is a step on a case's predicted label map, on by default and
recorded in the export (``export.json`` ``brain_mask``, from the training config's
``eval.brain_mask``; ``--brain-mask``/``--no-brain-mask`` of ``infer`` and ``evaluate`` override it):

- ``infer`` on CT volumes computes it from the case's HU (the head model the QA gate reads, not
  computed twice) on the scan's own grid;
- ``evaluate`` on a store prepared from CT volumes reads it from the store (``prepare`` keeps it
  beside each slice at model size, the shards' ``brain`` feature); a store of PNG slices has none
  (windowed 8-bit slices alone cannot tell air, CSF and bone apart), and the step says it was not
  applied, and why.

A case whose head model finds no intracranial space at all (not a head: the QA gate's coverage
check warns of it) loses every lesion voxel, as it has none inside a brain; so does a slice without
one (``head.py`` says which, and that ``--no-brain-mask`` keeps them, after a craniectomy say).

Order: the brain mask first, then the export's post-processing (``postprocess.py``). A rule that
keeps the largest component, or drops small ones, judges components against each other: a false
"lesion" in the orbit or the scalp could be the largest and take the true one's place; removed
first, it cannot. What post-processing removes is then counted on what the brain mask left, so the
two reported volumes add up to what the network predicted.

Every label map is a (Z, Y, X) array of class ids (any non-zero voxel is lesion); ``spacing`` a
voxel's (z, y, x) size in mm; volumes in mL (``volume_metrics.volume_ml``). No TensorFlow here.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from aisd_ray.scoring import volume_metrics

log = logging.getLogger(__name__)

# why the step was not applied, as metrics.json and summary.json say it
OFF = "turned off (--no-brain-mask, or the export's brain_mask is false)"
NO_MASK = "the store holds no intracranial mask (slices, not CT volumes)"
OLD_STORE = "the store was prepared before prepare kept the intracranial mask: prepare it again"


def apply(labels: Any, brain: Any, spacing: Any) -> tuple[np.ndarray, float]:
    """(``labels`` with every lesion voxel outside ``brain`` set to 0, the mL removed). ``labels``:
    (Z, Y, X) class ids; ``brain``: (Z, Y, X) bool (non-zero: inside), the same shape; ``spacing``:
    (z, y, x) mm. Slice by slice: beyond a copy of ``labels`` nothing the volume's size is made.
    ValueError when the shapes differ."""
    labels, brain = np.asarray(labels), np.asarray(brain)
    if labels.shape != brain.shape:
        raise ValueError(f"labels of shape {labels.shape} but a brain mask of shape {brain.shape}")
    kept, outside = labels.copy(), 0
    for k in range(labels.shape[0]):
        out = (labels[k] > 0) & ~brain[k].astype(bool)
        kept[k][out] = 0
        outside += int(out.sum())
    return kept, outside * volume_metrics.volume_ml(np.ones((1, 1, 1), bool), spacing)


def applied(removed_ml: float) -> dict[str, Any]:
    """What a case's summary says of a step that was applied."""
    return {"applied": True, "removed_ml": round(float(removed_ml), 3)}


def not_applied(reason: str) -> dict[str, Any]:
    """What a summary says of a step that was not applied (``reason``: ``OFF``, ``NO_MASK`` ...)."""
    return {"applied": False, "reason": reason, "removed_ml": 0.0}


def on_volume(labels: np.ndarray, hu: np.ndarray, spacing, head, on: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """``infer``'s step on one case: (labels, its record, ``applied`` or ``not_applied``). ``labels``:
    (Z, Y, X) class ids on the scan's grid, ``hu`` the scan's (Z, Y, X) HU, ``head`` its head model
    (``head.head_model``, reused). ``on`` False: the labels as they are, ``not_applied(OFF)``."""
    return on_mask(labels, mask_of(hu, spacing, head, on), spacing)


def mask_of(hu: np.ndarray, spacing, head, on: bool) -> np.ndarray | None:
    """The case's brain mask ((Z, Y, X) bool, ``head.brain_mask``) when the step is ``on``, else
    None: taken before the network runs, so the head model (four masks the volume's size) can be
    let go first (``infer_volumes.infer_case``)."""
    if not on:
        return None
    from aisd_ray.data.ct.head import brain_mask

    return brain_mask(hu, spacing, head)


def on_mask(labels: np.ndarray, mask: np.ndarray | None, spacing) -> tuple[np.ndarray, dict[str, Any]]:
    """(labels, record) of the step with a mask from ``mask_of``: None, the step is off."""
    if mask is None:
        return labels, not_applied(OFF)
    kept, removed = apply(labels, mask, spacing)
    return kept, applied(removed)


def store_reason(manifest: dict[str, Any]) -> str | None:
    """None when a store (its manifest) keeps the intracranial mask beside each slice; else why not
    (``NO_MASK`` for slices, ``OLD_STORE`` for CT volumes prepared before it was kept)."""
    source = manifest.get("source") or {}
    if source.get("brain_mask"):
        return None
    return OLD_STORE if "geometry" in source else NO_MASK


def resolve(given: bool | None, model: Any) -> bool:
    """Whether the step runs: ``given`` (``--brain-mask``/``--no-brain-mask``) when not None, else the
    model's ``brain_mask`` (an export's record; ``export.LoadedExport``), else off (a model object
    that records none, as a test double without ``tta`` predicts without TTA)."""
    return bool(getattr(model, "brain_mask", False)) if given is None else bool(given)


def on_store(volumes: Any, manifest: dict[str, Any], spacing: dict[str, Any], on: bool) -> dict[str, Any]:
    """``evaluate``'s step on a split's case volumes (``evaluate.CaseVolumes``: its ``apply_brain``
    removes, case by case, what lies outside the slices' stored masks; ``spacing``: (z, y, x) mm of a
    model-size voxel per case). The record for metrics.json: ``applied`` with the total mL removed and
    the cases, or ``not_applied`` with the reason (turned off, or a store without the mask: one log
    line)."""
    reason = OFF if not on else store_reason(manifest)
    if reason:
        log.info("brain mask not applied: %s", reason)
        return not_applied(reason)
    return {**applied(volumes.apply_brain(spacing)), "cases": len(volumes.brain_removed)}
