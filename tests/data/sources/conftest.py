"""Helpers the reader tests share: a rigid world transform, a refused read."""

import numpy as np
import pytest

from aisd_ray.data.sources.layout import DataError
from aisd_ray.data.sources.volume import VolumeError, read_volume


def rigid(degrees, axis, shift):
    """A RAS world transform: a rotation by ``degrees`` about ``axis``, then a shift (mm)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(degrees)
    out = np.eye(4)
    out[:3, :3] = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k
    out[:3, 3] = shift
    return out


def refused(path, match):
    """The VolumeError read_volume raises for ``path``: one line, naming it."""
    with pytest.raises(VolumeError, match=match) as info:
        read_volume(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value, DataError)
    return str(info.value)
