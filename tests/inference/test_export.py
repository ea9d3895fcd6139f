import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from aisd_ray.inference.export import INFO, KERAS_FILE, SAVED_MODEL, LoadedExport, model_from_checkpoint
from aisd_ray.train import checkpoint as ckpt
from tests.helpers import copy_export


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
    nothing written. (Three different members against their mean: tests/studies/test_crossval.py.)"""
    import shutil

    from aisd_ray.inference.export import LoadedExport, write_ensemble

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


# What an export was trained on (input_kind.py): the kind of input and the training domain, carried
# from the store's manifest through the run's record into export.json.

@pytest.fixture(scope="module")
def ct_run(tmp_path_factory):
    """A 1-epoch local run on a tiny nnU-Net store of CT volumes, whose manifest carries the training
    domain prepare computed, and its export: (config, shards, manifest, run, export)."""
    from aisd_ray import stages
    from aisd_ray.data.store.prepare import prepare
    from aisd_ray.data.synthetic.layouts import write_synthetic
    from tests.conftest import volume_config

    root = tmp_path_factory.mktemp("ct-run")
    cfg = volume_config("nnunet", 8, 1, 64, 4, "train.epochs=1", "train.backend='local'")
    cfg.data.source_dir = str(write_synthetic(root / "src", cfg.synthetic, progress=False))
    shards = str(root / "shards")
    manifest = prepare(cfg, shards, progress=False)
    assert manifest["source"]["domain"]
    stages.train(cfg, shards, str(root / "runs"))
    run = stages.run_uri(cfg, str(root / "runs"))
    return cfg, shards, manifest, run, stages.export(run)[0]


def test_an_export_records_the_kind_of_input_it_was_trained_on_8bit_slices(trained_run):
    """trained_run's store holds the synthetic PNG slices: 8-bit, windowed once by their maker."""
    run, export_uri = trained_run[2], trained_run[3]
    info = json.loads((Path(export_uri) / INFO).read_text())
    assert info["input"] == {"kind": "slices_8bit"} and "domain" not in info
    assert json.loads((Path(run) / "training_input.json").read_text()) == {"input": {"kind": "slices_8bit"}}
    model = LoadedExport(export_uri)
    assert model.input_kind == "slices_8bit" and model.domain is None


def test_an_export_of_ct_volumes_records_their_windows_channels_and_domain(ct_run):
    _, _, manifest, run, export_uri = ct_run
    source = manifest["source"]
    info = json.loads((Path(export_uri) / INFO).read_text())
    assert info["input"] == {"kind": "ct_hu", "windows": source["windows"], "channels": source["channels"]}
    assert info["domain"] == source["domain"]
    model = LoadedExport(export_uri)
    assert model.input_kind == "ct_hu" and model.input == info["input"] and model.domain == source["domain"]


def test_an_ensembles_domain_is_its_members_union_and_its_input_their_common_one(ct_run, trained_run, tmp_path):
    from aisd_ray.inference.export import ENSEMBLE, write_ensemble

    export_uri, domain = ct_run[4], ct_run[2]["source"]["domain"]
    # the union needs members with different domains; a second trained export on a second store would
    # cost minutes, so the second member is a copy whose domain is derived from the first: each range
    # moved down (its low end below the first's, its high end inside it), so the union takes its low
    # ends from the copy and its high ends from the original
    other_domain = {k: [v[0] - 1 - (v[1] - v[0]), (v[0] + v[1]) / 2] for k, v in domain.items() if k != "cases"}
    other_domain["cases"] = domain["cases"] + 2
    other = copy_export(export_uri, tmp_path / "other", domain=other_domain)
    ensemble = LoadedExport(write_ensemble([export_uri, other], str(tmp_path / "ensemble")))
    want = {k: [other_domain[k][0], domain[k][1]] for k in domain if k != "cases"}
    assert ensemble.domain == {**want, "cases": domain["cases"] + other_domain["cases"]}
    assert ensemble.input_kind == "ct_hu" and ensemble.input == LoadedExport(export_uri).input
    assert json.loads((tmp_path / "ensemble" / ENSEMBLE).read_text())["domain"] == ensemble.domain

    # a member without a domain: nothing can be said of the union
    bare = copy_export(export_uri, tmp_path / "bare", domain=None)
    assert LoadedExport(write_ensemble([export_uri, bare], str(tmp_path / "partial"))).domain is None

    # members trained on other kinds of input are refused, naming the difference, nothing written
    with pytest.raises(ValueError, match=r"differs from .* in input;"):
        write_ensemble([export_uri, trained_run[3]], str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()


def test_exports_and_ensembles_from_before_the_record_still_load_as_unknown(ct_run, tmp_path):
    from aisd_ray.inference.export import ENSEMBLE, write_ensemble

    old = copy_export(ct_run[4], tmp_path / "old", input=None, domain=None)
    model = LoadedExport(old)
    assert model.input is None and model.input_kind == "unknown" and model.domain is None
    ensemble = write_ensemble([old, old], str(tmp_path / "ensemble"))
    info = json.loads((tmp_path / "ensemble" / ENSEMBLE).read_text())
    del info["input"]  # as ensemble.json was written before "input" was a shared key
    (tmp_path / "ensemble" / ENSEMBLE).write_text(json.dumps(info))
    both = LoadedExport(ensemble)
    assert both.members == 2 and both.input_kind == "unknown" and both.domain is None


def test_evaluate_applies_infers_rule_to_a_store_of_the_other_kind(ct_run, trained_run, tmp_path, caplog):
    """A CT store under the 8-bit slices export and a PNG store under the one grey window CT export
    are scored with one QA warning line each; a PNG store under an export of three HU windows is
    refused in one line naming the store's manifest, nothing written (infer's rule: test_infer.py)."""
    from aisd_ray.config import builtin_config, load_config
    from aisd_ray.data.sources.layout import DataError
    from aisd_ray.evaluation.evaluate import evaluate_export
    from aisd_ray.inference.export import export_model
    from aisd_ray.model.flexunet import build_flexunet

    png_shards, ct_shards = trained_run[1], ct_run[1]
    with caplog.at_level("WARNING", logger="aisd_ray"):
        evaluate_export(trained_run[3], ct_shards, str(tmp_path / "ct-under-png"), progress=False, overlays=False)
        evaluate_export(ct_run[4], png_shards, str(tmp_path / "png-under-ct"), progress=False, overlays=False)
    warnings = [r.getMessage() for r in caplog.records if "QA input_kind:" in r.getMessage()]
    assert len(warnings) == 2
    assert "manifest.json: QA input_kind: CT volumes in HU given to the export" in warnings[0]
    assert "manifest.json: QA input_kind: 8-bit image slices given to the export" in warnings[1]

    cfg = load_config(builtin_config("tiny"), ["data.channels='windows'",
                                               "data.windows=[[40, 80], [35, 30], [40, 400]]"])
    three = export_model(cfg, build_flexunet(cfg.model), str(tmp_path / "three"),
                         {"input": {"kind": "ct_hu", "windows": [list(map(float, w)) for w in cfg.data.windows],
                                    "channels": "windows"}})
    with pytest.raises(DataError, match=r"manifest.json: 8-bit image slices, but the export .*three expects CT "
                                        r"volumes in HU, made into channels 'windows' through the window\(s\) "
                                        r"\(40, 80\), \(35, 30\), \(40, 400\) HU"):
        evaluate_export(three, png_shards, str(tmp_path / "refused"), progress=False)
    assert not (tmp_path / "refused").exists()
