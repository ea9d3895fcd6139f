"""The false-positive check on a real normal head: how many mL of "lesion" an export finds in a real
non-contrast head CT that has no acute lesion (issue 31 item 3).

The head is Debian's ``invesalius-examples`` (``Cranium.inv3``, an anonymised head CT; GPL-2): never
shipped here, installed when the check runs (``apt-get install -y invesalius-examples`` where this
runs as root with a package index; otherwise give ``--sample``). An ``.inv3`` file is an InVesalius 3
project: a tar.gz holding ``main.plist`` (``matrix``: filename, dtype, shape; ``spacing`` (x, y, z)
mm; ``orientation`` 0 axial, 1 coronal, 2 sagittal) and the raw volume, with no origin or direction.
``Cranium.inv3`` holds (108, 256, 256) int16 HU, 108 coronal slices 1.5 mm apart at 0.957 mm. Its
layout, read from the anatomy (the face at slice 0, the vertex at row 0): axis 0 anterior to
posterior, axis 1 superior to inferior, axis 2 taken as patient right to left (a head is symmetric
enough that the side does not change a false-positive volume). Only coronal projects are read.

The converter writes it as an axial series in ``volume``'s canonical geometry, stored RAS (NIfTI,
``volumes.write_nifti_case``), by default as a clinical series: 5 mm slices, each the mean of the
0.957 mm samples in its slab (a thick slice integrates its thickness), resampled linearly in-plane to
0.96 mm (``scipy.ndimage``). Then ``infer`` of the export on it: the lesion mL and count it reports
are all false positives. With the brain mask on and off where the installed ``infer_volumes`` has a
``brain_mask`` switch; else as the export infers.

Run: ``python -m aisd_ray.bench.normal_head --model EXPORT [--output DIR]`` (``make normal-head``):
prints one JSON object. Not part of ``make test`` (the sample is a package, not a test file).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import plistlib
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from aisd_ray.data.sources.layout import DataError

SAMPLE_PATHS = ("/usr/share/doc/invesalius-examples/examples/Cranium.inv3",
                "/usr/share/invesalius/samples/Cranium.inv3")
CORONAL = 1


def find_sample(install: bool = True) -> Path:
    """The installed ``Cranium.inv3``; installs ``invesalius-examples`` with apt-get first when it is
    missing, ``install`` is on and this runs as root. DataError (one line) when it cannot be had."""
    for path in SAMPLE_PATHS:
        if Path(path).is_file():
            return Path(path)
    if install and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "invesalius-examples"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for path in SAMPLE_PATHS:
            if Path(path).is_file():
                return Path(path)
    raise DataError(f"Cranium.inv3 not found in {' or '.join(SAMPLE_PATHS)}: install Debian's invesalius-examples "
                    "(apt-get install invesalius-examples, as root) or give --sample")


def read_inv3(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """An InVesalius 3 project's volume in canonical geometry: (HU int16 (Z, Y, X), z inferior to
    superior, y anterior to posterior, x right to left; spacing (z, y, x) mm). DataError naming the
    file for a project that is not a tar.gz with main.plist, a matrix of the stated size, or coronal."""
    path = Path(path)
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            if "main.plist" not in members:
                raise DataError(f"{path}: no main.plist inside: not an InVesalius 3 project")
            main = plistlib.loads(tar.extractfile(members["main.plist"]).read())
            matrix = main.get("matrix", {})
            name, shape, dtype = matrix.get("filename"), tuple(matrix.get("shape", ())), matrix.get("dtype", "int16")
            if name not in members or len(shape) != 3:
                raise DataError(f"{path}: main.plist names no 3-D matrix file inside the project ({name!r}, {shape})")
            raw = tar.extractfile(members[name]).read()
    except (tarfile.TarError, OSError, plistlib.InvalidFileException, EOFError) as e:
        raise DataError(f"{path}: not a readable InVesalius project (a tar.gz with main.plist): {e}") from None
    want = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(raw) != want:
        raise DataError(f"{path}: {name} holds {len(raw)} bytes, main.plist's shape {shape} of {dtype} needs {want}")
    if main.get("orientation") != CORONAL:
        raise DataError(f"{path}: orientation {main.get('orientation')!r}: only coronal projects (1) are read")
    sx, sy, sz = (float(s) for s in main["spacing"])
    volume = np.frombuffer(raw, np.dtype(dtype).newbyteorder("<")).reshape(shape)
    # (slice: anterior..posterior, row: superior..inferior, column: right..left) -> (inferior..superior, A..P, R..L)
    canonical = np.ascontiguousarray(volume.transpose(1, 0, 2)[::-1]).astype(np.int16)
    return canonical, (sy, sz, sx)


def clinical_series(hu: np.ndarray, spacing: tuple[float, float, float], slice_mm: float = 5.0,
                    pixel_mm: float = 0.96) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A canonical volume as a thick-slice axial series: resampled linearly to ``pixel_mm`` in plane
    and to a fine z step (``slice_mm`` / k, k the whole number nearest ``slice_mm / spacing[0]``),
    then each ``slice_mm`` slab the mean of its k samples. Returns (HU int16, spacing (z, y, x) mm)."""
    k = max(1, int(round(slice_mm / spacing[0])))
    fine = np.array(hu.shape) * np.array(spacing) / np.array((slice_mm / k, pixel_mm, pixel_mm))
    shape = np.maximum(np.rint(fine).astype(int), 1)
    shape[0] = shape[0] // k * k
    out = ndimage.zoom(hu.astype(np.float32), shape / np.array(hu.shape), order=1, grid_mode=True, mode="nearest")
    out = out[:shape[0]].reshape(shape[0] // k, k, *out.shape[1:]).mean(axis=1)
    size = np.array(hu.shape) * np.array(spacing)
    return (np.rint(out).astype(np.int16),
            (float(slice_mm), float(size[1] / out.shape[1]), float(size[2] / out.shape[2])))


def write_normal_head(sample: str | Path, path: str | Path, slice_mm: float | None = 5.0,
                      pixel_mm: float = 0.96) -> dict[str, Any]:
    """Convert ``sample`` (an .inv3) to NIfTI at ``path``, stored RAS, centred on the scanner axis;
    ``slice_mm`` None keeps the native sampling. Returns what was written (shape, spacing)."""
    from aisd_ray.data.synthetic.volumes import write_nifti_case

    hu, spacing = read_inv3(sample)
    if slice_mm:
        hu, spacing = clinical_series(hu, spacing, slice_mm, pixel_mm)
    write_nifti_case(hu, spacing, path, orientation="RAS", z0=-(hu.shape[0] - 1) / 2 * spacing[0])
    return {"nifti": str(path), "orientation": "RAS", "shape_zyx": list(hu.shape),
            "spacing_mm_zyx": [round(s, 4) for s in spacing]}


def check(export: str, out_dir: str | Path, sample: str | Path | None = None, slice_mm: float | None = 5.0,
          pixel_mm: float = 0.96) -> dict[str, Any]:
    """Infer ``export`` on the normal head; the false-positive lesion mL and count, per brain-mask setting."""
    from aisd_ray.data.ct.head import head_model
    from aisd_ray.data.sources.volume import read_volume
    from aisd_ray.inference.infer_volumes import infer_volumes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sample = Path(sample) if sample else find_sample()
    series = write_normal_head(sample, out / "normal_head.nii.gz", slice_mm, pixel_mm)
    vol = read_volume(out / "normal_head.nii.gz")
    series["intracranial_ml"] = round(head_model(vol.hu, vol.spacing).intracranial_ml, 1)
    settings = [True, False] if "brain_mask" in inspect.signature(infer_volumes).parameters else [None]
    runs = []
    for mask in settings:
        name = {True: "mask_on", False: "mask_off", None: "as_exported"}[mask]
        kwargs = {} if mask is None else {"brain_mask": mask}
        [case] = infer_volumes(export, out / "normal_head.nii.gz", str(out / name), progress=False, **kwargs)
        runs.append({"brain_mask": mask, "false_positive_ml": case["lesion_ml"],
                     "false_positive_lesions": case["lesion_count"],
                     "largest_ml": case["lesions"][0]["volume_ml"] if case["lesions"] else 0.0,
                     "before_postprocessing_ml": round(case["lesion_ml"] + case["postprocessing"]["removed_ml"], 3),
                     "postprocessing": {k: v for k, v in case["postprocessing"].items() if k != "removed_ml"},
                     "qa": [f"{f['check']}: {f['status']}" for f in case["qa"] if f["status"] == "warn"]})
    return {"check": "normal_head", "sample": str(sample), "export": str(export), "series": series, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aisd_ray.bench.normal_head", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="export folder")
    p.add_argument("--output", default="runs/normal-head", help="folder for the NIfTI and the masks")
    p.add_argument("--sample", help="an InVesalius .inv3 (default: the installed Cranium.inv3)")
    p.add_argument("--native", action="store_true", help="keep 1.5 mm x 0.957 mm, no clinical 5 mm series")
    args = p.parse_args(argv)
    try:
        result = check(args.model, args.output, args.sample, None if args.native else 5.0)
    except DataError as e:
        print(str(e), file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
