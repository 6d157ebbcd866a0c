"""The distance-map morphology (COVIDLesionSegLib.morphology) gives ITK's ball-kernel results voxel for voxel."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from COVIDLesionSegLib.morphology import ball_dilate, ball_erode, ball_open, squared_distance_to

# Radii in array order (z, y, x): the infection model's kernels on its 1.25 mm x 2 mm grid, isotropic ones, a zero axis.
RADII = [(2, 3, 3), (1, 2, 2), (1, 1, 1), (2, 2, 2), (0, 1, 1), (3, 4, 4), (0, 0, 2)]


def _itk(op, mask: np.ndarray, radius_zyx) -> np.ndarray:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    return sitk.GetArrayFromImage(op(image, [int(r) for r in reversed(radius_zyx)], sitk.sitkBall, 0, 1)).astype(bool)


def _blobs(seed: int, shape=(24, 40, 44)) -> np.ndarray:
    """Random blobs that touch the array's faces (where ITK's border rules matter), with thin strands."""
    rng = np.random.default_rng(seed)
    mask = ndi.gaussian_filter(rng.random(shape), 1.5) > 0.52
    mask[:, :, -2:] |= rng.random(shape[:2] + (2,)) > 0.3
    mask[:2] = True
    return mask


@pytest.mark.parametrize("radius", RADII)
def test_ball_kernel_is_itks(radius):
    point = np.zeros((2 * 4 + 1, 2 * 5 + 1, 2 * 5 + 1), bool)
    point[4, 5, 5] = True
    assert np.array_equal(ball_dilate(point, radius), _itk(sitk.BinaryDilate, point, radius))


@pytest.mark.parametrize("radius", RADII)
@pytest.mark.parametrize("seed", [0, 1])
def test_dilate_erode_open_equal_itk(radius, seed):
    mask = _blobs(seed)
    assert np.array_equal(ball_dilate(mask, radius), _itk(sitk.BinaryDilate, mask, radius))
    assert np.array_equal(ball_erode(mask, radius), _itk(sitk.BinaryErode, mask, radius))
    assert np.array_equal(ball_open(mask, radius), _itk(sitk.BinaryMorphologicalOpening, mask, radius))
    # With the border as background: ITK's erosion of the mask padded by one background voxel.
    padded = np.pad(mask, 1)
    expected = _itk(sitk.BinaryErode, padded, radius)[1:-1, 1:-1, 1:-1]
    assert np.array_equal(ball_erode(mask, radius, border_is_foreground=False), expected)


def test_sparse_mask_in_a_large_grid():
    """The distance map covers the mask's box only: a small blob far from the faces, and empty masks."""
    mask = np.zeros((40, 90, 90), bool)
    mask[20:24, 50:57, 30:33] = True
    mask[21, 53, 33:36] = True
    for radius in [(2, 3, 3), (1, 1, 1)]:
        assert np.array_equal(ball_dilate(mask, radius), _itk(sitk.BinaryDilate, mask, radius))
        assert np.array_equal(ball_open(mask, radius), _itk(sitk.BinaryMorphologicalOpening, mask, radius))
    empty = np.zeros((5, 6, 7), bool)
    assert not ball_dilate(empty, (1, 1, 1)).any() and not ball_erode(empty, (1, 1, 1)).any()
    assert ball_erode(~empty, (1, 2, 2)).all()          # outside counts as foreground: nothing erodes


def test_squared_distance_to_is_the_exact_euclidean_distance():
    mask = _blobs(3)
    spacing = (2.0, 0.7, 0.9)
    expected = ndi.distance_transform_edt(~mask, sampling=spacing) ** 2
    assert np.allclose(np.maximum(squared_distance_to(mask, spacing), 0), expected, rtol=1e-5, atol=1e-4)
    assert np.isinf(squared_distance_to(np.zeros((3, 3, 3), bool), spacing)).all()
