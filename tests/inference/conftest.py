"""Helpers the inference tests share."""

import numpy as np


def head_with_block():
    """(HU (7, 80, 72) int16, truth bool): air, a 36 HU head, an 86 HU block on slices 2..4 (even
    values: the series is stored with RescaleSlope 2)."""
    hu = np.full((7, 80, 72), -1000, np.int16)
    hu[:, 8:72, 6:66] = 36
    truth = np.zeros(hu.shape, bool)
    truth[2:5, 20:40, 30:50] = True
    hu[truth] = 86
    return hu, truth
