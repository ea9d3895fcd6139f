"""The head model: where the head, the skull and the intracranial space lie in a CT volume, from
Hounsfield units alone (no trained model), and the figures the QA gate (``qa.py``) reads from it.

Input: a canonical volume (``volume.Volume.hu``: (Z, Y, X) int16 HU, z inferior to superior) and its
spacing (z, y, x) mm. The rules, each with its reason:

- **head** (the body in the field of view): voxels above ``hu.TISSUE_HU`` (-500 HU, halfway between air,
  -1000, and fat, -100: any tissue is above it, air and the air-filled table padding below), the
  largest 3-D connected component (6-connected: the patient; a head holder, a table or a blanket
  touching nothing is left out), its holes filled slice by slice (sinuses, mastoid air cells and the
  ear canals are inside the head though they hold air).
- **skull**: head voxels at or above ``BONE_HU`` (300 HU: cortical bone is 700..2000 HU, the
  diploe 300..700; calcified falx or plexus at 100..300 and every soft tissue, blood included, stay
  below it).
- **intracranial space**: per axial slice, the skull ring closed by ``CLOSE_MM`` (2 mm: sutures and
  small foramina, not the gaps between ribs or pelvic bones, which are centimetres wide), its inside
  filled, the bone removed; of the enclosed regions only those of at least ``MIN_CAVITY_MM2``
  (1000 mm^2: a brain's cross-section from the skull base to near the vertex; the spinal canal,
  about 200..300 mm^2, and a vertebral body are smaller) in which at least ``SOFT_SHARE`` (80%) of
  the voxels lie in ``SOFT_HU`` (-20..100 HU: CSF 0..15 with noise, parenchyma 20..45, acute blood up
  to 90; fat at -100, air and bone fall outside). A brain is that homogeneous; a pelvis or abdomen
  enclosed by bone holds fat and bowel gas. Within such a region the voxels in ``SOFT_HU`` are the
  intracranial space.

**Brain mask** (``brain_mask``: where a predicted lesion may lie; ``inference/brain_mask.py`` removes
lesion voxels outside it): the enclosed regions kept above, whole, less the voxels at or below
``TISSUE_HU`` (air: pneumocephalus, a sinus cell the closing reached) and at or above ``BONE_HU``
(calcification). Wider than the intracranial space on purpose: the intracranial space keeps only the
voxels in ``SOFT_HU``, so a lesion voxel that noise pushes below -20 HU or a haemorrhage above
100 HU, and the partial-volume voxels at the inner table (100..300 HU), would be cut from a lesion
that is inside the skull. Still outside it: the bone (the closed ring), the scalp, the orbits, the
air and everything beyond the head or the field of view (outside the ring, or in no region that
passes the area and soft-share rules). A slice without such a region (below the skull base, the
vertex's last few millimetres, a craniectomy's open ring) has an empty brain mask: a lesion there is
removed, and ``--no-brain-mask`` is the way to keep it (after a craniectomy, say).

Figures (``HeadModel``): the head's share of the field of view, the intracranial volume (mL), and,
inside the intracranial space eroded by one pixel in-plane (so bone's partial volume at the inner
table does not count), the median HU (the brain is most of the intracranial volume, so the median
is a parenchyma value that CSF and a lesion barely move) and the noise: 1.4826 x the median absolute
deviation of the differences between in-plane neighbours, over sqrt(2) (a difference of two
neighbours cancels the anatomy, which is smooth at the pixel scale, and doubles the noise variance;
the MAD ignores the edges of ventricles and sulci).

On a 512x512x40 volume: a few seconds (``scipy.ndimage``, labelling and filling slice by slice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from aisd_ray.data.sources.hu import TISSUE_HU

BONE_HU = 300
SOFT_HU = (-20, 100)
CLOSE_MM = 2.0
MIN_CAVITY_MM2 = 1000.0
SOFT_SHARE = 0.8


@dataclass(frozen=True, eq=False)
class HeadModel:
    """The head model of one volume. Masks: (Z, Y, X) bool, as the volume. ``head_fraction``: the
    head's share of the field of view (head voxels / all voxels, 0..1); ``intracranial_ml``: the
    intracranial space in mL; ``parenchyma_hu_median``, ``parenchyma_noise_hu``: HU inside it
    (module docstring), None when it is empty."""

    head: np.ndarray = field(repr=False)
    skull: np.ndarray = field(repr=False)
    intracranial: np.ndarray = field(repr=False)
    head_fraction: float
    intracranial_ml: float
    parenchyma_hu_median: float | None
    parenchyma_noise_hu: float | None
    # the enclosed regions kept by the area and soft-share rules, whole (bone ring excluded): the
    # ground of ``brain_mask``
    cavity: np.ndarray | None = field(default=None, repr=False)

    def stats(self) -> dict[str, float | None]:
        """The figures as a JSON-able dict (rounded)."""
        def r(v, n):
            return None if v is None else round(float(v), n)

        return {"head_fraction": r(self.head_fraction, 4), "intracranial_ml": r(self.intracranial_ml, 1),
                "parenchyma_hu_median": r(self.parenchyma_hu_median, 2),
                "parenchyma_noise_hu": r(self.parenchyma_noise_hu, 2)}


def _head_mask(hu: np.ndarray) -> np.ndarray:
    tissue = hu > TISSUE_HU
    labels, n = ndimage.label(tissue)
    if n == 0:
        return tissue
    del tissue
    # the sizes counted slice by slice: a bincount of the whole int32 volume would copy it as int64
    sizes = sum(np.bincount(labels[k].ravel(), minlength=n + 1) for k in range(labels.shape[0]))
    sizes[0] = 0
    head = labels == int(np.argmax(sizes))
    del labels
    return np.stack([ndimage.binary_fill_holes(s) for s in head])


def _cavity_slice(hu: np.ndarray, bone: np.ndarray, pixel_mm2: float, close_px: int) -> np.ndarray:
    """The enclosed regions of one slice that pass the area and soft-share rules, whole."""
    if not bone.any():
        return np.zeros_like(bone)
    ring = ndimage.binary_closing(np.pad(bone, close_px), iterations=close_px)[close_px:-close_px,
                                                                               close_px:-close_px] if close_px else bone
    inside = ndimage.binary_fill_holes(ring) & ~ring
    labels, n = ndimage.label(inside)
    if n == 0:
        return inside
    soft = (hu >= SOFT_HU[0]) & (hu <= SOFT_HU[1])
    index = np.arange(1, n + 1)
    area = ndimage.sum_labels(np.ones_like(inside), labels, index) * pixel_mm2
    share = ndimage.mean(soft, labels, index)
    keep = np.zeros(n + 1, bool)
    keep[1:] = (area >= MIN_CAVITY_MM2) & (share >= SOFT_SHARE)
    return keep[labels]


def _noise(hu: np.ndarray, region: np.ndarray) -> float | None:
    # slice by slice, only the pairs: no mask, float or index array of the whole volume
    hu, region = np.asarray(hu), np.asarray(region)
    if hu.ndim == 2:
        hu, region = hu[None], region[None]
    counts = [int((r[..., 1:] & r[..., :-1]).sum()) for r in region]
    if sum(counts) < 50:
        return None
    diff, at = np.empty(sum(counts), np.float32), 0
    for h, r, n in zip(hu, region, counts):
        pair = r[..., 1:] & r[..., :-1]
        diff[at:at + n] = h[..., 1:][pair].astype(np.float32) - h[..., :-1][pair]
        at += n
    centre = np.median(diff, overwrite_input=True)  # in place: the median of the same values
    diff -= centre
    np.abs(diff, out=diff)
    return float(1.4826 * np.median(diff, overwrite_input=True) / np.sqrt(2))


def head_model(hu: np.ndarray, spacing: tuple[float, float, float]) -> HeadModel:
    """The head, skull and intracranial space of ``hu`` ((Z, Y, X) HU, canonical orientation) at
    ``spacing`` ((z, y, x) mm), with their figures (module docstring: the rules and why). Raises
    ValueError for an array that is not 3-D."""
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"a (Z, Y, X) volume expected, got shape {hu.shape}")
    dz, dy, dx = (float(s) for s in spacing)
    head = _head_mask(hu)
    skull = head & (hu >= BONE_HU)
    close_px = int(min(10, round(CLOSE_MM / min(dy, dx))))
    cavity = np.stack([_cavity_slice(hu[k], skull[k], dy * dx, close_px) for k in range(hu.shape[0])]) & head
    intracranial = cavity & (hu >= SOFT_HU[0]) & (hu <= SOFT_HU[1])
    core = ndimage.binary_erosion(intracranial, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool))
    values = hu[core]
    return HeadModel(head, skull, intracranial, float(head.mean()) if head.size else 0.0,
                     float(intracranial.sum()) * dz * dy * dx / 1000.0,
                     float(np.median(values)) if values.size >= 50 else None, _noise(hu, core), cavity)


def brain_mask(hu: np.ndarray, spacing: tuple[float, float, float], model: HeadModel | None = None) -> np.ndarray:
    """Where a lesion may lie: (Z, Y, X) bool, as ``hu`` ((Z, Y, X) HU, canonical) at ``spacing``
    ((z, y, x) mm): the head model's enclosed intracranial regions, whole, less air (at or below
    ``TISSUE_HU``) and bone (at or above ``BONE_HU``); the module docstring says why it is wider
    than ``HeadModel.intracranial``. ``model``: this volume's head model when already computed (it
    is then not computed again). ValueError for an array that is not 3-D."""
    hu = np.asarray(hu)
    if model is None or model.cavity is None:
        model = head_model(hu, spacing)
    out = np.empty(hu.shape, bool)
    for k in range(hu.shape[0]):  # slice by slice: no volume-sized temporaries
        out[k] = model.cavity[k] & (hu[k] > TISSUE_HU) & (hu[k] < BONE_HU)
    return out
