"""Which checkpoints count as candidates, which one is best, and what a damaged one does (issue 22,
cases 6, 7 and 8): a diverged run exits 1 and nothing non-finite is exported; the training log and
``export`` name the same best epoch; a checkpoint that does not load is named and skipped."""

import json
import logging
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from aisd_ray.cli import main
from aisd_ray.config import TrainConfig, builtin_config
from aisd_ray.train import checkpoint as ckpt
from aisd_ray.train import loop
from tests.conftest import one_error_line

TINY = str(builtin_config("tiny"))
NAN = float("nan")



def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def row(epoch, dice, loss=0.5, val_loss=0.5, finite=1.0):
    return {"epoch": epoch, "loss": loss, "val_loss": val_loss, ckpt.SCORE: dice, ckpt.FINITE: finite}


# -- the rule, on rows -------------------------------------------------------------------------

@pytest.mark.parametrize("case, r, score", [
    ("a defined Dice", row(1, 0.4), 0.4),
    ("an undefined (NaN) Dice", row(1, NAN), None),
    ("a NaN training loss", row(1, 0.4, loss=NAN), None),
    ("an infinite validation loss", row(1, 0.4, val_loss=math.inf), None),
    ("non-finite weights or optimizer state", row(1, 0.4, finite=0.0), None),
    ("a row from before the weights check", {"epoch": 1, "loss": 0.5, "val_loss": 0.5, ckpt.SCORE: 0.4}, 0.4),
])
def test_score_of_says_which_epochs_are_candidates(case, r, score):
    assert ckpt.score_of(r) == score, case


def test_the_log_and_the_ranking_pick_the_same_epoch_on_ties_and_skip_undefined_scores():
    """The loop's bookkeeping (its "best X @ N") and ``best_row`` / ``ranked`` (export's order)
    agree: NaN Dice and diverged epochs never count, and a tie keeps the earlier epoch."""
    rows = [row(1, NAN), row(2, 0.0), row(3, 0.0), row(4, 0.3, loss=NAN), row(5, 0.2), row(6, 0.2),
            row(7, 0.9, finite=0.0)]
    state, t = ckpt.LoopState(), TrainConfig()
    for r in rows:
        state = loop._after_epoch(state, dict(r), t)
    assert (state.best_epoch, state.best_score) == (5, 0.2)
    assert ckpt.best_row(rows)["epoch"] == 5
    found = [(f"run/checkpoint_{r['epoch']:06d}", ckpt.LoopState(epoch=r["epoch"], history=[r])) for r in rows]
    assert [s.epoch for _, s in ckpt.ranked(found)] == [5, 6, 2, 3]
    assert ckpt.best_of(found)[1]["epoch"] == 5
    assert ckpt.best_of(found[:1]) is None  # only an undefined Dice: no candidate


def test_ray_keeps_checkpoints_by_a_rank_whose_best_is_the_loops_best():
    state, t, ranks = ckpt.LoopState(), TrainConfig(), []
    for r in [row(1, NAN), row(2, 0.0), row(3, 0.0), row(4, 0.5, loss=NAN), row(5, 0.2), row(6, 0.2)]:
        state = loop._after_epoch(state, dict(r), t)
        ranks.append(ckpt.rank(state))
    assert ranks == [-1.0, 0.0, -1.0, -1.0, 0.2, -1.0]  # strictly higher at each new best, never NaN
    assert ranks.index(max(ranks)) + 1 == state.best_epoch


# -- case 6: a diverged run --------------------------------------------------------------------

def test_a_diverged_run_exits_1_and_nothing_non_finite_is_exported(parquet_store, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="aisd_ray")
    _, shards = parquet_store
    root = tmp_path / "runs"
    args = ["train", "--config", TINY, "--data", shards, "--output", str(root), "--backend", "local",
            "--set", "train.epochs=4", "--set", "train.learning_rate=1e9", "--set", "train.clipvalue=0",
            "--set", "train.max_rollbacks=1", "--set", "train.epoch_change_infer=false"]
    assert main(args) == 1
    run = root / "tiny"
    line = one_error_line(capsys)
    assert line.startswith(f"aisd-ray train: error: {run}: training stopped: diverged at epoch 2 after 1 "
                           "rollbacks: non-finite loss")
    assert "no checkpoint is left to export" in line
    assert "epoch 1/4" in caplog.text and "(no best yet)" in caplog.text and "new best" not in caplog.text

    found = ckpt.list_checkpoints(str(run))
    latest = found[-1]
    assert latest[1].epoch == 2 and ckpt.diverged(latest[1].stop_reason)  # kept: a rerun stays stopped
    with h5py.File(Path(latest[0], ckpt.WEIGHTS)) as f:
        kernels = []
        f.visititems(lambda n, o: kernels.append(np.array(o)) if isinstance(o, h5py.Dataset) else None)
    assert any(np.isnan(k).any() for k in kernels)  # the diverged weights, as they were
    assert ckpt.ranked(found) == []  # ... never a candidate

    assert main(["export", "--run", str(run)]) == 2
    line = one_error_line(capsys)
    assert f"{run}: no checkpoint to export" in line and "epochs 1, 2" in line
    assert not (run / "export").exists()

    assert main(args) == 1  # resumed: still diverged, the same way
    assert "diverged at epoch 2" in one_error_line(capsys)


# -- case 7 (ranking): a tie ------------------------------------------------------------------

def test_the_log_and_export_name_the_same_epoch_on_a_tie(parquet_store, tmp_path, capsys, caplog):
    """Two epochs of the tiny config tie at validation lesion Dice 0.000 (nothing found yet): the
    log's "best 0.000 @ 1" is the epoch export takes (it took the later one before)."""
    caplog.set_level(logging.INFO, logger="aisd_ray")
    _, shards = parquet_store
    root = tmp_path / "runs"
    assert main(["train", "--config", TINY, "--data", shards, "--output", str(root), "--backend", "local",
                 "--set", "train.epoch_change_infer=false"]) == 0
    run = root / "tiny"
    state = ckpt.list_checkpoints(str(run))[-1][1]
    scores = [r[ckpt.SCORE] for r in state.history]
    assert len(scores) == 2 and scores[0] == scores[1]  # the tie this test is about
    assert "(best 0.000 @ 1)" in caplog.text and state.best_epoch == 1
    capsys.readouterr()
    assert main(["export", "--run", str(run)]) == 0
    assert "(best epoch 1," in capsys.readouterr().out
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["checkpoint"] == str(run / "checkpoint_000001") and info["validation"]["epoch"] == 1


# -- case 8: a checkpoint that does not load -----------------------------------------------------

def zero_head(path: Path, n: int = 512) -> None:
    """Zero the first ``n`` bytes, size kept: the checkpoint still looks complete."""
    data = bytearray(path.read_bytes())
    data[:n] = bytes(n)
    path.write_bytes(bytes(data))


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the 2-epoch tiny run (checkpoints of epochs 1 and 2), free to break."""
    cfg, shards, run, _ = trained_run
    copy = tmp_path / "root" / "tiny"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    return cfg, shards, copy


def test_resume_skips_a_garbled_latest_checkpoint_and_names_it(run_copy, capsys, caplog):
    _, shards, run = run_copy
    bad = run / "checkpoint_000002" / ckpt.WEIGHTS
    zero_head(bad)
    args = ["train", "--config", str(run / "config.toml"), "--data", shards, "--output", str(run.parent),
            "--backend", "local", "--set", "train.epochs=3", "--set", "train.epoch_change_infer=false"]
    assert main(args) == 0
    assert warnings(caplog) == [f"{bad}: cannot be loaded (Unable to synchronously open file (file signature not "
                                f"found)); resuming from {run / 'checkpoint_000001'} (epoch 1) instead"]
    state = ckpt.list_checkpoints(str(run))[-1][1]
    assert [r["epoch"] for r in state.history] == [1, 2, 3] and state.resumes == [1]

    for folder in run.glob("checkpoint_*"):  # none loads: refused, naming each
        zero_head(folder / ckpt.WEIGHTS)
    capsys.readouterr()
    assert main(args) == 2
    line = one_error_line(capsys)
    assert f"{run}: no checkpoint loads, so the run cannot resume" in line
    assert f"{run / 'checkpoint_000003' / ckpt.WEIGHTS}: cannot be loaded" in line


def test_export_skips_a_garbled_or_non_finite_best_checkpoint_and_names_it(run_copy, capsys, caplog):
    _, _, run = run_copy
    best, _ = ckpt.best_checkpoint(str(run))
    other = next(str(f) for f in sorted(run.glob("checkpoint_*")) if str(f) != best)
    zero_head(Path(best, ckpt.WEIGHTS))
    assert main(["export", "--run", str(run)]) == 0
    assert warnings(caplog) == [f"{best}/{ckpt.WEIGHTS}: cannot be loaded (Unable to synchronously open file (file "
                                f"signature not found)); exporting {other} (epoch {other[-1]}, the best that loads) "
                                "instead"]
    assert json.loads((run / "export" / "export.json").read_text())["checkpoint"] == other

    with h5py.File(Path(other, ckpt.WEIGHTS), "r+") as f:  # Inf in one kernel, the file's size kept
        kernels = []
        f.visititems(lambda n, o: kernels.append(o) if isinstance(o, h5py.Dataset) and o.ndim == 4 else None)
        kernels[0][0, 0, 0, 0] = np.inf
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--output", str(run / "again")]) == 2
    line = one_error_line(capsys)
    assert f"{run}: no candidate checkpoint loads" in line and f"{other}/{ckpt.WEIGHTS}: holds non-finite" in line
    assert not (run / "again").exists()


@pytest.fixture(scope="module")
def model_and_optimizer():
    from aisd_ray.model.flexunet import build_flexunet
    from aisd_ray.train import optim
    from tests.conftest import tiny_config

    cfg = tiny_config()
    model = build_flexunet(cfg.model)
    optimizer = optim.build_optimizer(cfg.train)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def another_models_weights(folder: Path) -> None:
    """Replace the weights with a 4-level model's, the marker rewritten: a whole file swapped in."""
    from aisd_ray.model.flexunet import build_flexunet
    from tests.conftest import tiny_config

    build_flexunet(tiny_config("model.num_layers=4").model).save_weights(folder / ckpt.WEIGHTS)
    marker = json.loads((folder / ckpt.CHECKPOINT_INFO).read_text())
    marker["files"][ckpt.WEIGHTS] = (folder / ckpt.WEIGHTS).stat().st_size
    (folder / ckpt.CHECKPOINT_INFO).write_text(json.dumps(marker))


@pytest.mark.parametrize("damage, culprit, expect", [
    ("garbled optimizer state", ckpt.OPTIMIZER, "cannot be loaded ("),
    ("state that is not JSON", ckpt.STATE, "cannot be loaded (Expecting value"),
    ("another model's weights", ckpt.WEIGHTS, "cannot be loaded ("),
])
def test_each_unloadable_file_is_named_and_resume_falls_back(run_copy, model_and_optimizer, damage, culprit,
                                                             expect, caplog):
    _, _, run = run_copy
    latest = run / "checkpoint_000002"
    if culprit == ckpt.WEIGHTS:
        another_models_weights(latest)
    else:
        zero_head(latest / culprit, 16)
    model, optimizer = model_and_optimizer
    uri, state, skipped = ckpt.restore_latest(str(run), model, optimizer)
    assert (uri, state.epoch) == (str(run / "checkpoint_000001"), 1), damage
    named = skipped + warnings(caplog)  # an unreadable state.json is left out of the listing, with a warning
    assert len(named) == 1 and named[0].startswith(f"{latest / culprit}: {expect}"), named


def test_nan_in_the_optimizer_state_or_weights_is_a_divergence(model_and_optimizer):
    """Finite losses do not make an epoch a candidate: a NaN in an Adam moment (the next step's
    NaN) or an Inf weight counts as diverged, so the guard rolls back and ``score_of`` skips it."""
    model, optimizer = model_and_optimizer
    assert loop._all_finite(model, optimizer)
    slot = optimizer.variables[-1]
    kept = np.array(slot.numpy())
    slot.assign(np.full(kept.shape, np.nan, kept.dtype))
    try:
        assert not loop._all_finite(model, optimizer)
    finally:
        slot.assign(kept)
    weights = model.get_weights()
    model.set_weights([np.full_like(weights[0], np.inf)] + weights[1:])
    try:
        assert not loop._all_finite(model, optimizer)
    finally:
        model.set_weights(weights)
    r = row(3, 0.4, finite=0.0)
    trouble = loop._divergence(ckpt.LoopState(), r, np.zeros(3), np.zeros(3), TrainConfig())
    assert trouble == "non-finite weights or optimizer state (NaN or Inf)" and ckpt.score_of(r) is None


def test_pipeline_stops_at_a_diverged_run(synthetic_root, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["pipeline", "--config", TINY, "--source", str(synthetic_root), "--output", str(out), "--backend",
                 "local", "--set", "train.learning_rate=1e9", "--set", "train.clipvalue=0", "--set",
                 "train.on_collapse='stop'", "--set", "train.epoch_change_infer=false"])
    assert code == 1
    assert f"{out / 'tiny'}: training stopped: diverged at epoch 1: non-finite loss" in one_error_line(capsys)
    assert not (out / "tiny" / "export").exists() and not (out / "summary.json").exists()


def test_export_names_a_truncated_or_overwritten_best_checkpoint_and_takes_the_next(run_copy, capsys, caplog):
    """Two neighbours of a garbled file: a best checkpoint whose weights file is cut short (no
    longer complete: named in a warning, not silently dropped) and one whose bytes were overwritten
    with values that still load (the SHA-256 in checkpoint.json names it)."""
    _, _, run = run_copy
    best, _ = ckpt.best_checkpoint(str(run))
    other = next(str(f) for f in sorted(run.glob("checkpoint_*")) if str(f) != best)
    weights = Path(best, ckpt.WEIGHTS)
    original = weights.read_bytes()
    weights.write_bytes(original[:-100])
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's own bookkeeping file
    assert main(["export", "--run", str(run), "--output", str(run / "cut")]) == 0
    assert any(f"{best}: incomplete checkpoint" in w for w in warnings(caplog))
    assert not any("checkpoint_manager_snapshot" in w for w in warnings(caplog))  # a file, not a checkpoint
    assert json.loads((run / "cut" / "export.json").read_text())["checkpoint"] == other

    weights.write_bytes(original)
    with h5py.File(weights, "r+") as f:  # a finite value in one kernel, the file's size kept
        kernels = []
        f.visititems(lambda n, o: kernels.append(o) if isinstance(o, h5py.Dataset) and o.ndim == 4 else None)
        kernels[0][0, 0, 0, 0] = 37.0
    assert Path(best, ckpt.WEIGHTS).stat().st_size == len(original)
    caplog.clear()
    assert main(["export", "--run", str(run), "--output", str(run / "overwritten")]) == 0
    assert any(f"{best}/{ckpt.WEIGHTS}: does not match the SHA-256 that checkpoint.json lists" in w
               for w in warnings(caplog))
    assert json.loads((run / "overwritten" / "export.json").read_text())["checkpoint"] == other
