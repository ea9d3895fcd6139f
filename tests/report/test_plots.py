"""The training plots: lesion scores apart from the background-inclusive metric, NaN-safe."""

import numpy as np
from PIL import Image

from aisd_ray.report import plots


def rollback_marker(image):
    """Pixels of the rollback line: matplotlib's tab:red at alpha 0.6 over white, about (230, 125, 126)."""
    r, g, b = (image[..., i].astype(int) for i in range(3))
    return (r > 215) & (abs(g - 125) < 15) & (abs(b - 126) < 15)


def test_training_metrics_plot_with_a_rollback_and_an_undefined_epoch(tmp_path):
    history = [{"epoch": e, "lesion_dice": 0.1 * e, "val_lesion_dice": float("nan") if e == 1 else 0.1 * e,
                "val_lesion_iou": 0.05 * e, "val_dice_coef_multiclass": 0.9 + 0.01 * e,
                "learning_rate": 1e-3 / e, "rollbacks": 0 if e < 3 else 1} for e in range(1, 6)]
    out = tmp_path / "train_metrics.png"
    plots.training_metrics(history, "demo", str(out))
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (750, 650, 3)
    assert rollback_marker(image).any()
    plots.training_metrics([{**row, "rollbacks": 0} for row in history], "demo", str(tmp_path / "plain.png"))
    plain = np.asarray(Image.open(tmp_path / "plain.png").convert("RGB"))
    assert not rollback_marker(plain).any()
