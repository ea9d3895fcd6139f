"""prepare from CT volumes: nnU-Net's raw dataset layout and DICOM case folders, into the same
shards, with each case's geometry in the manifest; bad sources named before anything is written."""

import json
import shutil

import numpy as np
import pytest

from aisd_ray.data.ct.windows import InPlane
from aisd_ray.data.sources import volume
from aisd_ray.data.sources.layout import DataError
from aisd_ray.data.store.prepare import prepare
from aisd_ray.data.store.shards import iter_records, record_to_arrays
from aisd_ray.data.synthetic.layouts import write_synthetic
from tests.conftest import volume_config


def _cfg(layout: str, *more: str):
    return volume_config(layout, 6, 2, 96, 5, *more)


@pytest.fixture(scope="module")
def nnunet_source(tmp_path_factory):
    cfg = _cfg("nnunet")
    return write_synthetic(tmp_path_factory.mktemp("nnunet"), cfg.synthetic, progress=False)


def test_an_nnunet_dataset_becomes_shards_split_by_patient_with_each_cases_geometry(nnunet_source, tmp_path):
    cfg = _cfg("nnunet")
    cfg.data.source_dir = str(nnunet_source)
    manifest = prepare(cfg, str(tmp_path / "shards"), progress=False)
    source = manifest["source"]
    assert source["layout"] == "nnunet"
    test = sorted(p.name.removesuffix("_0000.nii.gz") for p in (nnunet_source / "imagesTs").iterdir())
    assert source["cases"]["test"] == test == sorted(cfg.data.test_cases)
    assert set(source["cases"]["train"]).isdisjoint(source["cases"]["valid"]) and source["cases"]["valid"]
    assert {s: e["records"] for s, e in manifest["splits"].items()} == {
        s: 5 * len(c) for s, c in source["cases"].items() if c}
    geo = source["geometry"][test[0]]
    fov = 230.0  # the synthetic field of view: 96 px at 230/96 mm
    assert geo["shape"] == [5, 96, 96] and geo["spacing_mm"] == pytest.approx([5.0, fov / 96, fov / 96])
    assert geo["model_spacing_mm"] == pytest.approx([5.0, fov / 64, fov / 64])
    assert source["windows"] == [[40.0, 80.0]]
    # a slice in the store is the case's HU slice through the window, resized: nothing else
    vol = volume.read_volume(nnunet_source / "imagesTs" / f"{test[0]}_0000.nii.gz")
    want = InPlane(96, 96, vol.spacing[1:], 64, 64).to_model(vol.hu[2], cfg.data.windows, 3)
    rows = {r["name"]: r for r in iter_records(str(tmp_path / "shards"), manifest, "test")}
    image, labels = record_to_arrays(rows[f"{test[0]}_2"])
    assert np.array_equal(image, want)
    assert rows[f"{test[0]}_2"]["case_id"] == test[0] and rows[f"{test[0]}_2"]["slice_index"] == 2
    # unchanged source and settings: nothing rewritten; another window: a new store
    assert prepare(cfg, str(tmp_path / "shards"), progress=False)["fingerprint"] == manifest["fingerprint"]
    cfg.data.windows = ((35.0, 40.0),)
    assert prepare(cfg, str(tmp_path / "shards"), progress=False)["fingerprint"] != manifest["fingerprint"]


def test_dicom_case_folders_become_shards_too(tmp_path):
    cfg = _cfg("dicom", "synthetic.num_cases=4", "synthetic.num_test_cases=1")
    cfg.data.source_dir = str(write_synthetic(tmp_path / "src", cfg.synthetic, progress=False))
    manifest = prepare(cfg, str(tmp_path / "shards"), progress=False)
    assert manifest["source"]["layout"] == "dicom"
    assert manifest["source"]["cases"]["test"] == list(cfg.data.test_cases)
    assert all(g["kind"] == "dicom" for g in manifest["source"]["geometry"].values())
    assert manifest["splits"]["train"]["lesion_fraction"] > 0


def _copy(src, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(src, root)
    return root


def _dataset_json(root):
    return json.loads((root / "dataset.json").read_text())


def _write_dataset_json(root, info):
    (root / "dataset.json").write_text(json.dumps(info))


def _as_v1(root):
    """nnU-Net v1's dataset.json for the same files: modality, labels {id: name} (the reverse of v2),
    a training list naming each image without its channel suffix, numTraining, a test list."""
    cases = sorted(p.name.removesuffix("_0000.nii.gz") for p in (root / "imagesTr").iterdir())
    tests = sorted(p.name.removesuffix("_0000.nii.gz") for p in (root / "imagesTs").iterdir())
    _write_dataset_json(root, {
        "name": "Task001_AISDSynthetic", "tensorImageSize": "3D", "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "lesion"}, "numTraining": len(cases), "numTest": len(tests),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
        "test": [f"./imagesTs/{c}.nii.gz" for c in tests]})


def _rows(shards, manifest):
    return {split: {r["name"]: [a.tobytes() for a in record_to_arrays(r)]
                    for r in iter_records(shards, manifest, split)} for split in manifest["splits"]}


@pytest.mark.parametrize("rewrite", [
    _as_v1,  # case 7: nnU-Net v1, read
    lambda r: _write_dataset_json(r, {**_dataset_json(r), "labels": {"background": "0", "lesion": "1"}}),
    lambda r: _write_dataset_json(r, {k: v for k, v in _dataset_json(r).items() if k != "numTraining"}),
], ids=["v1", "v2-ids-as-strings", "v2-without-numTraining"])
def test_an_nnunet_v1_dataset_json_and_other_readable_forms_give_the_v2_datasets_rows(nnunet_source, tmp_path,
                                                                                       rewrite):
    """The control: the same files under the v2 dataset.json. Its label map is unambiguous either way
    round, so the store holds the same cases, rows and class counts."""
    cfg = _cfg("nnunet")
    cfg.data.source_dir = str(nnunet_source)
    want = prepare(cfg, str(tmp_path / "v2"), progress=False)
    root = _copy(nnunet_source, tmp_path)
    rewrite(root)
    cfg.data.source_dir = str(root)
    got = prepare(cfg, str(tmp_path / "other"), progress=False)
    assert got["source"]["cases"] == want["source"]["cases"]
    assert {s: (e["records"], e["lesion_fraction"]) for s, e in got["splits"].items()} == {
        s: (e["records"], e["lesion_fraction"]) for s, e in want["splits"].items()}
    assert _rows(str(tmp_path / "other"), got) == _rows(str(tmp_path / "v2"), want)


def _first(root, folder):
    return sorted((root / folder).iterdir())[0]


def _numbered(root, delta):
    info = _dataset_json(root)
    _write_dataset_json(root, {**info, "numTraining": info["numTraining"] + delta})


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "core": 1, "penumbra": 2},
                                                          "channel_names": {"0": "CT"}})),
     r"dataset.json: labels .* are not the model's 2 classes"),
    (lambda r: next((r / "labelsTr").iterdir()).unlink(), r"labelsTr: no labels for 1 training image"),
    (lambda r: shutil.copy(next((r / "imagesTr").iterdir()), r / "imagesTr" / "1000099_0001.nii.gz"),
     r"1000099_0001.nii.gz: channel 0001: one CT channel"),
    (lambda r: shutil.copy(next((r / "imagesTr").iterdir()), r / "imagesTr" / "scan.nii.gz"),
     r"scan.nii.gz: not named <case>_<4-digit channel>"),
    # case 8: a label file with no image, numTraining still counting it: the orphan is named
    (lambda r: _first(r, "imagesTr").unlink(),
     r"labelsTr/(\d+).nii.gz: a label volume without its image imagesTr/\1_0000.nii.gz$"),
    (lambda r: _first(r, "imagesTs").unlink(),
     r"labelsTs/(\d+).nii.gz: a label volume without its image imagesTs/\1_0000.nii.gz$"),
    (lambda r: _numbered(r, +1), r"dataset.json: numTraining is 5 but imagesTr/ holds 4 training case\(s\)"),
    (lambda r: _numbered(r, -1), r"dataset.json: numTraining is 3 but imagesTr/ holds 4 training case\(s\)"),
    (lambda r: (r / "dataset.json").write_text("{'labels': {'background': 0}"),
     r"dataset.json: not an nnU-Net dataset.json \(JSON\)"),
    (lambda r: _write_dataset_json(r, [{"labels": {"background": 0, "lesion": 1}}]),
     r"dataset.json: not an nnU-Net dataset.json \(a JSON object with 'labels'\)"),
    (lambda r: _write_dataset_json(r, {k: v for k, v in _dataset_json(r).items() if k != "labels"}),
     r"dataset.json: not an nnU-Net dataset.json \(a JSON object with 'labels'\)"),
    (lambda r: _write_dataset_json(r, {**_dataset_json(r), "labels": ["background", "lesion"]}),
     r"dataset.json: 'labels' is \[\"background\", \"lesion\"\], not a map of class names to ids"),
    (lambda r: _write_dataset_json(r, {**_dataset_json(r), "labels": {"background": 0, "lesion": [1]}}),
     r"dataset.json: labels lesion are regions \(lists of label ids, nnU-Net's region-based training\)"),
    (lambda r: _write_dataset_json(r, {**_dataset_json(r), "labels": {"background": "zero", "lesion": "one"}}),
     r"dataset.json: labels .* map neither names to class ids \(nnU-Net v2\) nor class ids to names \(v1\)"),
    (lambda r: _write_dataset_json(r, {**_dataset_json(r), "file_ending": ".mha"}),
     r"dataset.json: file_ending '.mha': NIfTI images"),
])
def test_a_bad_nnunet_dataset_or_one_whose_files_and_dataset_json_disagree_is_named_and_nothing_written(
        nnunet_source, tmp_path, damage, message):
    root = _copy(nnunet_source, tmp_path)
    damage(root)
    cfg = _cfg("nnunet")
    cfg.data.source_dir = str(root)
    with pytest.raises(DataError, match=message):
        prepare(cfg, str(tmp_path / "shards"), progress=False)
    assert not (tmp_path / "shards").exists()


def _v1_then(change):
    def damage(root):
        _as_v1(root)
        info = _dataset_json(root)
        change(info)
        _write_dataset_json(root, info)
    return damage


@pytest.mark.parametrize("change, message", [
    (lambda i: i.update(labels={"0": "background", "1": "core", "2": "penumbra"}),
     r"dataset.json: labels .* are not the model's 2 classes 0..1 \(background, lesion\)"),
    (lambda i: i["training"].append({"image": "./imagesTr/1999999.nii.gz", "label": "./labelsTr/1999999.nii.gz"}),
     r"dataset.json: training case\(s\) 1999999 listed, but imagesTr/ holds no 1999999_0000.nii.gz"),
    (lambda i: i["training"].pop(0), r"imagesTr/\d+_0000.nii.gz: not in dataset.json's training list"),
    (lambda i: i.update(training=["./imagesTr/a.nii.gz"]), r"dataset.json: 'training' is not a list of"),
    (lambda i: i.update(modality={"0": "CT", "1": "CT"}), r"dataset.json: modality .*: one CT channel is read"),
])
def test_a_v1_dataset_json_is_checked_as_v2_is(nnunet_source, tmp_path, change, message):
    root = _copy(nnunet_source, tmp_path)
    _v1_then(change)(root)
    cfg = _cfg("nnunet")
    cfg.data.source_dir = str(root)
    with pytest.raises(DataError, match=message):
        prepare(cfg, str(tmp_path / "shards"), progress=False)
    assert not (tmp_path / "shards").exists()


def test_the_handed_nnunet_cases_through_the_cli(nnunet_source, tmp_path, capsys):
    """Case 7: a v1 dataset.json (a traceback before) prepares, exit 0. Case 8: a label without its
    image, numTraining 4 with 3 images: exit 2, one line naming the orphan label, nothing written."""
    from aisd_ray.cli import main

    config = tmp_path / "tiny.toml"
    config.write_text(_cfg("nnunet").to_toml())
    v1 = _copy(nnunet_source, tmp_path / "v1")
    _as_v1(v1)
    assert main(["prepare", "--config", str(config), "--source", str(v1), "--output", str(tmp_path / "a")]) == 0
    root = _copy(nnunet_source, tmp_path / "orphan")
    image = _first(root, "imagesTr")
    image.unlink()
    assert _dataset_json(root)["numTraining"] == 4 and len(list((root / "imagesTr").iterdir())) == 3
    capsys.readouterr()
    assert main(["prepare", "--config", str(config), "--source", str(root), "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    label = root / "labelsTr" / image.name.replace("_0000", "")
    assert len(err.splitlines()) == 1 and f"{label}: a label volume without its image imagesTr/{image.name}" in err
    assert not (tmp_path / "b").exists()


def test_labels_off_the_images_grid_or_with_an_unknown_class_are_named(nnunet_source, tmp_path):
    import SimpleITK as sitk

    root = _copy(nnunet_source, tmp_path)
    label = sorted((root / "labelsTr").iterdir())[0]
    image = sitk.ReadImage(str(label))
    shifted = sitk.Image(image)
    shifted.SetOrigin(tuple(o + 10 for o in image.GetOrigin()))
    sitk.WriteImage(shifted, str(label))
    cfg = _cfg("nnunet")
    cfg.data.source_dir = str(root)
    with pytest.raises(DataError, match=rf"{label.name}: origin .* differs from case"):
        prepare(cfg, str(tmp_path / "shards"), progress=False)
    two = sitk.GetArrayFromImage(image)
    two[two > 0] = 2
    out = sitk.GetImageFromArray(two)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(label))
    with pytest.raises(DataError, match=rf"{label.name}: label values \[0, 2\] but the model has classes 0..1"):
        prepare(cfg, str(tmp_path / "shards"), progress=False)
    assert not (tmp_path / "shards").exists()


def test_prepare_from_dicom_keeps_no_patient_data(tmp_path, caplog):
    """DICOM headers carry names, birth dates and IDs: the manifest, the shards and the log carry the
    case ID (the folder name) and the geometry only."""
    from aisd_ray.data.synthetic.volumes import write_dicom_cases

    cfg = _cfg("dicom", "synthetic.num_cases=3", "synthetic.num_test_cases=1")
    root = write_dicom_cases(tmp_path / "src", 5, ["1000001", "1000002", "1000003"], 64, 4,
                             patient_name="Roe^Richard", birth_date="19520229", patient_id="HOSP-991")
    cfg.data.source_dir, cfg.data.test_cases = str(root), ("1000003",)
    with caplog.at_level("DEBUG"):
        prepare(cfg, str(tmp_path / "shards"), progress=False)
    texts = [caplog.text] + [p.read_bytes().decode("latin-1") for p in (tmp_path / "shards").rglob("*") if p.is_file()]
    for secret in ("Roe", "Richard", "19520229", "HOSP-991"):
        assert not any(secret in text for text in texts), secret


def _aisd_dicom_release(root, as_zip: bool):
    """An AISD-like release: dicom/<case>/ series and mask/<case>/<k>.png raw labels (2: clear acute,
    4: invisible patches read as background), k in position order; case 1000003 has a mask slice more."""
    import zipfile

    from PIL import Image

    from aisd_ray.data.synthetic.volumes import synth_volume, write_dicom_series

    cases = ["0073410", "1000001", "1000002", "1000003"]
    truths = {}
    for case in cases:
        hu, truth, spacing = synth_volume(9, case, 64, 5)
        truths[case] = truth
        write_dicom_series(hu, spacing, root / "dicom" / case, case, seed=9)
        extra = 1 if case == "1000003" else 0
        for k in range(5 + extra):
            labels = (truth[min(k, 4)] * 2).astype(np.uint8)
            labels[:3, :3] = 4
            (root / "mask" / case).mkdir(parents=True, exist_ok=True)
            Image.fromarray(labels).save(root / "mask" / case / f"{k}.png")
    if as_zip:
        for side in ("dicom", "mask"):
            with zipfile.ZipFile(root / f"{side}.zip", "w") as archive:
                for path in sorted((root / side).rglob("*")):
                    if path.is_file():
                        archive.write(path, path.relative_to(root).as_posix())
            shutil.rmtree(root / side)
    return truths


@pytest.mark.parametrize("as_zip", [False, True])
def test_the_aisd_dicom_archives_pair_mask_slices_with_the_series_in_position_order(tmp_path, caplog, as_zip):
    truths = _aisd_dicom_release(tmp_path / "release", as_zip)
    cfg = _cfg("raw")
    cfg.data.source_dir, cfg.data.test_cases = str(tmp_path / "release"), ("0073410",)
    manifest = prepare(cfg, str(tmp_path / "shards"), progress=False)
    source = manifest["source"]
    assert source["layout"] == "aisd_dicom" and source["cases"]["test"] == ["0073410"]
    assert source["unpaired_skipped"] == ["1000003 (5 series slices, 6 mask slices)"]
    assert "1000003 (5 series slices, 6 mask slices)" in caplog.text
    assert manifest["splits"]["test"]["mask_values"] == "raw_labels"
    rows = {r["name"]: r for r in iter_records(str(tmp_path / "shards"), manifest, "test")}
    for k in range(5):
        _, labels = record_to_arrays(rows[f"0073410_{k}"])
        want = InPlane(64, 64, (1.0, 1.0), 64, 64).labels_to_model(truths["0073410"][k].astype(np.uint8))
        assert np.array_equal(labels, want), k  # label 2 -> lesion, 4 -> background, slice k on slice k


def test_a_store_windowed_otherwise_than_the_model_is_refused_naming_both(nnunet_source, tmp_path):
    """Rows made through other HU windows, or another channel mode, are another input: training
    (and evaluating an export) on them is refused before anything runs, naming the manifest."""
    from aisd_ray.data.store.shards import ShardStore

    cfg = _cfg("nnunet")
    cfg.data.source_dir = str(nnunet_source)
    prepare(cfg, str(tmp_path / "shards"), progress=False)
    ShardStore.open(str(tmp_path / "shards"), cfg)  # the config it was made with: fine
    cfg.data.windows = ((35.0, 40.0),)
    with pytest.raises(DataError, match=r"manifest.json: the shards were windowed with \[\[40.0, 80.0\]\] HU but "
                                        r"\[data\] windows is \[\[35.0, 40.0\]\]"):
        ShardStore.open(str(tmp_path / "shards"), cfg)
    cfg.data.windows, cfg.data.channels = ((40.0, 80.0),), "neighbours"
    with pytest.raises(DataError, match=r"the shards' channels are 'grey' but \[data\] channels is 'neighbours'"):
        ShardStore.open(str(tmp_path / "shards"), cfg)
