"""What the chief worker leaves beside the checkpoints after every epoch.

``history.csv`` (all losses and metrics), ``train_losses.png`` (losses, best epoch marked) and
``train_metrics.png`` (lesion scores, and each foreground class's val Dice where there are several,
on their own axis with the best epoch, the original's
background-inclusive metric in a panel of its own, the learning rate), TensorBoard scalars, and
the original's epoch-change images as one labelled grid per epoch,
``epoch_change_infer/Epoch_{e}.png`` (each fixed validation slice with the truth outlined in green
and the prediction in magenta, its lesion Dice in the caption), also in TensorBoard's images.
Files are written locally. When the run folder is on object storage they are mirrored to it
incrementally (only files that are new or changed since the last upload: an epoch sends its new
gallery, the CSV, the plots and the TensorBoard event file, not the whole folder again).
Drawing, writing and uploading all run on one background thread, so the chief goes straight on
to the next epoch and the other workers never wait for it at the next collective. At most one
epoch's artifacts are in flight; an error surfaces at the next epoch's end or at ``close``, which
waits for the last one.
"""

from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from aisd_ray.core import storage
from aisd_ray.report import plots, render
from aisd_ray.scoring import metrics
from aisd_ray.train import checkpoint as ckpt

LOSS_KEYS = ("loss", "val_loss")


class Artifacts:
    def __init__(self, run_uri: str, foreground_names=()):
        self.run_uri = run_uri
        self.foreground_names = list(foreground_names)  # for per-class curves
        self._tmp = None if storage.is_local(run_uri) else tempfile.mkdtemp(prefix="aisd-artifacts-")
        self.folder = Path(self._tmp or storage.resolve(run_uri)[1])
        self.folder.mkdir(parents=True, exist_ok=True)
        self._writer = tf.summary.create_file_writer(str(self.folder / "tensorboard"))
        self._uploaded: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime) last sent
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="aisd-artifacts")
        self._pending: Future | None = None
        self.uploaded_files = 0  # files sent so far (the incremental mirror's work, for tests and logs)

    def epoch_end(self, history: list[dict[str, float]], panels: list[tuple]) -> None:
        """``panels``: (name, image, truth labels, predicted labels) of the fixed preview slices.
        Returns at once: the files are drawn, written and uploaded on the background thread."""
        self._wait()  # the previous epoch's work writes the same files: let it finish first
        self._pending = self._worker.submit(self._write, [dict(row) for row in history], panels)

    def _write(self, history: list[dict[str, float]], panels: list[tuple]) -> None:
        row = history[-1]
        epoch = int(row["epoch"])
        grid = self._gallery(panels, epoch) if panels else None
        with self._writer.as_default(step=epoch):
            for key, value in row.items():
                if key != "epoch":
                    tf.summary.scalar(key, value)
            if grid is not None:
                tf.summary.image("epoch_change_infer", np.asarray(grid)[None], step=epoch)
        self._writer.flush()
        self._write_csv(history)
        name = self.run_uri.rstrip("/").rsplit("/", 1)[-1]
        epochs = [r["epoch"] for r in history]
        best = ckpt.best_row(history)  # the epoch the log names and export takes
        best_epoch = best["epoch"] if best else None
        plots.lines([(k, epochs, [r[k] for r in history]) for k in LOSS_KEYS], "epoch", "loss",
                    str(self.folder / "train_losses.png"), title=f"{name}: losses", mark_x=best_epoch)
        plots.training_metrics(history, name, str(self.folder / "train_metrics.png"), best_epoch,
                               metrics.own_classes(self.foreground_names))
        if grid is not None:
            out = self.folder / "epoch_change_infer"
            out.mkdir(exist_ok=True)
            grid.save(out / f"Epoch_{epoch}.png")
        if self._tmp:
            self._mirror()

    def _mirror(self) -> None:
        """Upload the files that are new or changed since the last call."""
        for path in sorted(self.folder.rglob("*")):
            if not path.is_file():
                continue
            stat, rel = path.stat(), path.relative_to(self.folder).as_posix()
            signature = (stat.st_size, stat.st_mtime_ns)
            if self._uploaded.get(rel) != signature:
                storage.write_bytes(storage.join(self.run_uri, rel), path.read_bytes())
                self._uploaded[rel] = signature
                self.uploaded_files += 1

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # a drawing or upload error is raised here, on the training thread

    def _gallery(self, panels, epoch: int):
        tiles = []
        for name, image, truth, prediction in panels:
            dice = metrics.scores_from_counts(*metrics.lesion_counts(truth[None], prediction[None])[0])["dice"]
            text = f"{name}  lesion Dice {dice:.2f}" if dice == dice else f"{name}  no lesion, none predicted"
            tiles.append((text, render.contours(image, truth, prediction)))
        name = self.run_uri.rstrip("/").rsplit("/", 1)[-1]
        return render.gallery(tiles, f"{name}  epoch {epoch}")

    def close(self, strict: bool = True) -> None:
        """Flush and upload what is left; ``strict=False`` (training already failing) swallows
        upload errors so that they do not replace the error on its way up."""
        try:
            self._wait()
            self._writer.close()
            if self._tmp:
                self._mirror()  # what closing the TensorBoard writer flushed
        except Exception:
            if strict:
                raise
        finally:
            self._worker.shutdown(wait=True)
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)

    def _write_csv(self, history: list[dict[str, float]]) -> None:
        storage.write_csv(str(self.folder / "history.csv"), history)
