"""Thin-slice scans (thin_slices.py): the infection model runs on slabs of about 1.25 mm, with a note."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib import thin_slices
from COVIDLesionSegLib.phantom import make_chest_phantom
from COVIDLesionSegLib.pipeline import Pipeline, SegmentOptions
from COVIDLesionSegLib.volume import CTVolume


def _image(hu: np.ndarray, spacing_zyx, origin=(-180.0, -160.0, 40.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    image.SetOrigin(origin)
    return image


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def test_slab_factor_groups_slices_up_to_1_25_mm():
    assert thin_slices.THIN_SLICE_MM == 1.25
    assert [thin_slices.slab_factor(s) for s in (5.0, 2.0, 1.25, 1.0, 0.625, 0.5, 0.3, 0.2986)] == \
        [1, 1, 1, 1, 2, 2, 4, 4]
    assert thin_slices.slab_slices(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]


def test_thick_slabs_are_the_slices_mean_with_the_middle_slice_s_lungs():
    """Each slab: the mean HU of its slices (the input's type), spacing k times the slice's, centred on its
    slices; the lungs of its middle slice; a last, shorter slab of what remains. The mask goes back to every
    slice of its slab, inside that slice's own lungs."""
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 200, size=(7, 6, 5)).astype(np.int16)
    lungs = rng.integers(0, 3, size=hu.shape).astype(np.uint8)
    volume = CTVolume.from_image(_image(hu, (0.4, 0.7, 0.7)))
    thick, thick_lungs = thin_slices.thick_slabs(volume, lungs, 3)
    assert thick.hu.dtype == np.int16 and thick.shape == (3, 6, 5)
    np.testing.assert_array_equal(thick.hu[0], np.rint(hu[0:3].mean(axis=0)))
    np.testing.assert_array_equal(thick.hu[2], hu[6])
    np.testing.assert_allclose(thick.spacing_zyx, (1.2, 0.7, 0.7), rtol=1e-6)
    assert thick.image.GetOrigin()[2] == pytest.approx(40.0 + 0.4)     # halfway between slices 0 and 2
    np.testing.assert_array_equal(thick_lungs, lungs[[1, 4, 6]])
    mask = np.zeros((3, 6, 5), bool)
    mask[1] = True
    back = thin_slices.to_thin_slices(mask, 3, lungs)
    assert back.shape == hu.shape
    np.testing.assert_array_equal(back[3:6], lungs[3:6] > 0)
    assert not back[:3].any() and not back[6:].any()
    with pytest.raises(ValueError, match="k >= 2"):
        thin_slices.thick_slabs(volume, lungs, 1)


def test_a_thin_scan_runs_the_infection_model_on_slabs_and_says_so():
    """A scan of 0.5 mm slices (each slice of a 1 mm phantom twice): the infection model runs on slabs of two
    slices, which are the 1 mm phantom's slices exactly, so its mask is the 1 mm run's on every thin slice (the
    lungs, computed on every thin slice on their 2 mm grid, come out the same here); the case's notes say
    so; a 1 mm scan has no such note."""
    image, truth = make_chest_phantom(shape_zyx=(256, 96, 96), spacing_zyx=(1.0, 3.7, 3.7), seed=3)
    hu = np.rint(sitk.GetArrayFromImage(image)).astype(np.int16)
    pipeline = Pipeline(SegmentOptions(infection_model="hu-threshold"))
    thick = pipeline.run(CTVolume.from_image(_image(hu, (1.0, 3.7, 3.7))))
    thin_hu = np.repeat(hu, 2, axis=0)
    thin = pipeline.run(CTVolume.from_image(_image(thin_hu, (0.5, 3.7, 3.7))))
    assert not any("thin slices" in n for n in thick.notes)
    note = [n for n in thin.notes if n.startswith("thin slices")]
    assert len(note) == 1 and "slabs of 2 slices" in note[0] and "0.50 mm" in note[0]
    np.testing.assert_array_equal(thin.lungs, np.repeat(thick.lungs, 2, axis=0))
    assert _dice(thick.infection, truth["infection"]) > 0.9
    np.testing.assert_array_equal(thin.infection, np.repeat(thick.infection, 2, axis=0))
    assert thin.quantities["both_lungs"]["infection_ml"] == pytest.approx(
        thick.quantities["both_lungs"]["infection_ml"], rel=1e-9)
