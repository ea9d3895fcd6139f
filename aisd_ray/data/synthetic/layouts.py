"""The synthetic stand-in in the layout a config asks for (``synthetic.layout``): the PNG layouts from
``slices.py`` (the raw release, its AISD zip, the original's tree), the CT volume layouts from
``volumes.py`` (an nnU-Net raw dataset, DICOM series cases). Here, above both, so that ``volumes.py``
can draw its heads with ``slices.py``'s geometry without the two importing each other."""

from __future__ import annotations

from pathlib import Path

from aisd_ray.config import SyntheticConfig
from aisd_ray.data.synthetic.slices import (synthetic_case_ids, synthetic_test_cases, write_synthetic_aisd,
                                            write_synthetic_raw)


def write_synthetic(out_dir: str | Path, cfg: SyntheticConfig, as_zip: bool = False, progress: bool = True) -> Path:
    """Write ``cfg.layout`` under ``out_dir``; return the folder ``prepare --source`` takes. The
    volume layouts hold the raw layout's patients (``synthetic_case_ids``) as HU volumes: "nnunet"
    with the official test IDs in imagesTs/labelsTs, "dicom" as series folders with labels/."""
    if cfg.layout == "raw":
        return write_synthetic_raw(out_dir, cfg, synthetic_case_ids(cfg), cfg.slices_per_case, as_zip, progress)
    if cfg.layout in ("nnunet", "dicom"):
        from aisd_ray.data.synthetic import volumes  # SimpleITK and pydicom load only for these layouts

        cases, test = synthetic_case_ids(cfg), synthetic_test_cases(cfg)
        hu = {"lesion_hu": cfg.lesion_hu, "noise_hu": cfg.noise_hu, "anatomy": cfg.anatomy}
        if cfg.layout == "nnunet":
            return volumes.write_nnunet_dataset(out_dir, cfg.seed, [c for c in cases if c not in test], test,
                                                cfg.size, cfg.slices_per_case, progress=progress, **hu)
        return volumes.write_dicom_cases(Path(out_dir) / "dicom", cfg.seed, cases, cfg.size,
                                         cfg.slices_per_case, progress=progress, **hu)
    return write_synthetic_aisd(out_dir, cfg, progress)
