"""The search space and searchers, without running trials."""

import pytest
from ray import tune

from aisd_ray.config import builtin_config, load_config
from aisd_ray.studies.tune import _searcher, param_space


def test_space_becomes_tune_distributions_with_whole_numbers_kept_whole():
    cfg = load_config(builtin_config("tune-demo"), ["tune.space.dilation={grid=[1, 2]}"])
    space = param_space(cfg)
    assert isinstance(space["learning_rate"], tune.search.sample.Float)
    assert space["learning_rate"].lower == pytest.approx(3e-4) and space["learning_rate"].upper == pytest.approx(3e-3)
    assert space["base_kernels"].categories == [3, 5] and all(type(v) is int for v in space["base_kernels"].categories)
    assert space["dilation"] == {"grid_search": [1, 2]}


def test_optuna_searcher_suggests_values_inside_the_space_one_trial_at_a_time():
    cfg = load_config(builtin_config("tune-demo"), ["tune.searcher='optuna'", "tune.max_concurrent_trials=1"])
    searcher = _searcher(cfg)
    assert searcher.set_search_properties("val_lesion_dice", "max", param_space(cfg))
    for i in range(3):
        params = searcher.suggest(f"t{i}")
        if i == 0:  # the base config's own values first (tune.include_default)
            assert params == {"learning_rate": pytest.approx(1e-3), "base_kernels": 3, "dilation": 2}
        assert 3e-4 <= params["learning_rate"] <= 3e-3 and params["base_kernels"] in (3, 5)
        assert params["dilation"] in (1, 2)
        assert searcher.suggest("waiting") is None  # max_concurrent_trials = 1
        searcher.on_trial_complete(f"t{i}", {"val_lesion_dice": 0.1 * i, **params})


def test_optuna_refuses_grid_values():
    cfg = load_config(builtin_config("tune-demo"), ["tune.searcher='optuna'", "tune.space.dilation={grid=[1, 2]}"])
    with pytest.raises(ValueError, match="cannot take grid values"):
        _searcher(cfg)


def test_the_leaderboard_names_the_epoch_export_takes():
    """Issue 22, case 7: a tie keeps the earlier epoch (as the training log and export do); a trial
    whose every epoch diverged has no best."""
    from types import SimpleNamespace

    import pandas as pd

    from aisd_ray.studies.tune import _row

    cfg = load_config(builtin_config("tiny"), ["tune.space={learning_rate={grid=[1e-7, 0.05]}}"])

    def result(rows):
        return SimpleNamespace(metrics_dataframe=pd.DataFrame(rows), metrics={"trial_id": "t"},
                               config={"learning_rate": 1e-7}, error=None, path="/trials/t")

    tie = [{"epoch": e, "loss": 0.5, "val_loss": 0.5, "val_lesion_dice": 0.25, "stop_reason": ""} for e in (1, 2)]
    row = _row(result(tie), cfg, "/trials")
    assert (row["best_epoch"], row["best_val_lesion_dice"], row["epochs_run"]) == (1, 0.25, 2)
    nan = float("nan")
    diverged = [{"epoch": 1, "loss": nan, "val_loss": nan, "val_lesion_dice": 0.0,
                 "stop_reason": "diverged at epoch 1: non-finite loss"}]
    row = _row(result(diverged), cfg, "/trials")
    assert row["best_epoch"] == 0 and row["best_val_lesion_dice"] != row["best_val_lesion_dice"]
    assert row["stop_reason"].startswith("diverged at epoch 1")


def _board_row(score, reason="reached 8 epochs"):
    return {"trial_id": "t", "best_val_score": score, "stop_reason": reason}


def test_trial_status_names_collapsed_diverged_failed_and_weak_trials():
    """Issue 23: a trial's status from the figures it has (its best val_score, its stop reason)."""
    from aisd_ray.studies.tune import trial_status

    nan = float("nan")
    assert trial_status(_board_row(0.84), 0.5) == "ok"
    assert trial_status(_board_row(0.5), 0.5) == "ok"  # the floor itself is reached
    assert trial_status(_board_row(0.3), 0.5) == "below floor"
    assert trial_status(_board_row(0.0008), 0.5) == "collapsed"  # next to no lesion found
    assert trial_status(_board_row(0.0), 0.1) == "collapsed"
    assert trial_status(_board_row(nan), 0.0) == "collapsed"  # no epoch was a candidate
    assert trial_status(_board_row(0.05), 0.0) == "ok"  # the user lowered the floor
    # diverged whatever it scored before the guard stopped it; an error wins over everything
    assert trial_status(_board_row(0.8, "diverged at epoch 5 after 3 rollbacks: collapsed: no lesion"), 0.1) \
        == "diverged"
    assert trial_status(_board_row(nan, "diverged at epoch 1: non-finite loss"), 0.1) == "diverged"
    assert trial_status(_board_row(0.8, "error: worker died"), 0.1) == "error"
    assert trial_status(_board_row(0.8), 0.1, errored=True) == "error"
    # ASHA's stop is a normal end: judged by the score
    assert trial_status(_board_row(0.7, "stopped by ASHA after epoch 2"), 0.5) == "ok"


def test_leaderboard_never_ranks_a_diverged_or_collapsed_trial_first():
    from aisd_ray.studies.tune import _order, trial_status

    nan = float("nan")
    rows = [{"trial_id": "a", "best_val_score": 0.9, "stop_reason": "diverged at epoch 6: non-finite loss"},
            {"trial_id": "b", "best_val_score": 0.0, "stop_reason": "reached 4 epochs"},
            {"trial_id": "c", "best_val_score": 0.6, "stop_reason": "stopped by ASHA after epoch 2"},
            {"trial_id": "d", "best_val_score": nan, "stop_reason": "error: boom"},
            {"trial_id": "e", "best_val_score": 0.3, "stop_reason": "reached 4 epochs"}]
    for row in rows:
        row["status"] = trial_status(row, 0.5)
    ordered = _order(rows)
    assert [(r["trial_id"], r["status"]) for r in ordered] == [
        ("c", "ok"), ("e", "below floor"), ("b", "collapsed"), ("a", "diverged"), ("d", "error")]


def test_the_default_point_is_the_base_configs_own_values():
    from aisd_ray.studies.tune import default_point

    cfg = load_config(builtin_config("tune-demo"))
    assert default_point(cfg) == {"learning_rate": 0.001, "base_kernels": 3, "dilation": 2}
    assert type(default_point(cfg)["base_kernels"]) is int
    assert default_point(load_config(builtin_config("tune-demo"), ["tune.include_default=false"])) is None
    assert default_point(load_config(builtin_config("tune-demo"), ["tune.space.dilation={grid=[1, 2]}"])) is None
    assert default_point(load_config(builtin_config("tune-demo"), ["model.base_kernels=[3, 5]"])) is None


def test_min_score_must_be_a_dice():
    from aisd_ray.config import ConfigError

    with pytest.raises(ConfigError, match="tune.min_score"):
        load_config(builtin_config("tune-demo"), ["tune.min_score=1.5"])
