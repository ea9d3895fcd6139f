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


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


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
    from aisd_ray.data.shards import ShardStore

    ShardStore.open(str(store), checksums=True)
    shutil.copy(synthetic_root / "train" / "masks" / mask.name, mask)

    image = sorted((source / "valid" / "images").iterdir())[0]
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(image)
    assert main(["prepare", "--config", TINY, "--source", str(source), "--output", str(store)]) == 2
    assert f"{image}: " in (line := one_error_line(capsys)) and "more than 8 bits per pixel" in line
