"""stages.data's prepare on the Ray backend: a volume source's cases read as Ray tasks give the
store a process pool gives, byte for byte."""

import pytest

from aisd_ray.data.store.prepare import prepare
from aisd_ray.data.synthetic.layouts import write_synthetic
from aisd_ray.stages.data import case_map
from tests.conftest import volume_config

pytestmark = pytest.mark.slow


def test_cases_read_as_ray_tasks_make_the_same_store(ray_cluster, tmp_path):
    cfg = volume_config("nnunet", 6, 2, 96, 4, "data.prepare_workers=1", "train.backend='ray'")
    cfg.data.source_dir = str(write_synthetic(tmp_path / "src", cfg.synthetic, progress=False))
    assert case_map(volume_config("nnunet", 6, 2, 96, 4, "train.backend='local'")) is None
    calls = []
    ray_map = case_map(cfg)

    def counted(fn, items):
        items = list(items)
        calls.append(len(items))
        return ray_map(fn, items)

    on_ray = prepare(cfg, str(tmp_path / "ray"), progress=False, map=counted)
    here = prepare(cfg, str(tmp_path / "here"), progress=False)
    assert calls == [6]
    files = {}
    for name in ("ray", "here"):
        root = tmp_path / name
        files[name] = {p.relative_to(root): p.read_bytes() for p in root.rglob("*.parquet")}
    assert files["ray"] == files["here"] and files["ray"]
    assert on_ray["splits"] == here["splits"] and on_ray["source"] == here["source"]


def test_a_case_refused_in_a_ray_task_is_its_one_line(ray_cluster, tmp_path):
    import nibabel as nib
    import numpy as np

    from aisd_ray.data.sources.layout import DataError

    cfg = volume_config("nnunet", 4, 1, 96, 4, "train.backend='ray'")
    cfg.data.source_dir = str(write_synthetic(tmp_path / "src", cfg.synthetic, progress=False))
    label = sorted((tmp_path / "src").rglob("labelsTr/*.nii.gz"))[0]
    img = nib.load(label)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 9  # a class id the 2-class model lacks
    nib.save(nib.Nifti1Image(data, img.affine, img.header), label)
    with pytest.raises(DataError) as err:
        prepare(cfg, str(tmp_path / "store"), progress=False, map=case_map(cfg))
    assert str(err.value).startswith(f"{label}: label values") and "\n" not in str(err.value)
    assert type(err.value) is DataError and not (tmp_path / "store").exists()


def test_without_a_running_ray_the_cases_go_to_the_process_pool(monkeypatch):
    """No Ray is started for prepare alone: with none running here and no RAY_ADDRESS, the Ray
    backend's map is the process pool's."""
    import ray

    from aisd_ray.train import ray_session

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_session, "ensure_ray", lambda *a: pytest.fail("Ray started for prepare alone"))
    cfg = volume_config("nnunet", 4, 1, 96, 4, "train.backend='ray'", "data.prepare_workers=2")
    assert list(case_map(cfg)(abs, [-2, 3, -5])) == [2, 3, 5]
