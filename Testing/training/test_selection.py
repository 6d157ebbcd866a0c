"""training.selection's rules on constructed masks whose answers are known (the runs on real scans are in
docs/default_models.md, section 7)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from training.selection import Scan, choose, thresholds_for, validation_scores


def _scan(n_slices=10, lesion_slices=(2, 3, 4)):
    lungs = np.zeros((n_slices, 8, 8), bool)
    lungs[:, 2:6, 2:6] = True
    truth = np.zeros_like(lungs)
    for z in lesion_slices:
        truth[z, 3:5, 3:5] = True
    return Scan("s", volume=None, lungs=lungs, truth=truth)


def test_validation_pools_the_host_slices_as_negatives():
    a, b = _scan(), _scan(lesion_slices=(6,))
    host = Scan("host", volume=None, lungs=_scan().lungs)
    perfect = [a.truth.copy(), b.truth.copy()]
    clean_host = np.zeros_like(host.lungs)
    r = validation_scores(perfect, [a, b], host, clean_host)
    assert r["synthetic_dsc"] == pytest.approx(1.0)
    assert r["synthetic_slice_sensitivity"] == 1.0 and r["synthetic_slice_specificity"] == 1.0
    assert r["host_infected_share"] == 0.0
    # Marking 5 of the host's 10 healthy slices costs specificity: 16 + 10 negatives, 5 of them called.
    noisy_host = np.zeros_like(host.lungs)
    noisy_host[:5, 3, 3] = True
    r = validation_scores(perfect, [a, b], host, noisy_host)
    assert r["synthetic_slice_specificity"] == pytest.approx(1 - 5 / 26)
    assert r["synthetic_dsc"] == pytest.approx(1.0)                      # the copies' DSC is unchanged
    assert r["host_infected_share"] == pytest.approx(5 / host.lungs.sum())
    assert r["synthetic_slice_youden"] == pytest.approx(r["synthetic_slice_specificity"])


def test_choose_by_youden_then_dsc_then_smaller_components_then_first():
    def row(t, youden, dsc, ml):
        return {"threshold": t, "postprocess": {"min_component_ml": ml}, "synthetic_slice_youden": youden,
                "synthetic_dsc": dsc}

    rows = [row(0.5, 0.60, 0.30, 0.0), row(0.7, 0.70, 0.20, 1.0), row(0.9, 0.70, 0.25, 2.0)]
    assert choose(rows)["threshold"] == 0.9                              # Youden tie: higher DSC
    rows = [row(0.5, 0.70, 0.25, 1.0), row(0.7, 0.70, 0.25, 0.5)]
    assert choose(rows)["threshold"] == 0.7                              # then smaller components
    rows = [row(0.5, 0.70, 0.25, 1.0), row(0.7, 0.70, 0.25, 1.0)]
    assert choose(rows)["threshold"] == 0.5                              # then the model's own (first)


def test_the_models_own_threshold_is_swept_first():
    own = SimpleNamespace(info=SimpleNamespace(threshold=0.5))
    assert thresholds_for(own) == [0.5, 0.1, 0.3, 0.7, 0.9]
    own.info.threshold = 0.6
    assert thresholds_for(own) == [0.6, 0.1, 0.3, 0.5, 0.7, 0.9]


def test_the_grid_tries_the_confirmation_with_each_growth():
    from training.selection import GROW_MM, grid_settings

    rules = grid_settings({"min_component_ml": (0.0, 1.0)})
    assert [r.min_component_ml for r in rules[:2]] == [0.0, 1.0] and not any(r.confirm_hu_threshold for r in rules[:2])
    confirm = rules[2:]
    assert all(r.confirm_hu_threshold for r in confirm) and [r.grow_mm for r in confirm] == list(GROW_MM)
    assert GROW_MM[0] == 0.0        # the plain confirmation stays a candidate
