"""Cases read side by side: the same store, byte for byte, at 1 and 2 worker processes; a case
refused in a worker process is the same one line here."""

import pytest

from aisd_ray.data.sources.layout import DataError
from aisd_ray.data.store import parallel
from aisd_ray.data.store.prepare import prepare
from aisd_ray.data.synthetic.layouts import write_synthetic
from tests.conftest import volume_config


def _cfg(workers: int):
    return volume_config("nnunet", 6, 2, 96, 4, f"data.prepare_workers={workers}")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("nnunet"), _cfg(1).synthetic, progress=False)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()
            and p.name != "manifest.json"}


def test_the_store_is_the_same_byte_for_byte_at_one_and_two_workers(source, tmp_path):
    stores = {}
    for workers in (1, 2):
        cfg = _cfg(workers)
        cfg.data.source_dir = str(source)
        manifest = prepare(cfg, str(tmp_path / f"w{workers}"), progress=False)
        stores[workers] = manifest, _files(tmp_path / f"w{workers}")
    (one, one_files), (two, two_files) = stores[1], stores[2]
    assert one_files == two_files and len(one_files) == sum(len(e["shards"]) for e in one["splits"].values())
    for key in ("splits", "source", "fingerprint"):
        assert one[key] == two[key]


def test_a_case_refused_in_a_worker_process_is_one_line_naming_its_file(source, tmp_path):
    import shutil

    import nibabel as nib
    import numpy as np

    bad = tmp_path / "src"
    shutil.copytree(source, bad)
    label = sorted((bad / "labelsTr").iterdir())[-1]
    img = nib.load(label)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 7  # a class id the 2-class model lacks
    nib.save(nib.Nifti1Image(data, img.affine, img.header), label)
    cfg = _cfg(2)
    cfg.data.source_dir = str(bad)
    with pytest.raises(DataError) as err:
        prepare(cfg, str(tmp_path / "store"), progress=False)
    assert str(err.value).startswith(f"{label}: label values") and "\n" not in str(err.value)
    assert not (tmp_path / "store").exists()


def test_a_map_gives_results_in_item_order_and_one_worker_per_item_at_most():
    assert list(parallel.local_map(2)(abs, [-3, 2, -1])) == [3, 2, 1]
    assert parallel.worker_count(0, 1) == 1 and parallel.worker_count(8, 3) == 3 and parallel.worker_count(2, 0) == 1
