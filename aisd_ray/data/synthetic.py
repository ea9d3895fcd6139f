"""A deterministic AISD-like slice generator for the demo and the tests.

AISD images cannot be shipped, so this draws what a windowed NCCT slice looks like
(FACTS section 4): black air, a bright skull ring, textured grey parenchyma, dark
ventricles and sulci, sometimes a head-holder arc, and in most slices a faint hypodense
lesion with soft edges, wedge-shaped in one hemisphere. It writes the original's
``AISD/{train,valid,test}/{images,masks}`` layout (RGB PNGs, masks near-white on black) or
the raw release's per-case layout (grey slices, label PNGs with values 0..5).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from aisd_ray.config import SyntheticConfig
from aisd_ray.progress import progress_bar

SPLITS = ("train", "valid", "test")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise in [-1, 1]: random cells upsampled bicubically."""
    small = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))


def synth_slice(rng: np.random.Generator, size: int, with_lesion: bool) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 HxW, lesion mask bool HxW) pair."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    cx, cy = rng.normal(0, 0.02, 2)
    ax, ay = rng.uniform(0.33, 0.40), rng.uniform(0.40, 0.46)  # head half-axes
    angle = rng.normal(0, 0.08)
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / ax
    v = (-(xx - cx) * s + (yy - cy) * c) / ay
    r = np.sqrt(u**2 + v**2)
    skull_t = rng.uniform(0.05, 0.08)
    brain = r < 1.0 - skull_t

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
        side = rng.choice([-1, 1])
        theta0 = rng.uniform(-0.9, 0.9) + (0 if side > 0 else np.pi)
        width = rng.uniform(0.25, 0.6)
        theta = np.arctan2(v, u)
        dtheta = np.angle(np.exp(1j * (theta - theta0)))
        r_in, r_out = rng.uniform(0.25, 0.5), 1.0 - skull_t - rng.uniform(0.02, 0.08)
        edge = 0.1 * _smooth_noise(rng, size, 12)
        mask = (np.abs(dtheta) < width / 2 + edge) & (r > r_in + edge) & (r < r_out) & brain
        if mask.any():
            contrast = rng.uniform(12, 22)  # hypodense: a few HU darker, i.e. faint
            soft = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(
                ImageFilter.GaussianBlur(max(1, size // 128))), np.float32) / 255.0
            img -= contrast * soft * brain
    if rng.random() < 0.4:  # head-holder arc below the skull
        arc = np.abs(np.sqrt((xx - cx) ** 2 + (yy - cy - 0.15) ** 2) - 0.55) < 0.008
        img[arc & (yy > cy + 0.35)] = rng.uniform(180, 230)
    img += rng.normal(0, 4, img.shape) * (r < 1.0)
    return np.clip(img, 0, 255).astype(np.uint8), mask


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

    Each case's lesion carries one acute label (1, 2, 3 or 5) in its middle slices; some slices
    also hold a label-4 ("invisible") patch, which the default mapping treats as background; the
    first case has one mask slice more than images, as some real cases do.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, bytes]] = {"image": {}, "mask": {}}
    bar = progress_bar(total=len(case_ids) * slices, desc="synthesize raw", unit="slice", enabled=progress)
    for case_no, case in enumerate(case_ids):
        label = (1, 2, 3, 5)[case_no % 4]
        for k in range(slices + (1 if case_no == 0 else 0)):
            rng = np.random.default_rng([cfg.seed, int(case), k])
            image, mask = synth_slice(rng, cfg.size, with_lesion=0 < k < slices - 1)
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
