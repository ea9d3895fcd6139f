"""The grid of a stack of DICOM slices (a series' files, or an enhanced CT file's frames): the slice
normal from ImageOrientationPatient, the order along it from ImagePositionPatient (never file names
or InstanceNumber), and the checks that make one uniform grid of them.

The checks: axial (the normal within ``AXIAL_LIMIT_DEG`` of the patient's z axis); no two slices at
one position; one slice spacing. Spacing comes in three kinds:

- uniform: every slice lies within ``SPACING_TOL`` x the step of where a uniform grid from the first
  to the last slice puts it (float jitter and positions rounded to 0.1 mm read as uniform); the
  step is the span over the number of steps;
- missing slice(s): the steps are the regular (median) step but for one or more that are an integer
  multiple (>= 2) of it with regular steps on both sides;
- varying spacing (2.5 mm x3, then 5 mm x4; thick-thin-thick; an odd step that is no multiple):
  refused with the steps, never called a missing slice. Reading such a series on its real positions
  (resampled for the model, the mask put back slab by slab) is not done: the refusal asks the user
  to resample it to one spacing first.

Gantry tilt (``tilt_findings``: logged and recorded): a tilted series' slices are sheared, not
rotated: the step is the distance between slices along their normal, so base area x perpendicular
height keeps volumes in mL right; the tilt is the angle between the slice normal and the line
through the first and last slice's positions.

Header findings of a DICOM reader live here too: the tilt and the contrast check of the QA gate
(``contrast_findings``), made on the headers already parsed; and ``odd_ones``, the one tolerance
by which slices "differ" in orientation or pixel spacing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aisd_ray.data.sources.volume_base import Finding, VolumeError

log = logging.getLogger(__name__)

AXIAL_LIMIT_DEG = 45.0  # a slice normal farther than this from the patient's z axis is not axial
SPACING_TOL = 0.1  # a slice farther than this x the step from its uniform grid position: spacing not uniform
TILT_NOTED_DEG = 0.01  # a gantry tilt above this is recorded as a finding and logged
RUNS_SHOWN = 6  # at most this many runs of equal steps in a "spacing varies" message


@dataclass(frozen=True)
class SliceGrid:
    """Slices on one uniform grid: ``order`` the slice indices given sorted along the normal (the
    first the lowest), ``row``/``col``/``normal`` unit vectors (LPS), ``origin`` the first slice's
    position (x, y, z) mm, ``step`` mm between slices along the normal, ``tilt_deg`` the gantry tilt."""

    order: list[int]
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    origin: np.ndarray
    step: float
    tilt_deg: float

    @property
    def direction(self) -> tuple[float, ...]:
        """ITK's direction: 9 floats row-major, columns row, col, normal."""
        return tuple(float(v) for v in np.stack([self.row, self.col, self.normal], axis=1).ravel())


def slice_grid(where: Path, orientation: np.ndarray, positions: np.ndarray, names: list[str],
               thickness: float) -> SliceGrid:
    """The grid of slices with one ImageOrientationPatient ``orientation`` (6 floats) at
    ``positions`` ((n, 3) mm, LPS), named ``names`` in messages; ``thickness`` (mm) is the step of a
    single slice. Raises VolumeError naming ``where`` for a non-axial stack, two slices at one
    position, missing slices or a varying spacing (module docstring)."""
    row, col = orientation[:3] / np.linalg.norm(orientation[:3]), orientation[3:] / np.linalg.norm(orientation[3:])
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    off_axis = float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))
    if off_axis > AXIAL_LIMIT_DEG:
        raise VolumeError(f"{where}: not an axial series (slice normal {off_axis:.0f} degrees from the patient's "
                          "z axis)")
    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    along, positions = along[order], positions[order]
    if len(order) == 1:
        return SliceGrid(order, row, col, normal, positions[0], float(thickness), 0.0)
    steps = np.diff(along)
    median = float(np.median(steps))
    for k, step in enumerate(steps):
        if step < max(1e-3, 0.01 * median):
            raise VolumeError(f"{where}: two slices at one position ({along[k]:.2f} mm along the slice normal: "
                              f"{names[order[k]]}, {names[order[k + 1]]})")
    step = float(along[-1] - along[0]) / len(steps)
    off_grid = np.abs(along - along[0] - step * np.arange(len(along)))
    if off_grid.max() > SPACING_TOL * step:
        _refuse_spacing(where, along, steps, median)
    advance = positions[-1] - positions[0]
    cos_tilt = min(1.0, abs(float(advance @ normal)) / float(np.linalg.norm(advance)))
    return SliceGrid(order, row, col, normal, positions[0], step, float(np.degrees(np.arccos(cos_tilt))))


def _refuse_spacing(where: Path, along: np.ndarray, steps: np.ndarray, median: float) -> None:
    """VolumeError for steps that are not uniform: missing slice(s) when every irregular step is a
    whole multiple (>= 2) of the median step between two regular ones, else the spacing varies."""
    multiple = np.rint(steps / median)
    near = np.abs(steps - multiple * median) <= SPACING_TOL * median
    regular = near & (multiple == 1)
    gaps = [k for k in range(len(steps)) if near[k] and multiple[k] >= 2
            and all(regular[j] for j in (k - 1, k + 1) if 0 <= j < len(steps))]
    if gaps and len(gaps) + int(regular.sum()) == len(steps):
        k = gaps[0]
        more = f"; {len(gaps) - 1} more gap(s)" if len(gaps) > 1 else ""
        raise VolumeError(f"{where}: missing slice(s): a gap of {steps[k]:.2f} mm between the slices at "
                          f"{along[k]:.2f} and {along[k + 1]:.2f} mm (median step {median:.2f} mm{more})")
    runs: list[list[float]] = []  # [first step, sum, count]
    for step in steps:
        if runs and abs(step - runs[-1][0]) <= SPACING_TOL * runs[-1][0]:
            runs[-1][1:] = [runs[-1][1] + step, runs[-1][2] + 1]
        else:
            runs.append([float(step), float(step), 1])
    shown = ", then ".join(f"{total / count:.2f} mm x{int(count)}" for _, total, count in runs[:RUNS_SHOWN])
    if len(runs) > RUNS_SHOWN:
        shown += f", then {len(runs) - RUNS_SHOWN} more run(s)"
    raise VolumeError(f"{where}: slice spacing varies: {shown} (slices {along[0]:.2f} to {along[-1]:.2f} mm along "
                      "the slice normal); one slice spacing expected: resample the series to one spacing first")


def tilt_findings(folder: Path, tilt: float) -> tuple[Finding, ...]:
    """A gantry tilt over ``TILT_NOTED_DEG``: one info log line naming ``folder`` and the angle, and
    its ``Finding`` (status "pass": the z spacing is taken along the slice normal)."""
    if tilt <= TILT_NOTED_DEG:
        return ()
    log.info("%s: gantry tilt %.2f degrees: slices sheared, z spacing taken along the slice normal", folder, tilt)
    return (Finding("gantry_tilt", "pass", value=round(tilt, 2), expected=None,
                    message=f"gantry tilt {tilt:.2f} degrees: slices sheared, z spacing taken along the slice "
                            "normal"),)


def odd_ones(values, atol: float = 1e-4) -> list[int]:
    """The indices of ``values`` ((n, k) numbers: each slice's ImageOrientationPatient or
    PixelSpacing) that differ by more than ``atol`` in any component from the value most of them
    share (the one with the most others within ``atol``): a localizer or another image among a
    series' slices. Within ``atol`` counts as equal, so float noise in a header never splits a series."""
    values = np.asarray(values, np.float64).reshape(len(values), -1)
    close = np.all(np.abs(values[:, None, :] - values[None, :, :]) <= atol, axis=-1)
    reference = int(np.argmax(close.sum(axis=1)))
    return [int(i) for i in np.flatnonzero(~close[reference])]


CONTRAST_TAGS = ("ContrastBolusAgent", "ContrastBolusAgentSequence")


def contrast_findings(datasets) -> tuple[Finding, ...]:
    """The contrast check of the QA gate, made on the headers a DICOM reader has parsed already
    (``datasets``: pydicom datasets, every slice's or one multi-frame file's): "warn" when any of them
    names a contrast agent (ContrastBolusAgent or its sequence), else "pass". Whether one is named is
    recorded, never its text."""
    named = any(tag in ds and ds[tag].value not in (None, "", []) for ds in datasets for tag in CONTRAST_TAGS)
    message = ("a contrast agent is named in the DICOM header; the model knows non-contrast CT" if named
               else "no contrast agent named in the DICOM header")
    return (Finding("contrast_agent", "warn" if named else "pass", named, False, message),)
