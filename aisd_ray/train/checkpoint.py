"""The checkpoint format shared by Ray and local runs: a folder holding

- ``model.weights.h5``: Keras weights;
- ``optimizer.npz``: the optimizer's variables, in ``optimizer.variables`` order;
- ``state.json``: epoch, learning rate, plateau counters, best metric and the history,
  so a resumed run carries on exactly where it stopped;
- ``checkpoint.json``, written last: each other file's size and SHA-256. A checkpoint counts as
  complete only when it is present and every file has its size, whatever order a copy (Ray
  Train's upload, ours to gs://) wrote the files in: an interrupted copy is never resumed from or
  exported, and a listing names it. The digests are checked when a checkpoint is loaded (resume,
  export): a file whose bytes changed after it was written, its size kept, is named and skipped.

Which checkpoints compete for "best", and how, is decided here and nowhere else (the loop's log
and rollback point, ``export``, the local reporter's retention, the rank Ray Train keeps by, Tune's
leaderboard): ``score_of`` says whether an epoch is a candidate and its score, ``better`` compares
two scores (a tie keeps the earlier epoch). A checkpoint that does not load is named and skipped
(``restore_latest``, ``export.export_best``), never mistaken for the run's state.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aisd_ray.core import storage
from aisd_ray.data.sources.layout import DataError
from aisd_ray.scoring.metrics import SCORE  # also ckpt.SCORE, as before

log = logging.getLogger(__name__)

WEIGHTS = "model.weights.h5"
OPTIMIZER = "optimizer.npz"
STATE = "state.json"
CHECKPOINT_INFO = "checkpoint.json"
LEGACY_SCORE = "val_lesion_dice"  # rows written before val_score existed (one lesion class: the same figure)
FINITE = "weights_finite"  # history key: 1.0 when the epoch ended with finite weights and optimizer state
RANK = "checkpoint_rank"  # reported with each checkpoint: what Ray Train keeps checkpoints by (see rank)
DIVERGED = "diverged at epoch"  # how the loop's stop reason for a diverged run begins


class CheckpointError(DataError):
    """A checkpoint that cannot be used: a file that does not load (garbled, truncated, another
    model's), or no checkpoint of a run left to export. The message names the folder and file."""


def score_of(row: dict[str, Any]) -> float | None:
    """The selection score of one epoch, from its history row: ``SCORE``, the mean over the
    foreground classes of their validation Dice, each pooled over the validation split (0..1; the
    validation lesion Dice with one lesion class; ``LEGACY_SCORE`` for rows written before
    ``SCORE`` existed), or None when the epoch is no candidate
    for the best checkpoint: its training or validation loss is not finite, it ended with
    non-finite weights or optimizer state (``FINITE`` 0), or its Dice is undefined (NaN: no lesion
    pixel in the validation truth nor in the prediction) or missing."""
    if not all(math.isfinite(float(row.get(key, math.nan))) for key in ("loss", "val_loss")):
        return None
    if not row.get(FINITE, 1.0):  # rows written before the key existed: judged by their losses
        return None
    score = float(row.get(SCORE, row.get(LEGACY_SCORE, math.nan)))
    return score if math.isfinite(score) else None


def better(score: float | None, than: float | None) -> bool:
    """True when an epoch scoring ``score`` (``score_of``) replaces the best so far, scoring
    ``than`` (None: no best yet). A non-candidate (None) never wins; a higher score wins; a tie
    keeps the earlier epoch (as Keras ``ModelCheckpoint(save_best_only=True)`` does), so the
    training log, the plots, ``export`` and Tune's leaderboard name the same epoch."""
    return score is not None and (than is None or score > than)


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Of history rows in epoch order, the best epoch's row (``better``); None if none is a candidate."""
    best = None
    for row in rows:
        if better(score_of(row), None if best is None else score_of(best)):
            best = row
    return best


def ranked(candidates: list[tuple[str, "LoopState"]]) -> list[tuple[str, "LoopState"]]:
    """``list_checkpoints``' result (in epoch order) reduced to the candidates, best first by
    ``better`` applied to each checkpoint's own epoch row; equal scores stay in epoch order."""
    scored = [item for item in candidates if item[1].history and score_of(item[1].history[-1]) is not None]

    def order(a, b) -> int:
        sa, sb = score_of(a[1].history[-1]), score_of(b[1].history[-1])
        return -1 if better(sa, sb) else 1 if better(sb, sa) else 0

    return sorted(scored, key=functools.cmp_to_key(order))  # a stable sort: ties keep epoch order


def rank(state: "LoopState") -> float:
    """What Ray Train keeps checkpoints by (``RANK``, higher is better) for the epoch just ended:
    the best score when that epoch is the best so far, else -1. Each new best is strictly higher
    than the one before, so Ray's top checkpoints are ours (Ray breaks ties to the later
    checkpoint and ranks NaN apart: neither can happen here)."""
    return float(state.best_score) if state.best_epoch and state.best_epoch == state.epoch else -1.0


def diverged(stop_reason: str) -> bool:
    """True when a run's stop reason says the divergence guard stopped it."""
    return str(stop_reason or "").startswith(DIVERGED)


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
    digests = {name: _sha256(folder / name) for name in (WEIGHTS, OPTIMIZER, STATE)}
    info = {"epoch": state.epoch, "files": sizes, "sha256": digests}
    (folder / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_digests(folder: str | Path, uri: str | None = None) -> None:
    """Check the local checkpoint ``folder``'s files against the SHA-256 digests its
    ``checkpoint.json`` lists (checkpoints written before digests were recorded have none: sizes
    only). CheckpointError naming the file whose bytes changed after it was written (a flipped
    or overwritten block keeps the size, so ``is_complete`` cannot see it)."""
    folder = Path(folder)
    uri = uri or str(folder)
    try:
        digests = json.loads((folder / CHECKPOINT_INFO).read_text()).get("sha256", {})
    except (OSError, ValueError, AttributeError):
        digests = {}
    for name, digest in digests.items():
        if _sha256(folder / name) != digest:
            raise CheckpointError(f"{storage.join(uri, name)}: does not match the SHA-256 that {CHECKPOINT_INFO} lists "
                                  "(damaged after it was written)")


def is_complete(uri: str) -> bool:
    """True when the checkpoint folder ``uri`` holds its marker and every file at its size."""
    marker = storage.join(uri, CHECKPOINT_INFO)
    if not storage.exists(marker):
        return False
    try:
        sizes = json.loads(storage.read_bytes(marker))["files"]
    except (ValueError, KeyError, TypeError):
        return False
    return all(storage.size(storage.join(uri, name)) == size for name, size in sizes.items())


def _unreadable(uri: str, name: str, exc: BaseException) -> CheckpointError:
    text = " ".join(str(exc).split())[:200] or type(exc).__name__
    return CheckpointError(f"{storage.join(uri, name)}: cannot be loaded ({text})")


def read_state(uri: str) -> LoopState:
    """The ``state.json`` of checkpoint folder ``uri``; CheckpointError naming it if unreadable."""
    try:
        return LoopState.from_json(storage.read_bytes(storage.join(uri, STATE)).decode())
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # not UTF-8, not JSON, not our keys
        raise _unreadable(uri, STATE, exc) from None


def _load_weights(model, folder: Path, uri: str) -> None:
    try:
        model.load_weights(folder / WEIGHTS)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # h5py's and Keras' ways to refuse a file
        raise _unreadable(uri, WEIGHTS, exc) from None


def load_weights(model, folder: str | Path, uri: str | None = None) -> None:
    """Load ``model.weights.h5`` from the local checkpoint ``folder`` (``uri``: its name in
    messages) into ``model``. CheckpointError naming the file when it does not load (garbled,
    truncated, another model's) or holds a non-finite value (NaN or Inf)."""
    uri = uri or str(folder)
    _load_weights(model, Path(folder), uri)
    if not all(np.isfinite(w).all() for w in model.get_weights()):
        raise CheckpointError(f"{storage.join(uri, WEIGHTS)}: holds non-finite weights (NaN or Inf)")
    verify_digests(folder, uri)  # last: a file that loads but whose bytes changed since it was written


def restore(folder: str | Path, model, optimizer, uri: str | None = None) -> LoopState:
    """Load the local checkpoint ``folder`` (``uri``: its name in messages) into ``model`` and
    ``optimizer``; its loop state. CheckpointError naming the file that does not load."""
    folder = Path(folder)
    uri = uri or str(folder)
    _load_weights(model, folder, uri)  # as saved: a diverged epoch's NaN weights too
    try:
        with np.load(folder / OPTIMIZER) as data:
            values = [data[f"arr_{i}"] for i in range(len(data.files))]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise _unreadable(uri, OPTIMIZER, exc) from None
    if len(values) != len(optimizer.variables):
        raise CheckpointError(f"{storage.join(uri, OPTIMIZER)}: holds {len(values)} optimizer variables, the "
                              f"model's optimizer {len(optimizer.variables)} (another model's checkpoint?)")
    for var, value in zip(optimizer.variables, values):
        if tuple(var.shape) != value.shape:
            raise CheckpointError(f"{storage.join(uri, OPTIMIZER)}: an optimizer variable of shape {value.shape}, "
                                  f"the model's {tuple(var.shape)} (another model's checkpoint?)")
        var.assign(value)
    try:
        state = LoopState.from_json((folder / STATE).read_text())
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise _unreadable(uri, STATE, exc) from None
    verify_digests(folder, uri)  # last: files that load but whose bytes changed since they were written
    return state


_warned: set[str] = set()  # unreadable state files already reported by this process


def list_checkpoints(run_uri: str) -> list[tuple[str, LoopState]]:
    """(uri, state) of every complete checkpoint folder directly under ``run_uri``, by epoch
    (an interrupted copy, without its marker or with a file short, is left out; so is one whose
    ``state.json`` does not parse, with a warning naming it, once per process). Every checkpoint
    folder of the run counts, also one that a worker group killed mid-run had uploaded before
    Ray's controller recorded it."""
    found = []
    for name in storage.list_dir(run_uri, folders=True):  # not Ray's checkpoint_manager_snapshot.json
        uri = storage.join(run_uri, name)
        if not name.startswith("checkpoint_"):
            continue
        if not is_complete(uri):
            if uri not in _warned:
                _warned.add(uri)
                log.warning("%s: incomplete checkpoint (no %s, or a file not at the size it lists: an "
                            "interrupted copy or a damaged file); left out", uri, CHECKPOINT_INFO)
            continue
        try:
            found.append((uri, read_state(uri)))
        except CheckpointError as exc:
            if uri not in _warned:
                _warned.add(uri)
                log.warning("%s; checkpoint left out", exc)
    return sorted(found, key=lambda item: item[1].epoch)


def restore_latest(run_uri: str, model, optimizer) -> tuple[str, LoopState, list[str]] | None:
    """Restore the run's latest complete checkpoint that loads into ``model`` and ``optimizer``:
    (its uri, its loop state, why each later one was skipped), or None when the run has none.
    A checkpoint whose file does not load is skipped for the one before it; CheckpointError
    naming every one when none loads. A checkpoint of a diverged epoch is restored like any other
    (its stop reason keeps the run stopped); it is only never a candidate for ``export``."""
    skipped = []
    for uri, _ in reversed(list_checkpoints(run_uri)):
        with storage.local_copy(uri) as folder:
            try:
                return uri, restore(folder, model, optimizer, uri), skipped
            except CheckpointError as exc:
                skipped.append(str(exc))
    if skipped:
        raise CheckpointError(f"{run_uri}: no checkpoint loads, so the run cannot resume: {'; '.join(skipped)}; "
                              "remove the damaged checkpoint folders to start afresh, or train into a new run "
                              "(run.name or --output)")
    return None


def best_of(candidates: list[tuple[str, LoopState]]) -> tuple[str, dict[str, Any]] | None:
    """Of ``list_checkpoints``' result, the best candidate (``ranked``) and its epoch's figures;
    None when no checkpoint is a candidate."""
    best = ranked(candidates)
    return (best[0][0], best[0][1].history[-1]) if best else None


def no_candidate(run_uri: str, found: list[tuple[str, LoopState]]) -> CheckpointError:
    """The error for a run whose checkpoints are none of them a candidate (``score_of``)."""
    epochs = ", ".join(str(state.epoch) for _, state in found)
    plural = "s" if len(found) > 1 else ""
    return CheckpointError(f"{run_uri}: no checkpoint to export: each of its checkpoints (epoch{plural} "
                           f"{epochs}) ended an epoch with a non-finite loss or weights or an undefined validation "
                           f"lesion Dice; train again (a lower train.learning_rate?) into a new run")


def best_checkpoint(run_uri: str) -> tuple[str, dict[str, Any]]:
    """The run's checkpoint whose own epoch is the best candidate (``ranked``) and its figures.
    FileNotFoundError when the run has no checkpoint, CheckpointError when none is a candidate."""
    found = list_checkpoints(run_uri)
    if not found:
        raise FileNotFoundError(f"{run_uri}: no checkpoints found; train first")
    best = best_of(found)
    if best is None:
        raise no_candidate(run_uri, found)
    return best
