"""Fixtures of the CT-volume reader and writer tests: one synthetic head (``tests.helpers.HEAD_SIZE`` px,
``HEAD_SLICES`` slices of 5 mm) and its plain DICOM series read back, the control every variant must equal."""

import pytest

from aisd_ray.data.synthetic.volumes import synth_volume, write_dicom_series
from aisd_ray.data.sources.volume import read_volume
from tests.helpers import HEAD_SIZE, HEAD_SLICES


@pytest.fixture(scope="module")
def case():
    """(HU (Z, Y, X) int16, labels uint8, spacing (z, y, x) mm) of one synthetic head."""
    return synth_volume(5, "0042", HEAD_SIZE, HEAD_SLICES)


@pytest.fixture(scope="module")
def control(case, tmp_path_factory):
    """The plain series of the head, read: what every variant must equal."""
    hu, _, spacing = case
    folder = tmp_path_factory.mktemp("control") / "plain"
    write_dicom_series(hu, spacing, folder, "plain")
    return read_volume(folder)
