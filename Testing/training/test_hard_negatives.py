"""training.hard_negatives: the 2D slices plus the healthy lung slices of a real HU scan, in the slices' domain."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from Testing.conftest import shared_file
from training.datasets import read_covid19ctseg2d
from training.hard_negatives import build


def test_build_adds_the_lung_slices_of_a_real_scan_as_one_negative_group(tmp_path):
    slices = shared_file("covid19ctseg2d/covid19ctseg2d.npz").parent
    scan = shared_file("ct/lidc_0001_ct.nii.gz")
    n = build(tmp_path, slices, scan, group=20)
    original = np.load(slices / "covid19ctseg2d.npz")
    out = np.load(tmp_path / "covid19ctseg2d.npz")
    n0 = len(original["images"])
    assert 60 <= n <= 133 and len(out["images"]) == n0 + n        # lung slices of a 133-slice chest CT
    assert np.array_equal(out["images"][:n0], original["images"])
    neg = slice(n0, None)
    assert (out["group"][neg] == 20).all() and not out["infection"][neg].any()
    assert out["lung"][neg].reshape(n, -1).mean(axis=1).min() > 0.005  # every negative holds lung
    # in the slices' domain: 8-bit, stretched per slice (the 2D set's own slices span 0..255 alike)
    assert out["images"][neg].dtype == np.uint8 and np.median(out["images"][neg].reshape(n, -1).max(axis=1)) >= 250
    rows = list(csv.DictReader((tmp_path / "slices.csv").open(newline="")))
    assert len(rows) == n0 + n and rows[-1]["group"] == "20"
    cases = read_covid19ctseg2d(tmp_path)                            # the training reader accepts the folder
    assert sum(c.group == "20" for c in cases) == n
    with pytest.raises(FileExistsError, match="--overwrite"):
        build(tmp_path, slices, scan, group=20)
    with pytest.raises(ValueError, match="already used"):
        build(tmp_path / "again", slices, scan, group=3)


def test_hu_domain_with_synthetic_lesions_and_repeated_negatives(tmp_path):
    """The HU-domain training folder: a host's lung slices (negatives, repeated) and the lesion slices of a
    synthetic copy with their exact masks, through the fixed HU window; no COVID-19-CT-Seg slices."""
    from training.hard_negatives import HU_WINDOW, main

    scan = shared_file("ct/lungptctdx_a0002_ct.nii.gz")        # 30 slices of 8 mm: fast
    shared_file("covid19ctseg2d/covid19ctseg2d.npz")              # the shape bank
    assert main([str(tmp_path), "--slices", "none", "--domain", "hu", "--scan", str(scan), "--synthetic", "2",
                 "--negative-repeat", "2", "--seed", "4"]) == 0
    out = np.load(tmp_path / "covid19ctseg2d.npz")
    rows = list(csv.DictReader((tmp_path / "slices.csv").open(newline="")))
    kinds = np.array([r["kind"] for r in rows])
    neg, syn = kinds == "negative", kinds == "synthetic"
    assert neg.sum() % 2 == 0 and neg.sum() >= 40 and syn.sum() >= 1   # 2 copies of ~27 lung slices
    assert not out["infection"][neg].any() and out["infection"][syn].reshape(syn.sum(), -1).any(axis=1).all()
    negatives = out["images"][neg]                                # each slice twice, one after the other
    assert np.array_equal(negatives[0::2], negatives[1::2]) and not np.array_equal(negatives[0], negatives[2])
    # HU through the fixed window: air (-1024 HU and below) is 0, soft tissue (~40 HU) about 191.
    lo, hi = HU_WINDOW["lo"], HU_WINDOW["hi"]
    assert out["images"][neg].min() == 0 and abs(np.median(out["images"][neg]) - 0) < 200
    assert round((40 - lo) / (hi - lo) * 255) == 191
    # Synthetic lesion pixels are denser than the lung around them.
    lesion = out["infection"][syn] > 0
    lung = (out["lung"][syn] > 0) & ~lesion
    assert out["images"][syn][lesion].mean() > out["images"][syn][lung].mean() + 10
    assert main([str(tmp_path), "--slices", "none", "--domain", "hu", "--scan", str(scan)]) == 2  # no overwrite
