import csv
import json

import numpy as np
import pytest
from PIL import Image

from aisd_ray.evaluation.evaluate import evaluate_export
from aisd_ray.evaluation.evaluate_masks import evaluate_folders


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


def test_cases_of_the_raw_release_are_scored_as_volumes(trained_run, tmp_path):
    """The tiny export scores a raw-layout store: per-case rows add up to the per-slice counts."""
    from aisd_ray.config import AISD_TEST_CASES
    from aisd_ray.data.store.prepare import prepare
    from aisd_ray.data.synthetic.slices import write_synthetic_raw
    from tests.conftest import tiny_config

    cases = list(AISD_TEST_CASES[:2]) + ["1000001", "1000002", "1000003"]
    write_synthetic_raw(tmp_path / "raw", tiny_config().synthetic, cases, slices=4, progress=False)
    prepare(tiny_config(f"data.source_dir='{tmp_path / 'raw'}'"), str(tmp_path / "shards"), progress=False)
    report = evaluate_export(trained_run[3], str(tmp_path / "shards"), str(tmp_path / "eval"), "test",
                             progress=False)
    block = report["cases"]
    assert block["cases"] == 2 and [r["case_id"] for r in block["per_case"]] == sorted(cases[:2])
    for row in block["per_case"]:
        slices = [r for r in report["per_image"] if r["name"].startswith(row["case_id"] + "_")]
        assert row["slices"] == len(slices) == 4
        assert row["true_volume"] == sum(r["tp"] + r["fn"] for r in slices)
        assert row["pred_volume"] == sum(r["tp"] + r["fp"] for r in slices)
        assert row["found_lesions"] + row["missed_lesions"] == row["true_lesions"] >= 1
    per_case = list(csv.DictReader(open(tmp_path / "eval" / "per_case.csv")))
    assert [r["case_id"] for r in per_case] == sorted(cases[:2])
    assert (tmp_path / "eval" / "volume_agreement.png").stat().st_size > 1000
    assert Image.open(tmp_path / "eval" / "per_case_dice.png").size[1] == 400  # the per-case bar chart
    assert "cases" in json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "cases" not in evaluate_export(trained_run[3], trained_run[1], str(tmp_path / "seed"), "test",
                                          progress=False)  # the original's tree has no case ids


def test_overlays_colour_found_false_and_missed_pixels():
    from aisd_ray.report import render

    image = np.full((4, 4, 3), 100, np.uint8)
    truth = np.array([[1, 1, 0, 0]] * 4, np.uint8)
    pred = np.array([[1, 0, 1, 0]] * 4, np.uint8)
    shown = render.error_map(image, truth, pred, size=4).astype(int)
    expected = [0.4 * 100 + 0.6 * np.array(c) for c in (render.TP, render.FN, render.FP)]
    for column, colour in zip(range(3), expected):
        assert np.abs(shown[0, column] - colour).max() <= 1
    assert (shown[0, 3] == 100).all()  # neither: the image as it is


def test_export_evaluation_writes_one_overlay_per_slice(trained_run, tmp_path):
    _, shards, _, export_uri = trained_run
    report = evaluate_export(export_uri, shards, str(tmp_path), "test", 4, progress=False)
    overlays = sorted(p.stem for p in (tmp_path / "overlays").iterdir())
    assert overlays == sorted(r["name"] for r in report["per_image"])
    panel = Image.open(tmp_path / "overlays" / f"{overlays[0]}.png")
    assert panel.width >= 2 * 256 and panel.height >= 256 + 44  # 64 px slices shown at 256 px
    evaluate_export(export_uri, shards, str(tmp_path / "plain"), "test", 4, progress=False, overlays=False)
    assert not (tmp_path / "plain" / "overlays").exists()


def test_case_volumes_keep_each_class_of_a_case():
    """Bit planes per class come back as the labels they were made of, in slice order."""
    from aisd_ray.evaluation.evaluate import CaseVolumes

    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, (4, 5, 7)).astype(np.uint8)
    pred = rng.integers(0, 3, (4, 5, 7)).astype(np.uint8)
    volumes = CaseVolumes(["penumbra", "core"])
    for i in (2, 0, 3, 1):  # slices arrive out of order
        volumes.add("case", i, truth[i], pred[i])
    row = volumes.scores()[0]
    assert row["slices"] == 4
    for k, name in ((1, "penumbra"), (2, "core")):
        t, p = truth == k, pred == k
        assert row[f"{name}_true_volume"] == t.sum() and row[f"{name}_pred_volume"] == p.sum()
        assert row[f"{name}_dice"] == pytest.approx(2 * (t & p).sum() / (t.sum() + p.sum()))
    assert row["true_volume"] == (truth > 0).sum() and row["pred_volume"] == (pred > 0).sum()


def test_case_figures_are_scored_after_the_postprocessing_choice():
    """A false speck on a case costs case Dice and a false lesion; the choice that removes it gives
    them back, at the case's spacing in mL or in voxels."""
    from aisd_ray.evaluation.evaluate import CaseVolumes

    truth = np.zeros((3, 12, 12), np.uint8)
    truth[0:2, 2:8, 2:8] = 1  # 72 voxels
    pred = truth.copy()
    pred[2, 10:12, 10:12] = 1  # a 4-voxel false speck
    volumes = CaseVolumes()
    for i in range(3):
        volumes.add("case", i, truth[i], pred[i])
    plain = volumes.scores()[0]
    assert plain["false_lesions"] == 1 and plain["dice"] == pytest.approx(144 / 148)
    spacing = {"case": (5.0, 1.0, 1.0)}  # 0.005 mL a voxel: the speck is 0.02 mL
    for choice in ({"rule": "remove_small", "min_ml": 0.1}, {"rule": "remove_small", "min_voxels": 5},
                   {"rule": "keep_largest"}):
        row = volumes.scores(spacing, choice)[0]
        assert row["false_lesions"] == 0 and row["dice"] == 1.0 and row["pred_volume"] == 72
        assert row["hd95_mm"] == 0.0
    assert volumes.scores(spacing, {"rule": "none"})[0]["dice"] == plain["dice"]


def test_postprocessing_is_chosen_on_the_valid_split_written_into_the_export_and_read_back(trained_run, tmp_path,
                                                                                           capsys):
    """`evaluate --split valid --choose-postprocessing` on a raw-release store: the choice lands in
    the export's postprocess.json (the valid cases scored for every candidate), LoadedExport reads
    it, and the next evaluation and infer --input record it."""
    import shutil

    from aisd_ray.cli import main
    from aisd_ray.config import AISD_TEST_CASES
    from aisd_ray.data.store.prepare import prepare
    from aisd_ray.data.synthetic.slices import write_synthetic_raw
    from aisd_ray.inference import postprocess
    from aisd_ray.inference.export import LoadedExport
    from tests.conftest import tiny_config

    export = tmp_path / "export"
    shutil.copytree(trained_run[3], export)  # the session's export stays as it is
    cases = list(AISD_TEST_CASES[:2]) + [f"100000{i}" for i in range(1, 7)]
    write_synthetic_raw(tmp_path / "raw", tiny_config().synthetic, cases, slices=4, progress=False)
    prepare(tiny_config(f"data.source_dir='{tmp_path / 'raw'}'", "data.valid_fraction=0.4"),
            str(tmp_path / "shards"), progress=False)
    assert main(["evaluate", "--model", str(export), "--data", str(tmp_path / "shards"), "--split", "valid",
                 "--choose-postprocessing", "--no-overlays", "--output", str(tmp_path / "valid")]) == 0
    assert "(chosen here, written into the export)" in capsys.readouterr().out
    written = json.loads((export / postprocess.FILE).read_text())
    report = json.loads((tmp_path / "valid" / "metrics.json").read_text())
    assert report["postprocessing"]["rule"] == written["rule"] and written["cases"] == report["cases"]["cases"] >= 2
    assert set(written["val_case_dice"]) == set(postprocess.candidates(in_ml=False))  # no spacing: voxels
    assert LoadedExport(str(export)).postprocess == postprocess.check(written, "x")
    # a choice of the export's is used by evaluate (recorded) and by infer --input (recorded per case)
    postprocess.save(str(export), {"rule": "keep_largest"})
    assert main(["evaluate", "--model", str(export), "--data", str(tmp_path / "shards"), "--no-overlays",
                 "--output", str(tmp_path / "test")]) == 0
    assert json.loads((tmp_path / "test" / "metrics.json").read_text())["postprocessing"]["rule"] == "keep_largest"
    from aisd_ray.data.synthetic.volumes import synth_volume, write_nifti_case

    hu, _, spacing = synth_volume(7, "1000002", 80, 6)
    write_nifti_case(hu, spacing, tmp_path / "patients" / "p.nii.gz")
    assert main(["infer", "--model", str(export), "--input", str(tmp_path / "patients"), "--output",
                 str(tmp_path / "masks"), "--tta"]) == 0
    summary = json.loads((tmp_path / "masks" / "cases" / "p" / "summary.json").read_text())
    assert summary["postprocessing"]["rule"] == "keep_largest" and summary["tta"] is True
    assert summary["lesion_count"] <= 1
