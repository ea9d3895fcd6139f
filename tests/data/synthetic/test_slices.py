import hashlib

import numpy as np
from PIL import Image

from aisd_ray.config import SyntheticConfig
from aisd_ray.data.synthetic.slices import synth_slice, write_synthetic_aisd


def digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    cfg = SyntheticConfig(num_train=3, num_valid=1, num_test=1, size=64, seed=7)
    a = write_synthetic_aisd(tmp_path / "a", cfg, progress=False)
    b = write_synthetic_aisd(tmp_path / "b", cfg, progress=False)
    cfg.seed = 8
    c = write_synthetic_aisd(tmp_path / "c", cfg, progress=False)
    assert digest(a) == digest(b) != digest(c)


def test_seed_layout_and_file_format(tmp_path):
    cfg = SyntheticConfig(num_train=4, num_valid=2, num_test=2, size=96, lesion_free_fraction=0.0)
    root = write_synthetic_aisd(tmp_path, cfg, progress=False)
    for split, n in (("train", 4), ("valid", 2), ("test", 2)):
        images = sorted((root / split / "images").glob("*.png"))
        masks = sorted((root / split / "masks").glob("*.png"))
        assert [p.name for p in images] == [p.name for p in masks] and len(images) == n
    image = Image.open(images[0])
    mask = np.asarray(Image.open(masks[0]))
    assert image.mode == "RGB" and image.size == (96, 96)
    values = set(np.unique(mask))
    assert values - {0} and max(values) in range(252, 256)  # near-white lesion on black


def test_slice_looks_like_windowed_ncct():
    rng = np.random.default_rng(3)
    image, mask = synth_slice(rng, 256, with_lesion=True)
    assert (image == 0).mean() > 0.2  # air
    assert (image == 255).mean() > 0.02  # skull ring
    assert mask.any()
    brain = (image > 60) & (image < 200) & ~mask
    # the lesion is hypodense but faint: darker than parenchyma by a few grey levels only
    gap = image[brain].mean() - image[mask].mean()
    assert 5 < gap < 40
    _, empty = synth_slice(np.random.default_rng(3), 256, with_lesion=False)
    assert not empty.any()
