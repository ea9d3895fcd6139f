"""The raw AISD release: per-case folders or zips, labels 0..5, the official test split."""

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from aisd_ray.config import AISD_TEST_CASES
from aisd_ray.data.sources.layout import DataError
from aisd_ray.data.sources.raw import read_release, split_cases
from aisd_ray.data.store import shards
from aisd_ray.data.store.prepare import prepare
from aisd_ray.data.synthetic.slices import write_synthetic_raw
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


APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)  # what Finder's "Compress" adds


def _add_members(zip_path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(zip_path, "a") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


@pytest.mark.parametrize("as_zip", [False, True], ids=["folders", "zips"])
def test_os_metadata_in_a_release_is_skipped_and_counted(tmp_path, caplog, as_zip):
    cases = OFFICIAL[:1] + OTHERS[:3]
    write_synthetic_raw(tmp_path / "clean", tiny_config().synthetic, cases, slices=3, as_zip=as_zip, progress=False)
    write_synthetic_raw(tmp_path / "mac", tiny_config().synthetic, cases, slices=3, as_zip=as_zip, progress=False)
    added = 0
    for side in ("image", "mask"):
        junk = {f"__MACOSX/{side}/{case}/._{k}.png": APPLEDOUBLE for case in cases for k in range(3)}
        junk |= {f"{side}/{cases[0]}/.DS_Store": b"Bud1", f"{side}/Thumbs.db": b"\xd0\xcf", f"{side}/desktop.ini": b"["}
        if as_zip:
            _add_members(tmp_path / "mac" / f"{side}.zip", junk)
        else:  # extracted on a non-Mac volume: the AppleDouble files lie beside the slices
            junk = {name.removeprefix("__MACOSX/"): data for name, data in junk.items()}
            for name, data in junk.items():
                (tmp_path / "mac" / name).write_bytes(data)
        added += len(junk)
    data = tiny_config().data
    caplog.set_level("INFO", logger="aisd_ray")
    clean, mac = (read_release(tmp_path / k, data, 64, 64, 3) for k in ("clean", "mac"))
    assert mac.metadata_skipped == added == 2 * (4 * 3 + 3)
    assert mac.cases == clean.cases and mac.unpaired == clean.unpaired == [f"{cases[0]}/3 (mask only)"]
    names = {s: [r.name for r in v] for s, v in clean.refs.items()}
    assert {s: [r.name for r in v] for s, v in mac.refs.items()} == names
    assert "15 OS metadata file(s) skipped" in caplog.text


# The two official test cases the issue renames, as a spreadsheet writes their IDs
DAMAGED = {"0072723": "072723", "0226290": "226290"}


def _rename_cases(root, renames: dict[str, str]) -> None:
    for side in ("image", "mask"):
        for old, new in renames.items():
            (root / side / old).rename(root / side / new)


def test_case_folders_that_lost_leading_zeros_are_read_as_their_ids(tmp_path, caplog):
    assert set(DAMAGED) <= set(OFFICIAL)
    write_synthetic_raw(tmp_path, tiny_config().synthetic, OFFICIAL + OTHERS[:3], slices=2, progress=False)
    _rename_cases(tmp_path, DAMAGED)
    got = read_release(tmp_path, tiny_config().data, 64, 64, 3)
    assert got.cases["test"] == sorted(OFFICIAL) and len(got.refs["test"]) == 3 * 2  # every slice paired
    assert got.padded_ids == {str(tmp_path / side / short): case for side in ("image", "mask")
                              for case, short in DAMAGED.items()}
    warning = next(r.getMessage() for r in caplog.records if "fewer than 7 digits" in r.getMessage())
    assert f"{tmp_path / 'image' / '072723'} -> 0072723" in warning and "226290 -> 0226290" in warning


def test_a_padded_id_that_collides_with_an_existing_case_names_both(tmp_path):
    write_synthetic_raw(tmp_path, tiny_config().synthetic, OFFICIAL + OTHERS[:3], slices=2, progress=False)
    (tmp_path / "image" / "0072723").rename(tmp_path / "image" / "72723")
    (tmp_path / "image" / OFFICIAL[0]).rename(tmp_path / "image" / "0072723")  # another case under its ID
    with pytest.raises(DataError) as err:
        read_release(tmp_path, tiny_config().data, 64, 64, 3)
    both = f"{tmp_path / 'image' / '0072723'} and {tmp_path / 'image' / '72723'} are both case 0072723"
    assert both in str(err.value)


@pytest.mark.parametrize("name", ["0072723 (copy)", "patient_12", "00072723"])
def test_a_folder_of_slices_that_is_not_a_case_is_named(tmp_path, name):
    write_synthetic_raw(tmp_path, tiny_config().synthetic, OFFICIAL + OTHERS[:3], slices=2, progress=False)
    (tmp_path / "image" / OTHERS[1]).rename(tmp_path / "image" / name)
    with pytest.raises(DataError) as err:
        read_release(tmp_path, tiny_config().data, 64, 64, 3)
    named = f"hold slices but are not named by a 7-digit case ID: {tmp_path / 'image' / name} (2 slices)"
    assert named in str(err.value)


def test_official_test_cases_a_release_lacks_are_reported_and_recorded(release, store, tmp_path, caplog):
    missing = [c for c in AISD_TEST_CASES if c not in OFFICIAL]
    assert store[0]["source"]["test_cases_missing"] == missing
    # told which official test cases the release holds (as the demo tells its synthetic release's), quiet
    caplog.clear()
    cfg = raw_config(release, f"data.test_cases={OFFICIAL}")
    manifest = prepare(cfg, str(tmp_path), progress=False)
    assert manifest["source"]["test_cases_missing"] == [] and manifest["source"]["cases"]["test"] == sorted(OFFICIAL)
    assert "official test cases" not in caplog.text
