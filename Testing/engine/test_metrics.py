"""Tests of COVIDLesionSegLib.metrics against values counted by hand on tiny masks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from COVIDLesionSegLib import metrics as M


def _box(shape, *slices):
    a = np.zeros(shape, dtype=bool)
    a[tuple(slices)] = True
    return a


# ------------------------------------------------------------------------------------- overlap metrics

def test_2d_counts_by_hand():
    # pred: 2x2 block; ref: 2x3 block containing it. TP=4, FP=0, FN=2, TN=25-6=19.
    pred = _box((5, 5), slice(1, 3), slice(1, 3))
    ref = _box((5, 5), slice(1, 3), slice(1, 4))
    assert M.confusion_counts(pred, ref) == {"tp": 4, "fp": 0, "fn": 2, "tn": 19}
    m = M.case_metrics(pred, ref, which=[k for k in M.METRIC_NAMES if k not in M.SURFACE_METRICS])
    assert m["dsc"] == pytest.approx(8 / 10)
    assert m["sensitivity"] == pytest.approx(4 / 6)
    assert m["specificity"] == pytest.approx(1.0)
    assert m["precision"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(0.8)
    assert m["accuracy"] == pytest.approx(23 / 25)
    assert m["voe"] == pytest.approx(1 - 4 / 6)
    assert m["rvd"] == pytest.approx(2 / 6)


def test_3d_counts_by_hand_with_false_positive():
    # pred: 2x2x2 cube + one stray voxel; ref: 2x2x3 box holding the cube. Grid 4x4x4 = 64.
    pred = _box((4, 4, 4), slice(0, 2), slice(0, 2), slice(0, 2))
    pred[3, 3, 3] = True
    ref = _box((4, 4, 4), slice(0, 2), slice(0, 2), slice(0, 3))
    # TP = 8, FP = 1, FN = 4, TN = 64 - 13 = 51
    m = M.case_metrics(pred.astype(np.uint8), ref.astype(np.uint8))
    assert m["dsc"] == pytest.approx(16 / 21)
    assert m["sensitivity"] == pytest.approx(8 / 12)
    assert m["specificity"] == pytest.approx(51 / 52)
    assert m["precision"] == pytest.approx(8 / 9)
    assert m["f1"] == pytest.approx(16 / 21)  # 2PR/(P+R) = DSC
    assert m["accuracy"] == pytest.approx(59 / 64)
    assert m["voe"] == pytest.approx(5 / 13)
    assert m["rvd"] == pytest.approx(3 / 12)
    assert list(m) == list(M.METRIC_NAMES)
    # the small helpers agree with case_metrics
    assert M.dice(pred, ref) == pytest.approx(m["dsc"])
    assert M.sensitivity(pred, ref) == pytest.approx(m["sensitivity"])
    assert M.specificity(pred, ref) == pytest.approx(m["specificity"])
    assert M.precision(pred, ref) == pytest.approx(m["precision"])
    assert M.voe(pred, ref) == pytest.approx(m["voe"])
    assert M.rvd(pred, ref) == pytest.approx(m["rvd"])


def test_f1_from_precision_recall_equals_dice_on_random_masks():
    rng = np.random.default_rng(3)
    for _ in range(5):
        pred = rng.random((6, 7, 8)) < 0.3
        ref = rng.random((6, 7, 8)) < 0.4
        m = M.case_metrics(pred, ref, which=["dsc", "f1", "voe"])
        assert m["f1"] == pytest.approx(m["dsc"])
        # Jaccard = DSC / (2 - DSC)
        assert 1 - m["voe"] == pytest.approx(m["dsc"] / (2 - m["dsc"]))


# ------------------------------------------------------------------------------------- surface metrics

def test_nsd_single_voxel_shift_honours_anisotropic_spacing():
    # One voxel vs the same voxel one step along axis 0. Surface elements sit on the 8 voxel corners (all
    # with equal area by symmetry). 4 of the 8 corners are shared (distance 0); the other 4 are one axis-0
    # step away from the other surface: 4 mm with spacing (4,1,1) -> outside tau = 3 mm -> NSD = 8/16;
    # 1 mm with isotropic spacing -> inside -> NSD = 1.
    a = np.zeros((5, 5, 5), bool)
    b = a.copy()
    a[2, 2, 2] = True
    b[3, 2, 2] = True
    assert M.nsd(a, b, spacing=(4.0, 1.0, 1.0), tau_mm=3.0) == pytest.approx(0.5, abs=1e-6)
    assert M.nsd(a, b, spacing=(1.0, 1.0, 1.0), tau_mm=3.0) == pytest.approx(1.0)
    # the same shift along the 1 mm axis is inside tau even with the coarse axis 0
    c = np.zeros((5, 5, 5), bool)
    c[2, 2, 3] = True
    assert M.nsd(a, c, spacing=(4.0, 1.0, 1.0), tau_mm=3.0) == pytest.approx(1.0)
    # a tolerance below the 1 mm step rejects the displaced half again
    assert M.nsd(a, b, spacing=(1.0, 1.0, 1.0), tau_mm=0.9) == pytest.approx(0.5, abs=1e-6)


def test_nsd_grows_with_tau_and_is_one_for_identical_masks():
    ref = _box((20, 20, 20), slice(5, 15), slice(5, 15), slice(5, 15))
    pred = np.roll(ref, 2, axis=2)
    assert M.nsd(ref, ref, spacing=(2.0, 0.7, 0.7)) == pytest.approx(1.0)
    values = [M.nsd(pred, ref, spacing=(1.0, 1.0, 1.0), tau_mm=t) for t in (0.0, 0.5, 1.0, 1.5, 2.5)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[0] < 1.0 and values[-1] == pytest.approx(1.0)


def test_hd95_by_hand():
    # 3D: single voxels 3 steps apart along axis 0 (2 mm) -> 6 mm; along axis 2 (1 mm) -> 3 mm.
    a = np.zeros((8, 8, 8), bool)
    a[1, 4, 4] = True
    b = np.zeros_like(a)
    b[4, 4, 4] = True
    c = np.zeros_like(a)
    c[1, 4, 7] = True
    assert M.hd95(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert M.hd95(a, c, spacing=(2.0, 1.0, 1.0)) == pytest.approx(3.0)
    # 2D: a 1x10 line vs the same line one row down, row spacing 2.5 mm -> every distance is 2.5 mm
    line = _box((6, 14), slice(2, 3), slice(2, 12))
    assert M.hd95(np.roll(line, 1, axis=0), line, spacing=(2.5, 1.0)) == pytest.approx(2.5)
    # 2D percentile: ref = one pixel, pred = that pixel + one 4 columns away (0.5 mm) -> directed
    # pred->ref distances {0, 2 mm}; their 95th percentile (linear interpolation) is 0.95 * 2 = 1.9 mm;
    # ref->pred distances {0}. HD95 = max(1.9, 0).
    ref = np.zeros((11, 11), bool)
    ref[5, 5] = True
    pred = ref.copy()
    pred[5, 9] = True
    assert M.hd95(pred, ref, spacing=(1.0, 0.5)) == pytest.approx(1.9)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI 1.6 passes a deprecated argument internally
def test_surface_metrics_crop_equals_monai_on_full_array():
    # An object touching the array border: the crop + zero pad must give MONAI's uncropped answer.
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(7)
    ref = np.zeros((12, 30, 30), bool)
    ref[0:6, 0:12, 3:15] = True
    pred = ref.copy()
    pred[0:6, 0:12, 15:17] = True
    pred &= rng.random(pred.shape) > 0.05
    spacing = (2.5, 0.8, 0.8)
    ours = M.case_metrics(pred, ref, spacing=spacing, which=["nsd", "hd95"])
    tp = torch.from_numpy(pred.astype(np.float32))[None, None]
    tr = torch.from_numpy(ref.astype(np.float32))[None, None]
    full_nsd = float(compute_surface_dice(tp, tr, [3.0], include_background=True, spacing=list(spacing),
                                          use_subvoxels=True)[0, 0])
    full_hd = float(compute_hausdorff_distance(tp, tr, include_background=True, percentile=95,
                                               spacing=list(spacing))[0, 0])
    assert ours["nsd"] == pytest.approx(full_nsd, abs=1e-6)
    assert ours["hd95"] == pytest.approx(full_hd, abs=1e-6)
    assert 0.0 < ours["nsd"] < 1.0 and ours["hd95"] > 0.0


# ------------------------------------------------------------------------------------------ edge cases

@pytest.mark.parametrize("shape", [(6, 6), (4, 6, 6)])
def test_edge_cases(shape):
    empty = np.zeros(shape, bool)
    blob = np.zeros(shape, bool)
    blob[(slice(1, 3),) * len(shape)] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no MONAI "all 0" warnings leak out
        both = M.case_metrics(empty, empty)
        ref_empty = M.case_metrics(blob, empty)
        pred_empty = M.case_metrics(empty, blob)
    assert both["dsc"] == 1.0 and both["nsd"] == 1.0 and both["f1"] == 1.0
    assert both["voe"] == 0.0 and both["rvd"] == 0.0 and both["hd95"] == 0.0
    assert both["accuracy"] == 1.0 and both["specificity"] == 1.0
    assert math.isnan(both["sensitivity"]) and math.isnan(both["precision"])

    assert ref_empty["dsc"] == 0.0 and ref_empty["nsd"] == 0.0 and ref_empty["f1"] == 0.0
    assert math.isnan(ref_empty["sensitivity"]) and math.isnan(ref_empty["rvd"]) and math.isnan(ref_empty["hd95"])
    assert ref_empty["precision"] == 0.0 and ref_empty["voe"] == 1.0
    assert ref_empty["specificity"] == pytest.approx(1 - blob.sum() / blob.size)

    assert pred_empty["dsc"] == 0.0 and pred_empty["nsd"] == 0.0 and pred_empty["f1"] == 0.0
    assert pred_empty["sensitivity"] == 0.0 and pred_empty["specificity"] == 1.0
    assert math.isnan(pred_empty["precision"]) and math.isnan(pred_empty["hd95"])
    assert pred_empty["rvd"] == 1.0 and pred_empty["voe"] == 1.0

    full = np.ones(shape, bool)
    assert math.isnan(M.specificity(full, full))


def test_which_selects_subset_in_canonical_order():
    a = _box((4, 4), slice(0, 2), slice(0, 2))
    m = M.case_metrics(a, a, which=["rvd", "dsc"])
    assert list(m) == ["dsc", "rvd"]
    assert M.case_metrics(a, a, which="nsd") == {"nsd": 1.0}


def test_bad_input_messages():
    a = np.zeros((4, 4), bool)
    with pytest.raises(ValueError, match="same shape"):
        M.case_metrics(a, np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="labelmap == 3"):
        M.case_metrics(np.full((4, 4), 3, np.uint8), a)
    with pytest.raises(ValueError, match="threshold"):
        M.case_metrics(np.full((4, 4), 0.4, np.float32), a)
    with pytest.raises(ValueError, match="one value per array axis"):
        M.case_metrics(a, a, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        M.case_metrics(a, a, spacing=(1.0, -1.0))
    with pytest.raises(ValueError, match="unknown metric"):
        M.case_metrics(a, a, which=["dice"])
    with pytest.raises(ValueError, match="2D or 3D"):
        M.case_metrics(np.zeros(4, bool), np.zeros(4, bool))
    with pytest.raises(ValueError, match="tau_mm"):
        M.nsd(a, a, tau_mm=-1)


# ------------------------------------------------------------------------------------------- aggregate

def test_aggregate_ignores_and_counts_nan():
    rows = [
        {"case": "a", "dsc": 0.5, "sensitivity": float("nan"), "custom": 2},
        {"case": "b", "dsc": 1.0, "sensitivity": 0.5, "custom": 4},
        {"case": "c", "dsc": float("nan"), "custom": 9},
        {"case": "d", "dsc": 0.9, "hd95": float("nan")},
    ]
    s = M.aggregate(rows)
    assert list(s) == ["dsc", "sensitivity", "hd95", "custom"]  # METRIC_NAMES order, then others; no "case"
    assert s["dsc"]["mean"] == pytest.approx(0.8)
    assert s["dsc"]["median"] == pytest.approx(0.9)
    assert s["dsc"]["std"] == pytest.approx(np.std([0.5, 1.0, 0.9]))
    assert s["dsc"]["min"] == 0.5 and s["dsc"]["max"] == 1.0
    assert s["dsc"]["n"] == 3 and s["dsc"]["n_nan"] == 1
    assert s["sensitivity"]["mean"] == pytest.approx(0.5)
    assert s["sensitivity"]["n"] == 1 and s["sensitivity"]["n_nan"] == 3  # one NaN + two rows without it
    assert math.isnan(s["hd95"]["mean"]) and s["hd95"]["n"] == 0 and s["hd95"]["n_nan"] == 4
    assert s["custom"]["median"] == pytest.approx(4.0) and s["custom"]["n"] == 3


def test_aggregate_of_case_metrics_rows():
    a = _box((6, 6), slice(1, 4), slice(1, 4))
    b = _box((6, 6), slice(1, 4), slice(1, 5))
    rows = [M.case_metrics(a, a), M.case_metrics(a, b), M.case_metrics(np.zeros_like(a), np.zeros_like(a))]
    s = M.aggregate(rows)
    assert set(s) == set(M.METRIC_NAMES)
    assert s["dsc"]["mean"] == pytest.approx((1 + 18 / 21 + 1) / 3)
    assert s["sensitivity"]["n"] == 2 and s["sensitivity"]["n_nan"] == 1
