"""The best checkpoint as a TensorFlow SavedModel that needs nothing else to serve.

Layout of an export folder:

- ``saved_model/``: signature ``serving_default``: ``image`` uint8 (N, H, W, C) ->
  ``probabilities`` float32 (N, H, W, num_classes) and ``labels`` uint8 (N, H, W) class ids;
  ``serving_float32`` takes the same pixels (0..255) as float32. The exported network always
  computes in float32, whatever precision it was trained in;
- ``model.keras``: the same network for Keras users;
- ``export.json``: input size, channels, class names, rgb_map, the source checkpoint and its
  validation metrics, the full config and its provenance (package versions, git commit, config
  hash, machine), so ``aisd-ray infer`` needs only this folder; ``input``, the kind of input it was
  trained on ({"kind": "ct_hu", "windows": [[level, width], ...] HU, "channels": mode} for CT
  volumes, {"kind": "slices_8bit"} for 8-bit slices: ``input_kind.py``, which says what else it
  may be given), and ``domain``, the ranges of what its training cases were ({name: [lo, hi],
  "cases": n}, from the store's manifest), both as its run recorded its store; an export from a
  run that recorded neither has neither (``LoadedExport.input_kind`` "unknown", ``domain`` None);
- ``.complete``: written last; a folder without it is an interrupted export and is refused.

An *ensemble* export (``crossval``'s, ``write_ensemble``) is a folder of member exports
(``fold_0/`` ... each as above) with ``ensemble.json`` in place of ``export.json`` (the members'
common input size, channels, windows, input kind and classes, the union of their domains, the
member folders, the cross-validation's figures) and its own ``postprocess.json`` and ``.complete``.
``LoadedExport`` takes either kind: an ensemble's prediction is the mean of its members' softmax
probabilities (nnU-Net's ensembling of fold models), its labels their argmax.

``calibration.json`` (either kind, written by ``evaluation/calibrate.py`` when an export is made
from a run with a store, or by ``crossval`` for its ensemble): the temperature T fitted on
validation voxels (``scoring/calibration.py``), what it was fitted on, NLL and ECE before and after,
the uncertainty measure and the review threshold. ``LoadedExport`` divides each forward pass's
logits by T (softmax(log p / T), p the SavedModel's softmax) before TTA and ensemble averaging; an
export without it: T = 1 and no review threshold.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import keras
import tensorflow as tf

from aisd_ray.config import Config, DataConfig, config_from_dict
from aisd_ray.core import provenance, storage
from aisd_ray.data.ct import qa
from aisd_ray.inference import input_kind, postprocess
from aisd_ray.model.flexunet import build_flexunet
from aisd_ray.scoring import calibration as calib
from aisd_ray.train import checkpoint as ckpt

log = logging.getLogger(__name__)
SAVED_MODEL = "saved_model"
KERAS_FILE = "model.keras"
INFO = "export.json"
ENSEMBLE = "ensemble.json"
# what every member of an ensemble must share, as export.json gives it ("input" absent from all
# the members of an ensemble written before it existed, and from its ensemble.json: still equal)
SHARED_KEYS = ("image", "num_classes", "class_names", "rgb_map", "windows", "channels", "input")
SIGNATURE = "serving_default"
FLOAT_SIGNATURE = "serving_float32"
CALIBRATION = "calibration.json"


def read_calibration(folder, uri: str) -> dict[str, Any] | None:
    """The export's ``CALIBRATION`` record (local ``folder``); None when it has none. ValueError
    naming the file for a temperature that is not a positive number."""
    path = folder / CALIBRATION
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    t = record.get("temperature")
    if not isinstance(t, (int, float)) or not t > 0 or t != t:
        raise ValueError(f"{storage.join(uri, CALIBRATION)}: temperature {t!r} is not a positive number")
    return record


def model_from_checkpoint(cfg: Config, checkpoint_uri: str) -> keras.Model:
    """The float32 FlexUNet of ``cfg.model`` with the checkpoint's weights (also a mixed-precision
    run's). ``checkpoint.CheckpointError`` naming the weights file when it does not load or holds
    a non-finite value."""
    model = build_flexunet(cfg.model)
    with storage.local_copy(checkpoint_uri) as folder:
        ckpt.load_weights(model, folder, checkpoint_uri)
    return model


def export_model(cfg: Config, model: keras.Model, out_uri: str, extra: dict[str, Any] | None = None) -> str:
    """Write the export folder atomically (it appears only once complete)."""
    m = cfg.model
    shape = (None, m.image_height, m.image_width, m.image_channels)

    def serve(image):
        probabilities = model(tf.cast(image, tf.float32), training=False)
        labels = tf.cast(tf.argmax(probabilities, axis=-1), tf.uint8)
        return {"probabilities": probabilities, "labels": labels}

    with storage.staged_dir(out_uri) as folder:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(SIGNATURE, serve, input_signature=[tf.TensorSpec(shape, tf.uint8, name="image")])
        archive.add_endpoint(FLOAT_SIGNATURE, serve, input_signature=[tf.TensorSpec(shape, tf.float32, name="image")])
        archive.write_out(str(folder / SAVED_MODEL), verbose=False)
        model.save(folder / KERAS_FILE)
        info = {
            "signature": {"name": SIGNATURE, "input": "image uint8 [N,H,W,C] raw pixels 0..255",
                          "float_variant": f"{FLOAT_SIGNATURE}: the same image as float32",
                          "outputs": {"probabilities": "float32 [N,H,W,num_classes] softmax",
                                      "labels": "uint8 [N,H,W] class ids"}},
            "image": {"height": m.image_height, "width": m.image_width, "channels": m.image_channels},
            "num_classes": m.num_classes, "class_names": list(cfg.data.class_names),
            "rgb_map": [list(c) for c in cfg.data.rgb_map],
            "windows": [list(w) for w in cfg.data.windows],  # HU (level, width): how CT volumes become input
            "channels": cfg.data.channels,  # what the channels hold (data.channels); image.channels counts them
            "tta": cfg.eval.tta,  # mirroring TTA by default when this export predicts (eval.tta of its training)
            "brain_mask": cfg.eval.brain_mask,  # lesions outside the brain removed by default (brain_mask.py)
            "parameters": int(model.count_params()),
            **(extra or {}),
            "config": cfg.to_dict(),
            "provenance": provenance.facts(cfg.to_toml()),
        }
        (folder / INFO).write_text(json.dumps(info, indent=2, default=str))
    return out_uri


def export_best(cfg: Config, run_uri: str, out_uri: str) -> tuple[str, dict[str, Any]]:
    """Export the run's best candidate checkpoint (``checkpoint.ranked``: the best validation lesion
    Dice of an epoch with finite losses and weights, the earlier epoch on a tie) that loads; the
    checkpoint's uri and its epoch's figures. A better one whose weights do not load is skipped
    with one warning naming it. The run's record of its store (``input_kind.RUN_RECORD``) gives the
    export its ``input`` and ``domain``. FileNotFoundError for a run without checkpoints;
    ``checkpoint.CheckpointError`` naming the run when none is a candidate or none loads."""
    found = ckpt.list_checkpoints(run_uri)
    if not found:
        raise FileNotFoundError(f"{run_uri}: no checkpoints found; train first")
    candidates = ckpt.ranked(found)
    if not candidates:
        raise ckpt.no_candidate(run_uri, found)
    skipped = []
    for checkpoint_uri, state in candidates:
        try:
            model = model_from_checkpoint(cfg, checkpoint_uri)
        except ckpt.CheckpointError as exc:
            skipped.append(str(exc))
            continue
        metrics = state.history[-1]
        if skipped:
            log.warning("%s; exporting %s (epoch %d, the best that loads) instead", "; ".join(skipped),
                        checkpoint_uri, state.epoch)
        export_model(cfg, model, out_uri, {"checkpoint": checkpoint_uri, "validation": metrics,
                                           **input_kind.read_run_record(run_uri)})
        return checkpoint_uri, metrics
    raise ckpt.CheckpointError(f"{run_uri}: no candidate checkpoint loads: {'; '.join(skipped)}")


def write_ensemble(member_uris: list[str], out_uri: str, choice: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None) -> str:
    """Write an ensemble export (see the module) of the exports ``member_uris`` to ``out_uri``,
    atomically: each member copied whole into ``fold_<i>/``, ``ensemble.json``, ``postprocess.json``
    (``choice``, when given) and ``.complete`` last. ``extra``: more for ``ensemble.json`` (its
    ``tta`` default: every member's recorded ``tta``; its ``config``: the first member's). Its
    ``domain``: the union of the members' (``qa.union_domain``), absent when one has none.
    ValueError when the members disagree on what they take or give (``SHARED_KEYS``);
    FileNotFoundError for an incomplete member."""
    infos = []
    for uri in member_uris:
        if not storage.exists(storage.join(uri, storage.COMPLETE)):
            raise FileNotFoundError(f"{storage.join(uri, storage.COMPLETE)}: missing; the member export is incomplete")
        infos.append(json.loads(storage.read_bytes(storage.join(uri, INFO))))
    for uri, info in zip(member_uris[1:], infos[1:]):
        differ = [k for k in SHARED_KEYS if info.get(k) != infos[0].get(k)]
        if differ:
            raise ValueError(f"{uri}: differs from {member_uris[0]} in {', '.join(differ)}; an ensemble's members "
                             "must take the same input and give the same classes")
    names = [f"fold_{i}" for i in range(len(member_uris))]
    with storage.staged_dir(out_uri) as folder:
        for name, uri in zip(names, member_uris):
            storage.download_tree(uri, folder / name)
        config = extra.get("config") if extra and "config" in extra else infos[0].get("config", {})
        info = {"kind": "ensemble", "members": names, "combine": "mean of the members' softmax probabilities",
                **{k: infos[0].get(k) for k in SHARED_KEYS},
                "tta": all(i.get("tta", False) for i in infos),  # the members' own default, unless extra says
                "brain_mask": all(i.get("brain_mask", True) for i in infos),
                **_present(domain=_union([i.get("domain") for i in infos])),
                **(extra or {}), "provenance": provenance.facts(config_from_dict(config).to_toml())}
        (folder / ENSEMBLE).write_text(json.dumps(info, indent=2, default=str))
        if choice is not None:
            (folder / postprocess.FILE).write_text(json.dumps(postprocess.check(choice, out_uri), indent=2))
    return out_uri


def _union(domains: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """An ensemble's training domain: ``qa.union_domain`` of its members'; None when one has none
    (nothing can then be said of the union)."""
    return qa.union_domain(domains) if domains and all(domains) else None


def _present(**values) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _member(folder, uri: str) -> tuple[dict[str, Any], Any]:
    """(export.json, the loaded SavedModel) of the export in local ``folder`` (``uri``: its name for
    errors); FileNotFoundError naming what is missing."""
    info_path = folder / INFO
    if not info_path.is_file():
        raise FileNotFoundError(f"{uri}: not an aisd-ray export (no {INFO} or {ENSEMBLE})")
    if not (folder / SAVED_MODEL).is_dir():
        raise FileNotFoundError(f"{storage.join(uri, SAVED_MODEL)}: missing; the export is incomplete, "
                                "export the run again")
    if not (folder / storage.COMPLETE).is_file():
        raise FileNotFoundError(f"{storage.join(uri, storage.COMPLETE)}: missing; the export was not written "
                                "to the end (interrupted?), export the run again")
    return json.loads(info_path.read_text()), tf.saved_model.load(str(folder / SAVED_MODEL))


class LoadedExport:
    """An export folder loaded for inference: the SavedModel signature and its metadata; or an
    ensemble export (the module), whose members' probabilities are averaged.

    Test-time augmentation lives here, not in the SavedModel, whose signatures stay plain (one
    forward pass): with ``tta`` (this object's default, or ``predict``'s argument) a prediction is
    nnU-Net's mirroring restricted to the axial slice's left-right axis: the softmax probabilities
    of the image and of its mirror (width axis flipped, predicted, flipped back) averaged, the labels
    their argmax. Twice the compute (an ensemble of K: 2K forward passes). The export records its
    training config's ``eval.tta`` as ``tta``: the default here, which ``tta`` (``--tta``/``--no-tta``
    of ``evaluate --model`` and ``infer``) overrides.

    ``postprocess``: the export's post-processing choice (``postprocess.json``, written by
    ``evaluate --choose-postprocessing`` or ``crossval``; ``postprocess.NONE`` when absent), which
    the per-case 3-D scoring and ``infer`` of CT patients apply; the network's predictions here are
    never altered.

    ``input``, ``input_kind`` and ``domain``: what it was trained on (the module), None, "unknown"
    and None for an export from before they were recorded.

    ``brain_mask``: whether ``infer`` and ``evaluate`` remove lesion voxels outside the brain
    (``brain_mask.py``; export.json ``brain_mask``, its training config's ``eval.brain_mask``). An
    export from before it was recorded: True, the default of every export since: the step removes
    only what lies outside the skull's intracranial space, where no lesion of any training could be,
    and each output says what it removed (``--no-brain-mask`` gives the older outputs back).

    ``calibration``: the export's ``calibration.json`` (None without), ``temperature`` its T (1.0
    without), applied to each pass's logits (the module); ``measure``: which case of the
    uncertainty measure applies (``calibration.MEASURES``)."""

    def __init__(self, uri: str, tta: bool | None = None):
        self.uri = uri
        self._copy = storage.local_copy(uri)
        folder = self._copy.__enter__()
        if (folder / ENSEMBLE).is_file():
            if not (folder / storage.COMPLETE).is_file():
                raise FileNotFoundError(f"{storage.join(uri, storage.COMPLETE)}: missing; the ensemble was not "
                                        "written to the end (interrupted?), rerun crossval")
            self.info = json.loads((folder / ENSEMBLE).read_text())
            members = [_member(folder / name, storage.join(uri, name)) for name in self.info["members"]]
            for name, (info, _) in zip(self.info["members"], members):
                differ = [k for k in SHARED_KEYS if info.get(k) != self.info.get(k)]
                if differ:
                    raise ValueError(f"{storage.join(uri, name, INFO)}: differs from {ENSEMBLE} in {', '.join(differ)}")
        else:
            members = [_member(folder, uri)]
            self.info = members[0][0]
        self.members = len(members)
        # the caller's choice, else the export's own (export.json / ensemble.json "tta", from eval.tta)
        self.tta = bool(self.info.get("tta", False)) if tta is None else bool(tta)
        self.brain_mask = bool(self.info.get("brain_mask", True))
        self.postprocess = postprocess.load(folder, storage.join(uri, postprocess.FILE))
        self._modules = [module for _, module in members]  # kept alive: the signatures belong to them
        self._fns = [module.signatures[SIGNATURE] for module in self._modules]
        self._float_fns = [module.signatures[FLOAT_SIGNATURE] for module in self._modules]
        image = self.info["image"]
        self.height, self.width, self.channels = image["height"], image["width"], image["channels"]
        self.rgb_map = [tuple(c) for c in self.info["rgb_map"]]
        # (level, width) HU windows of the model's channels; exports from before windows existed
        # were trained on the AISD PNGs' brain window
        self.windows = [tuple(w) for w in self.info.get("windows", DataConfig().windows)]
        # data.channels the model was trained with ("grey": exports from before channel modes)
        self.channel_mode = self.info.get("channels", "grey")
        # what it was trained on (input_kind.py; an ensemble: its members', equal by SHARED_KEYS);
        # None, "unknown" and None for an export from before exports recorded them
        self.input = self.info.get("input")
        self.input_kind = (self.input or {}).get("kind", input_kind.UNKNOWN)
        self.domain = self.info.get("domain")  # {name: [lo, hi], "cases": n}: the training cases' ranges
        self.calibration = read_calibration(folder, uri)  # None: T = 1, no review threshold
        self.temperature = float((self.calibration or {}).get("temperature", 1.0))

    @property
    def measure(self) -> str:
        return calib.measure_of(self.tta, self.members)

    def _run(self, fns, images: tf.Tensor, tta: bool | None, passes: bool = False,
             temperature: float | None = None) -> dict[str, tf.Tensor]:
        tta = self.tta if tta is None else tta
        t = self.temperature if temperature is None else float(temperature)
        n = tf.shape(images)[0]
        batch = tf.concat([images, tf.reverse(images, axis=[2])], axis=0) if tta else images
        raw = []  # each forward pass's softmax (T = 1), mirrored ones flipped back
        for fn in fns:
            out = fn(image=batch)["probabilities"]
            raw += [out[:n], tf.reverse(out[n:], axis=[2])] if tta else [out]
        scaled = raw if t == 1.0 else [tf.nn.softmax(tf.math.log(tf.maximum(p, calib.EPS)) / t, axis=-1) for p in raw]
        probabilities = tf.add_n(scaled) / float(len(scaled)) if len(scaled) > 1 else scaled[0]
        result = {"probabilities": probabilities, "labels": tf.cast(tf.argmax(probabilities, axis=-1), tf.uint8),
                  "uncertainty": _entropy(probabilities)}
        if passes:
            result["passes"] = tf.stack(raw)
        return result

    def predict(self, images, tta: bool | None = None, passes: bool = False,
                temperature: float | None = None) -> dict[str, tf.Tensor]:
        """The serving signature on a uint8 batch (N, H, W, C) of model-sized images: ``probabilities``
        float32 (N, H, W, classes), calibrated (the class), ``labels`` uint8 (N, H, W) their argmax
        and ``uncertainty`` float32 (N, H, W) 0..1, their normalised predictive entropy
        (``calibration.entropy``). ``tta``: mirroring (see the class), default this object's ``tta``.
        ``passes``: also ``passes`` float32 (K, N, H, W, classes), each forward pass's softmax at T = 1
        (K = members x 2 with TTA), what a temperature is fitted on. ``temperature``: this T instead
        of the export's."""
        return self._run(self._fns, tf.convert_to_tensor(images, tf.uint8), tta, passes, temperature)

    def predict_float(self, images, tta: bool | None = None, passes: bool = False,
                      temperature: float | None = None) -> dict[str, tf.Tensor]:
        """The same through the float32-input signature."""
        return self._run(self._float_fns, tf.convert_to_tensor(images, tf.float32), tta, passes, temperature)


def _entropy(probabilities: tf.Tensor) -> tf.Tensor:
    """``calibration.entropy`` in TensorFlow: (N, H, W) float32 0..1 of (N, H, W, C) probabilities."""
    p = tf.maximum(probabilities, calib.EPS)
    c = float(probabilities.shape[-1])
    return tf.clip_by_value(-tf.reduce_sum(p * tf.math.log(p), axis=-1) / tf.math.log(c), 0.0, 1.0)
