"""What the chief worker leaves beside the checkpoints after every epoch.

``history.csv`` (all losses and metrics), ``train_losses.png`` (losses, best epoch marked) and
``train_metrics.png`` (lesion scores on their own axis with the best epoch, the original's
background-inclusive metric in a panel of its own, the learning rate), TensorBoard scalars, and
the original's epoch-change images as one labelled grid per epoch,
``epoch_change_infer/Epoch_{e}.png`` (each fixed validation slice with the truth outlined in green
and the prediction in magenta, its lesion Dice in the caption), also in TensorBoard's images.
Files are written locally and mirrored to the run folder, which may be an object store.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from aisd_ray import metrics, plots, render, storage

LOSS_KEYS = ("loss", "val_loss")


class Artifacts:
    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        self._tmp = None if storage.is_local(run_uri) else tempfile.mkdtemp(prefix="aisd-artifacts-")
        self.folder = Path(self._tmp or storage.resolve(run_uri)[1])
        self.folder.mkdir(parents=True, exist_ok=True)
        self._writer = tf.summary.create_file_writer(str(self.folder / "tensorboard"))

    def epoch_end(self, history: list[dict[str, float]], panels: list[tuple]) -> None:
        """``panels``: (name, image, truth labels, predicted labels) of the fixed preview slices."""
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
        scored = [(r["val_lesion_dice"], r["epoch"]) for r in history
                  if r["val_lesion_dice"] == r["val_lesion_dice"]]  # NaN: no lesion anywhere
        plots.lines([(k, epochs, [r[k] for r in history]) for k in LOSS_KEYS], "epoch", "loss",
                    str(self.folder / "train_losses.png"), title=f"{name}: losses",
                    mark_x=max(scored)[1] if scored else None)
        plots.training_metrics(history, name, str(self.folder / "train_metrics.png"))
        if grid is not None:
            out = self.folder / "epoch_change_infer"
            out.mkdir(exist_ok=True)
            grid.save(out / f"Epoch_{epoch}.png")
        if self._tmp:
            storage.upload_dir(self._tmp, self.run_uri)

    def _gallery(self, panels, epoch: int):
        tiles = []
        for name, image, truth, prediction in panels:
            dice = metrics.scores_from_counts(*metrics.lesion_counts(truth[None], prediction[None])[0])["dice"]
            text = f"{name}  lesion Dice {dice:.2f}" if dice == dice else f"{name}  no lesion, none predicted"
            tiles.append((text, render.contours(image, truth, prediction)))
        name = self.run_uri.rstrip("/").rsplit("/", 1)[-1]
        return render.gallery(tiles, f"{name}  epoch {epoch}")

    def close(self) -> None:
        self._writer.close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _write_csv(self, history: list[dict[str, float]]) -> None:
        keys = list(dict.fromkeys(k for row in history for k in row))
        with open(self.folder / "history.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
