"""The checkpoint format shared by Ray and local runs: a folder holding

- ``model.weights.h5``: Keras weights;
- ``optimizer.npz``: the optimizer's variables, in ``optimizer.variables`` order;
- ``state.json``: epoch, learning rate, plateau counters, best metric and the history,
  so a resumed run carries on exactly where it stopped;
- ``checkpoint.json``, written last: each other file's size. A checkpoint counts as complete only
  when it is present and every file has its size, whatever order a copy (Ray Train's upload,
  ours to gs://) wrote the files in: an interrupted copy is never resumed from or exported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aisd_ray import storage

WEIGHTS = "model.weights.h5"
OPTIMIZER = "optimizer.npz"
STATE = "state.json"
COMPLETE = "checkpoint.json"
# The row key that ranks epochs and checkpoints (and Tune's trials): metrics.selection_score, the
# mean val Dice over the foreground classes (= val_lesion_dice with one lesion class).
SCORE = "val_score"
LEGACY_SCORE = "val_lesion_dice"  # rows written before val_score existed (one lesion class: the same figure)


@dataclass
class Plateau:
    """Counts epochs without improvement of a monitored value (lower is better)."""

    patience: int
    min_delta: float = 1e-4
    best: float = float("inf")
    wait: int = 0

    def update(self, value: float) -> bool:
        """Record ``value``; True when patience has run out (the counter then restarts)."""
        if value < self.best - self.min_delta:
            self.best, self.wait = value, 0
            return False
        self.wait += 1
        if self.patience and self.wait >= self.patience:
            self.wait = 0
            return True
        return False


@dataclass
class LoopState:
    epoch: int = 0  # epochs completed
    learning_rate: float = 0.0  # the last step's
    lr_scale: float = 1.0  # plateau reductions and rollbacks, times train.learning_rate
    rollbacks: int = 0  # divergence-guard rollbacks so far
    collapse_wait: int = 0  # consecutive epochs predicting no lesion after a better one
    best_score: float = -1.0
    best_epoch: int = 0
    early_stop: Plateau = field(default_factory=lambda: Plateau(0))
    reducer: Plateau = field(default_factory=lambda: Plateau(0))
    stop_reason: str = ""
    resumes: list[int] = field(default_factory=list)  # the epochs after which the run was resumed
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "LoopState":
        data = json.loads(text)
        data["early_stop"] = Plateau(**data["early_stop"])
        data["reducer"] = Plateau(**data["reducer"])
        return cls(**data)


def save(folder: str | Path, model, optimizer, state: LoopState) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_weights(folder / WEIGHTS)
    np.savez(folder / OPTIMIZER, *[np.asarray(v.numpy()) for v in optimizer.variables])
    (folder / STATE).write_text(state.to_json())
    sizes = {name: (folder / name).stat().st_size for name in (WEIGHTS, OPTIMIZER, STATE)}
    (folder / COMPLETE).write_text(json.dumps({"epoch": state.epoch, "files": sizes}, indent=2))


def is_complete(uri: str) -> bool:
    """True when the checkpoint folder ``uri`` holds its marker and every file at its size."""
    marker = storage.join(uri, COMPLETE)
    if not storage.exists(marker):
        return False
    try:
        sizes = json.loads(storage.read_bytes(marker))["files"]
    except (ValueError, KeyError, TypeError):
        return False
    return all(storage.size(storage.join(uri, name)) == size for name, size in sizes.items())


def restore(folder: str | Path, model, optimizer) -> LoopState:
    folder = Path(folder)
    model.load_weights(folder / WEIGHTS)
    with np.load(folder / OPTIMIZER) as data:
        values = [data[f"arr_{i}"] for i in range(len(data.files))]
    if len(values) != len(optimizer.variables):
        raise ValueError(f"{folder}: optimizer state has {len(values)} variables, "
                         f"the model's optimizer {len(optimizer.variables)} (different config?)")
    for var, value in zip(optimizer.variables, values):
        var.assign(value)
    return LoopState.from_json((folder / STATE).read_text())


def list_checkpoints(run_uri: str) -> list[tuple[str, LoopState]]:
    """(uri, state) of every complete checkpoint folder directly under ``run_uri``, by epoch
    (an interrupted copy, without its marker or with a file short, is left out)."""
    found = []
    for name in storage.list_dir(run_uri):
        uri = storage.join(run_uri, name)
        if name.startswith("checkpoint_") and is_complete(uri):
            found.append((uri, LoopState.from_json(storage.read_bytes(storage.join(uri, STATE)).decode())))
    return sorted(found, key=lambda item: item[1].epoch)


@contextlib.contextmanager
def latest_local(run_uri: str) -> Iterator[str | None]:
    """The run's latest complete checkpoint as a local folder for the block (a copy when the run is
    on gs://, removed after it), or None. Every checkpoint folder of the run counts, also one that a
    worker group killed mid-run had uploaded before Ray's controller recorded it."""
    found = list_checkpoints(run_uri)
    if not found:
        yield None
        return
    with storage.local_copy(found[-1][0]) as folder:
        yield str(folder)


def row_score(row: dict[str, Any]) -> float:
    """An epoch row's ``SCORE``, or for a row written before it existed, its ``LEGACY_SCORE``
    (NaN when neither is there)."""
    return float(row.get(SCORE, row.get(LEGACY_SCORE, float("nan"))))


def best_of(candidates: list[tuple[str, LoopState]]) -> tuple[str, dict[str, Any]]:
    """Of ``list_checkpoints``' result, the checkpoint whose own epoch scored the best ``row_score``
    (the validation lesion Dice with one lesion class), and that epoch's figures."""

    def rank(item):
        score = row_score(item[1].history[-1]) if item[1].history else -1.0
        score = -1.0 if score != score else score  # an undefined (NaN) Dice ranks last
        return score, item[1].epoch  # ties go to the later, longer-trained checkpoint

    uri, state = max(candidates, key=rank)
    return uri, state.history[-1]


def best_checkpoint(run_uri: str) -> tuple[str, dict[str, Any]]:
    """The run's checkpoint whose own epoch scored the best validation lesion Dice."""
    candidates = list_checkpoints(run_uri)
    if not candidates:
        raise FileNotFoundError(f"{run_uri}: no checkpoints found; train first")
    return best_of(candidates)
