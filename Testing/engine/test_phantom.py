"""The synthetic chest CT phantom: determinism, geometry, HU ranges and ground-truth consistency."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from COVIDLesionSegLib.phantom import DEFAULT_SHAPE_ZYX, labels_from_truth, make_chest_phantom
from COVIDLesionSegLib.volume import orientation_code


@pytest.fixture(scope="module")
def phantom():
    return make_chest_phantom(nodule=True)


def test_deterministic_and_seeded():
    a_img, a_truth = make_chest_phantom(seed=3)
    b_img, b_truth = make_chest_phantom(seed=3)
    c_img, _ = make_chest_phantom(seed=4)
    a, b, c = (sitk.GetArrayFromImage(i) for i in (a_img, b_img, c_img))
    assert np.array_equal(a, b)
    for key in a_truth:
        assert np.array_equal(a_truth[key], b_truth[key]), key
    assert not np.array_equal(a, c)


def test_geometry_is_lps_hu_and_masks_match(phantom):
    image, truth = phantom
    arr = sitk.GetArrayFromImage(image)
    assert arr.shape == DEFAULT_SHAPE_ZYX
    assert arr.dtype == np.int16
    assert orientation_code(image) == "LPS"
    assert image.GetSpacing() == (2.8, 2.8, 4.0)
    for key in ("right_lung", "left_lung", "infection", "body"):
        assert truth[key].shape == arr.shape and truth[key].dtype == bool, key
    # Outside air, lungs, soft tissue and bone at realistic values.
    assert np.median(arr[~truth["body"]]) < -950
    lungs = truth["right_lung"] | truth["left_lung"]
    assert -900 < np.median(arr[lungs & ~truth["infection"]]) < -780
    assert np.percentile(arr, 99.9) > 300  # ribs and spine


def test_anatomy_sides_junction_and_airway(phantom):
    image, truth = phantom
    arr = sitk.GetArrayFromImage(image)
    right, left = truth["right_lung"], truth["left_lung"]
    # LPS: the patient's right lung has the smaller x.
    assert np.nonzero(right)[2].mean() < np.nonzero(left)[2].mean()
    assert not (right & left).any()
    # The lungs touch (anterior junction): some right voxels have a left neighbour along x.
    assert (right[:, :, :-1] & left[:, :, 1:]).sum() > 10
    assert (lungs_ml := (right.sum() + left.sum()) * np.prod(image.GetSpacing()) / 1e6) > 2.0, lungs_ml
    # Trachea: an air column at the midline in the top slice, connected to the lungs' air.
    nx = arr.shape[2]
    column = (slice(None), slice(nx // 2 - 3, nx // 2 + 3))
    inside = (arr[-1] < -900) & truth["body"][-1]
    assert inside[column].sum() >= 6
    lab, _ = ndi.label((arr < -600) & truth["body"])
    trachea_label = lab[-1][column][inside[column]][0]
    assert trachea_label != 0 and (lab[right] == trachea_label).mean() > 0.5
    assert truth["airway"].any() and not (truth["airway"] & (right | left)).any()


def test_lesions(phantom):
    image, truth = phantom
    arr = sitk.GetArrayFromImage(image)
    lungs = truth["right_lung"] | truth["left_lung"]
    inf = truth["infection"]
    assert inf.any() and not (inf & ~lungs).any()
    cons = truth["consolidation"]
    assert cons.any() and (cons & ~inf).sum() == 0
    assert np.median(arr[cons]) > -50  # dense
    ggo = inf & ~cons
    assert -560 < np.median(arr[ggo]) < -250
    # The consolidation is attached to the pleura: it touches voxels outside the lungs.
    assert (ndi.binary_dilation(cons, iterations=1) & ~lungs & truth["body"]).any()
    assert truth["nodule"].sum() > 20 and not (truth["nodule"] & ~lungs).any()


def test_options_and_labels():
    _, truth = make_chest_phantom(infection=False, consolidation=False)
    assert not truth["infection"].any() and not truth["consolidation"].any()
    _, truth = make_chest_phantom(infection=False, consolidation=True)
    labels = labels_from_truth(truth)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert np.array_equal(labels == 3, truth["infection"])


def test_other_grids_and_bad_input():
    image, truth = make_chest_phantom(shape_zyx=(40, 96, 112), spacing_zyx=(6.0, 3.5, 3.2))
    assert sitk.GetArrayFromImage(image).shape == (40, 96, 112)
    assert truth["right_lung"].any() and truth["left_lung"].any()
    with pytest.raises(ValueError, match="shape_zyx"):
        make_chest_phantom(shape_zyx=(4, 64, 64))
    with pytest.raises(ValueError, match="spacing_zyx"):
        make_chest_phantom(spacing_zyx=(0.0, 1.0, 1.0))
