"""Intensity transforms and geometric helpers (preprocessing.py), including the match of the
``ctseg2d_domain`` transform with the shared 2D COVID-19-CT-Seg slices."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage as ndi

from COVIDLesionSegLib import preprocessing as pp
from COVIDLesionSegLib.volume import CTVolume
from Testing.conftest import shared_file

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------------------------------
# Voxel-wise transforms
# ------------------------------------------------------------------------------------------------------------

def test_ct_zscore_follows_nnunet():
    fg = RNG.normal(-300, 250, size=20000).astype(np.float32)
    params = pp.fit_ct_zscore([fg[:10000], fg[10000:]])
    assert params["lower"] == pytest.approx(np.percentile(fg, 0.5), rel=1e-6)
    assert params["upper"] == pytest.approx(np.percentile(fg, 99.5), rel=1e-6)
    assert params["mean"] == pytest.approx(fg.mean(), rel=1e-5) and params["std"] == pytest.approx(fg.std(), rel=1e-5)
    x = RNG.uniform(-2000, 2000, size=(3, 5, 7)).astype(np.float32)
    out = pp.ct_zscore(x, **params)
    expected = (np.clip(x, params["lower"], params["upper"]) - params["mean"]) / params["std"]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(pp.apply_intensity(x, {"name": "ct_zscore", **params}), out)
    with pytest.raises(ValueError, match="no foreground"):
        pp.fit_ct_zscore(np.array([]))


def test_hu_window_01_and_mu_sigma():
    x = np.array([-3000, -1250, -500, 250, 3000], np.float32)
    np.testing.assert_allclose(pp.hu_window_01(x, lo=-1250, hi=250), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(pp.mu_sigma(x), (x + 500) / 500)
    np.testing.assert_allclose(pp.apply_intensity(x, {"name": "mu_sigma", "mu": -500, "sigma": 500}), (x + 500) / 500)
    assert x[0] == -3000, "transforms do not modify their input"
    with pytest.raises(ValueError, match="greater than lo"):
        pp.hu_window_01(x, lo=10, hi=10)


def test_apply_intensity_errors():
    x = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="unknown intensity transform 'gamma'; known: ct_zscore, ctseg2d_domain"):
        pp.apply_intensity(x, {"name": "gamma"})
    with pytest.raises(ValueError, match="'name' key"):
        pp.apply_intensity(x, {"lo": 1})
    with pytest.raises(ValueError, match="bad parameters"):
        pp.apply_intensity(x, {"name": "hu_window_01", "lo": 0})  # hi missing
    with pytest.raises(ValueError, match="bad parameters"):
        pp.apply_intensity(x, {"name": "mu_sigma", "scale": 2})


# ------------------------------------------------------------------------------------------------------------
# ctseg2d_domain
# ------------------------------------------------------------------------------------------------------------

def _disc_phantom(size=300, pad=-1024.0):
    y, x = np.mgrid[:size, :size]
    r = np.hypot(y - size / 2, x - size / 2)
    s = np.full((size, size), pad, np.float32)
    s[r < 0.48 * size] = -1000
    s[r < 0.40 * size] = 40
    s[(r < 0.3 * size) & (x < size / 2 - 5)] = -850
    s[(r < 0.3 * size) & (x > size / 2 + 5)] = -850
    s[(r > 0.36 * size) & (r < 0.38 * size)] = 1600  # cortical bone, above the window's top
    return s


def test_ctseg2d_domain_output_and_quantisation():
    s = _disc_phantom()
    out = pp.ctseg2d_domain(s)
    assert out.shape == (256, 256) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out * 255, np.round(out * 255), atol=1e-4)  # 8-bit levels like the source
    stack = pp.ctseg2d_domain(np.stack([s, s[::-1]]))
    np.testing.assert_array_equal(stack[0], out)
    np.testing.assert_array_equal(stack[1], pp.ctseg2d_domain(s[::-1]))
    # A model-specific normalisation on top of /255.
    np.testing.assert_allclose(pp.ctseg2d_domain(s, mean=0.5, std=0.25), (out - 0.5) / 0.25, atol=1e-6)


def test_ctseg2d_domain_is_robust_to_padding_and_metal():
    s = _disc_phantom(pad=-1024.0)
    padded = _disc_phantom(pad=-3024.0)  # scanners store the outside of the reconstruction circle this way
    np.testing.assert_array_equal(pp.ctseg2d_domain(padded), pp.ctseg2d_domain(s))
    metal = s.copy()
    metal[150:152, 150:152] = 3071
    # The bright spot is clipped to the window, so the rest of the slice keeps its grey levels...
    diff = np.abs(pp.ctseg2d_domain(metal) - pp.ctseg2d_domain(s))
    assert np.mean(diff > 0) < 0.05
    # ...whereas stretching the raw range would darken the whole slice.
    raw = dict(window=(-4000.0, 4000.0))
    diff_raw = np.abs(pp.ctseg2d_domain(metal, **raw) - pp.ctseg2d_domain(s, **raw))
    assert np.mean(diff_raw > 0) > 0.5


def test_ctseg2d_clip_limit_is_opencv_seven():
    # OpenCV's clip = clipLimit * tile_pixels / 256 bins; scikit-image's = clip_limit * kernel_pixels.
    tile_pixels = (256 // 8) ** 2
    assert pp.CTSEG2D_CLIP_LIMIT * tile_pixels == pytest.approx(7.0 * tile_pixels / 256)


# Percentiles compared below.
_Q = [5, 25, 50, 75, 95]


def _ring(mask: np.ndarray) -> np.ndarray:
    """Tissue around the lungs: chest wall, mediastinum, ribs (2 to 12 pixels outside the lung mask)."""
    return ndi.binary_dilation(mask, iterations=12) & ~ndi.binary_dilation(mask, iterations=2)


def _crude_lungs(s: np.ndarray) -> np.ndarray:
    """Lungs of one HU slice: air inside the body, holes (vessels, lesions) filled."""
    body = ndi.binary_fill_holes(ndi.binary_opening(s > -500, iterations=2))
    lab, n = ndi.label(body)
    body = ndi.binary_fill_holes(lab == (np.argmax(ndi.sum(body, lab, range(1, n + 1))) + 1))
    air = ndi.binary_opening((s < -400) & ndi.binary_erosion(body, iterations=3), iterations=2)
    lab, n = ndi.label(air)
    out = np.zeros_like(air)
    for k in range(1, n + 1):
        comp = lab == k
        if comp.sum() > 2000:
            out |= ndi.binary_fill_holes(ndi.binary_closing(comp, iterations=6))
    return out


@pytest.fixture(scope="module")
def ctseg2d_stats():
    data = np.load(shared_file("covid19ctseg2d/covid19ctseg2d.npz"))
    group = data["group"]
    rows = np.flatnonzero(group < 8)[::5]  # coronacases volumes (HU CT originally), every 5th slice
    images, lungs = data["images"][rows], data["lung"][rows].astype(bool)
    ring = np.concatenate([im[_ring(lu)] for im, lu in zip(images, lungs)])
    return {"ring": np.percentile(ring, _Q), "lung_median": float(np.median(images[lungs])),
            "saturated": float((images >= 250).mean()), "lungs": data["lung"], "group": group}


@pytest.fixture(scope="module")
def hu_slices():
    vol = CTVolume.from_image(sitk.ReadImage(str(shared_file("ct/covidctmd_p001_ct.nii.gz"))))
    z = vol.shape[0]
    slices = np.asarray(vol.hu[[int(f * z) for f in (0.45, 0.5, 0.55, 0.6, 0.65, 0.7)]], np.float32)
    masks = np.stack([pp.resize_slices(_crude_lungs(s)[None].astype(np.float32), (256, 256), "nearest")[0] > 0.5
                      for s in slices])
    return slices, masks


def _stats(images: np.ndarray, masks: np.ndarray) -> dict:
    images = np.round(images * 255)
    ring = np.concatenate([im[_ring(m)] for im, m in zip(images, masks)])
    return {"ring": np.percentile(ring, _Q), "lung_median": float(np.median(images[masks])),
            "saturated": float((images >= 250).mean())}


def test_ctseg2d_domain_matches_the_shared_2d_data(ctseg2d_stats, hu_slices):
    slices, masks = hu_slices
    ours = _stats(pp.ctseg2d_domain(slices), masks)
    target = ctseg2d_stats
    # Loose tolerances: different patients, scanners and disease; the point is the same intensity domain.
    assert abs(ours["ring"][2] - target["ring"][2]) < 15, (ours, target)
    assert np.all(np.abs(ours["ring"][1:4] - target["ring"][1:4]) < 20), (ours, target)
    assert abs(ours["lung_median"] - target["lung_median"]) < 20, (ours, target)
    assert target["saturated"] / 2.5 < ours["saturated"] < target["saturated"] * 2.5, (ours, target)
    # The documented choice of window: a lung window would saturate the bone and brighten the tissue
    # far beyond the data, so it is a worse fit than the near-full-range default.
    lung_window = _stats(pp.ctseg2d_domain(slices, window=(-1000.0, 400.0)), masks)
    assert lung_window["saturated"] > 4 * target["saturated"]
    assert (np.abs(lung_window["ring"] - target["ring"]).mean() > np.abs(ours["ring"] - target["ring"]).mean())


# ------------------------------------------------------------------------------------------------------------
# Orientation
# ------------------------------------------------------------------------------------------------------------

def test_canonical_axial_slice_is_radiological_display():
    # Mark the patient's right side (-x in LPS physical space) in an image stored RAS-first.
    arr = np.zeros((3, 20, 30), np.int16)
    arr[:, 5, 2] = 100  # x index 2 of an LPS grid: patient right, anterior (small y)
    lps = sitk.GetImageFromArray(arr)
    ras = sitk.DICOMOrient(lps, "RAS")
    vol = CTVolume.from_image(ras)
    disp = pp.axial_display_slices(vol.hu, [1])[0]
    y, x = np.argwhere(disp == 100)[0]
    assert x < disp.shape[1] / 2, "patient right is on the image's left"
    assert y < disp.shape[0] / 2, "anterior is at the top"
    neuro = pp.axial_display_slices(vol.hu, [1], convention="neurological")[0]
    assert np.argwhere(neuro == 100)[0][1] > disp.shape[1] / 2
    with pytest.raises(ValueError, match="display convention"):
        pp.axial_display_slices(vol.hu, [1], convention="upside-down")


def test_real_data_orientations_agree(ctseg2d_stats):
    """The heart sits in the left hemithorax, so the right lung is the larger: on the image's left in the
    2D data (radiological display) and at small x in canonical slices of a real CT - the same side."""
    lungs, group = ctseg2d_stats["lungs"], ctseg2d_stats["group"]
    for g in range(8):
        sel = lungs[group == g]
        assert sel[:, :, :128].sum() > 1.03 * sel[:, :, 128:].sum(), f"group {g}"
    vol = CTVolume.from_image(sitk.ReadImage(str(shared_file("ct/covidctmd_normal001_ct.nii.gz"))))
    z, y, x = vol.shape
    chest = np.asarray(vol.hu[int(0.4 * z):int(0.7 * z):3, int(0.2 * y):int(0.8 * y), int(0.12 * x):int(0.88 * x)])
    air = chest < -400
    half = air.shape[2] // 2
    assert air[:, :, :half].sum() > 1.1 * air[:, :, half:].sum()


# ------------------------------------------------------------------------------------------------------------
# Resizing and boxes
# ------------------------------------------------------------------------------------------------------------

def test_resize_slices_numpy_and_torch_agree():
    x = RNG.normal(size=(3, 40, 48)).astype(np.float32)
    a = pp.resize_slices(x, (32, 32))
    b = pp.resize_slices(torch.from_numpy(x), (32, 32))
    assert a.shape == (3, 32, 32) and isinstance(b, torch.Tensor)
    np.testing.assert_allclose(a, b.numpy(), atol=1e-6)
    # Half-pixel centres: exact 2x downsampling averages 2x2 blocks.
    y = pp.resize_slices(x[:, :40, :48], (20, 24))
    np.testing.assert_allclose(y, x.reshape(3, 20, 2, 24, 2).mean(axis=(2, 4)), atol=1e-5)
    const = np.full((1, 7, 9), 0.3, np.float32)
    np.testing.assert_allclose(pp.resize_slices(const, (20, 31)), 0.3, atol=1e-6)
    labels = RNG.integers(0, 3, size=(2, 16, 16)).astype(np.float32)
    assert set(np.unique(pp.resize_slices(labels, (23, 9), "nearest"))) <= {0.0, 1.0, 2.0}
    with pytest.raises(ValueError, match="resize mode"):
        pp.resize_slices(x, (8, 8), "cubic")


def test_resize_volume_and_spacing():
    assert pp.resampled_shape((100, 512, 512), (2.5, 0.7, 0.7), (5.0, 1.4, 1.4)) == (50, 256, 256)
    v = RNG.normal(size=(8, 12, 16)).astype(np.float32)
    down = pp.resize_volume(v, (4, 6, 8))
    np.testing.assert_allclose(down, v.reshape(4, 2, 6, 2, 8, 2).mean(axis=(1, 3, 5)), atol=1e-5)
    multi = pp.resize_volume(np.stack([v, 2 * v]), (4, 6, 8))
    np.testing.assert_allclose(multi[1], 2 * down, atol=1e-5)


def test_bounding_box_and_margin():
    m = np.zeros((10, 20, 30), bool)
    m[3:5, 6:9, 10:20] = True
    assert pp.bounding_box(m) == (slice(3, 5), slice(6, 9), slice(10, 20))
    assert pp.bounding_box(m, (1, 10, 2)) == (slice(2, 6), slice(0, 19), slice(8, 22))
    assert pp.bounding_box(np.zeros((2, 2), bool)) is None
    assert pp.margin_voxels(10.0, (2.5, 0.7, 0.7)) == (4, 15, 15)


def test_pad_to_square_centres_the_slice_in_air_and_cuts_it_back():
    from COVIDLesionSegLib.preprocessing import pad_to_square

    x = np.arange(2 * 3 * 7, dtype=np.float32).reshape(2, 3, 7)
    padded, inside = pad_to_square(x)
    assert padded.shape == (2, 7, 7)
    assert np.array_equal(padded[:, inside[0], inside[1]], x)
    assert (padded[:, :2] == -1024).all() and (padded[:, 5:] == -1024).all()   # 2 rows above, 2 below
    same, whole = pad_to_square(np.zeros((1, 4, 4)))
    assert same.shape == (1, 4, 4) and whole == (slice(None), slice(None))


def test_axis_counts_equal_numpy_s_counts_in_any_chunking():
    """axis_counts (chunked along z, no full-size bool temporary) gives np.count_nonzero's per-axis counts."""
    from COVIDLesionSegLib.preprocessing import axis_counts

    labels = np.random.default_rng(1).integers(0, 3, size=(37, 11, 9)).astype(np.uint8)
    for step in (1, 5, 32, 100):
        counts = axis_counts(labels, step=step)
        for axis in range(3):
            others = tuple(a for a in range(3) if a != axis)
            np.testing.assert_array_equal(counts[axis], np.count_nonzero(labels, axis=others))
