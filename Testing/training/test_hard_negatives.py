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
