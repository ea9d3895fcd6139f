"""Masks as people have them (issue 22): class ids, AISD labels, 1-bit and 16-bit files, lesion-free
splits. Each case runs the CLI in-process and checks the exit code, the one line naming the file or
split, and the right figures (the unmodified tree's lesion fractions, Dice 1.0) where the input is
valid after all."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aisd_ray.cli import main
from aisd_ray.config import builtin_config
from aisd_ray.data.store import shards
from aisd_ray.data.synthetic.slices import write_synthetic_raw
from tests.conftest import tiny_config
from tests.test_bad_input import one_error_line

TINY = str(builtin_config("tiny"))
SPLITS = ("train", "valid", "test")


def prepare(source, out, *sets):
    args = ["prepare", "--config", TINY, "--source", str(source), "--output", str(out)]
    for item in sets:
        args += ["--set", item]
    return main(args)


def manifest(store) -> dict:
    return json.loads((Path(store) / "manifest.json").read_text())


def fractions(store) -> dict[str, float]:
    return {s: e["lesion_fraction"] for s, e in manifest(store)["splits"].items()}


def lesion_of(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) > 127


def rewrite_masks(source, convert, splits=SPLITS):
    """Every mask of ``splits`` rewritten as ``convert(lesion (H, W) bool)`` (a PIL image)."""
    for split in splits:
        for path in sorted((source / split / "masks").iterdir()):
            convert(lesion_of(path)).save(path)


@pytest.fixture
def source(synthetic_root, tmp_path):
    """A private copy of the tiny synthetic tree (the original's layout, near-white colour masks)."""
    copy = tmp_path / "AISD"
    shutil.copytree(synthetic_root, copy)
    return copy


@pytest.fixture
def unmodified(parquet_store):
    """Lesion fractions of the unmodified tree, as prepared with the tiny config."""
    want = fractions(parquet_store[1])
    assert set(want) == set(SPLITS) and all(v > 0 for v in want.values())
    return want


@pytest.mark.parametrize("lesion_value, reading", [(2, "raw_labels"), (1, "class_ids")])
def test_grey_label_masks_give_the_colour_trees_lesion_fractions(source, unmodified, tmp_path, caplog, capsys,
                                                                 lesion_value, reading):
    """Case 1: AISD's label 2 (looks black) and 0/1 masks were read as colours: all background."""
    rewrite_masks(source, lambda lesion: Image.fromarray((lesion * lesion_value).astype(np.uint8)))
    caplog.set_level(logging.INFO)
    assert prepare(source, tmp_path / "shards") == 0
    assert fractions(tmp_path / "shards") == unmodified
    assert {s: e["mask_values"] for s, e in manifest(tmp_path / "shards")["splits"].items()} == \
        dict.fromkeys(SPLITS, reading)
    for split in SPLITS:
        assert f"{split}: " in caplog.text and f"masks read as {reading} (" in caplog.text
    assert f"lesion fraction {unmodified['valid']:.4f}" in capsys.readouterr().out
    assert "NO LESION PIXEL" not in caplog.text


def test_16_bit_label_masks_are_read_and_a_lone_one_gets_mask_advice(source, synthetic_root, unmodified, tmp_path,
                                                                     capsys):
    """Case 10: a 16-bit 0/1 mask was refused with advice for CT images ("window it to 8 bits")."""
    odd = [p for p in sorted((source / "train" / "masks").iterdir()) if lesion_of(p).any()][3]
    Image.fromarray(lesion_of(odd).astype(np.uint16)).save(odd)
    assert prepare(source, tmp_path / "s1") == 2
    line = one_error_line(capsys)
    assert line.startswith(f"aisd-ray prepare: error: {odd}: ") and "window" not in line
    assert "values 0, 1 (I;16) fit class ids or raw AISD labels only" in line and "data.mask_values" in line
    assert not (tmp_path / "s1").exists()
    shutil.copy(synthetic_root / "train" / "masks" / odd.name, odd)

    rewrite_masks(source, lambda lesion: Image.fromarray(lesion.astype(np.uint16)))  # all of them: class ids
    assert prepare(source, tmp_path / "s2") == 0
    assert fractions(tmp_path / "s2") == unmodified

    shutil.rmtree(source)
    shutil.copytree(synthetic_root, source)
    rewrite_masks(source, lambda lesion: Image.fromarray((lesion * 40000).astype(np.uint16)))
    assert prepare(source, tmp_path / "s3") == 2
    line = one_error_line(capsys)
    first = sorted((source / "train" / "masks").iterdir())[0]
    assert f"{first}: label value 40000 is outside 0..5" in line and "window" not in line
    assert "A mask holds class ids, raw labels or 8-bit rgb_map colours" in line


def test_prepare_names_masks_of_a_split_that_disagree(source, tmp_path, capsys):
    """Neighbour of case 1: 0/2 masks among colour ones are an error, not background."""
    odd = [p for p in sorted((source / "valid" / "masks").iterdir()) if lesion_of(p).any()][1]
    Image.fromarray((lesion_of(odd) * 2).astype(np.uint8)).save(odd)
    assert prepare(source, tmp_path / "shards") == 2
    line = one_error_line(capsys)
    assert f"{odd}: as rgb_map colours its values would all be class 0, and 7 of the 8 masks of the valid split" in line
    assert not (tmp_path / "shards").exists()  # judged before anything is written


def perfect_evaluation(predictions, truth, out, capsys) -> dict:
    assert main(["evaluate", "--config", TINY, "--predictions", str(predictions), "--masks", str(truth),
                 "--output", str(out)]) == 0
    assert "lesion Dice 1.0000 (pooled)" in capsys.readouterr().out
    return json.loads((out / "metrics.json").read_text())


def test_evaluate_scores_0_1_predictions_against_colour_masks(synthetic_root, tmp_path, capsys):
    """Case 2: a perfect prediction as 0/1 grey PNGs scored lesion Dice 0.0."""
    truth = synthetic_root / "test" / "masks"
    (tmp_path / "pred").mkdir()
    for path in truth.iterdir():
        Image.fromarray(lesion_of(path).astype(np.uint8)).save(tmp_path / "pred" / path.name)
    report = perfect_evaluation(tmp_path / "pred", truth, tmp_path / "eval", capsys)
    assert report["lesion_dice"] == 1.0 and report["images"] == 8


def test_evaluate_scores_a_palette_prediction_against_raw_release_labels(tmp_path, capsys):
    """Case 2: the raw release's own mask slices (labels 0..5) as ground truth scored Dice 0.0."""
    release = write_synthetic_raw(tmp_path / "raw", tiny_config().synthetic, ["1000001", "1000002"], slices=6,
                                  progress=False)
    truth = release / "mask" / "1000002"  # lesion label 2, "invisible" label-4 patches on odd slices
    (tmp_path / "pred").mkdir()
    for path in truth.iterdir():
        labels = np.asarray(Image.open(path))
        assert set(np.unique(labels)) <= {0, 2, 4}
        prediction = Image.fromarray(np.isin(labels, (1, 2, 3, 5)).astype(np.uint8), "P")
        prediction.putpalette([0, 0, 0, 255, 255, 255])
        prediction.save(tmp_path / "pred" / path.name)
    report = perfect_evaluation(tmp_path / "pred", truth, tmp_path / "eval", capsys)
    assert report["lesion_dice"] == 1.0 and report["images"] == 6 and sum(r["tp"] for r in report["per_image"]) > 0


@pytest.mark.parametrize("content", ["all zero", "lesion"])
def test_a_1_bit_mask_slice_of_the_raw_release_is_read(tmp_path, capsys, content):
    """Case 3: a mode "1" mask slice ended in IndexError in raw.read_labels."""
    release = write_synthetic_raw(tmp_path / "raw", tiny_config().synthetic, ["1000001", "1000002", "1000003"],
                                  slices=6, progress=False)
    victim = next(p for p in sorted((release / "mask" / "1000002").iterdir())
                  if np.isin(np.asarray(Image.open(p)), (1, 2, 3, 5)).any())
    lesion = np.isin(np.asarray(Image.open(victim)), (1, 2, 3, 5))
    bits = lesion if content == "lesion" else np.zeros((64, 64), bool)
    Image.fromarray(bits).convert("1").save(victim)
    assert Image.open(victim).mode == "1"
    assert prepare(release, tmp_path / "shards") == 0, capsys.readouterr().err
    store = manifest(tmp_path / "shards")
    split = next(s for s, cases in store["source"]["cases"].items() if "1000002" in cases)
    record = next(r for r in shards.iter_records(str(tmp_path / "shards"), store, split)
                  if r["name"] == f"1000002_{victim.stem}")
    np.testing.assert_array_equal(shards.record_to_arrays(record)[1], bits.astype(np.uint8))
    assert store["splits"][split]["mask_values"] == "raw_labels"


@pytest.mark.parametrize("blank", ["valid", "train"])
def test_a_split_without_lesion_warns_at_prepare_and_stops_train(source, tmp_path, caplog, capsys, blank):
    """Case 7 (data side): a lesion-free validation split trained and ranked epochs without a word."""
    rewrite_masks(source, lambda lesion: Image.fromarray(np.zeros(lesion.shape, np.uint8)), splits=(blank,))
    store = tmp_path / "shards"
    caplog.set_level(logging.INFO)
    assert prepare(source, store) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"THE {blank.upper()} SPLIT HAS NO LESION PIXEL" in w for w in warnings), warnings
    assert fractions(store)[blank] == 0
    capsys.readouterr()
    assert main(["train", "--config", TINY, "--data", str(store), "--output", str(tmp_path / "runs"),
                 "--backend", "local"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"aisd-ray train: error: {store / 'manifest.json'}: the {blank} split has no lesion pixel")
    assert "data.allow_lesion_free_splits" in line and not (tmp_path / "runs").exists()

    allowed = tiny_config("data.allow_lesion_free_splits=true")
    shards.ShardStore.open(str(store), allowed)  # said to be intended: the store is accepted for training
    caplog.clear()
    assert prepare(source, tmp_path / "again", "data.allow_lesion_free_splits=true") == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
