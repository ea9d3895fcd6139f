"""evaluate and infer: an export (or predictions) scored against ground truth, and new images or
CT patients segmented."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aisd_ray.config import Config
from aisd_ray.core import storage
from aisd_ray.stages.run import on_node


def evaluate(cfg: Config, output: str, model: str | None = None, shards: str | None = None, split: str = "test",
             predictions: str | None = None, masks: str | None = None, overlays: bool = True,
             progress: bool = True, choose_postprocessing: bool = False,
             tta: bool | None = None, strict: bool = False, brain_mask: bool | None = None) -> dict[str, Any]:
    """Score an export on a split of a shard store (``model``, ``shards``; mirroring TTA per ``tta``,
    None: as the export records it; with ``choose_postprocessing``, on the valid split, the export's post-processing
    is chosen on its cases and written into the export first), or predictions against ground truth
    without a model (``predictions``, ``masks``: mask PNGs, or NIfTI label volumes scored per case
    in mm and mL); write metrics.json and its companions under ``output``. ``strict``: a case of a
    store prepared from volumes that QA warns of is refused (``evaluate.evaluate_export``). ``brain_mask``:
    lesion voxels outside the brain removed from each case first or not; None: as the export records it."""
    if predictions:
        from aisd_ray.evaluation.evaluate_volumes import evaluate_nifti_folders, is_nifti_folder

        if is_nifti_folder(masks):
            return evaluate_nifti_folders(predictions, masks, output, progress=progress)
        from aisd_ray.evaluation.evaluate_masks import evaluate_folders

        return evaluate_folders(predictions, masks, cfg.data, output, progress=progress)
    from aisd_ray.evaluation import evaluate as scoring

    return scoring.evaluate_export(model, shards, output, split, cfg.eval.batch_size, progress=progress,
                                   overlays=overlays, tta=tta, choose_postprocessing=choose_postprocessing,
                                   strict=strict, brain_mask=brain_mask)


@dataclass
class Inferred:
    """What ``infer`` wrote: mask file names (images) or per-case summaries (CT patients)."""

    output: str
    written: list[str] = field(default_factory=list)
    cases: list[dict[str, Any]] = field(default_factory=list)


def infer(cfg: Config, export_uri: str, on_worker: bool = False, progress: bool = True,
          tta: bool | None = None, strict: bool = False, brain_mask: bool | None = None,
          redo: bool = False) -> Inferred:
    """Segment ``infer.images_dir`` into ``infer.output_dir`` with an export: CT patients (a DICOM
    series folder, a NIfTI file, or a folder of them) give NIfTI masks in the scan's geometry with
    lesion volumes (``infer_volumes``), each case written whole when done, a rerun skipping the cases
    complete for the same export (``redo``: all done again), on a pool of Ray actors where there is a
    Ray cluster (``cohort_workers``), else in this process; a folder of images gives mask PNGs
    (``infer``), with ``on_worker`` as a Ray task on a training node. ``tta``: mirroring TTA on or
    off; None: as the export records it (its training config's ``eval.tta``). ``strict``: a QA
    warning refuses its case (``infer_volumes``), or, for images, the input-kind check's warning (``infer``). ``infer.dicom_seg``:
    a DICOM SEG beside each DICOM series case's mask (``dicom_seg.py``). ``brain_mask``: CT
    patients' lesion voxels outside the brain removed or not (``infer_volumes``); None: as the export records it;
    True for images: a ConfigError (8-bit slices hold no HU to find the brain in)."""
    from aisd_ray.inference.infer_volumes import is_volume_input

    source, out = cfg.infer.images_dir, storage.absolute(cfg.infer.output_dir)
    if storage.is_local(source) and is_volume_input(source):
        from aisd_ray.inference.infer_volumes import infer_volumes

        workers = cohort_workers(cfg, on_worker, out)
        pool = None
        if workers:
            from functools import partial

            from aisd_ray.inference.cohort_ray import run_pool

            pool = partial(run_pool, workers)
        cases = infer_volumes(storage.absolute(export_uri), storage.absolute(source), out, cfg.eval.batch_size,
                              cfg.infer.probabilities, progress=progress, tta=tta, strict=strict, redo=redo, pool=pool,
                              dicom_seg=cfg.infer.dicom_seg, brain_mask=brain_mask,
                              uncertainty=cfg.infer.uncertainty)
        return Inferred(out, cases=cases)
    if storage.is_local(source) and not Path(source).is_dir():  # what a folder of images is not: name it so
        from aisd_ray.data.sources.layout import DataError

        raise DataError(f"{source}: not found" if not Path(source).exists() else
                        f"{source}: neither a DICOM series (a folder, or an enhanced CT file), a NIfTI file nor a "
                        "folder of images")
    if brain_mask:  # asked for, where it cannot be done
        from aisd_ray.config import ConfigError

        raise ConfigError(f"--brain-mask: {source} is a folder of images; the brain mask needs CT volumes in HU "
                          "(8-bit slices cannot tell air, CSF and bone apart)")
    from aisd_ray.inference.infer import infer_folder

    written = on_node(cfg, on_worker, infer_folder, storage.absolute(export_uri), storage.absolute(source), out,
                   cfg.eval.batch_size, overlays=cfg.infer.overlays, progress=progress and not on_worker,
                   tta=tta, strict=strict)
    return Inferred(out, written=written)


def cohort_workers(cfg: Config, on_worker: bool, out: str) -> int:
    """How ``infer`` of CT patients runs: 0, in this process (``train.backend`` "local", or no Ray
    cluster: no RAY_ADDRESS, not the pipeline's Ray stage (``on_worker``), and no ``infer.workers``;
    a Ray that this process happens to have started is not asked: the same command runs the same
    way whatever ran before it in the process); else the Ray actor pool's size (``infer.workers``, 0: the pool's default,
    ``cohort_ray.default_workers``), with Ray joined or started and, on a cluster of more than one
    node, the output folder checked to be shared (``ray_session.require_shared_storage``)."""
    import os

    if cfg.train.backend != "ray":
        return 0
    if not (cfg.infer.workers or on_worker or os.environ.get("RAY_ADDRESS")):
        return 0
    from aisd_ray.train.ray_session import ensure_ray, require_shared_storage

    ensure_ray(max(cfg.infer.workers, 1) + 1)
    require_shared_storage(cfg, {"the infer output folder": out})
    return cfg.infer.workers or -1
