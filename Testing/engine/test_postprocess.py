"""Post-processing of learned infection masks (postprocess.py); the predictor applying a checkpoint's
setting is tested in test_network_predictor.py."""

from __future__ import annotations

import numpy as np
import pytest

from COVIDLesionSegLib.postprocess import InfectionPostprocess

SPACING = (2.0, 1.0, 1.0)   # 2 uL voxels


def _blobs():
    """A 1 mL lesion (500 voxels), a 0.02 mL speck (10 voxels) and lung at -850 HU around them."""
    hu = np.full((20, 40, 40), -850.0, dtype=np.float32)
    mask = np.zeros(hu.shape, dtype=bool)
    mask[5:10, 5:15, 5:15] = True            # 5 x 10 x 10 = 500 voxels = 1.0 mL
    mask[15, 30:32, 30:35] = True            # 10 voxels = 0.02 mL
    hu[mask] = -300.0
    return hu, mask


def test_identity_by_default_and_min_component_removes_only_the_speck():
    hu, mask = _blobs()
    assert np.array_equal(InfectionPostprocess().apply(mask, hu, SPACING), mask)
    kept = InfectionPostprocess(min_component_ml=0.1).apply(mask, hu, SPACING)
    assert kept.sum() == 500 and kept[5:10, 5:15, 5:15].all() and not kept[15].any()
    # A threshold just above the lesion's volume removes it as well.
    assert not InfectionPostprocess(min_component_ml=1.01).apply(mask, hu, SPACING).any()
    assert InfectionPostprocess(min_component_ml=1.0).apply(mask, hu, SPACING).sum() == 500


def test_hu_floor_removes_marked_voxels_at_aerated_lung_density():
    hu, mask = _blobs()
    mask[0:3, 20:30, 20:30] = True           # marked, but normal lung density (-850 HU)
    kept = InfectionPostprocess(min_hu=-750.0, smoothing_mm=0.0).apply(mask, hu, SPACING)
    assert not kept[0:3].any() and kept[5:10, 5:15, 5:15].all()
    # max_hu drops the dense part (e.g. contrast-filled vessels, bone at the border).
    hu[5:10, 5:15, 5:8] = 400.0
    kept = InfectionPostprocess(max_hu=150.0, smoothing_mm=0.0).apply(mask, hu, SPACING)
    assert not kept[5:10, 5:15, 5:8].any() and kept[5:10, 5:15, 8:15].all()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown"):
        InfectionPostprocess.from_spec({"min_size": 1})
    with pytest.raises(ValueError, match="below max_hu"):
        InfectionPostprocess.from_spec({"min_hu": 0, "max_hu": -100})
    with pytest.raises(ValueError, match=">= 0"):
        InfectionPostprocess.from_spec({"min_component_ml": -1})


def test_min_rise_floor_follows_the_scan_s_own_lung_baseline():
    """The same opacity (+250 HU over its lung) is kept in an inflated and in a dense (free-breathing) lung;
    an absolute floor would drop it in one of them."""
    rule = InfectionPostprocess(min_rise_hu=150.0, smoothing_mm=0.0)
    for baseline in (-850.0, -700.0):
        hu, mask = _blobs()
        hu[:] = baseline
        hu[5:10, 5:15, 5:15] = baseline + 250.0      # the lesion
        hu[15, 30:32, 30:35] = baseline + 100.0      # too faint: below the +150 HU floor
        lungs = np.ones(hu.shape, dtype=bool)
        kept = rule.apply(mask, hu, SPACING, lungs)
        assert kept[5:10, 5:15, 5:15].all() and not kept[15].any(), baseline
    with pytest.raises(ValueError, match="lung mask"):
        rule.apply(mask, hu, SPACING)


def test_confirmed_components_keeps_whole_components_that_the_evidence_touches():
    from COVIDLesionSegLib.postprocess import confirmed_components

    candidates = np.zeros((10, 20, 20), dtype=bool)
    candidates[2:5, 2:8, 2:8] = True          # touched by one evidence voxel
    candidates[6:9, 12:18, 12:18] = True      # untouched
    evidence = np.zeros_like(candidates)
    evidence[3, 4, 4] = True
    evidence[0, 19, 19] = True                # evidence outside every candidate adds nothing
    out = confirmed_components(candidates, evidence)
    assert out[2:5, 2:8, 2:8].all() and out.sum() == 3 * 6 * 6
    assert not confirmed_components(candidates, np.zeros_like(candidates)).any()
    assert InfectionPostprocess.from_spec({"confirm_hu_threshold": True}).is_identity is False
    with pytest.raises(ValueError, match="lung mask"):
        InfectionPostprocess(confirm_hu_threshold=True).apply(candidates, np.zeros(candidates.shape, np.float32),
                                                              SPACING)


def test_grown_components_take_the_candidates_near_confirmed_voxels_only():
    from COVIDLesionSegLib.postprocess import grown_components

    spacing = (2.0, 1.0, 1.0)
    confirmed = np.zeros((12, 40, 40), dtype=bool)
    confirmed[6, 10, 10] = True
    candidates = np.zeros_like(confirmed)
    candidates[6, 10, 10:40] = True            # a streak from the core outwards, x = 10..39 (1 mm voxels)
    candidates[6:12, 10, 10] = True            # and upwards, z = 6..11 (2 mm voxels)
    out = grown_components(confirmed, candidates, spacing, grow_mm=5.0)
    assert out[6, 10, 10:16].all() and not out[6, 10, 16:].any()     # 0..5 mm along x, nothing beyond
    assert out[6:9, 10, 10].all() and not out[9:, 10, 10].any()      # 0, 2, 4 mm along z: anisotropic spacing
    assert not (out & ~(confirmed | candidates)).any()                # never a voxel neither mask has
    assert np.array_equal(grown_components(confirmed, candidates, spacing, 0.0), confirmed)
    assert not grown_components(np.zeros_like(confirmed), candidates, spacing, 5.0).any()


def test_grow_mm_grows_the_confirmed_threshold_mask_into_the_network_s_rim():
    # A lesion whose dense core the Hounsfield bands find and whose faint rim only the "network" marks; a
    # second network mark far from any core (a false positive on healthy lung) must not be kept.
    zz, yy, xx = np.mgrid[:16, :48, :48]
    hu = np.full((16, 48, 48), -870.0, dtype=np.float32)
    core = (zz - 8) ** 2 * 4 + (yy - 16) ** 2 + (xx - 16) ** 2 <= 16      # a 4 mm ball at -450 HU
    rim = ((zz - 8) ** 2 * 4 + (yy - 16) ** 2 + (xx - 16) ** 2 <= 64) & ~core
    hu[core] = -450.0
    hu[rim] = -800.0                                                     # too faint for the bands
    far = (zz - 8) ** 2 * 4 + (yy - 38) ** 2 + (xx - 38) ** 2 <= 16
    network = core | rim | far
    lungs = np.ones(hu.shape, dtype=bool)
    confirm = InfectionPostprocess.from_spec({"confirm_hu_threshold": True})
    grow = InfectionPostprocess.from_spec({"confirm_hu_threshold": True, "grow_mm": 10.0})
    only_confirmed = confirm.apply(network, hu, SPACING, lungs)
    grown = grow.apply(network, hu, SPACING, lungs)
    assert only_confirmed[core].mean() > 0.5 and only_confirmed[rim].mean() < 0.2, (only_confirmed[core].mean(), only_confirmed[rim].mean())
    assert grown[rim | core].all() and not grown[far].any()
    # The caller's Hounsfield-band mask is used when given (the selection sweep computes it once).
    assert not grow.apply(network, hu, SPACING, lungs, hu_mask=np.zeros_like(lungs)).any()
    with pytest.raises(ValueError, match="needs confirm_hu_threshold"):
        InfectionPostprocess.from_spec({"grow_mm": 5.0})
    with pytest.raises(ValueError, match=">= 0"):
        InfectionPostprocess.from_spec({"confirm_hu_threshold": True, "grow_mm": -1.0})


def test_slices_that_matter_reach_grow_mm_along_z_and_every_slice_when_components_couple_them():
    hu_mask = np.zeros((30, 8, 8), dtype=bool)
    hu_mask[10, 4, 4] = True
    rule = InfectionPostprocess(confirm_hu_threshold=True, grow_mm=10.0)
    needed = rule.slices_that_matter(hu_mask, (2.5, 1.0, 1.0))
    # 10 mm at 2.5 mm slices: 4 slices each way, plus one of margin
    assert np.array_equal(np.flatnonzero(needed), np.arange(5, 16))
    assert not InfectionPostprocess(confirm_hu_threshold=True).slices_that_matter(
        np.zeros_like(hu_mask), (2.5, 1.0, 1.0)).any()
    assert InfectionPostprocess(confirm_hu_threshold=True, min_component_ml=0.1).slices_that_matter(
        hu_mask, (2.5, 1.0, 1.0)) is None
    assert InfectionPostprocess(min_hu=-700).slices_that_matter(hu_mask, (2.5, 1.0, 1.0)) is None
    short = InfectionPostprocess(confirm_hu_threshold=True, grow_mm=50.0).slices_that_matter(hu_mask[8:12],
                                                                                             (2.5, 1.0, 1.0))
    assert short.shape == (4,) and short.all()
