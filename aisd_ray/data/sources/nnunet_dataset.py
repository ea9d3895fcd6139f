"""nnU-Net's raw dataset layout, v2 and v1: ``dataset.json`` read, and checked against the files.

Both versions keep a case's CT as ``imagesTr/<case>_0000.nii.gz`` (channel 0000; one CT channel is
read, more are refused by name) and its labels as ``labelsTr/<case>.nii.gz``, the test split as
``imagesTs/`` with ``labelsTs/``. Their ``dataset.json`` differ:

- **v2** (nnU-Net 2.x, ``DatasetXXX_Name``): ``channel_names`` {"0": "CT"}, ``labels`` maps class
  names to ids ({"background": 0, "lesion": 1}), ``numTraining``, ``file_ending``;
- **v1** (nnU-Net 1.x, ``TaskXXX_Name``): ``modality`` {"0": "CT"}, ``labels`` maps ids to names
  ({"0": "background", "1": "lesion"}: the reverse of v2), ``training`` a list of
  {"image": "./imagesTr/<case>.nii.gz", "label": "./labelsTr/<case>.nii.gz"} (the image listed
  without its channel suffix), ``numTraining``, ``test`` a list of image paths.

The label map is read whichever way round it is given: its ids are the integers (an int, or a
string of digits, as JSON keys are), on one side of every entry and names on the other. Checks,
each one ``DataError`` line naming the file (nothing is written before them):

- ``dataset.json`` is a JSON object with a ``labels`` map; its ids are the model's classes
  0..num_classes-1; a v2 region (a name mapped to a list of ids: nnU-Net's region-based training,
  overlapping sigmoid outputs) is refused, as this model's classes are one id each;
- one channel; ``file_ending``, when given, is NIfTI;
- every label volume has its image (an orphan ``labelsTr/X.nii.gz`` without ``imagesTr/X_0000.nii.gz``
  is named, in labelsTs too): a labelled patient never vanishes;
- every training image has its labels (a test image without labels is left out, with a warning);
- ``numTraining``, when given, equals the training images found (nnU-Net asserts the same);
  a v1 ``training`` list names exactly the training images found.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aisd_ray.data.sources.layout import DataError, is_metadata
from aisd_ray.data.sources.volume_base import is_nifti, nifti_named, nifti_stem

log = logging.getLogger(__name__)
CT_CHANNEL = "0000"


@dataclass(frozen=True)
class DatasetJson:
    """What ``dataset.json`` says: ``version`` 1 or 2, ``labels`` {class id: name}, ``num_training``
    (None when absent), ``training`` the case IDs of a v1 ``training`` list (None when absent)."""

    version: int
    labels: dict[int, str]
    num_training: int | None
    training: tuple[str, ...] | None


def _as_id(value: Any) -> int | None:
    """A class id given as an int or a string of digits (a JSON key); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _label_map(where: Path, labels: Any) -> dict[int, str]:
    """{id: name} of a v2 ({name: id}) or v1 ({id: name}) ``labels``."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{where}: 'labels' is {json.dumps(labels)[:80]}, not a map of class names to ids "
                        "(nnU-Net v2: {\"background\": 0, \"lesion\": 1}) or ids to names (v1)")
    regions = sorted(name for name, v in labels.items() if isinstance(v, (list, tuple)))
    if regions:
        raise DataError(f"{where}: labels {', '.join(regions[:3])} are regions (lists of label ids, nnU-Net's "
                        "region-based training); this model's classes are one id each")
    if all(_as_id(v) is not None for v in labels.values()):  # v2: names to ids (also ids given as "0")
        return {_as_id(v): str(name) for name, v in labels.items()}
    if all(_as_id(k) is not None for k in labels):  # v1: ids to names
        return {_as_id(k): str(name) for k, name in labels.items()}
    raise DataError(f"{where}: labels {json.dumps(labels)[:120]} map neither names to class ids (nnU-Net v2) "
                    "nor class ids to names (v1)")


def read_dataset_json(root: Path, class_names: tuple[str, ...], num_classes: int) -> DatasetJson:
    """``root/dataset.json`` read and checked (the module's checks on the file itself)."""
    where = root / "dataset.json"
    try:
        info = json.loads(where.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: not an nnU-Net dataset.json (JSON): {str(exc).splitlines()[0]}") from None
    if not isinstance(info, dict) or "labels" not in info:
        raise DataError(f"{where}: not an nnU-Net dataset.json (a JSON object with 'labels')")
    version = 1 if "channel_names" not in info and ("modality" in info or "training" in info) else 2
    channels = info.get("channel_names", info.get("modality", {"0": "CT"}))
    if not isinstance(channels, dict) or len(channels) != 1:
        key = "channel_names" if version == 2 else "modality"
        raise DataError(f"{where}: {key} {json.dumps(channels)[:80]}: one CT channel is read")
    ending = info.get("file_ending", ".nii.gz")
    if ending not in (".nii.gz", ".nii"):
        raise DataError(f"{where}: file_ending {ending!r}: NIfTI images (.nii.gz) are read")
    labels = _label_map(where, info["labels"])
    if sorted(labels) != list(range(num_classes)) or len(labels) != len(info["labels"]):
        raise DataError(f"{where}: labels {json.dumps(info['labels'])} are not the model's {num_classes} classes "
                        f"0..{num_classes - 1} ({', '.join(class_names)})")
    count = info.get("numTraining")
    if count is not None and _as_id(count) is None:
        raise DataError(f"{where}: numTraining {count!r} is not a number of cases")
    return DatasetJson(version, dict(sorted(labels.items())), None if count is None else _as_id(count),
                       _training_list(where, info.get("training")))


def _training_list(where: Path, listed: Any) -> tuple[str, ...] | None:
    """The case IDs of a v1 ``training`` list ({"image": "./imagesTr/<case>.nii.gz", "label": ...})."""
    if listed is None:
        return None
    if not isinstance(listed, list) or not all(isinstance(e, dict) and isinstance(e.get("image"), str)
                                               and isinstance(e.get("label"), str) for e in listed):
        raise DataError(f"{where}: 'training' is not a list of {{\"image\": ..., \"label\": ...}} paths (nnU-Net v1)")
    cases = []
    for entry in listed:
        image, label = (nifti_stem(Path(entry[k]).name) for k in ("image", "label"))
        if image != label:
            raise DataError(f"{where}: training entry {json.dumps(entry)} pairs two cases ({image}, {label})")
        cases.append(image)
    return tuple(cases)


def _niftis(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not is_metadata(p.name) and is_nifti(p)) if folder.is_dir() else []


def _side(root: Path, images: str, labels: str) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(case, image, labels) of imagesTr/labelsTr (or Ts), and the images without labels by case.
    DataError for a file not named as nnU-Net names it, a second channel, or a label volume without
    its image."""
    pairs, unlabelled, cases = [], [], set()
    for path in _niftis(root / images):
        case, _, channel = nifti_stem(path.name).rpartition("_")
        if not case or not (len(channel) == 4 and channel.isdigit()):
            raise DataError(f"{path}: not named <case>_<4-digit channel>.nii.gz, as nnU-Net's {images}/ is")
        if channel != CT_CHANNEL:
            raise DataError(f"{path}: channel {channel}: one CT channel (_0000) is read; this dataset has more")
        cases.add(case)
        label = nifti_named(root / labels, case)
        if label is None:
            unlabelled.append(case)
        else:
            pairs.append((case, path, label))
    orphans = [p for p in _niftis(root / labels) if nifti_stem(p.name) not in cases]
    if orphans:
        more = f" (and {len(orphans) - 1} more: {', '.join(p.name for p in orphans[1:4])})" if len(orphans) > 1 else ""
        raise DataError(f"{orphans[0]}: a label volume without its image {images}/"
                        f"{nifti_stem(orphans[0].name)}_{CT_CHANNEL}.nii.gz{more}")
    return pairs, unlabelled


def nnunet_cases(root: str | Path, class_names: tuple[str, ...],
                 num_classes: int) -> tuple[list[tuple[str, Path, Path]], list[tuple[str, Path, Path]]]:
    """(training, test) cases of the nnU-Net raw dataset ``root``, each (case ID, image, labels),
    sorted by case; ``dataset.json`` and the files checked (the module). DataError naming the file."""
    root = Path(root)
    info = read_dataset_json(root, class_names, num_classes)
    trained, no_labels_tr = _side(root, "imagesTr", "labelsTr")
    tested, no_labels_ts = _side(root, "imagesTs", "labelsTs")
    if no_labels_tr:
        raise DataError(f"{root / 'labelsTr'}: no labels for {len(no_labels_tr)} training image(s): "
                        f"{', '.join(no_labels_tr[:5])}")
    if no_labels_ts:
        log.warning("%s: %d test image(s) without labels in labelsTs/ are left out of the test split: %s",
                    root / "imagesTs", len(no_labels_ts), ", ".join(no_labels_ts[:5]))
    where = root / "dataset.json"
    found = sorted(case for case, _, _ in trained)
    if info.training is not None and sorted(info.training) != found:
        missing = sorted(set(info.training) - set(found))
        if missing:
            raise DataError(f"{where}: training case(s) {', '.join(missing[:5])} listed, but imagesTr/ holds no "
                            f"{missing[0]}_{CT_CHANNEL}.nii.gz")
        extra = sorted(set(found) - set(info.training))
        if extra:
            raise DataError(f"{root / 'imagesTr' / f'{extra[0]}_{CT_CHANNEL}.nii.gz'}: not in dataset.json's "
                            f"training list ({len(extra)} image(s) unlisted)")
        raise DataError(f"{where}: the training list names a case twice")
    if info.num_training is not None and info.num_training != len(found):
        raise DataError(f"{where}: numTraining is {info.num_training} but imagesTr/ holds {len(found)} training "
                        f"case(s) with labels; nnU-Net requires them equal")
    if info.version == 1:
        log.info("%s: nnU-Net v1 dataset.json (labels {id: name}: %s)", where, info.labels)
    return trained, tested
