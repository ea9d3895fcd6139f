import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from aisd_ray.export import INFO, KERAS_FILE, SAVED_MODEL, LoadedExport, model_from_checkpoint
from aisd_ray.train import checkpoint as ckpt


def test_export_is_the_best_checkpoint(trained_run):
    cfg, _, run, export_uri = trained_run
    info = json.loads((Path(export_uri) / INFO).read_text())
    best_uri, best_metrics = ckpt.best_checkpoint(run)
    assert info["checkpoint"] == best_uri
    scores = [s.history[-1]["val_lesion_dice"] for _, s in ckpt.list_checkpoints(run)]
    assert info["validation"]["val_lesion_dice"] == max(scores)
    assert info["image"] == {"height": 64, "width": 64, "channels": 3}
    assert info["rgb_map"] == [[0, 0, 0], [255, 255, 255]] and info["class_names"] == ["background", "lesion"]
    assert info["provenance"]["packages"]["keras"] and info["provenance"]["config_sha256"]


def test_reloaded_savedmodel_predicts_like_the_keras_model(trained_run):
    cfg, _, run, export_uri = trained_run
    keras_model = model_from_checkpoint(cfg, ckpt.best_checkpoint(run)[0])
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    want = keras_model(images.astype(np.float32), training=False).numpy()
    got = LoadedExport(export_uri, tta=False).predict(images)  # the signature itself
    np.testing.assert_allclose(got["probabilities"].numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["labels"].numpy(), np.argmax(want, -1))
    assert got["labels"].dtype == tf.uint8

    import keras

    reloaded = keras.saving.load_model(Path(export_uri) / KERAS_FILE)
    np.testing.assert_allclose(reloaded(images.astype(np.float32)).numpy(), want, rtol=1e-5, atol=1e-6)


def test_signature_is_documented_and_typed(trained_run):
    export_uri = trained_run[3]
    fn = tf.saved_model.load(str(Path(export_uri) / SAVED_MODEL)).signatures["serving_default"]
    spec = fn.structured_input_signature[1]["image"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 64, 64, 3]
    assert set(fn.structured_outputs) == {"probabilities", "labels"}


def test_an_ensemble_averages_its_members_and_refuses_members_that_differ(trained_run, tmp_path):
    """The ensemble of an export with itself predicts exactly like it (with and without TTA), its
    postprocess.json travels with it, and a member that takes other windows is refused by name with
    nothing written. (Three different members against their mean: tests/test_crossval.py.)"""
    import shutil

    from aisd_ray.export import LoadedExport, write_ensemble

    export_uri = trained_run[3]
    choice = {"rule": "keep_largest", "min_ml": None, "min_voxels": None}
    ensemble = write_ensemble([export_uri, export_uri], str(tmp_path / "ensemble"), choice, {"folds": 2})
    single, both = LoadedExport(export_uri), LoadedExport(ensemble)
    assert both.members == 2 and single.members == 1 and both.postprocess["rule"] == "keep_largest"
    batch = np.random.default_rng(1).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(both.predict(batch)["probabilities"].numpy(),
                               single.predict(batch)["probabilities"].numpy(), atol=1e-6)
    np.testing.assert_allclose(both.predict(batch, tta=True)["probabilities"].numpy(),
                               single.predict(batch, tta=True)["probabilities"].numpy(), atol=1e-6)
    assert (tmp_path / "ensemble" / "fold_1" / "saved_model").is_dir()

    other = tmp_path / "other"
    shutil.copytree(export_uri, other)
    info = json.loads((other / "export.json").read_text())
    (other / "export.json").write_text(json.dumps({**info, "windows": [[35, 30]]}))
    with pytest.raises(ValueError, match="other: differs from .* in windows"):
        write_ensemble([export_uri, str(other)], str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
