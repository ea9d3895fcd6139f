"""The checkpoint format shared by Ray and local runs: a folder holding

- ``model.weights.h5``: Keras weights;
- ``optimizer.npz``: the optimizer's variables, in ``optimizer.variables`` order;
- ``state.json``: epoch, learning rate, plateau counters, best metric and the history,
  so a resumed run carries on exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aisd_ray import storage

WEIGHTS = "model.weights.h5"
OPTIMIZER = "optimizer.npz"
STATE = "state.json"
SCORE = "val_lesion_dice"


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
    """(uri, state) of every complete checkpoint folder directly under ``run_uri``, by epoch."""
    found = []
    for name in storage.list_dir(run_uri):
        state_uri = storage.join(run_uri, name, STATE)
        if name.startswith("checkpoint_") and storage.exists(state_uri):
            found.append((storage.join(run_uri, name),
                          LoopState.from_json(storage.read_bytes(state_uri).decode())))
    return sorted(found, key=lambda item: item[1].epoch)


def best_checkpoint(run_uri: str) -> tuple[str, dict[str, Any]]:
    """The checkpoint whose own epoch scored the best validation lesion Dice."""
    candidates = list_checkpoints(run_uri)
    if not candidates:
        raise FileNotFoundError(f"{run_uri}: no checkpoints found; train first")

    def rank(item):
        score = item[1].history[-1].get(SCORE, -1.0) if item[1].history else -1.0
        score = -1.0 if score != score else score  # an undefined (NaN) Dice ranks last
        return score, item[1].epoch  # ties go to the later, longer-trained checkpoint

    uri, state = max(candidates, key=rank)
    return uri, state.history[-1]
