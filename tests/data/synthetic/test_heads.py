"""Realistic synthetic heads (``heads``, ``anatomy``, ``mimics``): each part where and as dense as in a
head CT, the mimics labelled background, the acute lesion a few HU below the tissue it lies in; the
simple heads of before, bit for bit, behind ``synthetic.anatomy = "simple"``."""

import hashlib

import numpy as np
import pytest
from scipy import ndimage

from aisd_ray.config import ConfigError, SyntheticConfig, load_config
from aisd_ray.data.ct.head import head_model
from aisd_ray.data.synthetic.heads import synth_head
from aisd_ray.data.synthetic.mimics import TERRITORY_SHARE, AcuteLesion
from aisd_ray.data.synthetic.volumes import synth_volume

SIZE, SLICES = 96, 8
CASES = [f"{1000000 + i}" for i in range(14)]


@pytest.fixture(scope="module")
def heads():
    """14 patients at 96 px, 8 slices, with the generator's record of where each part lies."""
    return {case: synth_head(3, case, SIZE, SLICES, 5.0, 3.0, 5.0, 230.0, with_parts=True) for case in CASES}


def _sides(mask, brain):
    """Voxels of ``mask`` right and left of the brain's midline (its centroid, slice by slice)."""
    sides = [0, 0]
    for k in range(len(mask)):
        if mask[k].any():
            mid = ndimage.center_of_mass(brain[k])[1]
            columns = np.nonzero(mask[k])[1]
            sides[0] += int((columns < mid).sum())
            sides[1] += int((columns > mid).sum())
    return sides


def _mean(hu, mask):
    return float(hu[mask].astype(float).mean())


@pytest.mark.parametrize("args,kwargs,digest", [
    ((2024, "1000003", 64, 8), {}, "372981139026e7603a933fbb09b9a02a1822037b24104658512567629f19d315"),
    ((7, "abc", 96, 6), {"lesion_hu": 8.0, "noise_hu": 2.0},
     "0ec9c2292c550eae1a7195528c281a0f66579341323ab9d41b5726f0c286962b"),
])
def test_simple_anatomy_is_the_generator_of_before_bit_for_bit(args, kwargs, digest):
    """The digests are SHA-256 of (HU bytes + label bytes) from main's ``synth_volume`` at e9ce733, before
    issue 31 added the realistic heads: old figures stay reproducible with ``synthetic.anatomy = "simple"``."""
    hu, labels, _ = synth_volume(*args, **kwargs, anatomy="simple")
    assert hashlib.sha256(hu.tobytes() + labels.tobytes()).hexdigest() == digest
    realistic, _, _ = synth_volume(*args, **kwargs)
    assert not np.array_equal(realistic, hu)  # the default is the realistic head


def test_the_anatomy_key_defaults_to_realistic_and_refuses_another():
    assert SyntheticConfig().anatomy == "realistic"
    assert load_config(None, ["synthetic.anatomy=simple"]).synthetic.anatomy == "simple"
    with pytest.raises(ConfigError, match=r"synthetic.anatomy.*realistic, simple.*'fancy'"):
        load_config(None, ["synthetic.anatomy=fancy"])
    with pytest.raises(ValueError, match="synthetic anatomy 'fancy'"):
        synth_volume(1, "1", 32, 3, anatomy="fancy")


def test_every_part_and_mimic_is_drawn_somewhere(heads):
    seen = {name for *_, parts in heads.values() for name, mask in parts.items() if mask.any()}
    assert seen >= {"scalp", "holder", "skull", "sinus_air", "mastoid_air", "petrous", "orbital_fat", "globes",
                    "ventricles", "third_ventricle", "fourth_ventricle", "cisterns", "sulci", "falx", "pineal",
                    "plexus", "cerebellum", "brainstem", "streaks", "old_infarct", "lacunes", "leukoaraiosis"}


def test_mimic_voxels_are_never_labelled_lesion_and_the_lesion_lies_in_parenchyma(heads):
    for hu, labels, _, parts in heads.values():
        assert labels.any()
        for mimic in ("old_infarct", "lacunes", "leukoaraiosis", "ventricles", "cisterns", "sulci", "streaks",
                      "sinus_air", "orbital_fat"):
            assert not labels[parts[mimic]].any(), mimic
        assert parts["parenchyma"][labels > 0].all()
        per_slice = labels.sum(axis=(1, 2))
        assert per_slice[0] == per_slice[-1] == 0  # never the first or last slice, as the simple heads


def test_the_lowest_slice_holds_air_inside_the_head_with_bone_beside_it(heads):
    for hu, _, spacing, parts in heads.values():
        air = parts["sinus_air"][0] | parts["mastoid_air"][0]
        assert air.any() and (hu[0][air] < -500).all()
        assert head_model(hu, spacing).head[0][air].all()  # inside the head, not the air around it
        beside = ndimage.binary_dilation(air, iterations=2) & ~air
        assert (hu[0][beside] >= 300).mean() > 0.3  # bone around the cells
        assert (hu[0][parts["petrous"][0]] > 1200).all() and (hu[0][parts["orbital_fat"][0]] < -50).mean() > 0.9
        assert 0 <= np.median(hu[0][parts["globes"][0]]) <= 20  # vitreous


def test_ventricles_are_csf_dense_and_nearly_symmetric(heads):
    for hu, _, _, parts in heads.values():
        vent = parts["ventricles"]
        assert 0 <= np.median(hu[vent]) <= 15
        lateral = vent & ~parts["third_ventricle"] & ~parts["fourth_ventricle"]
        sides = _sides(lateral, parts["intracranial"])
        assert 0.6 < sides[0] / sides[1] < 1.6  # each side's size drawn 0.9..1.1 of the patient's


def test_old_infarcts_are_as_dark_as_csf_and_acute_lesions_a_few_hu_below_parenchyma(heads):
    found = 0
    for hu, labels, _, parts in heads.values():
        csf = _mean(hu, parts["ventricles"])
        lesion = labels > 0
        around = ndimage.binary_dilation(lesion, iterations=4) & ~ndimage.binary_dilation(lesion, iterations=2)
        around &= parts["parenchyma"] & ~parts["leukoaraiosis"] & ~parts["old_infarct"] & ~parts["lacunes"]
        contrast = _mean(hu, around) - _mean(hu, lesion)
        assert 1.5 < contrast < 9.0 and _mean(hu, lesion) - csf > 10  # dark, but not CSF
        for mimic in ("old_infarct", "lacunes"):
            if parts[mimic].any():
                found += 1
                assert abs(_mean(hu, parts[mimic]) - csf) < 6  # CSF 3..10 plus 0..5, noise SD 3
    assert found >= 2


def test_the_acute_lesion_lowers_grey_and_white_matter_alike_by_lesion_hu():
    """Respecting grey and white matter: inside the lesion each voxel lies lesion_hu below what it
    would be without one, in cortex and white matter alike (same noise: the same random draws)."""
    hu, labels, _, parts = synth_head(5, "1000002", SIZE, SLICES, 5.0, 3.0, 5.0, 230.0, with_parts=True)
    flat, _, _ = synth_head(5, "1000002", SIZE, SLICES, 0.0, 3.0, 5.0, 230.0)
    lesion = labels > 0
    white = lesion & parts["white"]
    grey = lesion & ~parts["white"]
    assert white.sum() > 10 and grey.sum() > 10
    for where in (white, grey):
        assert (hu[where].astype(float) - flat[where]).mean() == pytest.approx(-5.0, abs=0.1)


def test_leukoaraiosis_is_bilateral_symmetric_and_below_white_matter(heads):
    graded = compared = 0
    for hu, labels, _, parts in heads.values():
        leuko = parts["leukoaraiosis"]
        if leuko.sum() < 20:
            continue
        graded += 1
        clear = ~labels.any(axis=(1, 2))  # slices without the lesion, which it keeps 3 mm away from
        if leuko[clear].sum() >= 20:
            compared += 1
            sides = _sides(leuko[clear], parts["intracranial"][clear])
            assert 0.6 < sides[0] / sides[1] < 1.6  # both sides alike
        white = parts["white"] & ~leuko & ~parts["old_infarct"] & ~parts["lacunes"]
        assert 2.0 < _mean(hu, white) - _mean(hu, leuko) < 9.0
    assert graded >= 3 and compared >= 3


def test_calcifications_falx_streaks_and_scalp(heads):
    for hu, _, spacing, parts in heads.values():
        for calcified in ("pineal", "plexus"):
            if parts[calcified].any():
                assert np.median(hu[parts[calcified]]) > 100
        assert np.median(hu[parts["falx"]]) > np.median(hu[parts["parenchyma"]])
        cerebellum = parts["cerebellum"] & parts["parenchyma"]
        streaked = cerebellum & parts["streaks"]
        if streaked.sum() > 10:
            assert _mean(hu, cerebellum & ~parts["streaks"]) - _mean(hu, streaked) > 2.0
        assert 20 <= np.median(hu[parts["scalp"]]) <= 60
        if parts["holder"].any():  # apart from the head: not part of it
            assert not head_model(hu, spacing).head[parts["holder"]].any()


def test_most_acute_lesions_lie_in_the_middle_cerebral_artery_territory():
    rng = np.random.default_rng(0)
    drawn = [AcuteLesion.draw(rng).territory for _ in range(2000)]
    for territory, share in TERRITORY_SHARE.items():
        assert drawn.count(territory) / len(drawn) == pytest.approx(share, abs=0.03)
