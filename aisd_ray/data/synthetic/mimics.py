"""The acute lesion in a vascular territory, and the dark soft tissue that is not one (labelled background).

A model trained on heads where nothing but the lesion is darker than parenchyma learns "dark is
lesion" and outlines every ventricle, cistern and old scar of a real head. The mimics (each drawn
where it lies in real heads, in brain coordinates of ``anatomy``) and their HU; how often each is
drawn is a choice (so that a 44-patient set holds several of each), not an epidemiological figure:

- **old infarct** (35% of patients): a chronic territorial infarct is encephalomalacia, CSF-dense
  (the patient's CSF value, 0..4 HU above it) with sharp edges, a cortical-subcortical wedge in a
  branch of a territory, on one to two slices.
- **lacunes** (0..4, more with age): small deep infarcts, 3..12 mm (the definition's 3..15 mm), round,
  CSF-dense, in the lentiform nuclei, thalami, internal capsules and corona radiata; one slice each.
- **leukoaraiosis** (graded 0..3 with age): periventricular white-matter hypodensity, bilateral and
  symmetric, a band 3, 6 or 10 mm wide around the lateral ventricles (caps at the horns), 4..8 HU
  below white matter (normal white matter 24..29, leukoaraiosis about 18..24), with soft edges.

The **acute lesion**: early ischaemic change lowers attenuation by a few HU (``lesion_hu`` below the
tissue each voxel lies in, grey or white: the loss of grey-white differentiation), in one arterial
territory: the middle cerebral artery's (75%: the most common stroke, lateral hemisphere from the
Sylvian fissure, cortex to the basal ganglia), the posterior's (15%: occipital lobe and thalamus, at
lower levels) or the anterior's (10%: a paramedian strip along the falx, frontal and parietal). A
sub-sector of the territory, through neighbouring slices whose level the territory reaches, never
the first or last. Mimics keep 3 mm away from it, so no mimic voxel is ever labelled lesion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from aisd_ray.data.synthetic.anatomy import Patient, Slice
from aisd_ray.data.synthetic.slices import _smooth_noise

# levels (z) each territory reaches: MCA from the Sylvian fissure to high convexity, ACA from the
# frontal horns to the vertex, PCA from the midbrain to the atria
TERRITORY_Z = {"MCA": (-0.5, 0.75), "ACA": (-0.2, 0.95), "PCA": (-0.65, 0.3)}
TERRITORY_SHARE = {"MCA": 0.75, "PCA": 0.15, "ACA": 0.10}


@dataclass(frozen=True)
class AcuteLesion:
    """The acute infarct: its territory, side (-1 right, 1 left), sector (rad) and inner radius."""

    territory: str
    side: int
    phi0: float
    width: float
    r_in: float
    extent: tuple[float, float]  # ACA: q from..to; PCA: q from, lateral reach

    @classmethod
    def draw(cls, rng: np.random.Generator) -> AcuteLesion:
        names = list(TERRITORY_SHARE)
        territory = str(rng.choice(names, p=[TERRITORY_SHARE[n] for n in names]))
        return cls(territory, int(rng.choice([-1, 1])), float(rng.uniform(-0.7, 0.7)), float(rng.uniform(0.6, 1.3)),
                   float(rng.uniform(0.3, 0.65)),
                   (float(rng.uniform(-0.95, -0.6)), float(rng.uniform(-0.1, 0.3))) if territory == "ACA"
                   else (float(rng.uniform(0.35, 0.55)), float(rng.uniform(0.35, 0.6))))

    def run(self, zs: list[float], rng: np.random.Generator) -> list[int]:
        """The slices it runs through: a contiguous run of those (never the first or last) whose level
        the territory reaches; the inner slices when none does."""
        lo, hi = TERRITORY_Z[self.territory]
        inner = list(range(1, len(zs) - 1))
        eligible = [k for k in inner if lo <= zs[k] <= hi] or inner
        if not eligible:
            return []
        m = len(eligible)
        length = int(rng.integers(max(1, (m + 1) // 2), m + 1))
        start = int(rng.integers(0, m - length + 1))
        return eligible[start:start + length]

    def mask(self, sl: Slice, scale: float, rng: np.random.Generator) -> np.ndarray:
        """Its voxels in ``sl`` (bool), ``scale`` (0.55..1) its size at this slice of the run, with an
        irregular rim; parenchyma only."""
        size = sl.p.shape[0]
        edge = 0.08 * _smooth_noise(rng, size, 12)
        sp = self.side * sl.p
        if self.territory == "MCA":
            phi = np.arctan2(sl.q, sp)
            dphi = _wrapped(phi - self.phi0)
            area = (np.abs(dphi) < self.width * scale / 2 + edge) & (np.hypot(sl.p, sl.q) > self.r_in + edge)
        elif self.territory == "ACA":
            q0, q1 = self.extent
            area = (sp > 0.01) & (sp < 0.1 + 0.18 * scale + edge) & (sl.q > q0 + edge) & (sl.q < q1 + edge)
        else:
            q0, reach = self.extent
            area = (sp > 0.01) & (sp < reach * scale + edge) & (sl.q > q0 - edge)
        return area & (sp > 0) & sl.parenchyma


@dataclass(frozen=True)
class Mimics:
    """Which mimics a patient has and where: old infarct (side, sector, slices), lacunes (slice, p, q,
    diameter mm), leukoaraiosis grade, its HU drop and slices."""

    old: tuple[int, float, float, float, tuple[int, ...]] | None
    lacunes: tuple[tuple[int, float, float, float], ...]
    leuko_grade: int
    leuko_hu: float
    leuko_slices: tuple[int, ...]  # around the frontal horns, bodies and atria, not the temporal horns

    @classmethod
    def draw(cls, rng: np.random.Generator, pat: Patient, zs: list[float]) -> Mimics:
        old = None
        cortical = [k for k, z in enumerate(zs) if -0.45 <= z <= 0.8]
        if cortical and rng.random() < 0.35:
            k = int(rng.choice(cortical))
            ks = tuple(j for j in (k, k + int(rng.choice([-1, 1]))) if j in cortical)
            old = (int(rng.choice([-1, 1])), float(rng.uniform(-1.2, 1.2)), float(rng.uniform(0.3, 0.6)),
                   float(rng.uniform(0.55, 0.8)), ks if rng.random() < 0.5 else (k,))
        deep = [k for k, z in enumerate(zs) if -0.35 <= z <= 0.6]
        spots = ((0.3, -0.08), (0.1, 0.16), (0.22, 0.0), (0.25, -0.12), (0.28, 0.2))
        lacunes = []
        for _ in range(min(4, int(rng.poisson(0.4 + 2.0 * pat.atrophy)))):
            if deep:
                p, q = spots[int(rng.integers(len(spots)))]
                lacunes.append((int(rng.choice(deep)), float(rng.choice([-1, 1]) * p + rng.normal(0, 0.03)),
                                float(q + rng.normal(0, 0.03)), float(rng.uniform(3, 12))))
        grade = int(np.clip(round(3 * pat.atrophy + rng.uniform(-0.7, 0.7)), 0, 3))
        return cls(old, tuple(lacunes), grade, float(rng.uniform(4, 8)),
                   tuple(k for k, z in enumerate(zs) if -0.3 <= z <= 0.7))

    def apply(self, sl: Slice, k: int, lesion: np.ndarray, pat: Patient, rng: np.random.Generator,
              pixel_mm: float) -> dict[str, np.ndarray]:
        """Draw this slice's mimics into ``sl.hu`` away from ``lesion`` (3 mm); return their masks."""
        size = sl.p.shape[0]
        keep = sl.parenchyma
        if lesion.any():
            grow = max(1, int(round(3 / pixel_mm)))
            near = _box(lesion, grow + 1)
            keep = keep.copy()
            keep[near] &= ~ndimage.binary_dilation(lesion[near], iterations=grow)
        out = {"old_infarct": np.zeros(lesion.shape, bool), "lacunes": np.zeros(lesion.shape, bool),
               "leukoaraiosis": np.zeros(lesion.shape, bool)}
        lateral = sl.parts["ventricles"] & ~sl.parts["third_ventricle"] & ~sl.parts["fourth_ventricle"]
        if self.grade_width_mm and k in self.leuko_slices and lateral.any():
            noise = _smooth_noise(rng, size, 10)
            noise = (noise + noise[:, ::-1]) / 2  # the same on both sides
            dist = np.full(lateral.shape, np.inf, np.float32)
            near = _box(lateral, int(np.ceil(2 * self.grade_width_mm / pixel_mm)) + 2)
            dist[near] = ndimage.distance_transform_edt(~lateral[near]) * pixel_mm
            width = self.grade_width_mm * (1 + 0.35 * noise)
            white = keep & (sl.parts["grey_w"] < 0.5)
            weight = np.clip((width + 1.0 - dist) / 2.0, 0, 1) * white  # full inside, a soft edge over 2 mm
            band = weight >= 0.5
            sl.hu -= (self.leuko_hu * weight).astype(np.float32)
            out["leukoaraiosis"] = band
        if self.old is not None and k in self.old[4]:
            side, phi0, width, r_in, _ = self.old
            phi = np.arctan2(sl.q, side * sl.p)
            edge = 0.04 * _smooth_noise(rng, size, 16)
            old = ((np.abs(_wrapped(phi - phi0)) < width / 2 + edge)
                   & (np.hypot(sl.p, sl.q) > r_in + edge) & (side * sl.p > 0) & keep)
            sl.hu[old] = pat.csf + rng.uniform(0, 4)
            out["old_infarct"] = old
        for kk, p0, q0, diameter in self.lacunes:
            if kk == k:
                spot = sl.grid.ellipse(p0, q0, diameter / 2 * sl.mm, diameter / 2 * sl.mm) & keep
                sl.hu[spot] = pat.csf + rng.uniform(0, 5)
                out["lacunes"] |= spot
        return out

    @property
    def grade_width_mm(self) -> float:
        return (0.0, 3.0, 6.0, 10.0)[self.leuko_grade]


def _box(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    """The rows and columns of ``mask``'s bounding box widened by ``margin`` pixels."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return (slice(max(0, rows[0] - margin), rows[-1] + margin + 1),
            slice(max(0, cols[0] - margin), cols[-1] + margin + 1))


def _wrapped(angle: np.ndarray) -> np.ndarray:
    """An angle difference (rad) wrapped into -pi..pi."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


def place_lesion(sl: Slice, mask: np.ndarray, lesion_hu: float) -> None:
    """Lower ``sl.hu`` by ``lesion_hu`` inside ``mask``, with a soft rim outside it (parenchyma only),
    as ``volumes.synth_hu_slice`` does."""
    size = mask.shape[0]
    blurred = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(
        ImageFilter.GaussianBlur(max(1, size // 128))), np.float32) / 255.0
    sl.hu -= lesion_hu * np.maximum(mask, blurred) * sl.parenchyma
