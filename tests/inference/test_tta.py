"""Mirroring test-time augmentation on a real export: symmetric under the mirror, not the plain
prediction, chosen per config (eval.tta, --tta/--no-tta) and recorded in metrics.json."""

import json
from pathlib import Path

import numpy as np
import pytest

from aisd_ray.data.store import shards
from aisd_ray.evaluation.evaluate import evaluate_export
from aisd_ray.inference.export import LoadedExport


def _test_images(shards_uri, n=4):
    store = shards.ShardStore.open(shards_uri)
    records = [r for _, r in zip(range(n), shards.iter_records(shards_uri, store.manifest, "test"))]
    return np.stack([shards.record_to_arrays(r)[0] for r in records])


def test_tta_is_symmetric_under_the_mirror_and_not_the_plain_prediction(trained_run):
    _, shards_uri, _, export_uri = trained_run
    images = _test_images(shards_uri)
    mirrored = images[:, :, ::-1]
    model = LoadedExport(export_uri, tta=False)
    tta = model.predict(images, tta=True)["probabilities"].numpy()
    tta_of_mirror = model.predict(mirrored, tta=True)["probabilities"].numpy()
    assert tta.shape == images.shape[:3] + (2,) and tta.dtype == np.float32
    np.testing.assert_allclose(tta, tta_of_mirror[:, :, ::-1], atol=1e-5)
    plain = model.predict(images)["probabilities"].numpy()
    mirror_plain = model.predict(mirrored)["probabilities"].numpy()[:, :, ::-1]
    np.testing.assert_allclose(tta, (plain + mirror_plain) / 2, atol=1e-5)  # the mean of the two
    assert np.abs(tta - plain).max() > 1e-3  # the network is not mirror-symmetric
    np.testing.assert_allclose(tta.sum(-1), 1.0, atol=1e-5)
    labels = model.predict(images, tta=True)["labels"].numpy()
    assert labels.dtype == np.uint8 and np.array_equal(labels, np.argmax(tta, -1))
    # the object's default, and the float signature, follow the same rule
    on = LoadedExport(export_uri, tta=True)
    np.testing.assert_allclose(on.predict(images)["probabilities"].numpy(), tta, atol=1e-6)
    np.testing.assert_allclose(on.predict_float(images.astype(np.float32))["probabilities"].numpy(), tta, atol=1e-5)
    np.testing.assert_allclose(on.predict(images, tta=False)["probabilities"].numpy(), plain, atol=1e-6)


def test_evaluation_records_whether_tta_was_used(trained_run, tmp_path, capsys):
    from aisd_ray.cli import main

    _, shards_uri, _, export_uri = trained_run
    figures = {}
    for flag in ("--tta", "--no-tta"):
        out = tmp_path / flag
        assert main(["evaluate", "--model", export_uri, "--data", shards_uri, "--output", str(out),
                     "--no-overlays", flag]) == 0
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["tta"] is (flag == "--tta")
        assert saved["postprocessing"]["rule"] == "none"  # the fixture's export has no choice
        figures[flag] = saved["lesion_dice"]
        assert f"tta {'on' if flag == '--tta' else 'off'}; case volumes post-processed: none" in capsys.readouterr().out
    plain = evaluate_export(export_uri, shards_uri, str(tmp_path / "default"), overlays=False, progress=False)
    # without a flag, as the export records it: the tiny config's eval.tta, the default (on)
    assert plain["tta"] is True and plain["lesion_dice"] == pytest.approx(figures["--tta"])


def test_an_export_predicts_with_the_tta_its_training_config_chose_unless_told(trained_run, tmp_path, capsys):
    """export.json records eval.tta; evaluate and infer use it when neither --tta nor --no-tta is given."""
    import shutil

    from aisd_ray.cli import main

    _, shards_uri, _, export_uri = trained_run
    assert json.loads((Path(export_uri) / "export.json").read_text())["tta"] is True  # eval.tta's default
    chosen = tmp_path / "export-no-tta"
    shutil.copytree(export_uri, chosen)
    info = json.loads((chosen / "export.json").read_text())
    (chosen / "export.json").write_text(json.dumps({**info, "tta": False}))  # as trained with eval.tta = false
    assert LoadedExport(str(chosen)).tta is False and LoadedExport(str(chosen), tta=True).tta is True
    for flags, expected in (([], False), (["--tta"], True)):
        out = tmp_path / f"eval{len(flags)}"
        assert main(["evaluate", "--model", str(chosen), "--data", shards_uri, "--output", str(out),
                     "--no-overlays", *flags]) == 0
        assert json.loads((out / "metrics.json").read_text())["tta"] is expected
