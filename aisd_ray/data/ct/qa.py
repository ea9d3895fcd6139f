"""The QA gate: what is checked of every CT case before it is segmented (``infer --input``), scored
(``evaluate``) or sharded (``prepare``), and recorded with it as ``Finding``s (``volume_base``).

Three kinds of check:

- **refuse**: not Hounsfield units, not axial, no usable geometry (no ImageOrientationPatient or
  position, a 4-D NIfTI), missing or duplicated slices. The readers (``volume.read_volume``) raise
  these already, as a VolumeError naming the file; no ``Volume`` exists to check, so they are not
  repeated here. What a reader noticed and mended (NaN set to air, a gantry tilt) comes in
  ``Volume.findings`` and leads each case's list.
- **warn** (``--strict`` refuses): a contrast agent named in the DICOM header (``ContrastBolusAgent``
  or its sequence; whether one is named is recorded, never the header's text); and, against an
  export's training domain (``union_domain`` of the training cases' ``case_domain``), each value of
  ``DOMAIN_KEYS`` outside its range widened by its tolerance (``TOLERANCES``, with why). An export
  without a domain (written before it was recorded) gives one "skipped" finding, ``domain``.
- **coverage** (a warning): a volume with less than ``MIN_INTRACRANIAL_ML`` of intracranial space
  (``head.head_model``) is not a head CT, or too little of one to judge a lesion volume.

``prepare`` has no export yet: it records each case's ``case_domain`` values and its physics and
coverage findings (``record``), and the union of the values as the store's domain.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable


from aisd_ray.data.ct.head import HeadModel
from aisd_ray.data.sources.volume_base import Finding, Volume, VolumeError

log = logging.getLogger(__name__)

MIN_INTRACRANIAL_ML = 100.0  # a brain is 1100..1500 mL; 100 mL is two 5 mm slices through the ventricles
# the domain's values per case: key -> (unit, tolerance kind, tolerance, why)
TOLERANCES = {
    "in_plane_spacing_mm": ("mm", "relative", 0.1, "a resize to the model size absorbs a little, not a new "
                            "pixel size"),
    "slice_spacing_mm": ("mm", "relative", 0.1, "thin slices are noisier and their partial volume differs"),
    "image_size_px": ("px", "relative", 0.1, "a matrix the training never saw is resized by another factor"),
    "parenchyma_hu_median": ("HU", "absolute", 5.0, "scanners and kVp move parenchyma by a few HU; an acute "
                             "lesion is only 2..6 HU below it"),
    "parenchyma_noise_hu": ("HU", "relative", 0.5, "noise half again as high (or as low) as any training case "
                            "changes what a faint hypodensity looks like"),
    "gantry_tilt_deg": ("degrees", "absolute", 2.0, "a tilt shears the slices against the anatomy"),
    "head_fraction": ("", "absolute", 0.1, "a head filling much more or less of the field of view than in "
                      "training (another reconstruction field)"),
}
DOMAIN_KEYS = tuple(TOLERANCES)


def case_domain(vol: Volume, head: HeadModel) -> dict[str, float | None]:
    """One case's values of ``DOMAIN_KEYS``: in-plane spacing (the mean of y and x, mm), slice spacing
    (mm), image size (the larger of rows and columns, px), parenchyma median and noise (HU, None
    without an intracranial space), gantry tilt (degrees), head fraction of the field of view."""
    _, h, w = vol.hu.shape
    stats = head.stats()
    return {"in_plane_spacing_mm": round((vol.spacing[1] + vol.spacing[2]) / 2, 5),
            "slice_spacing_mm": round(float(vol.spacing[0]), 5), "image_size_px": int(max(h, w)),
            "parenchyma_hu_median": stats["parenchyma_hu_median"],
            "parenchyma_noise_hu": stats["parenchyma_noise_hu"],
            "gantry_tilt_deg": round(abs(float(vol.gantry_tilt_deg)), 3), "head_fraction": stats["head_fraction"]}


def union_domain(values: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The training domain of cases' ``case_domain`` values (or of several domains: an ensemble's
    members): {key: [lo, hi]} per ``DOMAIN_KEYS`` (keys no case has a value for are left out) and
    ``cases``, the number of cases."""
    values = list(values)
    out: dict[str, Any] = {}
    for key in DOMAIN_KEYS:
        found = [v for d in values for v in _as_range(d.get(key))]
        if found:
            out[key] = [min(found), max(found)]
    out["cases"] = sum(int(d.get("cases", 1)) for d in values)
    return out


def _as_range(v) -> list[float]:
    if v is None:
        return []
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)]


def _widened(key: str, lo: float, hi: float) -> tuple[float, float]:
    _, kind, tol, _ = TOLERANCES[key]
    return (lo * (1 - tol), hi * (1 + tol)) if kind == "relative" else (lo - tol, hi + tol)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def domain_findings(values: dict[str, Any], domain: dict[str, Any] | None) -> list[Finding]:
    """One finding per ``DOMAIN_KEYS`` value of a case against ``domain`` (``union_domain``): "pass"
    inside the range widened by its tolerance, "warn" outside, "skipped" where the case or the domain
    has no value; a single "skipped" finding ``domain`` when there is no domain at all."""
    if not domain:
        return [Finding("domain", "skipped", None, None, "the export records no training domain (written before "
                                                        "it was recorded): the domain checks were skipped")]
    found = []
    for key in DOMAIN_KEYS:
        value, expected = values.get(key), domain.get(key)
        unit = TOLERANCES[key][0]
        if value is None or not expected:
            found.append(Finding(key, "skipped", value, expected, f"{key}: no value to compare"))
            continue
        lo, hi = _widened(key, *expected)
        inside = lo - 1e-9 <= float(value) <= hi + 1e-9
        tol = TOLERANCES[key]
        how = f"{tol[2]:.0%}" if tol[1] == "relative" else f"{tol[2]:g} {unit}".strip()
        message = (f"{key} {_fmt(value)} {unit} {'inside' if inside else 'outside'} the training range "
                   f"{_fmt(expected[0])}..{_fmt(expected[1])} {unit} (tolerance {how})").replace("  ", " ")
        found.append(Finding(key, "pass" if inside else "warn", value, list(expected), message))
    return found


def physics_findings(vol: Volume, head: HeadModel) -> list[Finding]:
    """The reader's own findings, then the contrast and coverage checks (no export needed)."""
    found = list(getattr(vol, "findings", ()) or ())  # a DICOM reader's include its contrast check
    if not any(f.check == "contrast_agent" for f in found):
        found.append(Finding("contrast_agent", "skipped", None, False,
                             "no DICOM header to check for a contrast agent (NIfTI)"))
    ml = round(head.intracranial_ml, 1)
    if ml < MIN_INTRACRANIAL_ML:
        what = "no intracranial space found: not a head CT" if ml == 0 else \
            f"only {ml:g} mL of intracranial space: too little of a head to judge"
        found.append(Finding("coverage", "warn", ml, [MIN_INTRACRANIAL_ML, None], what))
    else:
        found.append(Finding("coverage", "pass", ml, [MIN_INTRACRANIAL_ML, None],
                             f"{ml:g} mL of intracranial space"))
    return found


def check_case(vol: Volume, head: HeadModel, domain: dict[str, Any] | None = None) -> list[Finding]:
    """Every check of one case (module docstring): the reader's findings first, then contrast,
    coverage and the domain checks against ``domain`` (an export's; None: one "skipped" finding)."""
    return physics_findings(vol, head) + domain_findings(case_domain(vol, head), domain)


def warnings(findings: Iterable[Finding]) -> list[Finding]:
    """The findings that warn or fail, in order."""
    return [f for f in findings if f.status in ("warn", "fail")]


def label(findings: Iterable[Finding]) -> str:
    """"pass", or "warn: <check>, <check>" naming what warned (a ``cases.csv`` column)."""
    bad = warnings(findings)
    return "pass" if not bad else "warn: " + ", ".join(dict.fromkeys(f.check for f in bad))


def as_json(findings: Iterable[Finding]) -> list[dict[str, Any]]:
    """The findings as dicts (check, status, value, expected, message); NaN as None."""
    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return [{k: clean(v) for k, v in asdict(f).items()} for f in findings]


def from_json(rows: Iterable[dict[str, Any]]) -> list[Finding]:
    """``as_json``'s dicts (a manifest's or a summary's) back as ``Finding``s; missing keys as None."""
    return [Finding(**{k: r.get(k) for k in ("check", "status", "value", "expected", "message")}) for r in rows]


def log_finding(where: str, finding: Finding) -> None:
    """One log line, "<where>: QA <check>: <message>" (a status other than warn is named after the
    check): the one format of the QA gate's lines, for a case ("case 0042") or a folder or store."""
    status = "" if finding.status == "warn" else f" {finding.status}"
    log.warning("%s: QA %s%s: %s", where, finding.check, status, finding.message)


def log_warnings(case_id: str, findings: Iterable[Finding]) -> None:
    """One log line per warning, naming the case and the check (``log_finding``)."""
    for f in warnings(findings):
        log_finding(f"case {case_id}", f)


def refuse_if_strict(strict: bool, where: str | Path, case_id: str | None, findings: Iterable[Finding]) -> None:
    """With ``strict``, the first warning is a VolumeError (a DataError) of one line: ``where``, the
    case (``case_id``; None for a folder of images), the check, its value and the training range."""
    bad = warnings(findings)
    if strict and bad:
        f = bad[0]
        expected = "" if f.expected is None else f", expected {f.expected}"
        case = "" if case_id is None else f"case {case_id}: "
        raise VolumeError(f"{where}: {case}QA {f.check} = {f.value}{expected}: {f.message} "
                          "(--strict refuses what QA warns of)")


def record(vol: Volume, head: HeadModel) -> dict[str, Any]:
    """What ``prepare`` keeps of a case: its ``case_domain`` values and its physics and coverage
    findings (``as_json``); each warning logged one line."""
    found = physics_findings(vol, head)
    log_warnings(vol.case_id, found)
    return {"values": case_domain(vol, head), "findings": as_json(found)}


def manifest_findings(manifest: dict[str, Any], split: str, domain: dict[str, Any] | None
                      ) -> dict[str, list[Finding]]:
    """Per case of ``split`` of a store prepared from volumes: its recorded findings, then its
    recorded values against ``domain`` (an export's). Empty for a store without QA records (PNG
    slices, a store prepared before them)."""
    source = manifest.get("source") or {}
    recorded = source.get("qa") or {}
    cases = (source.get("cases") or {}).get(split) or []
    return {case: from_json(recorded[case]["findings"]) + domain_findings(recorded[case]["values"], domain)
            for case in cases if case in recorded}
