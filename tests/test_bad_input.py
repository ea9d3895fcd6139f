"""Bad input ends with exit 2 and one line naming the file or key, and damages nothing.

Each case runs the CLI in-process against a copy of a tiny shard store (or run), then checks
the exit code, the message on stderr, and that nothing was written or broken."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aisd_ray.cli import main
from aisd_ray.config import builtin_config
from tests.conftest import one_error_line

TINY = str(builtin_config("tiny"))


@pytest.fixture
def store(parquet_store, tmp_path):
    """A private copy of the tiny Parquet store, free to break."""
    copy = tmp_path / "shards"
    shutil.copytree(parquet_store[1], copy)
    return copy


def train(shards, output, *sets):
    args = ["train", "--config", TINY, "--data", str(shards), "--output", str(output), "--backend", "local"]
    for item in sets:
        args += ["--set", item]
    return main(args)



def test_a_shard_with_flipped_bytes_is_named_before_training(store, tmp_path, capsys):
    victim = sorted((store / "train").iterdir())[0]
    data = bytearray(victim.read_bytes())
    data[100:164] = bytes(b ^ 0xFF for b in data[100:164])
    victim.write_bytes(bytes(data))
    assert train(store, tmp_path / "runs") == 2
    line = one_error_line(capsys)
    assert f"{victim}: shard checksum does not match the manifest" in line
    assert not (tmp_path / "runs").exists()  # nothing written: no run folder


def test_a_truncated_manifest_is_reported_and_prepare_rebuilds_it(store, synthetic_root, tmp_path, capsys):
    manifest = store / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    assert train(store, tmp_path / "runs") == 2
    assert "manifest.json: unreadable manifest (truncated or not JSON)" in one_error_line(capsys)
    assert main(["prepare", "--config", TINY, "--source", str(synthetic_root), "--output", str(store)]) == 0
    assert json.loads(manifest.read_text())["splits"]["train"]["records"] == 32


def test_shards_of_another_size_than_the_config(store, tmp_path, capsys):
    assert train(store, tmp_path / "runs", "model.image_width=128", "model.image_height=128") == 2
    line = one_error_line(capsys)
    assert "the shards hold 64x64x3 images but [model] image_height x image_width x image_channels is 128x128x3" in line
    assert not (tmp_path / "runs").exists()


def test_shards_with_other_colours_than_the_config(store, tmp_path, capsys):
    assert train(store, tmp_path / "runs", "data.rgb_map=[[0,0,0],[255,0,0]]") == 2
    assert "were categorised with rgb_map [[0, 0, 0], [255, 255, 255]]" in one_error_line(capsys)


def test_a_batch_larger_than_a_workers_share(store, tmp_path, capsys):
    assert train(store, tmp_path / "runs", "train.batch_size=64") == 2
    line = one_error_line(capsys)
    assert "[train] batch_size: 64 is more than a worker's share of the 32 training slices" in line
    assert not (tmp_path / "runs").exists()


def test_resume_with_another_model_is_refused_and_the_run_stays_usable(store, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert train(store, runs, "train.epochs=1") == 0
    config = (runs / "tiny" / "config.toml").read_text()
    capsys.readouterr()
    assert train(store, runs, "train.epochs=2", "model.base_filters=8") == 2
    line = one_error_line(capsys)
    assert "this run's checkpoints hold another model ([model] base_filters 4 -> 8)" in line
    assert (runs / "tiny" / "config.toml").read_text() == config  # the run is as it was
    assert train(tmp_path / "nowhere", runs, "model.base_filters=8") == 2  # a bad --data neither
    assert "nowhere/manifest.json: no manifest" in one_error_line(capsys)
    assert (runs / "tiny" / "config.toml").read_text() == config
    assert main(["export", "--run", str(runs / "tiny")]) == 0


def test_an_export_folder_without_its_saved_model(trained_run, tmp_path, capsys):
    broken = tmp_path / "export"
    shutil.copytree(trained_run[3], broken)
    shutil.rmtree(broken / "saved_model")
    assert main(["infer", "--model", str(broken), "--images", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert f"{broken / 'saved_model'}: missing; the export is incomplete" in one_error_line(capsys)


def test_evaluate_names_a_corrupt_test_shard(trained_run, store, tmp_path, capsys):
    victim = sorted((store / "test").iterdir())[-1]
    data = bytearray(victim.read_bytes())
    data[-40:-20] = bytes(20)
    victim.write_bytes(bytes(data))
    assert main(["evaluate", "--model", trained_run[3], "--data", str(store), "--output", str(tmp_path / "e")]) == 2
    assert f"{victim}: shard checksum does not match" in one_error_line(capsys)
    assert not Path(tmp_path / "e").exists()


def test_infer_stopped_by_a_bad_image_leaves_no_partial_folder(trained_run, synthetic_root, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((synthetic_root / "test" / "images").iterdir())[:6]:
        shutil.copy(path, images / path.name)
    (images / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    out = tmp_path / "masks"
    assert main(["infer", "--model", trained_run[3], "--images", str(images), "--output", str(out)]) == 2
    assert "zz_broken.png" in one_error_line(capsys)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".staging-")]
    (images / "zz_broken.png").unlink()
    assert main(["infer", "--model", trained_run[3], "--images", str(images), "--output", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 6 and len(list((out / "overlays").glob("*.png"))) == 6


def test_prepare_refuses_a_mask_in_another_palette_and_a_16_bit_image(synthetic_root, tmp_path, capsys):
    source = tmp_path / "AISD"
    shutil.copytree(synthetic_root, source)
    store = tmp_path / "shards"
    assert main(["prepare", "--config", TINY, "--source", str(source), "--output", str(store)]) == 0
    manifest = (store / "manifest.json").read_text()
    mask = sorted((source / "train" / "masks").iterdir())[3]
    red = np.asarray(Image.open(mask).convert("RGB")).copy()
    red[red.sum(-1) > 600] = (220, 20, 20)  # lesion drawn in red, rgb_map says white
    red[:4, :4] = (220, 20, 20)
    Image.fromarray(red).save(mask)
    assert main(["prepare", "--config", TINY, "--source", str(source), "--output", str(store)]) == 2
    line = one_error_line(capsys)
    assert f"{mask}: " in line and "pixels are farther than 64 from every rgb_map colour" in line
    assert "(220, 20, 20)" in line
    # the failed rewrite left the good store as it was: same manifest, every shard verifies
    assert (store / "manifest.json").read_text() == manifest
    from aisd_ray.data.store.shards import ShardStore

    ShardStore.open(str(store), checksums=True)
    shutil.copy(synthetic_root / "train" / "masks" / mask.name, mask)

    image = sorted((source / "valid" / "images").iterdir())[0]
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(image)
    assert main(["prepare", "--config", TINY, "--source", str(source), "--output", str(store)]) == 2
    assert f"{image}: " in (line := one_error_line(capsys)) and "more than 8 bits per pixel" in line


# --- configs and command lines -------------------------------------------------------------------


@pytest.mark.parametrize("content, named", [
    ("[model]\nimage_widht = 64\n", "image_widht"),  # a typo'd key
    ("[train]\nepochs = \"ten\"\n", "[train] epochs"),  # a wrong type
    ("[train]\nepochs = 0\n", "[train] epochs: must be >= 1"),  # out of range
    ("[nosuchsection]\nx = 1\n", "nosuchsection"),  # an unknown section
    ("[model\nimage_width = 64\n", "bad.toml"),  # not TOML
    ("[model]\nrgb_map = " + "[" * 2000 + "]" * 2000 + "\n", "bad.toml"),  # nesting that overflows a parser
    ("[data]\nrgb_map = [[0, 0, 0]]\n", "rgb_map"),  # one colour for two classes
])
def test_a_bad_config_file_names_its_key_and_writes_nothing(tmp_path, capsys, content, named):
    bad = tmp_path / "bad.toml"
    bad.write_text(content)
    out = tmp_path / "runs"
    assert main(["train", "--config", str(bad), "--data", str(tmp_path), "--output", str(out)]) == 2
    line = one_error_line(capsys)
    assert named in line and str(bad) in line
    assert not out.exists()


def test_an_original_ini_with_code_in_a_value_is_refused_not_run(tmp_path, capsys):
    ini = tmp_path / "train_eval_infer.config"
    ini.write_text("[model]\nimage_width = __import__('os').system('touch pwned')\n")
    assert main(["inspect", "--config", str(ini)]) == 2
    assert str(ini) in (line := one_error_line(capsys)) and "image_width" in line
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


@pytest.mark.parametrize("args, named", [
    (["--config", "no/such.toml"], "no/such.toml: config file not found"),
    (["--config", "nosuchname"], "nosuchname"),
    (["--set", "train.epochs"], "train.epochs"),  # no '='
    (["--set", "train.nosuchkey=1"], "train.nosuchkey"),
])
def test_bad_command_line_config_is_named(tmp_path, capsys, args, named):
    assert main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "runs"), *args]) == 2
    assert named in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


# --- sources ------------------------------------------------------------------------------------


def test_prepare_from_a_missing_source_folder(tmp_path, capsys):
    assert main(["prepare", "--config", TINY, "--source", str(tmp_path / "nope"), "--output", str(tmp_path / "s")]) == 2
    assert str(tmp_path / "nope") in one_error_line(capsys)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("damage", ["lonely image", "no masks folder", "garbage image", "mask of another size"])
def test_prepare_names_the_bad_source_file(synthetic_root, tmp_path, capsys, damage):
    source = tmp_path / "AISD"
    shutil.copytree(synthetic_root, source)
    images, masks = source / "valid" / "images", source / "valid" / "masks"
    victim = sorted(images.iterdir())[1]
    if damage == "lonely image":
        (masks / victim.name).unlink()
    elif damage == "no masks folder":
        shutil.rmtree(masks)
        victim = masks
    elif damage == "garbage image":
        victim.write_bytes(b"GIF89a but not really")
    else:
        victim = masks / victim.name
        Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(victim)
    out = tmp_path / "shards"
    assert main(["prepare", "--config", TINY, "--source", str(source), "--output", str(out)]) == 2
    assert str(victim) in one_error_line(capsys)
    assert not (out / "manifest.json").exists()


def test_prepare_names_a_raw_release_zip_that_is_not_a_zip(tmp_path, capsys):
    (tmp_path / "image.zip").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "mask.zip").write_bytes(b"")
    out = tmp_path / "shards"
    assert main(["prepare", "--config", TINY, "--source", str(tmp_path), "--output", str(out)]) == 2
    assert f"{tmp_path / 'image.zip'}: not a readable zip file" in one_error_line(capsys)
    assert not out.exists()


def test_prepare_names_a_raw_label_outside_0_to_5(tmp_path, capsys):
    from aisd_ray.data.synthetic.slices import write_synthetic_raw
    from tests.conftest import tiny_config

    write_synthetic_raw(tmp_path / "raw", tiny_config().synthetic, ["1000001", "1000002", "1000003"], slices=2,
                        progress=False)
    bad = tmp_path / "raw" / "mask" / "1000002" / "1.png"
    Image.fromarray(np.full((64, 64), 9, np.uint8)).save(bad)
    assert main(["prepare", "--config", TINY, "--source", str(tmp_path / "raw"), "--output", str(tmp_path / "s")]) == 2
    assert f"{bad}: label value 9 is outside 0..5" in one_error_line(capsys)
    assert not (tmp_path / "s" / "manifest.json").exists()


# --- shard stores -------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_missing_or_truncated_shard_is_named(store, tmp_path, capsys, damage):
    victim = sorted((store / "valid").iterdir())[0]
    if damage == "deleted":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:-10])
    assert train(store, tmp_path / "runs") == 2
    assert str(victim) in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("edit, named", [
    (lambda m: m.update(format_version=99), "format_version 99 is not"),
    (lambda m: m.pop("splits"), "manifest.json"),
    (lambda m: m["splits"].pop("train"), "train"),
])
def test_a_manifest_that_is_json_but_not_ours(store, tmp_path, capsys, edit, named):
    manifest = json.loads((store / "manifest.json").read_text())
    edit(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))
    assert train(store, tmp_path / "runs") == 2
    assert named in (line := one_error_line(capsys)) and str(store) in line
    assert not (tmp_path / "runs").exists()


# --- outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only", "s3"])
def test_an_output_that_cannot_be_written_is_named(store, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    output = {"a file": str(blocker), "under a file": str(blocker / "runs"), "read-only": "/proc/aisd-ray-runs",
              "s3": "s3://bucket/runs"}[where]
    assert train(store, output) == 2
    line = one_error_line(capsys)
    assert (output if where != "a file" else str(blocker)) in line, line
    assert blocker.read_text() == "not a folder"


# --- runs and exports ---------------------------------------------------------------------------


def test_export_of_a_missing_run_or_a_run_without_checkpoints(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope" / "config.toml") in one_error_line(capsys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(Path(TINY).read_text())
    assert main(["export", "--run", str(run)]) == 2
    assert f"{run}: no checkpoints found" in one_error_line(capsys)
    assert not (run / "export").exists()


def test_a_checkpoint_copied_half_way_is_not_taken(trained_run, tmp_path, capsys):
    from aisd_ray.train import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(trained_run[2], run)
    latest = ckpt.list_checkpoints(str(run))[-1][0]
    Path(latest, ckpt.WEIGHTS).write_bytes(Path(latest, ckpt.WEIGHTS).read_bytes()[:1000])  # a short copy
    assert latest not in [uri for uri, _ in ckpt.list_checkpoints(str(run))]
    for folder in run.glob("checkpoint_*"):
        (folder / ckpt.CHECKPOINT_INFO).unlink(missing_ok=True)  # no checkpoint finished copying
    assert main(["export", "--run", str(run)]) == 2
    assert f"{run}: no checkpoints found" in one_error_line(capsys)


def test_an_export_that_was_not_written_to_the_end(trained_run, tmp_path, capsys):
    broken = tmp_path / "export"
    shutil.copytree(trained_run[3], broken)
    (broken / ".complete").unlink()
    assert main(["infer", "--model", str(broken), "--images", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert f"{broken / '.complete'}: missing; the export was not written to the end" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_infer_with_a_missing_model_or_an_empty_image_folder(trained_run, tmp_path, capsys):
    assert main(["infer", "--model", str(tmp_path / "nope"), "--images", str(tmp_path), "--output",
                 str(tmp_path / "o")]) == 2
    assert str(tmp_path / "nope") in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["infer", "--model", trained_run[3], "--images", str(tmp_path / "empty"), "--output",
                 str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'empty'}: no images (.png, .jpg, ...), DICOM series or NIfTI files found" in \
        one_error_line(capsys)
    assert not (tmp_path / "o").exists()
    (tmp_path / "notes.txt").write_text("not a scan\n")
    for given, line in ((tmp_path / "nope.nii.gz", "not found"), (tmp_path / "notes.txt", "neither a DICOM series (a "
                        "folder, or an enhanced CT file), a NIfTI file nor a folder of images")):
        assert main(["infer", "--model", trained_run[3], "--input", str(given), "--output", str(tmp_path / "o")]) == 2
        assert one_error_line(capsys) == f"aisd-ray infer: error: {given}: {line}"
        assert not (tmp_path / "o").exists()


def test_evaluate_an_export_on_shards_of_another_size(trained_run, synthetic_root, tmp_path, capsys):
    big = tmp_path / "shards96"
    assert main(["prepare", "--config", TINY, "--source", str(synthetic_root), "--output", str(big),
                 "--set", "model.image_width=96", "--set", "model.image_height=96"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", trained_run[3], "--data", str(big), "--output", str(tmp_path / "e")]) == 2
    assert "the shards hold 96x96x3 images but the export" in one_error_line(capsys)
    assert not (tmp_path / "e").exists()


def test_evaluate_a_split_the_store_does_not_have(trained_run, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["evaluate", "--model", trained_run[3], "--data", trained_run[1], "--split", "tset",
                 "--output", str(out)]) == 2
    assert "tset" in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("names, culprit", [
    ("['background', 'lesion', 'core']", "'lesion' names every foreground class together"),
    ("['background', 'core', 'core']", "names a class twice"),
    ("['background', 'penumbra', 'core infarct']", "'core infarct': a name is a metric key"),
])
def test_class_names_that_cannot_key_per_class_metrics_are_refused(names, culprit, tmp_path, capsys):
    """With several foreground classes every metric is reported per class under its name: a name
    that would collide with the combined 'lesion' keys, another class's, or a file name is refused."""
    code = main(["prepare", "--config", TINY, "--source", str(tmp_path), "--output", str(tmp_path / "out"),
                 "--set", "model.num_classes=3", "--set", "data.rgb_map=[[0,0,0],[0,255,0],[255,0,0]]",
                 "--set", f"data.class_names={names}"])
    line = one_error_line(capsys)
    assert code == 2 and "class_names" in line and culprit in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting, named", [
    ("train.placement_strategy='PACKED'",
     "[train] placement_strategy: must be one of ('PACK', 'SPREAD', 'STRICT_PACK', 'STRICT_SPREAD'), got 'PACKED'"),
    ("run.shared_filesystem='yes'", "run.shared_filesystem"),
])
def test_a_bad_placement_strategy_or_shared_filesystem_value_is_named(store, tmp_path, capsys, setting, named):
    """Issue 20's two keys are checked with the config, before Ray or TensorFlow load."""
    assert train(store, tmp_path / "runs", setting) == 2
    assert named in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()
