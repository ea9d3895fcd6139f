"""The search space and searchers, without running trials."""

import pytest
from ray import tune

from aisd_ray.config import builtin_config, load_config
from aisd_ray.tune import _searcher, param_space


def test_space_becomes_tune_distributions_with_whole_numbers_kept_whole():
    cfg = load_config(builtin_config("tune-demo"), ["tune.space.dilation={grid=[1, 2]}"])
    space = param_space(cfg)
    assert isinstance(space["learning_rate"], tune.search.sample.Float)
    assert space["learning_rate"].lower == pytest.approx(3e-4) and space["learning_rate"].upper == pytest.approx(5e-3)
    assert space["base_kernels"].categories == [3, 5] and all(type(v) is int for v in space["base_kernels"].categories)
    assert space["dilation"] == {"grid_search": [1, 2]}


def test_optuna_searcher_suggests_values_inside_the_space_one_trial_at_a_time():
    cfg = load_config(builtin_config("tune-demo"), ["tune.searcher='optuna'"])
    searcher = _searcher(cfg)
    assert searcher.set_search_properties("val_lesion_dice", "max", param_space(cfg))
    for i in range(3):
        params = searcher.suggest(f"t{i}")
        assert 3e-4 <= params["learning_rate"] <= 5e-3 and params["base_kernels"] in (3, 5)
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

    from aisd_ray.tune import _row

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
