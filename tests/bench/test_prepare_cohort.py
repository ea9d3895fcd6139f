"""The prepare-at-cohort-scale figures in tiny mode: every figure there, as a command printing JSON.
No timing asserted (a shared 2-core machine's figures are noise)."""

import json

from aisd_ray.bench import prepare_cohort


def test_tiny_prepare_figures_are_written_and_printed(tmp_path, capsys):
    out = tmp_path / "prepare.json"
    report = prepare_cohort.main(["--tiny", "--output", str(out)])
    assert json.loads(out.read_text()) == report == json.loads(capsys.readouterr().out)
    figures = {f["name"]: f for f in report["prepare_volumes"]}
    assert set(figures) == {"prepare_volumes_1w", "prepare_volumes_2w", "prepare_volumes_full", "prepare_volumes_noop"}
    assert figures["prepare_volumes_1w"]["cases"] == 12 and figures["prepare_volumes_2w"]["workers"] == 2
    for f in figures.values():
        assert f["unit"] and 0 < f["min"] <= f["median"] <= f["max"]
    assert set(report["ratios"]) == {"prepare_volumes_2w_over_1w", "prepare_noop_over_full"}
    assert all(v > 0 for v in report["ratios"].values())
