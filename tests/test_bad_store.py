"""The data people really have, at the command line (issue 22): a release zipped on macOS, case
folders whose IDs lost their leading zeros, a store damaged after prepare, a manifest that points
outside its store, and a prepare that fails part-way. Each asserts the exit code, the one line
naming the culprit (or the warning naming it), and the right figures where the input is valid."""

import json
import shutil
import zipfile

import pytest

from aisd_ray.cli import main
from aisd_ray.config import AISD_TEST_CASES, builtin_config
from aisd_ray.data.store.shards import ShardStore
from tests.conftest import one_error_line
from tests.conftest import tiny_config

TINY = str(builtin_config("tiny"))
CASES, SLICES = 10, 4  # the release: 10 cases x 4 slices, the first 6 official test cases
TEST_CASES = 6



def synthesize(out, layout="raw"):
    assert main(["synthesize", "--config", TINY, "--output", str(out), "--layout", layout, "--cases", str(CASES),
                 "--slices", str(SLICES)]) == 0
    return out


def prepare(source, out, *extra):
    return main(["prepare", "--config", TINY, "--source", str(source), "--output", str(out), *extra])


def split_records(out) -> dict[str, int]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {split: entry["records"] for split, entry in manifest["splits"].items()}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The issue's raw release as folders, and what prepare makes of it untouched."""
    root = synthesize(tmp_path_factory.mktemp("release"))
    out = tmp_path_factory.mktemp("clean") / "shards"
    assert prepare(root, out) == 0
    return root, split_records(out), json.loads((out / "manifest.json").read_text())["source"]["cases"]


def test_the_clean_release_has_six_official_test_cases(release):
    _, records, cases = release
    assert cases["test"] == sorted(AISD_TEST_CASES[:TEST_CASES])
    assert records["test"] == TEST_CASES * SLICES


def test_a_release_zipped_on_macos_prepares_like_the_clean_one(release, tmp_path, caplog):
    """Finder's "Compress" adds __MACOSX/<side>/<case>/._<n>.png beside every slice (AppleDouble,
    not PNG): skipped as metadata and counted, the splits as from the clean release."""
    caplog.set_level("INFO", logger="aisd_ray")
    root = synthesize(tmp_path / "mac", "raw-zip")
    counts = {}
    for side in ("image", "mask"):
        with zipfile.ZipFile(root / f"{side}.zip", "a") as zf:
            slices = [n for n in zf.namelist() if n.endswith(".png")]
            for name in slices:
                folder, base = name.rsplit("/", 1)
                zf.writestr(f"__MACOSX/{folder}/._{base}", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" + bytes(40))
            zf.writestr(f"{side}/.DS_Store", b"\x00\x00\x00\x01Bud1")
        counts[side] = len(slices) + 1
    out = tmp_path / "shards"
    assert prepare(root, out) == 0
    assert split_records(out) == release[1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["cases"] == release[2]
    assert manifest["source"]["metadata_skipped"] == counts["image"] + counts["mask"] == 2 * CASES * SLICES + 3
    assert f"{root / 'image.zip'}: {counts['image']} OS metadata file(s) skipped" in caplog.text
    assert f"{root / 'mask.zip'}: {counts['mask']} OS metadata file(s) skipped" in caplog.text
    assert "._" not in " ".join(manifest["source"]["unpaired_skipped"])


def test_case_folders_that_lost_leading_zeros_keep_their_test_cases(release, tmp_path, caplog):
    """0072723 -> 072723 and 0226290 -> 226290 (a spreadsheet's doing): read as their IDs, with a
    warning naming both folders; still 6 test cases."""
    root = tmp_path / "release"
    shutil.copytree(release[0], root)
    for side in ("image", "mask"):
        (root / side / "0072723").rename(root / side / "072723")
        (root / side / "0226290").rename(root / side / "226290")
    out = tmp_path / "shards"
    assert prepare(root, out) == 0
    assert split_records(out) == release[1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["cases"] == release[2] and len(manifest["source"]["cases"]["test"]) == TEST_CASES
    assert manifest["source"]["padded_ids"][str(root / "image" / "072723")] == "0072723"
    warning = next(r.getMessage() for r in caplog.records if "fewer than 7 digits" in r.getMessage())
    assert f"{root / 'image' / '072723'} -> 0072723" in warning and f"{root / 'mask' / '226290'} -> 0226290" in warning


def test_a_case_folder_that_is_no_id_is_named_and_nothing_is_written(release, tmp_path, capsys):
    root = tmp_path / "release"
    shutil.copytree(release[0], root)
    (root / "mask" / "0073410").rename(root / "mask" / "0073410 (1)")  # a second download, renamed by the browser
    out = tmp_path / "shards"
    assert prepare(root, out) == 2
    line = one_error_line(capsys)
    assert f"{root / 'mask' / '0073410 (1)'} ({SLICES + 1} slices)" in line and "7-digit case ID" in line
    assert not out.exists()


def test_official_test_cases_missing_from_a_release_are_reported(release, tmp_path, caplog):
    """A release with some official test cases but not all (a partial copy) says which are missing;
    the demo hands the synthetic release's own test IDs on, so its prepare stays quiet."""
    root = tmp_path / "release"
    shutil.copytree(release[0], root)
    for side in ("image", "mask"):
        shutil.rmtree(root / side / "0537908")
    out = tmp_path / "shards"
    wanted = AISD_TEST_CASES[:TEST_CASES]
    assert prepare(root, out, "--set", f"data.test_cases={list(wanted)}") == 0
    assert "1 of the 6 official test cases (data.test_cases) are not in this release" in caplog.text
    assert "0537908" in caplog.text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["test_cases_missing"] == ["0537908"] and split_records(out)["test"] == 5 * SLICES


@pytest.mark.parametrize("fmt, damage", [("tfrecord", "flipped byte"), ("parquet", "deleted")])
def test_rerunning_prepare_repairs_a_damaged_store(release, tmp_path, capsys, caplog, fmt, damage):
    """train names the damaged shard and advises re-running prepare; prepare then rewrites the store
    (naming the shard), and train's store check passes."""
    out = tmp_path / "shards"
    fmt_set = ["--set", f"data.shard_format='{fmt}'"]
    assert prepare(release[0], out, *fmt_set) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    victim = out / manifest["splits"]["train"]["shards"][0]["name"]
    if damage == "deleted":
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[len(data) // 3] ^= 0x10
        victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["train", "--config", TINY, "--data", str(out), "--output", str(tmp_path / "runs"), "--backend",
                 "local", *fmt_set]) == 2
    assert str(victim) in one_error_line(capsys)
    assert prepare(release[0], out, *fmt_set) == 0
    assert f"{victim}: shard" in caplog.text and "rewriting the store" in caplog.text
    cfg = tiny_config(f"data.shard_format='{fmt}'")
    store = ShardStore.open(str(out), cfg, checksums=True)  # train's store check
    assert {s: e["records"] for s, e in store.manifest["splits"].items()} == release[1]


@pytest.mark.parametrize("entry", ["../{other}/train/{shard}", "{other_abs}/train/{shard}", "gs://other/train/{shard}",
                                   "train\\{shard}"])
def test_a_manifest_pointing_outside_its_store_is_refused(release, tmp_path, capsys, entry):
    out, other = tmp_path / "shards", tmp_path / "other"
    assert prepare(release[0], out) == 0
    shutil.copytree(out, other)
    manifest = json.loads((out / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][0]["name"].split("/")[-1]
    name = entry.format(other=other.name, other_abs=other, shard=shard)
    manifest["splits"]["train"]["shards"][0]["name"] = name
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["train", "--config", TINY, "--data", str(out), "--output", str(tmp_path / "runs"),
                 "--backend", "local"]) == 2
    line = one_error_line(capsys)
    assert f"{out / 'manifest.json'}: split 'train' lists shard {name!r}, which is not a name inside the store" in line
    assert not (tmp_path / "runs").exists()
    assert prepare(release[0], out) == 0  # prepare rewrites it
    ShardStore.open(str(out), tiny_config(), checksums=True)


def test_a_failed_prepare_leaves_no_output_and_an_existing_store_untouched(release, tmp_path, capsys):
    """A bad slice in the raw release's test split (written last, after train/ and valid/)."""
    root = tmp_path / "release"
    shutil.copytree(release[0], root)
    bad = root / "image" / AISD_TEST_CASES[0] / "2.png"
    good = bad.read_bytes()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but cut short")
    out = tmp_path / "new" / "shards"
    assert prepare(root, out) == 2
    assert f"{bad}: cannot read image" in one_error_line(capsys)
    assert not (tmp_path / "new").exists()
    bad.write_bytes(good)
    assert prepare(root, out) == 0
    before = {p: p.read_bytes() for p in out.rglob("*")if p.is_file()}
    bad.write_bytes(b"garbage")
    capsys.readouterr()
    assert prepare(root, out) == 2
    assert f"{bad}: cannot read image" in one_error_line(capsys)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
