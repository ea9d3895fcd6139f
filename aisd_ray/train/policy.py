"""The epoch policy of the training loop: what happens between two epochs, apart from the steps.

After each epoch ``loop.run_training`` asks this module: is the epoch diverged (``_divergence``:
a non-finite loss, weights or optimizer state, or a collapse to all-background after lesions were
found), which epoch is best so far (``_after_epoch``, by ``checkpoint.score_of``/``better``, the
rule ``export`` follows), whether to reduce the learning rate or stop early (plateaus on
validation loss), and what to do about a divergence (``_on_divergence``: roll back to the best
epoch's in-memory ``_Snapshot`` with a lower learning rate, stop, or ignore, as
``train.on_collapse`` says). ``epoch_line`` is the one log line per epoch. No TensorFlow graph
and no Ray here: numbers in, decisions out (the snapshot holds numpy copies).
"""

from __future__ import annotations

import logging
import math

import keras
import numpy as np

from aisd_ray.scoring import metrics
from aisd_ray.train import checkpoint as ckpt

log = logging.getLogger("aisd_ray.train.loop")  # the loop's logger: its lines read as before


class _Snapshot:
    """Weights and optimizer state held in memory: the divergence guard's rollback point."""

    def __init__(self, model: keras.Model, optimizer, epoch: int):
        self.epoch = epoch
        self.weights = [np.array(w) for w in model.get_weights()]
        self.slots = [np.array(v.numpy()) for v in optimizer.variables]

    def restore(self, model: keras.Model, optimizer) -> None:
        model.set_weights(self.weights)
        for var, value in zip(optimizer.variables, self.slots):
            var.assign(value)


def _all_finite(model: keras.Model, optimizer) -> bool:
    """True when every weight (moving statistics included) and optimizer variable is finite."""
    return (all(np.isfinite(w).all() for w in model.get_weights())
            and all(np.isfinite(np.asarray(v.numpy())).all() for v in optimizer.variables))


def _divergence(state: ckpt.LoopState, row: dict, train_counts: np.ndarray, val_counts: np.ndarray,
                t) -> str:
    """Why this epoch counts as diverged ('' if it does not): a non-finite loss, non-finite weights
    or optimizer state (``row[checkpoint.FINITE]`` 0), or, after an epoch that found lesions,
    ``collapse_patience`` epochs predicting no lesion pixel anywhere."""
    if not (math.isfinite(row["loss"]) and math.isfinite(row["val_loss"])):
        return f"non-finite loss (train {row['loss']:.4g}, validation {row['val_loss']:.4g})"
    if not row.get(ckpt.FINITE, 1.0):
        return "non-finite weights or optimizer state (NaN or Inf)"
    tp, fp, fn = val_counts
    nothing_predicted = tp + fp == 0 and train_counts[0] + train_counts[1] == 0 and tp + fn > 0
    if state.best_score > 0 and nothing_predicted:
        state.collapse_wait += 1
        if state.collapse_wait >= t.collapse_patience:
            return (f"collapsed: no lesion pixel predicted on train or validation for {state.collapse_wait} "
                    f"epochs after val lesion Dice {state.best_score:.3f} at epoch {state.best_epoch}")
    else:
        state.collapse_wait = 0
    return ""


def epoch_line(row: dict, state: ckpt.LoopState, epochs: int, foreground_names=()) -> str:
    """One compact line per epoch, as nnU-Net prints: losses, lesion Dice, best so far, learning
    rate, epoch time and an ETA from the epochs run so far (every figure is in history.csv).
    With several foreground classes, each class's val Dice and their mean (the score that picks
    the best epoch) follow the lesion Dice."""
    epoch = int(row["epoch"])
    best = ("new best" if state.best_epoch == epoch else
            f"best {state.best_score:.3f} @ {state.best_epoch}" if state.best_epoch else "no best yet")
    seconds = [r["epoch_seconds"] for r in state.history]
    left = (epochs - epoch) * sum(seconds) / max(len(seconds), 1)
    eta = f"  ETA {int(left // 60)}m{int(left % 60):02d}s" if epoch < epochs and not state.stop_reason else ""
    rollbacks = f"  rollbacks {state.rollbacks}" if state.rollbacks else ""
    return (f"epoch {epoch}/{epochs}  loss {row['loss']:.4f}  val loss {row['val_loss']:.4f}  "
            f"val lesion Dice {row['val_lesion_dice']:.3f}{_class_part(row, foreground_names)} ({best})  "
            f"train lesion Dice {row['lesion_dice']:.3f}  "
            f"lr {row['learning_rate']:.2e}  {row['epoch_seconds']:.1f} s{eta}{rollbacks}")


def _class_part(row: dict, foreground_names) -> str:
    own = metrics.own_classes(foreground_names)
    if len(own) < 2:
        return ""
    return "  val Dice " + " ".join(f"{c} {row[f'val_{c}_dice']:.3f}" for c in own) + \
        f" mean {row[ckpt.SCORE]:.3f}"


def _on_divergence(state: ckpt.LoopState, trouble: str, best: _Snapshot, model, optimizer, t) -> None:
    """Roll back to the best epoch with a lower learning rate, or stop, as train.on_collapse says."""
    if t.on_collapse == "rollback" and state.rollbacks < t.max_rollbacks:
        best.restore(model, optimizer)
        state.rollbacks += 1
        state.lr_scale *= t.rollback_factor
        state.collapse_wait = 0
        log.warning("epoch %d diverged (%s): rolled back to the weights of epoch %d, learning rate x%g "
                    "(rollback %d of at most %d)", state.epoch, trouble, best.epoch, t.rollback_factor,
                    state.rollbacks, t.max_rollbacks)
    elif t.on_collapse == "ignore":
        log.warning("epoch %d diverged (%s); train.on_collapse = 'ignore': carrying on", state.epoch, trouble)
    else:
        after = f" after {state.rollbacks} rollbacks" if state.rollbacks else ""
        state.stop_reason = f"diverged at epoch {state.epoch}{after}: {trouble}"
        log.error("stopping: %s (train.on_collapse = %r)", state.stop_reason, t.on_collapse)


def _after_epoch(state: ckpt.LoopState, row: dict, t) -> ckpt.LoopState:
    """Best-model bookkeeping (``checkpoint.score_of`` and ``better``: the rule ``export`` follows),
    reduce-LR-on-plateau and early stopping on validation loss."""
    state.epoch = int(row["epoch"])
    state.history.append(row)
    score = ckpt.score_of(row)
    if ckpt.better(score, state.best_score if state.best_epoch else None):
        state.best_score, state.best_epoch = score, state.epoch
    if state.reducer.update(row["val_loss"]) and t.lr_schedule == "plateau":
        state.lr_scale *= t.reducer_factor
        log.info("val_loss has not improved for %d epochs: learning rate x%g -> %.3g", t.reducer_patience,
                 t.reducer_factor, max(t.learning_rate * state.lr_scale, t.min_learning_rate))
    if state.early_stop.update(row["val_loss"]):  # final: a rerun with more epochs stays stopped
        state.stop_reason = f"early stop: val_loss did not improve for {t.patience} epochs"
    return state
