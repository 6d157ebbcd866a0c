"""Input robustness (issue 11, input side): the same physical scan gives the same physical result however it
is stored, and damaged or ambiguous inputs are refused with a reason instead of being read silently."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib.phantom import make_chest_phantom
from COVIDLesionSegLib.pipeline import Pipeline, SegmentOptions
from COVIDLesionSegLib.volume import CTVolume

# Every DICOM orientation code: one letter of each pair, in any axis order (48 codes).
ORIENTATIONS = ["".join(p) for letters in itertools.product("LR", "PA", "SI")
                for p in itertools.permutations(letters)]


@pytest.fixture(scope="module")
def hu_pipeline():
    return Pipeline(SegmentOptions(device="cpu"))


def _lps_labels(result) -> np.ndarray:
    """The result's labelmap on the input grid, brought to LPS, to compare results in physical space."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(result.labelmap_in_input_geometry(), "LPS"))


def _volumes(result) -> dict:
    q = result.quantities
    return {side: (q[side]["volume_ml"], q[side]["infection_ml"]) for side in ("right_lung", "left_lung")}


@pytest.mark.parametrize("shape_zyx, spacing_zyx", [((40, 96, 104), (6.0, 3.6, 3.4)),
                                                    ((32, 112, 112), (8.0, 3.2, 3.2))],
                         ids=["6mm-slices", "8mm-slices"])
def test_random_orientation_and_tiny_spacing_changes_give_identical_physical_results(hu_pipeline, shape_zyx,
                                                                                     spacing_zyx):
    """Property: storing the scan in any of the 48 axis orders / flips, with its spacing changed by a few
    1e-14 mm (what a format conversion or a float32 header does), changes nothing: same mL, same voxels."""
    image, _ = make_chest_phantom(shape_zyx=shape_zyx, spacing_zyx=spacing_zyx)
    base = hu_pipeline.run(CTVolume.from_image(image))
    base_labels, base_volumes = _lps_labels(base), _volumes(base)
    rng = np.random.default_rng(11)
    for draw in range(3):
        code = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
        stored = sitk.DICOMOrient(image, code)
        eps = rng.choice([-2e-14, -1e-14, 1e-14, 2e-14], size=3)
        eps[draw % 3] = -1e-14 if draw == 0 else 1e-14   # each run has one axis nudged each way
        stored.SetSpacing([float(s + e) for s, e in zip(stored.GetSpacing(), eps)])
        result = hu_pipeline.run(CTVolume.from_image(stored))
        assert _volumes(result) == base_volumes, (code, eps.tolist())
        assert np.array_equal(_lps_labels(result), base_labels), (code, eps.tolist())
