import numpy as np
import pytest

from aisd_ray.data.ct.windows import InPlane, window


def test_a_window_maps_hu_linearly_onto_0_255_and_clips():
    """Brain window (level 40, width 80): 0 HU and below black, 80 HU and above white, 40 HU mid-grey
    (127.5 rounds to 128), 20 HU a quarter (63.75 -> 64)."""
    hu = np.array([[-1000, 0, 20, 40, 80, 1200]], np.int16)
    out = window(hu, [(40, 80)], 1)
    assert out.dtype == np.uint8 and out.shape == (1, 6, 1)
    assert out[0, :, 0].tolist() == [0, 0, 64, 128, 255, 255]


def test_one_window_is_replicated_and_several_fill_one_channel_each():
    hu = np.full((2, 2), 32, np.int16)
    grey = window(hu, [(40, 80)], 3)
    assert grey.shape == (2, 2, 3) and (grey == grey[..., :1]).all()
    three = window(hu, [(40, 80), (32, 8), (40, 400)], 3)
    # 32 HU: (32-0)/80 -> 102; stroke window 28..36 -> 127.5 -> 128; wide -160..240 -> 0.48 -> 122
    assert three[0, 0].tolist() == [102, 128, 122]
    with pytest.raises(ValueError, match="2 windows for 3 channels"):
        window(hu, [(40, 80), (40, 40)], 3)


def test_in_plane_resize_records_the_model_spacing_and_goes_back_to_the_slice_size():
    plane = InPlane(512, 400, (0.45, 0.5), 128, 128)
    assert plane.model_spacing == pytest.approx((1.8, 1.5625))
    probs = np.zeros((128, 128, 2), np.float32)
    probs[..., 0] = 1
    probs[32:96, 32:96] = [0, 1]
    back = plane.labels_back(probs)
    assert back.shape == (512, 400) and back.dtype == np.uint8
    assert back[256, 200] == 1 and back[10, 10] == 0
    assert plane.probabilities_back(probs).shape == (512, 400, 2)
