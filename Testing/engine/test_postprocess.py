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
