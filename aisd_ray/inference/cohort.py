"""The bookkeeping of ``infer --input`` on a folder of patients (a cohort): an output folder that is
whole *per case*, a rerun that skips the cases already done, refused cases as rows, and the
cohort's summary. No Ray here (``cohort_ray.py`` spreads the cases over a Ray actor pool).

- **Whole per case**: a case's ``<case>.nii.gz`` and ``cases/<case>/`` (``summary.json``,
  ``preview.png``, ``probabilities.nii.gz``) are written in a temporary folder inside the output
  folder (``cases/.tmp-<case>-<pid>-...``), then renamed into place, the mask first and the case
  folder last (``case_output``); on ``gs://`` the files are uploaded and ``summary.json`` last. A
  case is *complete* when its ``summary.json`` is there, records this export's identity
  (``export_id``) and its mask is there (``complete``): a killed run leaves whole cases only, and a
  half-written case is redone.
- **The export's identity** (``export_identity``): a SHA-256 (16 hex digits) of the export's
  ``export.json`` or ``ensemble.json``, ``postprocess.json`` and ``calibration.json`` bytes and of
  the settings that change a case's outputs or its verdict (``tta``, a post-processing given instead
  of the export's, ``probabilities``, ``strict``, ``dicom_seg``, ``brain_mask``, ``uncertainty``):
  another export, a re-chosen post-processing, a new calibration or another setting redoes every
  case; ``--redo`` redoes them anyway.
- **Refused cases** (a ``VolumeError``: not CT, a missing slice, ``--strict`` QA): a row
  ``{"case_id", "status": "refused", "error": <one line>}`` with no outputs; the others go on.
- At the end ``cases.csv`` (one row per case, ``status`` "done" or "refused" and ``error``) and
  ``cohort.json`` (``cohort_summary``), each written atomically, then ``.complete``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from aisd_ray.core import storage
from aisd_ray.data.ct import qa

COHORT = "cohort.json"
TMP = ".tmp-"  # a case being written: cases/.tmp-<case>-<pid>-<random>/


def export_identity(export_uri: str, model: Any = None, **settings: Any) -> str:
    """16 hex digits: SHA-256 of the export's record files (``export.json`` or ``ensemble.json``,
    and ``postprocess.json`` and ``calibration.json`` when there) and of ``settings`` (JSON, sorted keys). ``model``: an
    already loaded export or a stand-in; one without files at ``export_uri`` is named by its type."""
    digest = hashlib.sha256()
    found = False
    for name in ("export.json", "ensemble.json", "postprocess.json", "calibration.json"):
        uri = storage.join(export_uri, name)
        if not storage.exists(uri):
            continue
        digest.update(name.encode() + b"\0" + storage.read_bytes(uri))
        found = True
    if not found and model is not None:
        digest.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def summary_uri(out_uri: str, case_id: str) -> str:
    return storage.join(out_uri, "cases", case_id, "summary.json")


def mask_uri(out_uri: str, case_id: str) -> str:
    return storage.join(out_uri, f"{case_id}.nii.gz")


def complete(out_uri: str, case_id: str, export_id: str) -> dict[str, Any] | None:
    """The case's summary when it is complete for ``export_id`` (module), else None."""
    uri = summary_uri(out_uri, case_id)
    try:
        if not storage.exists(uri) or not storage.exists(mask_uri(out_uri, case_id)):
            return None
        info = json.loads(storage.read_bytes(uri))
    except (OSError, ValueError):
        return None
    return info if info.get("export_id") == export_id else None


def remove_stale(out_uri: str) -> None:
    """Temporary case folders a killed run left (local output folders only)."""
    cases = Path(out_uri) / "cases"
    if storage.is_local(out_uri) and cases.is_dir():
        for entry in cases.iterdir():
            if entry.name.startswith(TMP):
                shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def case_output(out_uri: str, case_id: str) -> Iterator[tuple[Path, Path]]:
    """(mask path, case folder): local paths to write one case's outputs into; they replace the
    case's outputs in ``out_uri`` only when the block succeeds (module: the mask first, the case
    folder, with its ``summary.json``, last). Nothing of the case is left when it raises."""
    local = storage.is_local(out_uri)
    parent = Path(out_uri) / "cases" if local else None
    if parent:
        parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP}{case_id}-{os.getpid()}-", dir=parent))
    try:
        folder = tmp / "case"
        folder.mkdir()
        yield tmp / "mask.nii.gz", folder
        if local:
            old = Path(summary_uri(out_uri, case_id))
            if old.exists():
                old.unlink()  # from here on the case reads as incomplete, whatever stops the swap
            os.replace(tmp / "mask.nii.gz", mask_uri(out_uri, case_id))
            target = parent / case_id
            if target.exists():
                shutil.rmtree(target)
            os.replace(folder, target)
        else:
            if storage.exists(summary_uri(out_uri, case_id)):
                storage.delete(summary_uri(out_uri, case_id))  # from here on the case reads as incomplete
            storage.write_bytes(mask_uri(out_uri, case_id), (tmp / "mask.nii.gz").read_bytes())
            files = sorted(p for p in folder.iterdir() if p.name != "summary.json")
            case_uri = storage.join(out_uri, "cases", case_id)
            for name in set(storage.list_dir(case_uri)) - {p.name for p in files}:
                storage.delete(storage.join(case_uri, name))  # an earlier run's output this one did not write
            for path in files + [folder / "summary.json"]:
                storage.write_bytes(storage.join(out_uri, "cases", case_id, path.name), path.read_bytes())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def refused(case_id: str, reason: str) -> dict[str, Any]:
    """The row of a refused case: its one-line reason, no outputs."""
    return {"case_id": case_id, "status": "refused", "error": reason.splitlines()[0] if reason else ""}


def is_refused(row: dict[str, Any]) -> bool:
    return row.get("status") == "refused"


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    q = np.quantile(np.asarray(values, float), [0.0, 0.25, 0.5, 0.75, 1.0])
    return dict(zip(("min", "q1", "median", "q3", "max"), (round(float(v), 3) for v in q)))


def cohort_summary(rows: list[dict[str, Any]], skipped: int = 0) -> dict[str, Any]:
    """What the cohort came to: ``cases``, ``done`` (of which ``skipped``: complete from an earlier
    run with the same export), ``refused`` (with their reasons), the lesion mL distribution over
    the done cases (min, quartiles (numpy's linear interpolation), max), ``qa_warned`` (done cases
    with a QA warning) and, where the rows carry a review flag (summary.json's ``uncertainty.review``:
    an export with a review threshold), ``review_flagged``."""
    done = [r for r in rows if not is_refused(r)]
    out: dict[str, Any] = {
        "cases": len(rows), "done": len(done), "skipped": skipped, "refused": len(rows) - len(done),
        "refused_cases": {r["case_id"]: r["error"] for r in rows if is_refused(r)},
        "lesion_ml": _quantiles([float(r["lesion_ml"]) for r in done]),
        "cases_with_lesion": sum(1 for r in done if r.get("lesion_count")),
        "qa_warned": sum(1 for r in done if qa.warnings(qa.from_json(r.get("qa", ())))),
    }
    flags = [(r.get("uncertainty") or {}).get("review") for r in done]
    if any(f is not None for f in flags):
        out["review_flagged"] = sum(1 for f in flags if f)
    return out


def write_cohort(out_uri: str, rows: list[dict[str, Any]], csv_row, fields: list[str], skipped: int) -> dict[str, Any]:
    """``cases.csv`` (``csv_row(row)`` of each done row, the refused rows' case, status and error),
    ``cohort.json`` and ``.complete``, each atomically, in that order; the cohort summary."""
    storage.write_csv(storage.join(out_uri, "cases.csv"), [
        {"case_id": r["case_id"], "status": "refused", "error": r["error"]} if is_refused(r)
        else {**csv_row(r), "status": "done", "error": ""} for r in rows], fields + ["status", "error"])
    info = cohort_summary(rows, skipped)
    storage.write_json(storage.join(out_uri, COHORT), info)
    storage.write_text(storage.join(out_uri, storage.COMPLETE), json.dumps({"completed_at": storage.utc_now()}))
    return info
