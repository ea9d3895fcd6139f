"""Realistic synthetic patients in HU: ``anatomy`` (the head, level by level) with ``mimics`` (the
acute lesion in a vascular territory and the dark tissue that is not one). ``volumes.synth_volume``
calls ``synth_head`` when ``synthetic.anatomy`` is "realistic" (the default); "simple" keeps the
earlier ellipse heads of ``volumes.synth_hu_slice``, bit for bit.

Geometry as the simple heads: (Z, Y, X) canonical, z inferior to superior, y anterior to posterior,
x patient right to left; the slices sample the head from the skull base (``z`` -1) to the vertex
(``z`` 1) whatever their number, the head's outline shrinking towards both ends.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np

from aisd_ray.data.synthetic.anatomy import Patient, draw_slice
from aisd_ray.data.synthetic.mimics import AcuteLesion, Mimics, place_lesion
from aisd_ray.data.synthetic.slices import Head

HEAD_SCALE = 0.9  # the simple heads' outline is the skull: leave room for scalp and holder in the view
PARTS = ("scalp", "holder", "skull", "sinus_air", "mastoid_air", "petrous", "orbital_fat", "globes", "intracranial",
         "parenchyma", "white", "csf", "sulci", "ventricles", "third_ventricle", "fourth_ventricle", "cisterns",
         "falx", "pineal", "plexus", "cerebellum", "brainstem", "streaks", "old_infarct", "lacunes", "leukoaraiosis")


def case_key(case: str) -> int:
    """A case ID's 64-bit random-stream key (SHA-256), the same on every machine."""
    return int.from_bytes(hashlib.sha256(str(case).encode()).digest()[:8], "little")


def synth_head(seed: int, case: str, size: int, slices: int, lesion_hu: float, noise_hu: float, slice_mm: float,
               fov_mm: float, with_parts: bool = False):
    """One patient: (HU int16 (Z, Y, X), labels uint8 0/1, spacing (z, y, x) mm) as
    ``volumes.synth_volume``; with ``with_parts`` also {part name: (Z, Y, X) bool} (``PARTS``: where
    each anatomical part and mimic was drawn; the tests check them), for small volumes."""
    key = case_key(case)
    rng = np.random.default_rng([seed, key, 1])
    head = Head.draw(rng)
    head = replace(head, ax=head.ax * HEAD_SCALE, ay=head.ay * HEAD_SCALE)
    pat = Patient.draw(rng)
    zs = [(k + 0.5) / slices * 2 - 1 for k in range(slices)]
    acute = AcuteLesion.draw(rng)
    run = acute.run(zs, rng)
    mimics = Mimics.draw(rng, pat, zs)
    hu = np.empty((slices, size, size), np.int16)
    labels = np.zeros((slices, size, size), np.uint8)
    parts = {name: np.zeros((slices, size, size), bool) for name in PARTS} if with_parts else {}
    pixel_mm = fov_mm / size
    for k, z in enumerate(zs):
        srng = np.random.default_rng([seed, key, k, 1])
        shrink = float(np.sqrt(1 - (0.55 * z) ** 2))
        sl = draw_slice(srng, size, replace(head, ax=head.ax * shrink, ay=head.ay * shrink), pat, z, fov_mm)
        mask = np.zeros((size, size), bool)
        if k in run:
            t = (run.index(k) + 0.5) / len(run)
            mask = acute.mask(sl, 0.55 + 0.45 * float(np.sin(np.pi * t)), srng)
            place_lesion(sl, mask, lesion_hu)
        drawn = mimics.apply(sl, k, mask, pat, srng, pixel_mm)
        sl.hu += srng.normal(0, noise_hu, sl.hu.shape).astype(np.float32)
        hu[k] = np.rint(np.clip(sl.hu, -1024, 3071)).astype(np.int16)
        labels[k] = mask
        for name in parts:
            found = drawn.get(name, sl.parts.get(name))
            if found is not None:
                parts[name][k] = found
    spacing = (float(slice_mm), fov_mm / size, fov_mm / size)
    return (hu, labels, spacing, parts) if with_parts else (hu, labels, spacing)
