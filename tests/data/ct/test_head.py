"""The head model (``aisd_ray.data.ct.head``): on synthetic heads (realistic and simple) the intracranial
space is the brain and CSF (the lesion inside it, air and skull not), its figures those of the pixels; on a real body
CT (TotalSegmentator's test file) there is no intracranial space. The brain mask: the brain and
the lesion whole, no air, bone or field-of-view padding, lesion voxels outside SOFT_HU kept."""

import numpy as np
import pytest
from scipy import ndimage

from aisd_ray.data.sources import volume
from aisd_ray.data.ct.head import BONE_HU, SOFT_HU, brain_mask, head_model
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


@pytest.mark.parametrize("case,size,slices", [("1000001", 64, 8), ("1000002", 96, 6)])
def test_the_brain_mask_holds_the_whole_brain_and_lesion_and_no_air_bone_or_padding(case, size, slices):
    """The synthetic head holds no soft tissue outside its skull: the brain mask is its intracranial
    space (everything in SOFT_HU there), with the lesion; a scanner's padding outside its
    reconstruction circle (-3024 HU) changes nothing."""
    hu, labels, spacing = synth_volume(7, case, size, slices)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    hu[:, np.hypot(yy, xx) > 0.5 * size] = -3024  # outside the field of view
    model = head_model(hu, spacing)
    brain = brain_mask(hu, spacing, model)
    assert brain.dtype == bool and brain.shape == hu.shape
    assert brain[labels > 0].all() and brain[model.intracranial].all()
    assert not brain[hu >= BONE_HU].any() and not brain[hu <= -500].any()
    assert np.array_equal(brain, brain_mask(hu, spacing))  # the head model computed here: the same


def test_the_brain_mask_keeps_lesion_voxels_that_noise_or_the_inner_table_push_out_of_soft_hu():
    """A voxel of the brain at the inner table (partial volume with bone, 100..300 HU) or one that
    noise pushes below -20 HU lies outside the intracranial space's SOFT_HU but inside the brain."""
    hu, _, spacing = synth_volume(7, "1000001", 96, 6)
    inside = head_model(hu, spacing).intracranial
    bone = hu >= BONE_HU
    at_table = inside & ndimage.binary_dilation(bone, np.ones((1, 3, 3), bool))
    # not the lowest slice: its cavity (the skull base's) is small, and its whole rim at 180 HU is a fifth of
    # it, so the region is no longer mostly soft tissue (SOFT_SHARE): the cavity rule working, not this one
    at_table[0] = False
    deep = ndimage.binary_erosion(inside, np.ones((1, 9, 9), bool))
    noisy = np.zeros_like(deep)
    noisy[np.nonzero(deep)[0][::97], np.nonzero(deep)[1][::97], np.nonzero(deep)[2][::97]] = True
    assert at_table.sum() > 20 and noisy.sum() > 20
    hu[at_table] = 180
    hu[noisy] = -45
    model = head_model(hu, spacing)
    brain = brain_mask(hu, spacing, model)
    assert not model.intracranial[at_table | noisy].any()  # outside SOFT_HU: not in the intracranial space
    assert brain[at_table].all() and brain[noisy].all()


def test_a_real_body_ct_has_no_brain_mask_so_nothing_of_it_can_hold_a_lesion():
    """TotalSegmentator's abdomen: its bone (ribs, spine, pelvis) encloses fat, bowel gas and the
    spinal canal, none of it a brain; with a scanner's padding outside a circle, none either."""
    vol = volume.read_volume(BODY_CT)
    hu = vol.hu.copy()
    assert (hu >= BONE_HU).sum() > 1000 and (hu <= -500).sum() > 1000
    assert not brain_mask(hu, vol.spacing).any()
    z, h, w = hu.shape
    yy, xx = np.mgrid[:h, :w]
    hu[:, np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) > 0.5 * min(h, w)] = -3024
    assert not brain_mask(hu, vol.spacing).any()
