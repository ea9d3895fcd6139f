"""Several lesion classes on real slices: CPAISD's penumbra and core (cpaisd-mini, CC BY 4.0).

Prepare, a few training steps, export, evaluate and infer with a 3-class config at 64 px; every
per-class figure is checked against a pixel count made here with numpy on the label maps.
"""

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aisd_ray import stages
from aisd_ray.data.store.prepare import prepare
from aisd_ray.evaluation.evaluate import evaluate_export
from aisd_ray.inference.export import LoadedExport
from aisd_ray.inference.infer import infer_folder
from aisd_ray.scoring import metrics
from aisd_ray.train import checkpoint as ckpt
from tests.conftest import tiny_config

MINI = Path(__file__).resolve().parents[2] / "shared" / "real" / "cpaisd-mini"
needs_mini = pytest.mark.skipif(not (MINI / "images").is_dir(),
                                reason=f"{MINI} not present (shared/ absent): no real multi-class slices")
RGB_MAP = [[0, 0, 0], [0, 255, 0], [255, 0, 0]]
NAMES = ["penumbra", "core"]  # class ids 1 and 2
pytestmark = pytest.mark.slow  # trains a model


def _counts(truth, pred, k):
    t, p = np.asarray(truth) == k, np.asarray(pred) == k
    return int(np.sum(t & p)), int(np.sum(~t & p)), int(np.sum(t & ~p))


def _dice(tp, fp, fn):
    return 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else math.nan


def _same(a, b):
    return (a is None or a != a) and (b is None or b != b) or a == pytest.approx(b, abs=1e-12)


def _labels_of(path):
    """Class ids of an RGB mask PNG: the nearest RGB_MAP colour of each pixel."""
    rgb = np.asarray(Image.open(path).convert("RGB"), np.int64)
    return np.argmin(((rgb[..., None, :] - np.array(RGB_MAP)) ** 2).sum(-1), axis=-1)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A 2-epoch local run on 12/6/6 real slices (symlinked), its export and its shards."""
    if not (MINI / "images").is_dir():
        pytest.skip(f"{MINI} not present (shared/ absent)")
    root = tmp_path_factory.mktemp("cpaisd")
    names = sorted(p.name for p in (MINI / "images").iterdir())
    for split, chosen in (("train", names[:12]), ("valid", names[12:18]), ("test", names[18:24])):
        for side in ("images", "masks"):
            (root / "tree" / split / side).mkdir(parents=True)
            for name in chosen:
                os.symlink(MINI / side / name, root / "tree" / split / side / name)
    cfg = tiny_config(f"data.source_dir='{root / 'tree'}'", "model.num_classes=3", f"data.rgb_map={RGB_MAP}",
                      "data.class_names=['background', 'penumbra', 'core']", "train.backend='local'",
                      "train.epochs=2", "train.steps_per_epoch=2")
    shards = str(root / "shards")
    prepare(cfg, shards, progress=False)
    stages.train(cfg, shards, str(root / "runs"))
    run = stages.run_uri(cfg, str(root / "runs"))
    export_uri, best = stages.export(run)
    return cfg, root, shards, run, export_uri, best


@needs_mini
def test_training_rows_and_history_have_each_class(real_run):
    cfg, root, shards, run, export_uri, best = real_run
    history = ckpt.list_checkpoints(run)[-1][1].history
    assert [r["epoch"] for r in history] == [1, 2]
    for row in history:
        for name in NAMES:
            for key in (f"{name}_dice", f"val_{name}_dice", f"val_{name}_iou", f"val_{name}_precision",
                        f"val_{name}_recall"):
                assert key in row, key
        assert _same(row["val_score"], metrics.selection_score([row["val_penumbra_dice"], row["val_core_dice"]]))
        assert "val_lesion_dice" in row and "lesion_dice" in row  # the combined lesion is kept
    columns = next(csv.reader(open(Path(run) / "history.csv")))
    assert {"val_penumbra_dice", "val_core_dice", "penumbra_dice", "core_dice", "val_score"} <= set(columns)
    # the export's epoch is the one with the best val_score (ties: the earlier epoch)
    scored = [(r["val_score"], -r["epoch"]) for r in history if r["val_score"] == r["val_score"]]
    if scored:
        assert best["epoch"] == -max(scored)[1]

    # the best epoch's validation figures against a count of the export's predictions on the valid split
    truth, pred = _split_labels(LoadedExport(export_uri, tta=False), shards, "valid")
    assert len(truth) == 6
    for k, name in enumerate(NAMES, start=1):
        tp, fp, fn = _counts(truth, pred, k)
        assert _same(best[f"val_{name}_dice"], _dice(tp, fp, fn))

    # the log line names each class's val Dice and their mean, the score that picks the best epoch
    from aisd_ray.train.loop import epoch_line

    state = ckpt.list_checkpoints(run)[-1][1]
    line = epoch_line(history[-1], state, 2, ["penumbra", "core"])
    assert (f"val Dice penumbra {history[-1]['val_penumbra_dice']:.3f} core {history[-1]['val_core_dice']:.3f} "
            f"mean {history[-1]['val_score']:.3f}") in line


def _split_labels(model, shards_uri, split):
    """(N, H, W) true and predicted labels of a split, straight from the shards and the export."""
    from aisd_ray.data.store import shards

    store = shards.ShardStore.open(shards_uri)
    arrays = [shards.record_to_arrays(r) for r in shards.iter_records(shards_uri, store.manifest, split)]
    images = np.stack([a[0] for a in arrays])
    truth = np.stack([a[1] for a in arrays])
    pred = np.argmax(model.predict(images)["probabilities"].numpy(), axis=-1)
    return truth, pred


@needs_mini
def test_evaluated_export_reports_each_class_as_counted_here(real_run, tmp_path):
    cfg, root, shards, run, export_uri, best = real_run
    out = tmp_path / "eval"
    report = evaluate_export(export_uri, shards, str(out), "test", progress=False)
    saved = json.loads((out / "metrics.json").read_text())
    truth, pred = _split_labels(LoadedExport(export_uri), shards, "test")
    assert saved["classes"] == NAMES and len(saved["per_image"]) == len(truth) == 6
    for k, name in enumerate(NAMES, start=1):
        tp, fp, fn = _counts(truth, pred, k)
        assert _same(saved[f"{name}_dice"], _dice(tp, fp, fn))
        assert _same(saved[f"{name}_recall"], tp / (tp + fn) if tp + fn else math.nan)
        per_image = [_dice(*_counts(t, p, k)) for t, p in zip(truth, pred)]
        defined = [d for d in per_image if d == d]
        assert _same(saved[f"{name}_dice_per_image"], float(np.mean(defined)) if defined else math.nan)
        assert saved[f"images_with_{name}"] == sum(1 for t in truth if np.any(t == k))
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    for row, t, p in zip(rows, truth, pred):
        for k, name in enumerate(NAMES, start=1):
            assert (int(row[f"{name}_tp"]), int(row[f"{name}_fp"]), int(row[f"{name}_fn"])) == _counts(t, p, k)
    lesion = _counts(truth > 0, pred > 0, True)
    assert _same(saved["lesion_dice"], _dice(*lesion))  # the combined foreground, as before
    assert _same(saved["class_dice_mean"], metrics.selection_score([report["penumbra_dice"], report["core_dice"]]))


@needs_mini
def test_folder_evaluation_of_inferred_masks_reports_each_class(real_run, tmp_path, capsys):
    """Infer the test slices at their own 512 px, then score the palette masks against the truth."""
    from aisd_ray import cli

    cfg, root, shards, run, export_uri, best = real_run
    infer_folder(export_uri, root / "tree" / "test" / "images", str(tmp_path / "pred"), progress=False)
    config = tmp_path / "three.toml"
    config.write_text(cfg.to_toml())
    out = tmp_path / "eval"
    cli.main(["evaluate", "--config", str(config), "--predictions", str(tmp_path / "pred"),
              "--masks", str(root / "tree" / "test" / "masks"), "--output", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads((out / "metrics.json").read_text())
    masks = sorted((root / "tree" / "test" / "masks").iterdir())
    truth = np.stack([_labels_of(p) for p in masks])
    pred = np.stack([_labels_of(tmp_path / "pred" / p.name) for p in masks])
    assert truth.shape == (6, 512, 512) and set(np.unique(truth)) <= {0, 1, 2} and np.any(truth == 2)
    for k, name in enumerate(NAMES, start=1):
        assert _same(saved[f"{name}_dice"], _dice(*_counts(truth, pred, k)))
        assert f"{name} Dice " in printed
    rows = {r["name"]: r for r in saved["per_image"]}
    for path, t, p in zip(masks, truth, pred):
        assert (rows[path.stem]["core_tp"], rows[path.stem]["core_fp"], rows[path.stem]["core_fn"]) == \
            _counts(t, p, 2)
