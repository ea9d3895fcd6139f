"""What the chief worker leaves beside the checkpoints after every epoch.

``history.csv`` (all losses and metrics), ``train_losses.png`` and ``train_metrics.png``
(the original's two plots), TensorBoard scalars, and the original's epoch-change inference
panels ``epoch_change_infer/Epoch_{e}_{name}.png`` (image | truth | prediction).
Files are written locally and mirrored to the run folder, which may be an object store.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from aisd_ray import plots, render, storage

LOSS_KEYS = ("loss", "val_loss")
METRIC_KEYS = ("lesion_dice", "val_lesion_dice", "val_lesion_iou", "val_dice_coef_multiclass")


class Artifacts:
    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        self._tmp = None if storage.is_local(run_uri) else tempfile.mkdtemp(prefix="aisd-artifacts-")
        self.folder = Path(self._tmp or storage.resolve(run_uri)[1])
        self.folder.mkdir(parents=True, exist_ok=True)
        self._writer = tf.summary.create_file_writer(str(self.folder / "tensorboard"))

    def epoch_end(self, history: list[dict[str, float]], panels: list[tuple[str, np.ndarray]]) -> None:
        row = history[-1]
        with self._writer.as_default(step=int(row["epoch"])):
            for key, value in row.items():
                if key != "epoch":
                    tf.summary.scalar(key, value)
        self._writer.flush()
        self._write_csv(history)
        self._plot(history, LOSS_KEYS, "loss", "train_losses.png")
        self._plot(history, METRIC_KEYS, "score", "train_metrics.png")
        out = self.folder / "epoch_change_infer"
        out.mkdir(exist_ok=True)
        for name, picture in panels:
            render.side_by_side(*picture).save(out / f"Epoch_{int(row['epoch'])}_{name}.png")
        if self._tmp:
            storage.upload_dir(self._tmp, self.run_uri)

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

    def _plot(self, history, keys, ylabel: str, filename: str) -> None:
        epochs = [row["epoch"] for row in history]
        series = [(f"{k} (background-inclusive)" if k == "val_dice_coef_multiclass" else k, epochs,
                   [row[k] for row in history]) for k in keys if k in history[0]]
        plots.lines(series, "epoch", ylabel, str(self.folder / filename),
                    dashed=("val_dice_coef_multiclass (background-inclusive)",))
