"""The anatomy of a realistic synthetic head slice in Hounsfield units (``synthetic.anatomy = "realistic"``).

Each part is a function of the slice's level ``z`` (-1 the lowest slice, the skull base, .. 1 the
vertex) in brain coordinates ``p`` (patient right -1 .. left 1) and ``q`` (anterior -1 .. posterior 1),
1 being the inner table of the skull. One brain unit is about 80 mm (a head 180..200 mm long); sizes
below are in mm and converted with the patient's own unit. HU are the typical values of non-contrast
head CT at 120 kVp as radiology teaching tabulates them (not measured here; ranges drawn per patient):

- air -1000; fat -100 (-80..-120): orbital and subcutaneous fat; CSF 0..15 (drawn 3..10): ventricles,
  sulci, cisterns, the space between brain and inner table; white matter 24..29; grey matter 7..10
  above it (32..39); deep grey nuclei (caudate, lentiform nucleus, thalamus) 2 HU below cortex;
  cerebellum as grey matter, the brainstem as white; vitreous 5..15; muscle and skin 35..50.
- bone: the vault's cortex 950..1100 with a darker diploe; the petrous bone 1300..1700 (the densest
  of the skull); the skull base around the sinuses 600..1200. Calcification > 100 HU: the pineal
  gland (calcified in about 60% of adults, 3..5 mm, 120..300 HU), the choroid plexus in the atria
  (about half of adults, 4..6 mm, 100..250 HU). The falx: a 1..2 mm dural fold, 50..70 HU.
- the ventricles: frontal horns, bodies and atria with occipital horns, temporal horns, a 2..6 mm
  slit of third ventricle and a fourth ventricle in the posterior fossa; their size, the sulci, the
  cisterns, the Sylvian fissures and the extra-axial CSF widen with ``atrophy`` (0 young .. 1 old).
- the levels: z < -0.7 the skull base: orbits (globes 24 mm, fat), ethmoid and sphenoid sinuses,
  mastoid air cells lateral to the petrous bones, the middle cranial fossae (temporal lobes) and
  the posterior fossa (cerebellum, fourth ventricle, pons); -0.7..-0.45 the suprasellar cistern,
  midbrain, frontal sinus, cerebellum behind the tentorium; above: the cerebrum.
- beam hardening: dark streaks (the Hounsfield bar) 5..20 HU deep between the petrous bones across
  the posterior fossa, and fainter streaks from the skull base, where dense bone hardens the beam.
- outside the skull: scalp 4..7 mm (skin and muscle, a thin fat layer), the temporalis muscles,
  eyelids; a head holder (80% of patients, 100..300 HU, plastic or carbon) behind the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aisd_ray.data.synthetic.slices import Head, _smooth_noise

BASE_Z, MIDBRAIN_Z = -0.7, -0.45  # the skull-base band, then the band of the cisterns and midbrain


@dataclass(frozen=True)
class Patient:
    """One patient's tissue values (HU), sizes and which calcifications, holder and streaks they have."""

    white: float
    grey: float
    csf: float
    skull: float
    petrous: float
    atrophy: float  # 0 young .. 1 old: ventricles, sulci, cisterns
    vent_scale: tuple[float, float]  # right, left lateral ventricle size
    pineal_hu: float | None
    plexus_hu: float | None
    falx_hu: float
    scalp_mm: float
    holder_hu: float | None
    streak_hu: float  # beam hardening depth

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Patient:
        white = float(rng.uniform(24, 29))
        atrophy = float(rng.beta(1.5, 2.0))
        vent = 0.85 + 0.9 * atrophy
        return cls(white, white + float(rng.uniform(7, 10)), float(rng.uniform(3, 10)),
                   float(rng.uniform(950, 1100)), float(rng.uniform(1300, 1700)), atrophy,
                   (vent * float(rng.uniform(0.9, 1.1)), vent * float(rng.uniform(0.9, 1.1))),
                   float(rng.uniform(120, 300)) if rng.random() < 0.6 else None,
                   float(rng.uniform(100, 250)) if rng.random() < 0.5 else None,
                   float(rng.uniform(50, 70)), float(rng.uniform(4, 7)),
                   float(rng.uniform(100, 300)) if rng.random() < 0.8 else None, float(rng.uniform(5, 20)))


def bump(z: float, lo: float, hi: float) -> float:
    """0 outside lo..hi, rising to 1 in the middle: how much of a structure a level cuts."""
    half = (hi - lo) / 2
    t = (z - (lo + hi) / 2) / half
    return float(np.sqrt(max(0.0, 1 - t * t)))


class Grid:
    """A slice's brain coordinates ``p``, ``q`` (float32 (size, size)) and masks of shapes in them,
    each computed only inside its bounding box in pixels (what keeps a 512 px slice fast)."""

    def __init__(self, size: int, head: Head):
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
        self.size, self.head, self.inner = size, head, 1.0 - head.skull_t
        self.c, self.s = float(np.cos(head.angle)), float(np.sin(head.angle))
        self.u = ((xx - head.cx) * self.c + (yy - head.cy) * self.s) / head.ax
        self.v = (-(xx - head.cx) * self.s + (yy - head.cy) * self.c) / head.ay
        self.p, self.q = self.u / self.inner, self.v / self.inner
        self.unit_px = self.inner * max(head.ax, head.ay) * size  # one brain unit, at most, in pixels

    def box(self, cx: float, cy: float, radius: float) -> tuple[slice, slice]:
        """The pixel rows and columns within ``radius`` (brain units) of (cx, cy)."""
        h = self.head
        u, v = cx * self.inner, cy * self.inner
        col = (h.cx + u * h.ax * self.c - v * h.ay * self.s + 0.5) * self.size
        row = (h.cy + u * h.ax * self.s + v * h.ay * self.c + 0.5) * self.size
        r = radius * self.unit_px + 2
        return (slice(int(np.clip(row - r, 0, self.size)), int(np.clip(row + r + 1, 0, self.size))),
                slice(int(np.clip(col - r, 0, self.size)), int(np.clip(col + r + 1, 0, self.size))))

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
        """Inside the ellipse centred (cx, cy) with half-axes rx, ry, rotated by ``angle`` (rad)."""
        out = np.zeros((self.size, self.size), bool)
        rows, cols = self.box(cx, cy, max(rx, ry))
        p, q = self.p[rows, cols], self.q[rows, cols]
        c, s = np.cos(angle), np.sin(angle)
        a, b = (p - cx) * c + (q - cy) * s, -(p - cx) * s + (q - cy) * c
        out[rows, cols] = (a / max(rx, 1e-6)) ** 2 + (b / max(ry, 1e-6)) ** 2 < 1
        return out

    def pair(self, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
        """The ellipse and its mirror image across the midline (both hemispheres)."""
        return self.ellipse(cx, cy, rx, ry, angle) | self.ellipse(-cx, cy, rx, ry, -angle)

    def near(self, a: tuple[float, float], b: tuple[float, float], scale: float) -> np.ndarray:
        """exp(-(d / scale)^2), d the distance from the segment a..b (float32; 0 beyond 3 scales)."""
        out = np.zeros((self.size, self.size), np.float32)
        cx, cy = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
        rows, cols = self.box(cx, cy, np.hypot(b[0] - a[0], b[1] - a[1]) / 2 + 3 * scale)
        p, q = self.p[rows, cols], self.q[rows, cols]
        dx, dy = b[0] - a[0], b[1] - a[1]
        t = np.clip(((p - a[0]) * dx + (q - a[1]) * dy) / (dx * dx + dy * dy), 0, 1)
        out[rows, cols] = np.exp(-(np.hypot(p - a[0] - t * dx, q - a[1] - t * dy) / scale) ** 2)
        return out

    def segment(self, a: tuple[float, float], b: tuple[float, float], width: float) -> np.ndarray:
        """Within ``width`` of the segment a..b."""
        return self.near(a, b, width) > np.exp(-1.0)


@dataclass
class Slice:
    """One drawn slice: HU (float32, no noise, no lesion), its grid (brain coordinates ``p``, ``q``),
    one mm in brain units, and the parts' masks ((size, size) bool; "grey_w" the cortical weight 0..1)."""

    hu: np.ndarray
    grid: Grid
    mm: float
    parts: dict[str, np.ndarray]

    @property
    def p(self) -> np.ndarray:
        return self.grid.p

    @property
    def q(self) -> np.ndarray:
        return self.grid.q

    @property
    def parenchyma(self) -> np.ndarray:
        return self.parts["parenchyma"]


def draw_slice(rng: np.random.Generator, size: int, head: Head, pat: Patient, z: float,
               fov_mm: float) -> Slice:
    """One axial slice at level ``z`` of ``pat``'s head (``head``: where it lies in the image)."""
    g = Grid(size, head)
    u, v, p, q, inner = g.u, g.v, g.p, g.q, g.inner
    r = np.sqrt(u**2 + v**2)
    rho = r / inner
    mm = 1.0 / (inner * (head.ax + head.ay) / 2 * fov_mm)  # one mm in brain units
    px = 1.0 / (size * (head.ax + head.ay) / 2 * inner)  # one pixel in brain units
    parts: dict[str, np.ndarray] = {}
    hu = np.full((size, size), -1000.0, np.float32)

    # outside the skull: scalp (skin, a thin fat layer, temporalis muscle at the temple), then the holder
    scalp_r = 1.0 + pat.scalp_mm * mm * inner
    temporalis = 6 * mm * inner * bump(z, -0.8, 0.3) * np.clip((np.abs(p) - 0.6) / 0.3, 0, 1) * (q < 0.2)
    scalp = (r >= 1.0) & (r < scalp_r + temporalis)
    hu[scalp] = 42.0
    fat_layer = scalp & (np.abs(r - (1.0 + scalp_r) / 2) < max(0.6 * mm, 0.5 * px))
    hu[fat_layer] = -100.0
    parts["scalp"] = scalp
    if pat.holder_hu is not None:
        gap, thick = (10 * mm + 0.5 * px) * inner, max(4 * mm, 1.2 * px) * inner
        holder = (r > scalp_r + gap) & (r < scalp_r + gap + thick) & (v > 0.45)
        hu[holder] = pat.holder_hu
        parts["holder"] = holder

    # skull: cortex with a darker diploe, as ``volumes.synth_hu_slice``; at least 1.5 px thick (outward),
    # so that a small image (a test's 64 px) still draws a closed ring, as a scanner's blur would
    bone = (r < max(1.0, inner + 1.5 * px * inner)) & (rho >= 1.0)
    depth = np.clip((1.0 - r) / head.skull_t, 0, 1)
    vault = pat.skull + 100 * _smooth_noise(rng, size, 32) - 300 * np.sin(np.pi * depth)
    hu[bone] = np.clip(vault, 700, 1200)[bone]
    inside = rho < 1.0
    cavity = inside
    air = np.zeros_like(inside)
    if z < BASE_Z:
        cavity, air = _skull_base(g, hu, inside, pat, mm, px, rng, parts)
    elif z < MIDBRAIN_Z:
        # the frontal sinus between the tables of a thicker frontal bone; mastoid air in the temporal
        # bone lateral to the posterior fossa: air enclosed by bone, the cranial cavity closed
        frontal, temporal = g.pair(0.12, -0.97, 0.15, 0.07) & inside, g.pair(0.86, 0.33, 0.14, 0.18) & inside
        hu[frontal] = pat.skull
        hu[temporal] = pat.petrous
        mastoid = g.pair(0.88, 0.33, 0.07, 0.1)
        air = g.pair(0.12, -0.98, 0.09, 0.035) | mastoid
        hu[air] = -1000.0
        parts["mastoid_air"] = mastoid
        cavity = inside & ~frontal & ~temporal
    parts["skull"] = (bone | (inside & ~cavity)) & ~air
    parts["sinus_air"] = air

    # intracranial: brain, with CSF between it and the inner table (widening with atrophy)
    extra = (1.5 + 4 * pat.atrophy) * mm
    surface = cavity & (rho > 1.0 - extra - 0.02 * _smooth_noise(rng, size, 12))
    depth_in = np.clip((1.0 - rho) / 0.12, 0, 1)  # 0 at the brain surface .. 1 at 10 mm in
    grey_w = np.clip(1.2 - depth_in + 0.35 * _smooth_noise(rng, size, 20), 0, 1)  # cortical ribbon
    texture = 0.6 * _smooth_noise(rng, size, 24) + 0.4 * _smooth_noise(rng, size, 64)
    tissue = pat.white + (pat.grey - pat.white) * grey_w + 1.5 * texture
    sulci = (np.abs(_smooth_noise(rng, size, 16)) < 0.025 + 0.06 * pat.atrophy) & (rho > 0.62) & cavity
    csf = surface | sulci
    parts["sulci"] = sulci | surface
    grey_w[sulci] = 1.0

    vent = _ventricles(g, z, pat, mm, px)
    cisterns = _cisterns(g, z, pat, mm)
    falx, fissure = _falx_and_fissure(g, z, pat, mm, px)
    deep = _deep_grey(g, z)
    tissue[deep] = (pat.grey - 2.0 + texture)[deep]
    posterior = _posterior_fossa(g, z) & cavity
    tissue[posterior] = (pat.grey - 1.0 + 1.5 * texture)[posterior]  # cerebellum
    if z < MIDBRAIN_Z:
        stem = g.ellipse(0.0, 0.1, 0.17, 0.15) & cavity  # pons / midbrain
        tissue[stem] = (pat.white + 4.0 + texture)[stem]
        parts["brainstem"] = stem
    parts["cerebellum"] = posterior & ~vent["fourth"]
    csf |= (vent["all"] | cisterns | fissure) & cavity
    hu[cavity] = tissue[cavity]
    hu[csf & cavity] = pat.csf
    hu[falx & cavity] = pat.falx_hu
    parts["falx"] = falx & cavity
    parts["ventricles"] = vent["all"] & cavity
    parts["fourth_ventricle"] = vent["fourth"] & cavity
    parts["third_ventricle"] = vent["third"] & cavity
    parts["cisterns"] = cisterns & cavity
    soft = cavity & ~csf & ~falx
    for name, (mask, value) in _calcifications(g, z, pat, mm, px).items():
        hu[mask & cavity] = value
        parts[name] = mask & cavity
        soft &= ~mask
    parts["csf"] = csf & cavity
    parts["parenchyma"] = soft
    parts["white"] = soft & (grey_w < 0.3) & ~deep & ~posterior
    parts["intracranial"] = cavity
    parts["grey_w"] = grey_w
    if z < MIDBRAIN_Z:  # beam hardening between the petrous bones
        streaks = _streaks(g, z, pat, rng) * cavity
        hu -= streaks
        parts["streaks"] = streaks > 2.0
    return Slice(hu, g, mm, parts)


def _skull_base(g, hu, inside, pat, mm, px, rng, parts):
    """The lowest band: bone around a cavity of the middle and posterior fossae; orbits opening
    anteriorly through the skull, ethmoid and sphenoid sinuses, mastoid air. Returns (cavity, air)."""
    size = g.size
    middle = g.pair(0.52, -0.12, 0.3, 0.36)
    posterior = g.ellipse(0.0, 0.45, 0.74, 0.48)
    width = max(0.06, 1.5 * px)
    petrous = g.segment((0.14, 0.08), (0.82, 0.3), width) | g.segment((-0.14, 0.08), (-0.82, 0.3), width)
    cavity = inside & (middle | posterior) & ~petrous
    base = inside & ~cavity
    hu[base] = np.clip(800 + 250 * _smooth_noise(rng, size, 24), 600, 1200)[base]
    hu[petrous & inside] = pat.petrous
    parts["petrous"] = petrous & inside
    # orbits: fat around a globe (24 mm), open anteriorly through the skull and scalp
    orbit = g.pair(0.42, -0.92, 0.24, 0.3)
    globe = g.pair(0.42, -1.0, 12 * mm, 12 * mm)
    hu[orbit] = -100.0
    hu[globe] = 10.0
    parts["orbital_fat"], parts["globes"] = orbit & ~globe, globe
    # sinuses: ethmoid cells between the orbits (air with bony septa), the sphenoid behind them
    septa = np.abs(_smooth_noise(rng, size, 20)) < 0.08
    ethmoid = g.ellipse(0.0, -0.78, 0.14, 0.22) & ~septa
    sphenoid = g.ellipse(0.0, -0.42, 0.16, 0.1)
    mastoid = g.pair(0.86, 0.32, 0.12, 0.16) & ~septa
    air = (ethmoid | sphenoid | mastoid) & inside
    hu[air] = -1000.0
    parts["mastoid_air"] = mastoid & inside
    parts["petrous"] &= ~air
    return cavity, air


def _ventricles(g, z, pat, mm, px) -> dict[str, np.ndarray]:
    """Lateral ventricles (frontal horns, bodies, atria and occipital horns, temporal horns), the third
    ventricle (a midline slit, 2..6 mm with atrophy) and the fourth (in the posterior fossa), sized by
    level and atrophy."""
    lateral = np.zeros(g.p.shape, bool)
    for side, scale in ((-1, pat.vent_scale[0]), (1, pat.vent_scale[1])):
        f, b, o, t = bump(z, -0.3, 0.55), bump(z, 0.05, 0.65), bump(z, -0.3, 0.35), bump(z, -0.75, -0.3)
        if f:  # frontal horn, pointing anterolaterally
            lateral |= g.ellipse(side * 0.11, -0.3, 0.06 * scale * f, 0.16 * f, side * -0.45)
        if b:  # body
            lateral |= g.ellipse(side * 0.13, 0.0, 0.045 * scale * b, 0.32 * b)
        if o:  # atrium and occipital horn, pointing posterolaterally
            lateral |= g.ellipse(side * 0.22, 0.34, 0.06 * scale * o, 0.17 * o, side * 0.5)
        if t:  # temporal horn
            lateral |= g.ellipse(side * 0.5, -0.05, max(0.02 * scale * t, px), 0.07 * t, side * 0.3)
    empty = np.zeros(g.p.shape, bool)
    w3 = bump(z, -0.45, 0.1) * (2 + 4 * pat.atrophy) / 2 * mm
    third = g.ellipse(0.0, 0.05, max(w3, 0.6 * px), 0.13) if w3 else empty
    f4 = bump(z, -1.0, -0.45)
    fourth = g.ellipse(0.0, 0.3, 0.09 * f4 * (1 + 0.4 * pat.atrophy), 0.05 * f4) if f4 else empty
    return {"all": lateral | third | fourth, "third": third, "fourth": fourth}


def _cisterns(g, z, pat, mm) -> np.ndarray:
    """Suprasellar cistern in front of the midbrain, the ambient cisterns around it and the
    quadrigeminal cistern behind; the Sylvian fissures; the prepontine cistern and cisterna magna
    lower down. Width: 2..6 mm with atrophy."""
    w = (2 + 4 * pat.atrophy) * mm
    out = np.zeros(g.p.shape, bool)
    if MIDBRAIN_Z - 0.15 <= z < MIDBRAIN_Z + 0.15:
        out |= g.ellipse(0.0, -0.18, 0.1 + w, 0.08 + w)
        out |= g.ellipse(0.0, 0.1, 0.17 + w, 0.15 + w) & ~g.ellipse(0.0, 0.1, 0.17, 0.15)
        out |= g.ellipse(0.0, 0.33, 0.06 + w, 0.04 + w)
    if BASE_Z - 0.1 <= z < 0.25:  # Sylvian fissures, from the lateral surface to the insula
        width = 0.25 * w + 0.008
        out |= g.segment((0.42, -0.1), (1.0, -0.18), width) | g.segment((-0.42, -0.1), (-1.0, -0.18), width)
    if z < MIDBRAIN_Z:
        out |= g.ellipse(0.0, -0.07, 0.12, 0.05 + w) | g.ellipse(0.0, 0.93, 0.1 + w, 0.06 + w)
    return out


def _falx_and_fissure(g, z, pat, mm, px) -> tuple[np.ndarray, np.ndarray]:
    """The falx (1.5 mm) and the interhemispheric fissure's CSF around it (1..3 mm with atrophy):
    above the cisterns only, and there in front of and behind the deep structures below z 0.3."""
    if z < MIDBRAIN_Z:
        return np.zeros(g.p.shape, bool), np.zeros(g.p.shape, bool)
    where = np.abs(g.q) < 0.98
    if z <= 0.3:
        where &= np.abs(g.q) > 0.42
    half = max(0.75 * mm, 0.35 * px)
    ap = np.abs(g.p)
    falx = where & (ap < half)
    return falx, where & (ap < half + (1 + 2 * pat.atrophy) * mm) & ~falx


def _deep_grey(g, z) -> np.ndarray:
    """Caudate heads, lentiform nuclei and thalami (deep grey matter), between z -0.4 and 0.25."""
    k = bump(z, -0.4, 0.25)
    if not k:
        return np.zeros(g.p.shape, bool)
    return (g.pair(0.17, -0.28, 0.06 * k, 0.1 * k) | g.pair(0.3, -0.08, 0.07 * k, 0.17 * k, 0.2)
            | g.pair(0.1, 0.16, 0.08 * k, 0.12 * k))


def _posterior_fossa(g, z) -> np.ndarray:
    """The cerebellum: behind the petrous bones at the base, behind the tentorium above it."""
    if z < BASE_Z:
        return g.ellipse(0.0, 0.5, 0.72, 0.46)
    if z < MIDBRAIN_Z:
        return (g.q > 0.42 + 0.25 * g.p ** 2) & g.ellipse(0.0, 0.45, 0.8, 0.55)
    return np.zeros(g.p.shape, bool)


def _calcifications(g, z, pat, mm, px) -> dict[str, tuple[np.ndarray, float]]:
    """The pineal gland behind the third ventricle (4 mm) and the choroid plexus in both atria (5 mm),
    where this patient's are calcified, at the level of the third ventricle and the atria."""
    out = {}
    if pat.pineal_hu is not None and -0.2 <= z < 0.15:
        r = max(2 * mm, 0.6 * px)
        out["pineal"] = (g.ellipse(0.0, 0.24, r, r), pat.pineal_hu)
    if pat.plexus_hu is not None and -0.1 <= z < 0.3:
        r = max(2.5 * mm, 0.6 * px)
        out["plexus"] = (g.pair(0.23, 0.36, r, r), pat.plexus_hu)
    return out


def _streaks(g, z, pat, rng) -> np.ndarray:
    """Beam hardening: HU to subtract. A dark band between the petrous bones (the Hounsfield bar) and a
    few thin streaks fanning back from them, strongest at the lowest level."""
    k = 1.0 if z < BASE_Z else 0.5
    out = g.near((-0.8, 0.22), (0.8, 0.22), 0.06)
    for a in rng.uniform(0.3, 1.3, 4) * rng.choice([-1, 1], 4):
        x0 = 0.5 * float(np.sign(a))
        out += 0.5 * g.near((x0, 0.2), (x0 - float(np.sin(a)), 0.2 + float(np.cos(a))), 0.012)
    return pat.streak_hu * k * out
