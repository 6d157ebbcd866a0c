"""Tests of the Hounsfield-band infection baseline (COVIDLesionSegLib.infection_hu)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from COVIDLesionSegLib.evaluation import read_slice_labels
from COVIDLesionSegLib.infection_hu import band_fractions, segment_infection_hu
from COVIDLesionSegLib.preprocessing import bounding_box
from COVIDLesionSegLib.progress import Cancelled
from Testing.conftest import shared_file

SPACING = (2.0, 0.75, 0.75)  # z, y, x in mm: a typical thin-slice chest CT


def _mm_grid(shape, spacing):
    return np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")


@pytest.fixture(scope="module")
def phantom():
    """Two ellipsoidal lungs at -850 HU in +40 HU tissue with a ground-glass ball, a consolidation ball,
    a thin (2 mm) and a thick (6 mm) vessel; 20 HU noise."""
    shape = (36, 128, 128)
    z, y, x = _mm_grid(shape, SPACING)
    zc, yc = 35.0, 48.0
    right = ((z - zc) / 30) ** 2 + ((y - yc) / 40) ** 2 + ((x - 25) / 20) ** 2 <= 1
    left = ((z - zc) / 30) ** 2 + ((y - yc) / 40) ** 2 + ((x - 71) / 20) ** 2 <= 1
    lungs = np.zeros(shape, np.uint8)
    lungs[right] = 1
    lungs[left] = 2
    hu = np.full(shape, 40.0, np.float32)
    hu[lungs > 0] = -850.0
    ggo = (((z - zc) ** 2 + (y - 40) ** 2 + (x - 25) ** 2) <= 10.0 ** 2)
    cons = (((z - zc) ** 2 + (y - 40) ** 2 + (x - 71) ** 2) <= 8.0 ** 2)
    # thin vessel along z through the left lung, well away from the consolidation ball
    thin = (((y - 68) ** 2 + (x - 71) ** 2) <= 1.0 ** 2) & (lungs == 2)
    # thick vessel along y through the upper right lung, away from the ground-glass ball
    thick = (((z - 55) ** 2 + (x - 25) ** 2) <= 3.0 ** 2) & (lungs == 1)
    hu[ggo] = -550.0
    hu[cons] = 20.0
    hu[thin] = 40.0
    hu[thick] = 40.0
    hu += np.random.default_rng(0).normal(0, 20, shape).astype(np.float32)
    return {"hu": hu, "lungs": lungs, "ggo": ggo, "cons": cons, "thin": thin, "thick": thick}


def test_finds_opacities_and_drops_vessels(phantom):
    calls = []
    mask = segment_infection_hu(phantom["hu"], phantom["lungs"], SPACING,
                                progress=lambda f, m: calls.append((f, m)))
    assert mask.dtype == bool and mask.shape == phantom["hu"].shape
    share = {k: mask[phantom[k]].mean() for k in ("ggo", "cons", "thin", "thick")}
    assert share["ggo"] > 0.8, share
    assert share["cons"] > 0.8, share
    assert share["thin"] < 0.2, share
    assert share["thick"] < 0.2, share
    # nothing outside the lungs (the +40 HU tissue is in the consolidation band)
    assert not mask[phantom["lungs"] == 0].any()
    # almost nothing of the normal parenchyma away from the lesions
    lesion_zone = ndi.binary_dilation(phantom["ggo"] | phantom["cons"], iterations=3)
    assert mask[(phantom["lungs"] > 0) & ~lesion_zone].mean() < 0.002
    # progress: monotone fractions ending at 1
    fractions = [f for f, _ in calls]
    assert len(calls) >= 5 and fractions == sorted(fractions) and fractions[-1] == 1.0
    # most of what was found around the ground-glass ball is ground glass (raw HU)
    frac = band_fractions(phantom["hu"], mask & phantom["ggo"])
    assert frac["ggo"] > 0.95


def test_lung_label_values_and_dtype_do_not_matter(phantom):
    lungs_binary = (phantom["lungs"] > 0).astype(np.uint8)
    a = segment_infection_hu(phantom["hu"], phantom["lungs"], SPACING)
    b = segment_infection_hu(phantom["hu"].astype(np.int16), lungs_binary, SPACING)
    assert (a ^ b).mean() < 1e-3  # int16 rounding of the noise only


def test_empty_lungs_and_cancel(phantom):
    empty = np.zeros_like(phantom["lungs"])
    out = segment_infection_hu(phantom["hu"], empty, SPACING)
    assert out.shape == empty.shape and not out.any()

    def cancel(fraction, message):
        if fraction > 0.2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        segment_infection_hu(phantom["hu"], phantom["lungs"], SPACING, progress=cancel)


def test_bad_inputs():
    hu = np.zeros((4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="does not match"):
        segment_infection_hu(hu, np.zeros((4, 8, 9), np.uint8), SPACING)
    with pytest.raises(ValueError, match="3D"):
        segment_infection_hu(hu[0], np.zeros((8, 8), np.uint8), SPACING)
    with pytest.raises(ValueError, match="spacing"):
        segment_infection_hu(hu, np.zeros((4, 8, 8), np.uint8), (2.0, 0.0, 0.75))


# ---------------------------------------------------------------------------------------------- real CT

def _crude_lungs(hu: np.ndarray) -> np.ndarray:
    """Deliberately simple lung mask (so this test does not depend on lungs.py): air < -400 HU that does not
    touch the in-plane border (i.e. inside the body), the largest one or two components, holes filled per
    slice, split into right (1) / left (2) at the x midline of the LPS array."""
    low = hu < -400
    lab, n = ndi.label(low)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([lab[:, 0, :].ravel(), lab[:, -1, :].ravel(),
                                       lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]))
    sizes[0] = 0
    sizes[border] = 0
    order = np.argsort(sizes)[::-1]
    keep = [order[0]] + [i for i in order[1:2] if sizes[i] > 0.2 * sizes[order[0]]]
    mask = np.isin(lab, keep)
    for z in range(mask.shape[0]):
        mask[z] = ndi.binary_fill_holes(mask[z])
    lungs = mask.astype(np.uint8)
    lungs[:, :, hu.shape[2] // 2:] *= 2
    return lungs


def _slice_labels(name: str) -> np.ndarray:
    labels = read_slice_labels(shared_file("ct/covidctmd_slice_labels.csv"), name)
    assert (labels["z"] == np.arange(len(labels["z"]))).all()
    return labels["infected"]


def test_real_ct_covid_patient_has_more_infection_than_normal_subject():
    results = {}
    for name in ("covidctmd_p001_ct.nii.gz", "covidctmd_normal001_ct.nii.gz"):
        image = sitk.ReadImage(str(shared_file(f"ct/{name}")))
        # The files are stored LPS already, so the array is canonical and z_index is the array's first axis.
        assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()) == "LPS"
        hu = sitk.GetArrayFromImage(image)
        spacing = tuple(reversed(image.GetSpacing()))
        lungs = _crude_lungs(hu)
        mask = segment_infection_hu(hu, lungs, spacing)
        assert not mask[lungs == 0].any()
        labels = _slice_labels(name)
        assert len(labels) == hu.shape[0]
        predicted = mask.any(axis=(1, 2))
        results[name] = {
            "lung_ml": float((lungs > 0).sum() * np.prod(spacing) / 1000),
            "infection_ml": float(mask.sum() * np.prod(spacing) / 1000),
            "share": float(mask.sum() / (lungs > 0).sum()),
            "tp": int((predicted & labels).sum()), "fn": int((~predicted & labels).sum()),
            "tn": int((~predicted & ~labels).sum()), "fp": int((predicted & ~labels).sum()),
        }
    p, n = results["covidctmd_p001_ct.nii.gz"], results["covidctmd_normal001_ct.nii.gz"]
    tp, fn = p["tp"], p["fn"]
    tn, fp = p["tn"] + n["tn"], p["fp"] + n["fp"]
    sens, spec = tp / (tp + fn), tn / (tn + fp)
    print(f"\nHU baseline on COVID-CT-MD: {results}\nslice-level sensitivity {sens:.3f} specificity {spec:.3f}")
    assert p["tp"] + p["fn"] == 80 and n["tp"] + n["fn"] == 0  # the csv's 80 infected slices of P001
    assert p["share"] > 0.001
    assert p["share"] > 3 * n["share"]
    # slice-level agreement with the radiologists clearly better than chance (sens + spec = 1)
    assert sens + spec > 1.3


# ------------------------------------------------------------------------------------------------- slabs

def test_slabs_give_the_unsplit_result():
    """A large (thin-slice) synthetic volume through the slab path equals the one-slab result."""
    from COVIDLesionSegLib import infection_hu
    from COVIDLesionSegLib.phantom import make_chest_phantom
    from COVIDLesionSegLib.volume import CTVolume

    image, truth = make_chest_phantom(shape_zyx=(320, 118, 128), spacing_zyx=(0.8, 2.8, 2.8))
    vol = CTVolume.from_image(image)
    lungs = (truth["right_lung"] > 0).astype(np.uint8) + 2 * (truth["left_lung"] > 0).astype(np.uint8)
    whole = segment_infection_hu(vol.hu, lungs, vol.spacing_zyx)
    crop_voxels = int(np.prod([s.stop - s.start for s in bounding_box(lungs > 0, 0)]))
    assert crop_voxels <= infection_hu.SLAB_VOXELS, "the unsplit run must be one slab"
    budget = crop_voxels // 5
    margin = [int(np.ceil(3 * infection_hu.SMOOTHING_SIGMA_MM / s)) + 1 for s in vol.spacing_zyx]
    box = bounding_box(lungs > 0, margin)
    grid = infection_hu._working_grid([s.stop - s.start for s in reversed(box)], tuple(reversed(vol.spacing_zyx)))
    slabs = list(infection_hu._slabs([s.stop - s.start for s in box], vol.spacing_zyx, grid, budget))
    assert len(slabs) >= 4
    # Every working-grid slice is resampled from exactly one slab, and the cores partition the crop.
    rows = np.concatenate([np.arange(r.start, r.stop) for _, _, r in slabs])
    assert np.array_equal(rows, np.arange(grid.GetSize()[2]))
    assert [c.start for c, _, _ in slabs[1:]] == [c.stop for c, _, _ in slabs[:-1]]
    split = segment_infection_hu(vol.hu, lungs, vol.spacing_zyx, slab_voxels=budget)
    assert whole.sum() > 1000, "the phantom's lesions must be found for the comparison to mean anything"
    assert np.array_equal(split, whole)


def test_fast_mode_finds_the_phantom_lesions_and_drops_vessels(phantom):
    fast = segment_infection_hu(phantom["hu"], phantom["lungs"], SPACING, fast=True)
    assert not fast[phantom["lungs"] == 0].any()
    share = {k: fast[phantom[k]].mean() for k in ("ggo", "cons", "thin", "thick")}
    assert share["ggo"] > 0.8 and share["cons"] > 0.8, share
    assert share["thin"] < 0.2 and share["thick"] < 0.2, share
