"""``aisd-ray infer``: a folder of images in, palette mask PNGs (and overlays) out.

Works from an export folder alone; the images may be a local folder or a gs:// prefix. Each
image (PNG/JPG, any size) is resized to the model size, segmented, and its class probabilities
resized back (bilinear) to the image's own size before the most likely class is taken, so masks
have smooth edges at any size; each is saved under the same base name as a palette PNG in
``rgb_map`` colours, as the original's inferencer did. An overlay ``overlays/<name>.png`` shows
image | image with the lesion outline, at the image's size. The output folder appears only once
every image is done: a bad image (named in the error) leaves no partial folder.

The images are 8-bit slices, windowed already: what the export was trained on is checked first
(``input_kind.check``, the one rule): an export trained on CT volumes through several HU windows, or
in a channel mode other than grey, is refused (one line: it expects CT volumes, ``--input``); one
trained on one grey window segments them with a QA warning (one log line); ``qa.json`` in the
output folder records the check ({"checks": [{"check": "input_kind", "status", "value",
"expected", "message"}]}, status "pass", "warn", or "skipped" for an export that does not record
its training input).

With ``tta`` each prediction averages the image and its left-right mirror (``export.LoadedExport``).
The export's post-processing choice (``postprocess.json``) is *not* applied here: its rules act on
3-D lesions of a whole case, and a folder of images has no case or slice order to build one from
(``infer --input`` on CT patients applies it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from aisd_ray.core import storage
from aisd_ray.core.progress import progress_bar
from aisd_ray.data.ct import qa
from aisd_ray.data.sources import layout
from aisd_ray.inference import input_kind
from aisd_ray.inference.export import LoadedExport
from aisd_ray.report import render


def infer_folder(export_uri: str, images_dir: str | Path, out_uri: str, batch_size: int = 4,
                 overlays: bool = True, progress: bool = True, tta: bool | None = None,
                 strict: bool = False) -> list[str]:
    """Segment every image of ``images_dir``; return the written mask names. DataError naming the
    folder for no images, an unreadable image, or an export that cannot take 8-bit slices (module);
    with ``strict``, also for the input-kind check's warning (nothing written)."""
    with storage.local_copy(str(images_dir)) as local:  # a gs:// folder is copied first
        return _infer(LoadedExport(export_uri, tta=tta), images_dir, local, out_uri, batch_size, overlays, progress,
                      strict)


def _infer(model: LoadedExport, images_dir, local: Path, out_uri: str, batch_size: int, overlays: bool,
           progress: bool, strict: bool = False) -> list[str]:
    paths = sorted(layout.list_images(local).values())
    if not paths:
        from aisd_ray.data.sources.volume import dicom_below

        dicom = dicom_below(local)
        if dicom is not None:  # a patient/study/series tree: speak of DICOM, not PNG
            raise layout.DataError(f"{images_dir}: no images (.png, .jpg, ...) and no DICOM series here or one "
                                   f"folder down, but DICOM files deeper (e.g. {dicom.relative_to(local)}): give "
                                   "the series folder, or a folder of series folders")
        raise layout.DataError(f"{images_dir}: no images (.png, .jpg, ...), DICOM series or NIfTI files found")
    finding = input_kind.check(model.input, input_kind.SLICES_8BIT, str(images_dir), model.uri)
    qa.refuse_if_strict(strict, images_dir, None, [finding])
    written = []
    bar = progress_bar(total=len(paths), desc="infer", unit="image", enabled=progress)
    with storage.staged_dir(out_uri) as folder:
        if overlays:
            (folder / "overlays").mkdir()
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            originals = [layout.read_image(p, model.channels) for p in chunk]
            batch = np.stack([layout.resize_image(o, model.height, model.width) for o in originals])
            probabilities = model.predict(batch)["probabilities"].numpy()
            for path, original, probs in zip(chunk, originals, probabilities):
                mask = layout.labels_at(probs, *original.shape[:2])
                name = f"{path.stem}.png"
                render.palette_png(mask, model.rgb_map).save(folder / name)
                if overlays:
                    render.side_by_side(original, render.overlay(original, mask)).save(folder / "overlays" / name)
                written.append(name)
            bar.update(len(chunk))
        (folder / "qa.json").write_text(json.dumps({"checks": qa.as_json([finding])}, indent=2))
    bar.close()
    return written
