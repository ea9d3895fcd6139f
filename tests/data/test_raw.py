"""The raw AISD release: per-case folders or zips, labels 0..5, the official test split."""

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from aisd_ray.config import AISD_TEST_CASES
from aisd_ray.data import shards
from aisd_ray.data.layout import DataError
from aisd_ray.data.prepare import prepare
from aisd_ray.data.raw import read_release, split_cases
from aisd_ray.data.synthetic import write_synthetic_raw
from tests.conftest import tiny_config

OFFICIAL = list(AISD_TEST_CASES[:3])
OTHERS = [f"{1000000 + i:07d}" for i in range(7)]
SLICES = 6


def raw_config(root, *overrides):
    return tiny_config(f"data.source_dir='{root}'", *overrides)


@pytest.fixture(scope="module", params=["folders", "zips"])
def release(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"raw-{request.param}")
    # The first case (an official test case) has one mask slice more than images.
    write_synthetic_raw(root, tiny_config().synthetic, OFFICIAL + OTHERS, slices=SLICES,
                        as_zip=request.param == "zips", progress=False)
    return root


@pytest.fixture(scope="module")
def store(release, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("raw-shards"))
    return prepare(raw_config(release), out, progress=False), out


def records(store, split):
    return list(shards.iter_records(store[1], store[0], split))


def test_official_test_cases_form_the_test_split_and_patients_never_straddle(store):
    manifest = store[0]
    cases = manifest["source"]["cases"]
    assert cases["test"] == sorted(OFFICIAL)
    assert sorted(cases["train"] + cases["valid"]) == OTHERS and not set(cases["train"]) & set(cases["valid"])
    assert len(cases["valid"]) == 1  # round(7 * 0.15)
    for split in ("train", "valid", "test"):
        seen = {r["case_id"] for r in records(store, split)}
        assert seen == set(cases[split])
    assert manifest["splits"]["test"]["records"] == len(OFFICIAL) * SLICES


def test_unpaired_slices_are_reported_and_skipped(store):
    assert store[0]["source"]["unpaired_skipped"] == [f"{OFFICIAL[0]}/{SLICES} (mask only)"]
    first_case = [r for r in records(store, "test") if r["case_id"] == OFFICIAL[0]]
    assert [r["slice_index"] for r in first_case] == list(range(SLICES))
    assert first_case[2]["name"] == f"{OFFICIAL[0]}_2"


def _raw_mask(release, case, k):
    member = f"mask/{case}/{k}.png"
    if (release / "mask.zip").is_file():
        with zipfile.ZipFile(release / "mask.zip") as zf:
            return np.asarray(Image.open(io.BytesIO(zf.read(member))))
    return np.asarray(Image.open(release / member))


def test_lesion_is_labels_1_2_3_5_and_label_4_is_background(release, store):
    by_name = {r["name"]: r for r in records(store, "test")}
    for case in OFFICIAL:
        for k in range(SLICES):
            raw = _raw_mask(release, case, k)
            labels = shards.record_to_arrays(by_name[f"{case}_{k}"])[1]
            np.testing.assert_array_equal(labels, np.isin(raw, [1, 2, 3, 5]).astype(np.uint8))
    assert any((_raw_mask(release, OFFICIAL[0], k) == 4).any() for k in range(SLICES))


def test_label_map_is_configurable(release, tmp_path):
    cfg = raw_config(release, "data.raw_label_map=[0, 1, 1, 1, 1, 1]")
    manifest = prepare(cfg, str(tmp_path), progress=False)
    record = next(r for r in shards.iter_records(str(tmp_path), manifest, "test") if r["name"] == f"{OFFICIAL[0]}_1")
    raw = _raw_mask(release, OFFICIAL[0], 1)
    assert record["lesion_pixels"] == int(np.count_nonzero(raw)) > int(np.isin(raw, [1, 2, 3, 5]).sum())


def test_drop_empty_train_keeps_every_evaluation_slice(release, store, tmp_path):
    manifest = prepare(raw_config(release, "data.drop_empty_train=true"), str(tmp_path), progress=False)
    train = list(shards.iter_records(str(tmp_path), manifest, "train"))
    assert train and all(r["lesion_pixels"] > 0 for r in train)
    assert len(train) < store[0]["splits"]["train"]["records"]
    for split in ("valid", "test"):
        assert manifest["splits"][split]["records"] == store[0]["splits"][split]["records"]
        assert any(r["lesion_pixels"] == 0 for r in shards.iter_records(str(tmp_path), manifest, split))


def test_patient_split_is_seeded():
    data = tiny_config().data
    ids = [f"{i:07d}" for i in range(40)] + list(AISD_TEST_CASES[:5])
    a, b = split_cases(ids, data), split_cases(list(reversed(ids)), data)
    assert a == b and len(a["valid"]) == 6 and a["test"] == sorted(AISD_TEST_CASES[:5])
    data.split_seed += 1
    assert split_cases(ids, data)["valid"] != a["valid"]


def test_folders_and_zips_give_the_same_shards(tmp_path):
    cfg = tiny_config().synthetic
    for layout in ("f", "z"):
        write_synthetic_raw(tmp_path / layout, cfg, OFFICIAL[:1] + OTHERS[:3], slices=3, as_zip=layout == "z",
                            progress=False)
    got = []
    for layout in ("f", "z"):
        manifest = prepare(raw_config(tmp_path / layout), str(tmp_path / f"out-{layout}"), progress=False)
        got.append([r for split in manifest["splits"]
                    for r in shards.iter_records(str(tmp_path / f"out-{layout}"), manifest, split)])
    assert got[0] == got[1]


def test_a_label_outside_0_to_5_names_the_file(tmp_path):
    write_synthetic_raw(tmp_path, tiny_config().synthetic, OTHERS[:3], slices=2, progress=False)
    bad = np.full((64, 64), 9, np.uint8)
    Image.fromarray(bad).save(tmp_path / "mask" / OTHERS[1] / "1.png")
    with pytest.raises(DataError, match=rf"mask/{OTHERS[1]}/1.png: label value 9 is outside 0..5"):
        prepare(raw_config(tmp_path), str(tmp_path / "out"), progress=False)


def test_a_release_without_cases_is_an_error(tmp_path):
    (tmp_path / "image").mkdir()
    (tmp_path / "mask").mkdir()
    with pytest.raises(DataError, match="no case folders"):
        read_release(tmp_path, tiny_config().data, 64, 64, 3)
