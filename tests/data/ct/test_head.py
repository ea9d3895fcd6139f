"""The head model (``aisd_ray.data.ct.head``): on synthetic heads (realistic and simple) the intracranial
space is the brain and CSF (the lesion inside it, air and skull not), its figures those of the pixels; on a real body
CT (TotalSegmentator's test file) there is no intracranial space."""

import numpy as np
import pytest

from aisd_ray.data.sources import volume
from aisd_ray.data.ct.head import BONE_HU, SOFT_HU, head_model
from aisd_ray.data.synthetic.heads import synth_head
from aisd_ray.data.synthetic.volumes import synth_volume
from tests.helpers import BODY_CT


@pytest.mark.parametrize("case,size,slices", [("1000001", 64, 8), ("1000002", 96, 6)])
def test_the_brain_of_a_synthetic_head_is_found_with_the_lesion_inside_and_no_air_or_bone(case, size, slices):
    """The realistic head (scalp, orbits, sinuses, skull base) against the generator's own record of
    where its cranial cavity lies; the simple head, with no soft tissue outside its skull, against
    its soft voxels."""
    hu, labels, spacing, parts = synth_head(7, case, size, slices, 5.0, 3.0, 5.0, 230.0, with_parts=True)
    simple, simple_labels, _ = synth_volume(7, case, size, slices, anatomy="simple")
    for hu, labels, cavity in ((hu, labels, parts["intracranial"]), (simple, simple_labels, None)):
        model = head_model(hu, spacing)
        soft = (hu >= SOFT_HU[0]) & (hu <= SOFT_HU[1])
        inside = soft if cavity is None else soft & cavity
        assert labels.any() and model.intracranial[labels > 0].all()
        assert not model.intracranial[hu < -500].any() and not model.intracranial[hu >= BONE_HU].any()
        assert model.intracranial.sum() >= 0.95 * inside.sum() and not model.intracranial[~inside].any()
        # each slice's, the skull base's too (between orbits, sinuses and petrous bones)
        assert np.all(model.intracranial.sum(axis=(1, 2)) >= 0.95 * inside.sum(axis=(1, 2)))
        assert model.skull[hu >= BONE_HU].all() and model.head[model.intracranial].all()
        voxel_ml = float(np.prod(spacing)) / 1000
        assert model.intracranial_ml == pytest.approx(model.intracranial.sum() * voxel_ml)
        assert model.head_fraction == pytest.approx(model.head.mean())
        assert abs(model.parenchyma_hu_median - np.median(hu[model.intracranial])) <= 1.0


@pytest.mark.parametrize("noise", [3.0, 8.0])
def test_the_noise_estimate_follows_the_images_noise(noise):
    hu, _, spacing = synth_volume(7, "1000003", 96, 6, noise_hu=noise)
    model = head_model(hu, spacing)
    assert model.parenchyma_noise_hu == pytest.approx(noise, rel=0.25)


def test_a_real_body_ct_has_a_body_and_bone_but_no_intracranial_space():
    vol = volume.read_volume(BODY_CT)
    assert vol.hu.shape == (112, 101, 122) and vol.spacing == pytest.approx((3.0, 3.0, 3.0))
    model = head_model(vol.hu, vol.spacing)
    assert model.head_fraction > 0.3 and model.skull.sum() > 1000
    assert model.intracranial_ml == 0 and model.parenchyma_hu_median is None and model.parenchyma_noise_hu is None


def test_a_512_matrix_volume_of_40_slices_is_modelled():
    """A clinical matrix size runs through (its speed is a benchmark's concern, not a test's)."""
    small, _, spacing = synth_volume(7, "1000004", 128, 40)
    hu = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)  # 512 x 512 x 40
    model = head_model(hu, (spacing[0], spacing[1] / 4, spacing[2] / 4))
    assert model.intracranial.shape == hu.shape and model.intracranial_ml > 100


def test_a_volume_that_is_not_3d_is_a_value_error():
    with pytest.raises(ValueError, match="shape"):
        head_model(np.zeros((4, 4), np.int16), (1.0, 1.0, 1.0))
