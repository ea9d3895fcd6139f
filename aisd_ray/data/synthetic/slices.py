"""A deterministic AISD-like slice generator for the demo and the tests.

AISD images cannot be shipped, so this draws what a windowed NCCT slice of the release looks
like: black air, a bright skull ring, textured grey parenchyma, dark
ventricles and sulci, sometimes a head-holder arc, and in most slices a faint hypodense
lesion with soft edges, wedge-shaped in one hemisphere. It writes the original's
``AISD/{train,valid,test}/{images,masks}`` layout (RGB PNGs, masks near-white on black) or
the raw release's per-case layout (grey slices, label PNGs with values 0..5).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from aisd_ray.config import SPLITS, SyntheticConfig
from aisd_ray.core.progress import progress_bar


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise in [-1, 1]: random cells upsampled bicubically."""
    small = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))


@dataclass
class Head:
    """Where the head lies in the slice: centre offset, half-axes, tilt, skull thickness."""

    cx: float
    cy: float
    ax: float
    ay: float
    angle: float
    skull_t: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Head:
        cx, cy = rng.normal(0, 0.02, 2)
        ax, ay = rng.uniform(0.33, 0.40), rng.uniform(0.40, 0.46)
        return cls(cx, cy, ax, ay, rng.normal(0, 0.08), rng.uniform(0.05, 0.08))


@dataclass
class Lesion:
    """A wedge in one hemisphere: its direction, angular width, inner radius and how far short of
    the cortex it stops (all in head coordinates), and how much darker than parenchyma it is."""

    side: int
    theta0: float
    width: float
    r_in: float
    gap: float
    contrast: float | None = None  # None: drawn per slice

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Lesion:
        side = int(rng.choice([-1, 1]))
        theta0 = rng.uniform(-0.9, 0.9) + (0 if side > 0 else np.pi)
        return cls(side, theta0, rng.uniform(0.25, 0.6), rng.uniform(0.25, 0.5), rng.uniform(0.02, 0.08))


def synth_slice(rng: np.random.Generator, size: int, with_lesion: bool, head: Head | None = None,
                lesion: Lesion | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 HxW, lesion mask bool HxW) pair. ``head`` and ``lesion`` fix the geometry
    (a patient's slices share it); otherwise it is drawn from ``rng``, as is all texture."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    h = head or Head.draw(rng)
    c, s = np.cos(h.angle), np.sin(h.angle)
    u = ((xx - h.cx) * c + (yy - h.cy) * s) / h.ax
    v = (-(xx - h.cx) * s + (yy - h.cy) * c) / h.ay
    r = np.sqrt(u**2 + v**2)
    brain = r < 1.0 - h.skull_t

    img = np.zeros((size, size), np.float32)
    img[(r < 1.0) & ~brain] = 255.0  # skull ring (windowed to white)
    texture = 0.6 * _smooth_noise(rng, size, 24) + 0.4 * _smooth_noise(rng, size, 64)
    parenchyma = rng.uniform(95, 125) + 10 * texture
    img[brain] = parenchyma[brain]

    # Ventricles: two dark lobes either side of the midline; sulci: dark wiggles near the cortex.
    vent_w = rng.uniform(0.06, 0.12)
    for side in (-1, 1):
        vu, vv = (u - side * rng.uniform(0.08, 0.14)) / vent_w, (v + rng.uniform(-0.1, 0.1)) / (2.2 * vent_w)
        img[(vu**2 + vv**2 < 1) & brain] = rng.uniform(25, 45)
    sulci = (np.abs(_smooth_noise(rng, size, 16)) < 0.05) & (r > 0.7) & brain
    img[sulci] = rng.uniform(30, 50)

    mask = np.zeros((size, size), bool)
    if with_lesion:
        # A wedge in one hemisphere from near the midline out to the cortex, with an irregular rim.
        les = lesion or Lesion.draw(rng)
        theta = np.arctan2(v, u)
        dtheta = np.angle(np.exp(1j * (theta - les.theta0)))
        r_out = 1.0 - h.skull_t - les.gap
        edge = 0.1 * _smooth_noise(rng, size, 12)
        mask = (np.abs(dtheta) < les.width / 2 + edge) & (r > les.r_in + edge) & (r < r_out) & brain
        if mask.any():
            contrast = les.contrast or rng.uniform(12, 22)  # hypodense: a few HU darker, i.e. faint
            soft = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(
                ImageFilter.GaussianBlur(max(1, size // 128))), np.float32) / 255.0
            img -= contrast * soft * brain
    if rng.random() < 0.4:  # head-holder arc below the skull
        arc = np.abs(np.sqrt((xx - h.cx) ** 2 + (yy - h.cy - 0.15) ** 2) - 0.55) < 0.008
        img[arc & (yy > h.cy + 0.35)] = rng.uniform(180, 230)
    img += rng.normal(0, 4, img.shape) * (r < 1.0)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def synth_case(seed: int, case: str, size: int, slices: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One patient: ``slices`` axial slices through one head, bottom to top, with one lesion.

    The head's outline shrinks towards the top and bottom slices (an ellipsoid); the lesion keeps
    its direction through the slices it spans (a contiguous run that leaves the first and last slice
    free), widest in the middle of its run, so it is one 3-D lesion; texture and noise are per slice.
    """
    rng = np.random.default_rng([seed, int(case)])
    head, lesion = Head.draw(rng), Lesion.draw(rng)
    lesion.contrast = rng.uniform(12, 22)
    inner = max(slices - 2, 0)
    run = int(rng.integers(max(1, (inner + 1) // 2), inner + 1)) if inner else 0
    first = 1 + int(rng.integers(0, inner - run + 1)) if run else 0
    out = []
    for k in range(slices):
        z = (k + 0.5) / slices * 2 - 1  # -1 bottom .. 1 top
        shrink = float(np.sqrt(1 - (0.55 * z) ** 2))
        slice_head = replace(head, ax=head.ax * shrink, ay=head.ay * shrink)
        t = (k - first + 0.5) / run if run else 0.0
        with_lesion = run > 0 and first <= k < first + run
        slice_lesion = replace(lesion, width=lesion.width * (0.55 + 0.45 * np.sin(np.pi * t))) if with_lesion else None
        out.append(synth_slice(np.random.default_rng([seed, int(case), k]), size, with_lesion, slice_head,
                               slice_lesion))
    return out


def write_synthetic_aisd(out_dir: str | Path, cfg: SyntheticConfig, progress: bool = True) -> Path:
    """Write the original's layout under ``out_dir/AISD``; same seed, same bytes."""
    root = Path(out_dir) / "AISD"
    counts = {"train": cfg.num_train, "valid": cfg.num_valid, "test": cfg.num_test}
    total = sum(counts.values())
    bar = progress_bar(total=total, desc="synthesize", unit="slice", enabled=progress)
    index = 10000
    for split_no, split in enumerate(SPLITS):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for k in range(counts[split]):
            rng = np.random.default_rng([cfg.seed, split_no, k])
            with_lesion = rng.random() >= cfg.lesion_free_fraction
            image, mask = synth_slice(rng, cfg.size, with_lesion)
            name = f"{index}.png"
            index += 1
            Image.fromarray(np.repeat(image[..., None], 3, axis=-1)).save(root / split / "images" / name)
            white = int(rng.integers(252, 256))  # the original's masks are near-white, not exactly 255
            Image.fromarray(np.repeat((mask * white).astype(np.uint8)[..., None], 3, axis=-1)).save(
                root / split / "masks" / name)
            bar.update()
    bar.close()
    return root


def write_synthetic_raw(out_dir: str | Path, cfg: SyntheticConfig, case_ids: list[str], slices: int = 6,
                        as_zip: bool = False, progress: bool = True) -> Path:
    """Write the raw release's layout under ``out_dir``: ``image/<case>/<k>.png`` (grey) and
    ``mask/<case>/<k>.png`` (labels 0..5), or the same trees inside ``image.zip`` / ``mask.zip``.

    Each case is one head (``synth_case``) whose lesion carries one acute label (1, 2, 3 or 5) in a
    run of neighbouring slices, never the first or last; some slices
    also hold a label-4 ("invisible") patch, which the default mapping treats as background; the
    first case has one mask slice more than images, as some real cases do.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, bytes]] = {"image": {}, "mask": {}}
    bar = progress_bar(total=len(case_ids) * slices, desc="synthesize raw", unit="slice", enabled=progress)
    for case_no, case in enumerate(case_ids):
        label = (1, 2, 3, 5)[case_no % 4]
        extra = 1 if case_no == 0 else 0
        for k, (image, mask) in enumerate(synth_case(cfg.seed, case, cfg.size, slices + extra)):
            labels = mask.astype(np.uint8) * label
            if k % 2:  # an "invisible acute" patch away from the lesion
                c = cfg.size // 2
                labels[c - 3:c + 3, 2:8] = np.where(labels[c - 3:c + 3, 2:8] == 0, 4, labels[c - 3:c + 3, 2:8])
            if k < slices:
                files["image"][f"image/{case}/{k}.png"] = _png(image)
            files["mask"][f"mask/{case}/{k}.png"] = _png(labels)
            bar.update()
    bar.close()
    for side, members in files.items():
        if as_zip:
            with zipfile.ZipFile(root / f"{side}.zip", "w") as zf:
                for name, data in members.items():
                    zf.writestr(name, data)
        else:
            for name, data in members.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)
    return root


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_test_cases(cfg: SyntheticConfig) -> list[str]:
    """The official test IDs the raw layout carries: the first ``num_test_cases`` of the 52. A store
    prepared from it with these as ``data.test_cases`` has its whole official test split (the demo
    hands them on); with the default 52, prepare says which are missing, as for any partial release."""
    from aisd_ray.config import AISD_TEST_CASES

    return list(AISD_TEST_CASES[:cfg.num_test_cases])


def synthetic_case_ids(cfg: SyntheticConfig) -> list[str]:
    """The raw layout's patients: the first ``num_test_cases`` official test IDs, then made-up IDs."""
    return synthetic_test_cases(cfg) + [f"{1000000 + i:07d}" for i in range(cfg.num_cases - cfg.num_test_cases)]
