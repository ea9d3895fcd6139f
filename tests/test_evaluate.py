import csv
import json

import numpy as np
import pytest
from PIL import Image

from aisd_ray.evaluate import evaluate_export, evaluate_folders


def test_export_evaluation_writes_seed_csv_and_metrics(trained_run, tmp_path):
    cfg, shards, _, export_uri = trained_run
    report = evaluate_export(export_uri, shards, str(tmp_path), "test", 4, progress=False)
    lines = (tmp_path / "evaluation.csv").read_text().splitlines()
    assert lines[0].startswith("categorical_crossentropy,") and lines[1].startswith("dice_coef_multiclass,")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["images"] == 8 and len(saved["per_image"]) == 8
    for key in ("lesion_dice", "lesion_iou", "lesion_precision", "lesion_recall", "lesion_dice_per_image",
                "dice_coef_multiclass", "categorical_crossentropy"):
        assert key in saved
    tp = sum(r["tp"] for r in saved["per_image"])
    fp = sum(r["fp"] for r in saved["per_image"])
    fn = sum(r["fn"] for r in saved["per_image"])
    if tp + fp + fn:
        assert saved["lesion_dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert report["categorical_crossentropy"] == pytest.approx(float(lines[0].split(",")[1]), abs=1e-4)
    rows = list(csv.DictReader(open(tmp_path / "per_image.csv")))
    assert len(rows) == 8


def mask(path, box):
    array = np.zeros((20, 20, 3), np.uint8)
    if box:
        array[box[0]:box[1], box[0]:box[1]] = 254
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_evaluation_scores_without_a_model(tmp_path):
    mask(tmp_path / "truth" / "1.png", (0, 10))  # 100 px
    mask(tmp_path / "pred" / "1.png", (5, 10))  # 25 px inside it
    mask(tmp_path / "truth" / "2.png", None)
    mask(tmp_path / "pred" / "2.png", None)  # empty vs empty: undefined, left out
    report = evaluate_folders(tmp_path / "pred", tmp_path / "truth", ((0, 0, 0), (255, 255, 255)),
                              str(tmp_path / "out"), progress=False)
    assert report["lesion_dice"] == pytest.approx(2 * 25 / 125)
    assert report["lesion_recall"] == pytest.approx(0.25) and report["lesion_precision"] == 1.0
    assert report["lesion_dice_per_image"] == pytest.approx(0.4)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["per_image"][1]["lesion_dice"] is None
