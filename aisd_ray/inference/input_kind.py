"""What a model was trained on, and the one rule for what else it may be given.

Kinds of input:

- ``ct_hu``: CT volumes in Hounsfield units (nnU-Net, DICOM series, NIfTI), windowed by the
  training's HU ``windows`` into the channels of its channel mode (``data.channels``): a store
  whose manifest ``source`` records ``windows`` (``volume_source.py``);
- ``slices_8bit``: 8-bit PNG/JPEG slices, windowed once by whoever made them (the AISD release's
  PNGs, the original's tree): any other store;
- ``unknown``: an export written before exports recorded it.

The channel: ``stages.train`` records the store's input (``of_manifest``: its ``input`` and, when the
manifest has it, the training ``domain``, ``prepare``'s [lo, hi] ranges of what the training
cases were) in the run folder (``RUN_RECORD``) when training starts; ``export.export_best`` copies
them into ``export.json`` ("input", "domain"); an ensemble's domain is its members' union
(``qa.union_domain``). A run from before has no record, its export no "input" (kind unknown).

The rule (``check``), the same for ``infer --images``, ``infer --input`` and ``evaluate``:

- the kind it was trained on: pass;
- 8-bit slices to a ``ct_hu`` model that sees more than one distinct window, or a channel mode other
  than grey (neighbours, symmetry: built from a whole volume): refused (``DataError``), as one
  8-bit window cannot give those channels; with one grey window: segmented with a warning, as
  slices windowed otherwise give wrong, often empty, masks;
- CT volumes to a ``slices_8bit`` model: segmented with a warning, windowed with the export's own
  ``windows`` (its training config's ``data.windows``), taken to be the window its slices were
  made with; nothing recorded says they were;
- an ``unknown`` model: the check is skipped, and the log says it could not be made.
"""

from __future__ import annotations

import json
from typing import Any

from aisd_ray.core import storage
from aisd_ray.data.ct import qa
from aisd_ray.data.sources.layout import DataError
from aisd_ray.data.sources.volume_base import Finding

CT_HU, SLICES_8BIT, UNKNOWN = "ct_hu", "slices_8bit", "unknown"
CHECK = "input_kind"
RUN_RECORD = "training_input.json"  # in a run folder: what its store held (``of_manifest``)
WHAT = {CT_HU: "CT volumes in HU", SLICES_8BIT: "8-bit image slices"}
INFER_ADVICE = "give --input a DICOM series or NIfTI"


def of_source(source: dict[str, Any] | None) -> dict[str, Any]:
    """The input a store holds, from its manifest's ``source``: {"kind": "ct_hu", "windows": [[level,
    width], ...] HU, "channels": mode} for CT volumes, {"kind": "slices_8bit"} otherwise."""
    source = source or {}
    if "windows" not in source:
        return {"kind": SLICES_8BIT}
    return {"kind": CT_HU, "windows": [[float(v) for v in w] for w in source["windows"]],
            "channels": source.get("channels", "grey")}


def of_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a run records of its store (``RUN_RECORD``): {"input": ``of_source``} and "domain" (the
    manifest's ``source.domain``, as it is) when there is one."""
    source = manifest.get("source") or {}
    return {"input": of_source(source), **({"domain": source["domain"]} if source.get("domain") else {})}


def write_run_record(run_uri: str, manifest: dict[str, Any]) -> None:
    """``run_uri/RUN_RECORD``: ``of_manifest(manifest)``."""
    storage.write_text(storage.join(run_uri, RUN_RECORD), json.dumps(of_manifest(manifest), indent=2))


def read_run_record(run_uri: str) -> dict[str, Any]:
    """A run's record ({"input": ..., "domain": ...}); {} for a run trained before it was written."""
    uri = storage.join(run_uri, RUN_RECORD)
    if not storage.exists(uri):
        return {}
    record = json.loads(storage.read_bytes(uri))
    return {k: record[k] for k in ("input", "domain") if record.get(k)}


def _windows(windows) -> str:
    return ", ".join(f"({level:g}, {width:g})" for level, width in windows)


def check(trained: dict[str, Any] | None, given: str, where: str, export: str, windows=(),
          advice: str = INFER_ADVICE) -> Finding:
    """The rule (module docstring) for ``given`` input (``CT_HU`` or ``SLICES_8BIT``) at ``where``
    (the folder or store given) to the export ``export`` trained on ``trained`` (its "input"; None:
    unknown); ``windows``: the (level, width) HU windows it applies to CT volumes. Returns the
    finding, status "pass", "warn" or "skipped", the last two logged (one line); DataError naming
    ``where``, what the export expects and ``advice`` for a refusal."""
    kind = (trained or {}).get("kind", UNKNOWN)
    expected = kind if kind in WHAT else UNKNOWN
    if expected == UNKNOWN:
        message = (f"the export {export} does not record the kind of input it was trained on (exported before "
                   f"exports recorded it): whether it takes {WHAT[given]} cannot be checked")
        return _logged(Finding(CHECK, "skipped", given, UNKNOWN, message), where)
    if expected == given:
        return Finding(CHECK, "pass", given, expected)
    if given == SLICES_8BIT:
        seen, mode = trained.get("windows") or [], trained.get("channels", "grey")  # the training's windows
        distinct = sorted({tuple(w) for w in seen})
        if mode != "grey" or len(distinct) != 1:
            raise DataError(f"{where}: 8-bit image slices, but the export {export} expects CT volumes in HU, made "
                            f"into channels {mode!r} through the window(s) {_windows(seen)} HU, which 8-bit slices "
                            f"cannot give: {advice}")
        message = (f"8-bit image slices given to the export {export}, trained on CT volumes in HU through the window "
                   f"{_windows(distinct)} HU: segmented as if each slice had been windowed so; slices windowed "
                   "otherwise give wrong, often empty, masks")
    else:
        message = (f"CT volumes in HU given to the export {export}, trained on 8-bit image slices: windowed with "
                   f"its windows {_windows(windows)} HU, taken to be the window those slices were made with (nothing "
                   "recorded says so)")
    return _logged(Finding(CHECK, "warn", given, expected, message), where)


def _logged(finding: Finding, where: str) -> Finding:
    qa.log_finding(where, finding)
    return finding
