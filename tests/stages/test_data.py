"""stages.data's prepare on the Ray backend: a volume source's cases read as Ray tasks give the
store a process pool gives, byte for byte; a refused case ends the map without cancelling a task
(Ray 2.60's ray.cancel of a running task can end the driver process)."""

import time

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


def _slow_mark(item):
    """A case's task: refuses item 2 at once, else writes its marker after a moment."""
    from pathlib import Path

    from aisd_ray.data.sources.layout import DataError

    folder, i = item
    if i == 2:
        raise DataError(f"case {i}: refused")
    time.sleep(0.5)
    Path(folder, f"{i}.done").write_text("")
    return i


def test_a_refused_case_lets_the_tasks_in_flight_finish_and_starts_no_more(ray_cluster, tmp_path):
    """Item 2 of 40 is refused: the error is raised only once every task in flight has finished (its
    marker written, none written after; a cancelled one would have been stopped), and the items
    beyond the window are never started."""
    import ray

    from aisd_ray.data.sources.layout import DataError

    cfg = volume_config("nnunet", 4, 1, 96, 4, "train.backend='ray'")
    node = ray.get_runtime_context().get_node_id()
    cpus = int(next(n["Resources"]["CPU"] for n in ray.nodes() if n["NodeID"] == node))
    with pytest.raises(DataError, match="case 2: refused"):
        list(case_map(cfg)(_slow_mark, [(str(tmp_path), i) for i in range(40)]))
    done = sorted(int(p.stem) for p in tmp_path.glob("*.done"))
    # items 3..2+2*cpus were in flight when item 2 was refused: each finished; none after them started
    assert done == [i for i in range(3 + 2 * cpus) if i != 2]
    time.sleep(1.0)
    assert sorted(int(p.stem) for p in tmp_path.glob("*.done")) == done  # no task was still running
