import json

import numpy as np
import pytest
from PIL import Image

from aisd_ray.data.sources.layout import DataError
from aisd_ray.inference.infer import infer_folder


def test_masks_come_back_at_each_input_size_with_palette_colours(trained_run, tmp_path):
    export_uri = trained_run[3]
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (100, 80, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(images / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(images / "c.jpeg")
    out = tmp_path / "out"
    written = infer_folder(export_uri, images, str(out), batch_size=2, progress=False)
    assert written == ["a.png", "b.png", "c.png"]
    for name, size in (("a", (80, 100)), ("b", (64, 64)), ("c", (200, 300))):
        mask = Image.open(out / f"{name}.png")
        assert mask.mode == "P" and mask.size == size
        assert mask.getpalette()[:6] == [0, 0, 0, 255, 255, 255]
        assert set(np.unique(np.asarray(mask))) <= {0, 1}
        overlay = Image.open(out / "overlays" / f"{name}.png")
        assert overlay.size == (2 * size[0] + 4, size[1])


def test_no_images_is_an_error(trained_run, tmp_path):
    import pytest

    from aisd_ray.data.sources.layout import DataError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images"):
        infer_folder(trained_run[3], tmp_path / "empty", str(tmp_path / "out"), progress=False)


def test_upscaled_masks_follow_the_probabilities_not_the_model_grid():
    from aisd_ray.data.sources.layout import labels_at, resize_labels

    probs = np.zeros((4, 4, 2), np.float32)
    probs[..., 0] = 1.0
    probs[1:3, 1:3] = (0.0, 1.0)  # a 2x2 lesion in a 4x4 prediction
    smooth = labels_at(probs, 32, 32)
    blocky = resize_labels(np.argmax(probs, -1).astype(np.uint8), 32, 32)
    assert smooth.shape == (32, 32) and smooth[16, 16] == 1 and smooth[0, 0] == 0
    assert smooth.sum() < blocky.sum()  # bilinear probabilities round the square's corners
    assert not smooth[8, 8] and blocky[8, 8]  # the corner pixel of the 2x2 block
    assert (labels_at(probs, 4, 4) == np.argmax(probs, -1)).all()


def test_a_real_export_segments_a_dicom_series_and_a_nifti_and_evaluate_scores_them_in_mm(trained_run, tmp_path,
                                                                                           capsys, caplog):
    """The CLI end to end on a trained SavedModel: a shuffled DICOM series and a NIfTI of the same
    synthetic patient give masks on their inputs' grids and a summary in mL; `evaluate
    --predictions/--masks` scores the masks against the labels in mm and mL (nnU-Net's
    evaluate_folder use)."""
    import SimpleITK as sitk

    from aisd_ray.cli import main
    from aisd_ray.data.sources import volume, volume_write
    from aisd_ray.data.synthetic.volumes import synth_volume, write_dicom_series, write_nifti_case

    hu, truth, spacing = synth_volume(7, "1000002", 80, 6)
    patients, labels = tmp_path / "patients", tmp_path / "labels"
    write_dicom_series(hu, spacing, patients / "1000002", "1000002", seed=7)
    write_nifti_case(hu, spacing, patients / "1000003.nii.gz")
    for case, given in (("1000002", patients / "1000002"), ("1000003", patients / "1000003.nii.gz")):
        volume_write.write_nifti(volume.read_volume(given), truth, labels / f"{case}.nii.gz")
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="aisd_ray"):
        assert main(["infer", "--model", trained_run[3], "--input", str(patients), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    # trained on 8-bit slices, given CT volumes: segmented through its window, with one QA warning line
    [warning] = [r.getMessage() for r in caplog.records if "QA input_kind" in r.getMessage()]
    assert warning.startswith(f"{patients}: QA input_kind: CT volumes in HU given to the export")
    assert "1000002: lesion" in printed and "1000003: lesion" in printed
    for case in ("1000002", "1000003"):
        mask = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        truth_image = sitk.ReadImage(str(labels / f"{case}.nii.gz"))
        assert mask.GetSize() == truth_image.GetSize() == (80, 80, 6)
        assert np.allclose(mask.GetDirection(), truth_image.GetDirection())
        assert np.allclose(mask.GetOrigin(), truth_image.GetOrigin(), atol=1e-3)
        summary = json.loads((out / "cases" / case / "summary.json").read_text())
        assert summary["spacing_mm_zyx"] == [round(s, 5) for s in spacing] and summary["lesion_ml"] >= 0
    # the same patient read two ways gives the same prediction
    a = volume.read_labels(out / "1000002.nii.gz", like=volume.read_volume(patients / "1000002"))
    b = volume.read_labels(out / "1000003.nii.gz", like=volume.read_volume(patients / "1000003.nii.gz"))
    assert np.array_equal(a, b)
    report_dir = tmp_path / "eval"
    assert main(["evaluate", "--predictions", str(out), "--masks", str(labels), "--output", str(report_dir)]) == 0
    report = json.loads((report_dir / "metrics.json").read_text())
    assert report["cases"] == 2 and {r["case_id"] for r in report["per_case"]} == {"1000002", "1000003"}
    row = report["per_case"][0]
    assert row["true_ml"] == pytest.approx(truth.sum() * np.prod(spacing) / 1000)
    assert "hd95_mm" in row and "nsd" in row and "lesion_f1" in row
    assert (report_dir / "per_case.csv").is_file() and (report_dir / "volume_agreement.png").is_file()


# Case 10 of issue 28: 8-bit slices given to an export trained on CT volumes in HU (input_kind.py's rule)

def _export(tmp_path, name, kind, channels="grey", windows=((40.0, 80.0),)):
    """A real (untrained) tiny export recording that it was trained on ``kind`` input, as export_best
    writes what its run recorded of its store."""
    from aisd_ray.config import builtin_config, load_config
    from aisd_ray.inference.export import export_model
    from aisd_ray.model.flexunet import build_flexunet

    cfg = load_config(builtin_config("tiny"), [f"data.channels='{channels}'",
                                               f"data.windows={[list(w) for w in windows]}"])
    record = {"kind": kind, "windows": [list(map(float, w)) for w in windows], "channels": channels}
    return export_model(cfg, build_flexunet(cfg.model), str(tmp_path / name),
                        {"input": record if kind == "ct_hu" else {"kind": kind}})


def _slices(tmp_path, n=3):
    folder = tmp_path / "slices"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (72, 80), dtype=np.uint8)).save(folder / f"slice_{k}.png")
    return folder


@pytest.mark.parametrize("channels, windows", [
    ("windows", ((40.0, 80.0), (35.0, 30.0), (40.0, 400.0))),  # the demo's export
    ("grey", ((40.0, 80.0), (35.0, 30.0), (40.0, 400.0))),
    ("neighbours", ((40.0, 80.0),)),
], ids=["three-windows", "grey-three-windows", "neighbours"])
def test_8bit_slices_to_an_export_of_several_hu_windows_are_refused_in_one_line(tmp_path, capsys, channels, windows):
    from aisd_ray.cli import main

    export = _export(tmp_path, "export", "ct_hu", channels, windows)
    slices = _slices(tmp_path)
    out = tmp_path / "out"
    assert main(["infer", "--model", export, "--images", str(slices), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{slices}: 8-bit image slices, but the export {export} expects CT volumes in HU, made into channels " \
           f"'{channels}'" in err
    assert err.endswith("which 8-bit slices cannot give: give --input a DICOM series or NIfTI")
    assert not out.exists()


def test_8bit_slices_to_an_export_of_one_grey_hu_window_are_segmented_with_a_qa_warning(tmp_path, caplog):
    export = _export(tmp_path, "export", "ct_hu")
    slices = _slices(tmp_path)
    with caplog.at_level("WARNING", logger="aisd_ray"):
        written = infer_folder(export, slices, str(tmp_path / "out"), progress=False)
    assert written == ["slice_0.png", "slice_1.png", "slice_2.png"]
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    qa = json.loads((tmp_path / "out" / "qa.json").read_text())
    assert qa == {"checks": [{"check": "input_kind", "status": "warn", "value": "slices_8bit", "expected": "ct_hu",
                              "message": warning.split("QA input_kind: ", 1)[1]}]}
    assert warning.startswith(f"{slices}: QA input_kind: 8-bit image slices given to the export {export}, "
                              "trained on CT volumes in HU through the window (40, 80) HU")
    # --strict refuses what QA warns of: one line, nothing written
    refusal = r"slices: QA input_kind = slices_8bit, expected ct_hu: 8-bit image slices .* \(--strict refuses what QA"
    with pytest.raises(DataError, match=refusal):
        infer_folder(export, slices, str(tmp_path / "strict"), progress=False, strict=True)
    assert not (tmp_path / "strict").exists()


def test_8bit_slices_to_an_8bit_export_pass_and_to_an_export_from_before_are_said_unchecked(trained_run, tmp_path,
                                                                                             caplog):
    import shutil

    slices = _slices(tmp_path)
    with caplog.at_level("WARNING", logger="aisd_ray"):
        infer_folder(trained_run[3], slices, str(tmp_path / "out"), progress=False)
    assert json.loads((tmp_path / "out" / "qa.json").read_text())["checks"][0]["status"] == "pass"
    assert not [r for r in caplog.records if "QA" in r.getMessage()]

    old = tmp_path / "old"
    shutil.copytree(trained_run[3], old)
    info = json.loads((old / "export.json").read_text())
    del info["input"]  # as exports were written before they recorded it
    (old / "export.json").write_text(json.dumps(info))
    infer_folder(str(old), slices, str(tmp_path / "old-out"), progress=False)
    [check] = json.loads((tmp_path / "old-out" / "qa.json").read_text())["checks"]
    assert check["status"] == "skipped" and check["expected"] == "unknown"
    [line] = [r.getMessage() for r in caplog.records if "QA" in r.getMessage()]
    assert "does not record the kind of input it was trained on" in line and "cannot be checked" in line


def test_the_demos_export_refuses_prewindowed_png_slices_naming_what_it_expects(synthetic_root, tmp_path, capsys):
    """Case 10 as handed: the demo's export (trained on CT volumes through three HU windows) and
    pre-windowed 8-bit PNG slices: exit 2, one line, no mask written. The export learnt its input
    from its run's record of the store."""
    from aisd_ray.cli import main
    from aisd_ray.inference.export import LoadedExport

    demo = tmp_path / "demo"
    settings = ["synthetic.layout='nnunet'", "synthetic.num_cases=10", "synthetic.slices_per_case=6",
                "synthetic.num_test_cases=2", "synthetic.size=96", "train.backend='local'", "train.epochs=1",
                "data.channels='windows'", "data.windows=[[40, 80], [35, 30], [40, 400]]"]  # the demo's channels
    assert main(["demo", "--config", "tiny", "--output", str(demo), "-q", *[a for s in settings
                                                                         for a in ("--set", s)]]) == 0
    source = json.loads((demo / "shards" / "manifest.json").read_text())["source"]
    export = demo / "tiny" / "export"
    assert LoadedExport(str(export)).input == {"kind": "ct_hu", "windows": source["windows"], "channels": "windows"}
    slices = synthetic_root / "test" / "images"  # 8-bit PNG slices, windowed once by their maker
    capsys.readouterr()
    assert main(["infer", "--model", str(export), "--images", str(slices), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{slices}: 8-bit image slices, but the export {export} expects CT volumes in HU, made into channels " \
           "'windows' through the window(s) (40, 80), (35, 30), (40, 400) HU" in err
    assert not (tmp_path / "out").exists()
