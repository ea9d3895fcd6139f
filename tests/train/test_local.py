"""The local backend: same loop, no Ray."""

import pytest

from aisd_ray import stages
from aisd_ray.train import checkpoint as ckpt


def run_local(cfg, shards, root, **overrides):
    cfg.train.backend = "local"
    for key, value in overrides.items():
        setattr(cfg.train, key, value)
    stages.train(cfg, shards, root)
    return ckpt.list_checkpoints(stages.run_uri(cfg, root))


def test_fixed_seed_gives_the_same_first_epoch_loss(parquet_store, tmp_path):
    cfg, shards = parquet_store
    a = run_local(cfg, shards, str(tmp_path / "a"), epochs=1)[-1][1].history[0]
    b = run_local(cfg, shards, str(tmp_path / "b"), epochs=1)[-1][1].history[0]
    assert a["loss"] == b["loss"] and a["val_loss"] == b["val_loss"]
    c = run_local(cfg, shards, str(tmp_path / "c"), epochs=1, seed=999)[-1][1].history[0]
    assert c["loss"] != a["loss"]


def test_augmented_training_is_reproducible_and_differs_from_plain(parquet_store, tmp_path):
    cfg, shards = parquet_store
    plain = run_local(cfg, shards, str(tmp_path / "plain"), epochs=1)[-1][1].history[0]
    cfg.augment.enabled = True
    a = run_local(cfg, shards, str(tmp_path / "a"), epochs=1)[-1][1].history[0]
    b = run_local(cfg, shards, str(tmp_path / "b"), epochs=1)[-1][1].history[0]
    assert a["loss"] == b["loss"] != plain["loss"]
    assert a["val_loss"] == b["val_loss"]


def test_rerun_resumes_from_the_latest_checkpoint(parquet_store, tmp_path):
    cfg, shards = parquet_store
    root = str(tmp_path / "runs")
    first = run_local(cfg, shards, root, epochs=1, seed=137)
    assert [s.epoch for _, s in first] == [1]
    second = run_local(cfg, shards, root, epochs=3)
    latest = second[-1][1]
    assert latest.epoch == 3 and [row["epoch"] for row in latest.history] == [1, 2, 3]
    assert latest.history[0] == first[0][1].history[0]  # epoch 1 was not run again
    # the latest two (a fallback if the latest does not load) and the best (a tie: the earlier) kept
    assert {s.epoch for _, s in second} == {2, 3, latest.best_epoch}


def test_outputs_of_a_run(trained_run):
    _, _, run, _ = trained_run
    from pathlib import Path

    folder = Path(run)
    for name in ("history.csv", "train_losses.png", "train_metrics.png", "config.toml", "provenance.json"):
        assert (folder / name).is_file(), name
    import hashlib
    import json

    facts = json.loads((folder / "provenance.json").read_text())
    assert facts["packages"]["tensorflow"] and facts["packages"]["ray"] and facts["machine"]["cpus"]
    assert facts["config_sha256"] == hashlib.sha256((folder / "config.toml").read_bytes()).hexdigest()
    assert facts["git_commit"] is None or len(facts["git_commit"].split("+")[0]) == 40
    assert list((folder / "tensorboard").iterdir())
    panels = sorted(p.name for p in (folder / "epoch_change_infer").iterdir())
    assert panels == ["Epoch_1.png", "Epoch_2.png"]  # one labelled grid per epoch (2 slices each)
    from PIL import Image

    grid = Image.open(folder / "epoch_change_infer" / "Epoch_2.png")
    assert grid.width >= 2 * 256 and grid.height >= 256  # 64 px slices shown at 256 px, side by side
    header = (folder / "history.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "val_loss", "val_lesion_dice", "val_dice_coef_multiclass", "learning_rate"} <= set(header)


def test_reduce_lr_on_plateau_really_applies():
    from aisd_ray.config import TrainConfig
    from aisd_ray.train.loop import _after_epoch
    from aisd_ray.train.optim import learning_rate

    t = TrainConfig(learning_rate=0.01, reducer_patience=2, patience=4, epochs=10)
    state = ckpt.LoopState(learning_rate=0.01, early_stop=ckpt.Plateau(4), reducer=ckpt.Plateau(2))
    for epoch, val_loss in enumerate([1.0, 1.0, 1.0, 1.0, 1.0], start=1):
        state = _after_epoch(state, {"epoch": epoch, "val_loss": val_loss, "val_lesion_dice": 0.1}, t)
        if epoch == 3:
            assert learning_rate(t, 30, 10, state.lr_scale) == pytest.approx(0.005)
    assert state.stop_reason.startswith("early stop") and state.epoch == 5


def test_validation_steps_caps_the_scored_slices(parquet_store, tmp_path):
    cfg, shards = parquet_store
    cfg.eval.batch_size = 2
    history = run_local(cfg, shards, str(tmp_path), epochs=1, validation_steps=1)[-1][1].history
    full = run_local(cfg, shards, str(tmp_path / "full"), epochs=1, validation_steps=0)[-1][1].history
    assert history[0]["loss"] == full[0]["loss"]  # same training
    assert history[0]["val_loss"] != full[0]["val_loss"]  # 2 of 8 validation slices scored


def test_log_has_one_line_per_epoch_and_progress_lines_where_no_bar_is_drawn(parquet_store, tmp_path, caplog):
    import logging

    cfg, shards = parquet_store
    cfg.train.log_every_seconds = 1e-9  # a progress line after every step (no terminal under pytest)
    with caplog.at_level(logging.INFO, logger="aisd_ray"):
        run_local(cfg, shards, str(tmp_path), epochs=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "aisd_ray.train.loop"]
    epochs = [line for line in lines if line.startswith("epoch ") and "  loss " in line]
    assert len(epochs) == 2
    assert "val lesion Dice" in epochs[0] and "(new best)" in epochs[0] and "ETA " in epochs[0]
    assert "ETA" not in epochs[1]  # the last epoch
    steps = 32 // cfg.train.batch_size
    assert "epoch 1/2: step 1/%d, loss" % steps in "\n".join(lines)


def test_one_lesion_class_rows_add_only_val_score_equal_to_the_lesion_dice(trained_run):
    """The two-class default: no per-class keys, and the selection score is the lesion Dice itself
    (the one other new column, weights_finite, is the divergence guard's)."""
    import csv
    from pathlib import Path

    _, _, run, _ = trained_run
    history = ckpt.list_checkpoints(run)[-1][1].history
    for row in history:
        assert row[ckpt.SCORE] == row["val_lesion_dice"] or row["val_lesion_dice"] != row["val_lesion_dice"]
        assert not any(k.startswith(("val_class", "val_background")) for k in row)
    columns = next(csv.reader(open(Path(run) / "history.csv")))
    assert [c for c in columns if "lesion" not in c and c not in (
        "epoch", "loss", "val_loss", "val_dice_coef_multiclass", "learning_rate", "replica_weight_spread",
        "train_images_per_second", "input_wait_fraction", "epoch_seconds", "rollbacks",
        ckpt.FINITE)] == ["val_score"]
