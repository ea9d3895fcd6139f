"""``pipeline --folds K`` (or ``data.folds`` = K): the whole study in one command.

Patient k-fold cross-validation with its ensemble (``crossval.py``: the K fold runs trained at
once on Ray, their out-of-fold figures, the post-processing chosen on them, the ensemble export and
its scores on the test split), then every test patient segmented by the ensemble through the same
``infer`` stage ``pipeline`` ends with (``stages.infer``: a NIfTI mask in the scan's geometry,
``cases/<case>/summary.json`` with the lesion mL and ``preview.png``, ``cases.csv``). Without folds
``pipeline`` is ``stages.pipeline`` (one run); the CLI chooses between them.

Output folder: crossval's (``fold_<k>/``, ``runs/``, ``oof/``, ``ensemble/``, ``ensemble_test/``,
``folds.csv``, ``crossval.json``), and

- ``infer/``: the test patients segmented (``infer_volumes``' outputs);
- ``test_patients/``: links to the test patients' CT (NIfTI files or DICOM series folders, named by
  case ID), what ``infer`` reads (in a temporary folder where the output is ``gs://``, the source is
  ``gs://`` or the AISD DICOM release is zipped: then ``infer`` runs in this process);
- ``summary.json``: the outputs and figures, written last.

The same command again resumes: crossval keeps its finished folds, exports and scores, and the
test patients are not segmented again once ``infer/`` holds every one's mask and summary and its
``cases.csv``. The source must be CT volumes (crossval refuses PNG slices).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from aisd_ray import stages
from aisd_ray.config import Config
from aisd_ray.core import storage

log = logging.getLogger(__name__)


def patients_in_test_split(output: str) -> list[str]:
    """The test patients' case IDs, as fold 0's store records them (every fold's test split is the same)."""
    manifest = json.loads(storage.read_bytes(storage.join(output, "fold_0", "shards", "manifest.json")))
    return list(((manifest.get("source") or {}).get("cases") or {}).get("test") or [])


def segmented(out: str, case_ids: list[str]) -> bool:
    """True when ``out`` holds ``cases.csv`` and every case's ``<case>.nii.gz`` and ``cases/<case>/summary.json``."""
    wanted = [f"{c}.nii.gz" for c in case_ids] + [f"cases/{c}/summary.json" for c in case_ids] + ["cases.csv"]
    return all(storage.exists(storage.join(out, name)) for name in wanted)


def _link_name(case_id: str, image: Path) -> str:
    """The link's name: the case ID, with the image's NIfTI or DICOM file suffix (``volume.case_id_of``
    gives the case ID back)."""
    name = image.name.lower()
    suffix = next((s for s in (".nii.gz", ".nii") if name.endswith(s)), ".dcm" if image.is_file() else "")
    return case_id + suffix


def segment_test_patients(cfg: Config, ensemble: str, out: str, case_ids: list[str],
                          progress: bool = True) -> stages.Inferred:
    """Segment the source's test patients (``case_ids``) with the export ``ensemble`` into ``out``
    through ``stages.infer``; DataError (volume_source) for a source that cannot be listed."""
    from aisd_ray.data.store.volume_source import list_volume_cases

    source, out = cfg.data.source_dir, storage.absolute(out)
    with tempfile.TemporaryDirectory(prefix="aisd-study-") as tmp:
        root = Path(source) if storage.is_local(source) else Path(tmp) / "source"
        if not storage.is_local(source):
            log.info("copying %s to a local temp folder to read its test patients", source)
            storage.download_tree(source, root, progress=progress)
        splits, _ = list_volume_cases(root, cfg.data, cfg.model.num_classes, Path(tmp) / "work")
        cases = [c for c in splits.get("test", []) if c.case_id in set(case_ids)]
        in_tmp = any(Path(tmp).resolve() in c.image.resolve().parents for c in cases)
        links = (Path(tmp) / "test_patients" if in_tmp or not storage.is_local(out)
                 else Path(storage.resolve(out)[1]).parent / "test_patients")
        if links.exists():
            shutil.rmtree(links)
        links.mkdir(parents=True)
        for case in cases:
            (links / _link_name(case.case_id, case.image)).symlink_to(case.image.resolve())
        run = copy.deepcopy(cfg)
        run.infer.images_dir, run.infer.output_dir = str(links), out
        on_worker = cfg.train.backend == "ray" and links.parent != Path(tmp)  # the links reachable from a node
        log.info("segmenting %d test patient(s) with the ensemble into %s", len(cases), out)
        return stages.infer(run, ensemble, on_worker, progress)


def study(cfg: Config, output: str, progress: bool = True) -> stages.DemoResult:
    """Cross-validation (``data.folds`` >= 2) with its ensemble, its test scores and every test
    patient segmented, under ``output``; a rerun continues where it stopped. Raises as
    ``crossval.crossval`` (ConfigError, DataError, TrainingFailed) and ``stages.infer``."""
    from aisd_ray.inference.postprocess import describe
    from aisd_ray.studies import crossval

    started = time.time()
    output = storage.absolute(output)
    summary = crossval.crossval(cfg, output, progress)
    result = stages.DemoResult(outputs={"folds (runs, exports, validation)": storage.join(output, "runs"),
                                        "ensemble export": summary["ensemble"],
                                        "folds.csv + crossval.json": output})
    if "ensemble_test" in summary:
        result.outputs["test metrics.json (ensemble)"] = storage.join(output, "ensemble_test", "metrics.json")
    case_ids, out = patients_in_test_split(output), storage.join(output, "infer")
    if case_ids and segmented(out, case_ids):
        log.info("%s: every test patient is segmented already", out)
    elif case_ids:
        segment_test_patients(cfg, summary["ensemble"], out, case_ids, progress)
    if case_ids:
        result.outputs["test patients (NIfTI) + summary.json + preview.png, cases.csv"] = out
    if cfg.infer.images_dir:  # what pipeline's last stage segments when given, with the ensemble
        given = copy.deepcopy(cfg)
        given.infer.output_dir = cfg.infer.output_dir or storage.join(output, "infer_images")
        result.outputs["infer.images_dir segmented"] = stages.infer(given, summary["ensemble"], False, progress).output
    oof, test = summary["out_of_fold"], summary.get("ensemble_test") or {}
    result.figures = {
        "folds": summary["folds"], "folds at once": summary["concurrent"],
        "out-of-fold cases": oof.get("cases", 0),
        "out-of-fold case Dice (mean)": _number(oof.get("case_dice_mean")),
        "post-processing (chosen out of fold)": describe(summary["postprocessing"]),
        **({"ensemble test lesion Dice (pooled)": _number(test.get("lesion_dice_pooled")),
            "ensemble test case Dice (mean)": _number(test.get("case_dice_mean")),
            "ensemble test case HD95 (median, mm)": _number(test.get("case_hd95_mm_median"))} if test else {}),
        "test patients segmented": len(case_ids),
        "wall time (s)": round(time.time() - started, 1),
    }
    storage.write_json(storage.join(output, "summary.json"), {"outputs": result.outputs, "figures": result.figures})
    return result


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)
