"""Quantification arithmetic on masks whose answers are worked out by hand below."""

from __future__ import annotations

import json

import numpy as np
import pytest

from COVIDLesionSegLib import LABEL_LEFT_LUNG, LABEL_RIGHT_LUNG
from COVIDLesionSegLib.quantify import CSV_COLUMNS, SEVERITY_CSV_COLUMNS, ZONES, flatten_for_csv, quantify, zone_score

SPACING_ZYX = (2.0, 1.0, 1.0)  # voxel = 2 mm^3 = 0.002 mL


def two_box_lungs():
    """Canonical (z, y, x) arrays: z up = superior, y up = posterior, small x = patient's right.

    Right lung: box z 5..34 (30 slices), y 1..10 (10 rows), x 0..9 (10) = 3000 voxels = 6 mL.
    Its infection: the top third (z 25..34) of the dorsal half (y 6..10), all x = 10*5*10 = 500 voxels = 1 mL.
    Left lung: box z 5..19 (15 slices), y 2..8 (7 rows), x 14..17 (4) = 420 voxels = 0.84 mL.
    Its infection: the lower third (z 5..9), all rows, x 14..15 = 5*7*2 = 70 voxels = 0.14 mL.
    Plus 12 infection voxels outside both lungs, which must not count.
    """
    lungs = np.zeros((40, 12, 20), np.uint8)
    infection = np.zeros(lungs.shape, bool)
    lungs[5:35, 1:11, 0:10] = LABEL_RIGHT_LUNG
    infection[25:35, 6:11, 0:10] = True
    lungs[5:20, 2:9, 14:18] = LABEL_LEFT_LUNG
    infection[5:10, 2:9, 14:16] = True
    infection[0:2, 0:2, 0:3] = True  # outside: below both lungs
    return lungs, infection


def test_two_box_lungs_volumes_percentages_and_zones():
    lungs, infection = two_box_lungs()
    report = quantify(lungs, infection, SPACING_ZYX)
    right, left, both = (report[k] for k in ("right_lung", "left_lung", "both_lungs"))
    assert report["voxel_volume_ml"] == pytest.approx(0.002)

    assert right["voxels"] == 3000 and right["volume_ml"] == pytest.approx(6.0)
    assert right["infection_voxels"] == 500 and right["infection_ml"] == pytest.approx(1.0)
    assert right["infected_percent"] == pytest.approx(100 * 500 / 3000, abs=1e-3)
    # Thirds of 30 slices: lower z 5..14, middle 15..24, upper 25..34 -> 1000 voxels (2 mL) each.
    for zone, inf_voxels in (("upper", 500), ("middle", 0), ("lower", 0)):
        z = right["zones"][zone]
        assert (z["voxels"], z["infection_voxels"]) == (1000, inf_voxels), zone
        assert z["volume_ml"] == pytest.approx(2.0)
        assert z["infected_percent"] == pytest.approx(100 * inf_voxels / 1000)
    # Halves of 10 rows: ventral y 1..5, dorsal y 6..10 -> 1500 voxels (3 mL) each.
    assert (right["zones"]["ventral"]["voxels"], right["zones"]["ventral"]["infection_voxels"]) == (1500, 0)
    assert (right["zones"]["dorsal"]["voxels"], right["zones"]["dorsal"]["infection_voxels"]) == (1500, 500)
    assert right["zones"]["dorsal"]["infected_percent"] == pytest.approx(100 / 3, abs=1e-3)
    assert right["extent_voxels"] == {"z": [5, 34], "y": [1, 10]}

    assert left["voxels"] == 420 and left["volume_ml"] == pytest.approx(0.84)
    assert left["infection_voxels"] == 70 and left["infected_percent"] == pytest.approx(100 * 70 / 420, abs=1e-3)
    # Thirds of 15 slices: 5 each (5*7*4 = 140 voxels); all infection in the lower third (70/140 = 50 %).
    assert [left["zones"][z]["voxels"] for z in ("lower", "middle", "upper")] == [140, 140, 140]
    assert [left["zones"][z]["infection_voxels"] for z in ("lower", "middle", "upper")] == [70, 0, 0]
    assert left["zones"]["lower"]["infected_percent"] == pytest.approx(50.0)
    # 7 rows y 2..8: the mid-plane passes through the centre of row 5, which counts as dorsal:
    # ventral rows 2,3,4 (3*15*4 = 180 voxels, infection 3*5*2 = 30), dorsal rows 5..8 (240, 40).
    assert (left["zones"]["ventral"]["voxels"], left["zones"]["ventral"]["infection_voxels"]) == (180, 30)
    assert (left["zones"]["dorsal"]["voxels"], left["zones"]["dorsal"]["infection_voxels"]) == (240, 40)

    assert both["voxels"] == 3420 and both["infection_voxels"] == 570
    assert both["volume_ml"] == pytest.approx(6.84) and both["infection_ml"] == pytest.approx(1.14)
    assert both["infected_percent"] == pytest.approx(100 * 570 / 3420, abs=1e-3)
    assert both["zones"]["upper"]["voxels"] == 1140 and both["zones"]["upper"]["infection_voxels"] == 500
    assert both["zones"]["dorsal"]["infected_percent"] == pytest.approx(100 * 540 / 1740, abs=1e-3)

    assert report["infection_outside_lungs_voxels"] == 12
    assert report["infection_outside_lungs_ml"] == pytest.approx(0.024)
    assert any("outside both lung masks" in n for n in report["notes"])
    json.dumps(report, allow_nan=False)  # plain JSON, no numpy types


def test_zone_boundaries_follow_the_lungs_own_extent_not_the_slices():
    """A lung tapering upwards: slice k (k = 0..5) holds k+1 voxels. Thirds of 6 slices: lower z 0,1
    (1+2 = 3 voxels), middle z 2,3 (3+4 = 7), upper z 4,5 (5+6 = 11). The lung is placed at z 10..15 of a
    taller image, so thirds of the image would give a different answer."""
    lungs = np.zeros((30, 4, 8), np.uint8)
    for k in range(6):
        lungs[10 + k, 1, 0:k + 1] = LABEL_RIGHT_LUNG
    infection = lungs > 0
    report = quantify(lungs, infection, (1.0, 1.0, 1.0))
    zones = report["right_lung"]["zones"]
    assert [zones[z]["voxels"] for z in ("lower", "middle", "upper")] == [3, 7, 11]
    assert zones["upper"]["infected_percent"] == 100.0
    # A single row in y: its centre is on the mid-plane, so the whole lung is dorsal and ventral is empty.
    assert zones["ventral"]["voxels"] == 0 and zones["ventral"]["infected_percent"] is None
    assert zones["dorsal"]["voxels"] == 21


def test_single_slice_lung_is_all_middle_third():
    lungs = np.zeros((5, 6, 6), np.uint8)
    lungs[2, 1:5, 0:2] = LABEL_RIGHT_LUNG  # one slice, 4 rows
    report = quantify(lungs, np.zeros(lungs.shape, bool), (1.0, 1.0, 1.0))
    zones = report["right_lung"]["zones"]
    assert (zones["lower"]["voxels"], zones["middle"]["voxels"], zones["upper"]["voxels"]) == (0, 8, 0)
    assert (zones["ventral"]["voxels"], zones["dorsal"]["voxels"]) == (4, 4)  # rows 1,2 | 3,4
    assert zones["middle"]["infected_percent"] == 0.0 and zones["upper"]["infected_percent"] is None


def test_empty_lung_gives_zero_volume_and_undefined_percentages():
    lungs, infection = two_box_lungs()
    lungs[lungs == LABEL_LEFT_LUNG] = 0
    report = quantify(lungs, infection, SPACING_ZYX)
    left = report["left_lung"]
    assert left["voxels"] == 0 and left["volume_ml"] == 0.0 and left["infected_percent"] is None
    assert all(left["zones"][z]["infected_percent"] is None for z in ZONES)
    assert "extent_voxels" not in left
    assert any("left lung is empty" in n for n in report["notes"])
    # The former left-lung infection is now outside the lungs: 70 + 12 voxels.
    assert report["infection_outside_lungs_voxels"] == 82
    assert report["both_lungs"]["infected_percent"] == pytest.approx(100 * 500 / 3000, abs=1e-3)


def test_rounding_and_spacing():
    lungs = np.zeros((3, 3, 3), np.uint8)
    lungs[:, :, :] = LABEL_RIGHT_LUNG
    infection = np.zeros(lungs.shape, bool)
    infection[0, 0, 0] = True
    report = quantify(lungs, infection, (0.7, 0.61, 0.61))
    right = report["right_lung"]
    assert right["volume_ml"] == round(27 * 0.7 * 0.61 * 0.61 / 1000, 3)
    assert right["infected_percent"] == round(100 / 27, 3)


def test_flatten_for_csv_matches_columns_and_report():
    lungs, infection = two_box_lungs()
    lungs[lungs == LABEL_LEFT_LUNG] = 0
    report = quantify(lungs, infection, SPACING_ZYX)
    row = flatten_for_csv(report)
    assert tuple(row) == CSV_COLUMNS
    assert row["right_lung_ml"] == report["right_lung"]["volume_ml"]
    assert row["both_lungs_ml"] == report["both_lungs"]["volume_ml"]
    assert row["both_infected_pct"] == report["both_lungs"]["infected_percent"]
    assert row["right_upper_infection_ml"] == report["right_lung"]["zones"]["upper"]["infection_ml"]
    assert row["left_dorsal_infected_pct"] is None
    assert row["infection_outside_lungs_ml"] == report["infection_outside_lungs_ml"]
    assert len(set(CSV_COLUMNS)) == len(CSV_COLUMNS)


@pytest.mark.parametrize("lungs, infection, spacing, match", [
    (np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 3), bool), (1, 1, 1), "differs"),
    (np.full((2, 2, 2), 3, np.uint8), np.zeros((2, 2, 2), bool), (1, 1, 1), "values"),
    (np.zeros((2, 2), np.uint8), np.zeros((2, 2), bool), (1, 1, 1), "3D"),
    (np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), bool), (1, 1, 1), "integer"),
    (np.zeros((2, 2, 2), np.uint8), np.full((2, 2, 2), 2, np.uint8), (1, 1, 1), "boolean"),
    (np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 2), bool), (1, 0, 1), "positive"),
    (np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 2), bool), (1, 1), "positive"),
])
def test_bad_input_is_rejected_clearly(lungs, infection, spacing, match):
    with pytest.raises(ValueError, match=match):
        quantify(lungs, infection, spacing)


# ------------------------------------------------------------------ severity: PO, PHO and the zone score

def two_box_hu(lungs, infection):
    """HU for :func:`two_box_lungs`: aerated lung -850, ground glass -600 and, in the top half (z 30..34) of
    the right lung's infection, consolidation -100 HU (10*5*10/2 = 250 voxels). One infection voxel sits at
    exactly -200 HU, which is not *above* the threshold, and one at -199, which is."""
    hu = np.full(lungs.shape, 40, np.int16)
    hu[lungs > 0] = -850
    hu[infection] = -600
    hu[30:35, 6:11, 0:10] = -100
    hu[25, 6, 0] = -200   # in the right infection's lower half: ground glass by the rule
    hu[5, 2, 14] = -199   # in the left infection: high opacity
    return hu


def test_percentage_of_opacity_and_high_opacity_per_lung_and_total():
    lungs, infection = two_box_lungs()
    report = quantify(lungs, infection, SPACING_ZYX, hu=two_box_hu(lungs, infection))
    severity = report["severity"]
    # PO (Chaganti et al.): infection / lung volume = the infected percentage, from the same counts.
    assert severity["percentage_of_opacity"] == {"right_lung": round(100 * 500 / 3000, 3),
                                                 "left_lung": round(100 * 70 / 420, 3),
                                                 "both_lungs": round(100 * 570 / 3420, 3)}
    # PHO: infection voxels above -200 HU / lung volume: right 250 of 3000, left the one -199 voxel of 420.
    assert severity["percentage_of_high_opacity"] == {"right_lung": round(100 * 250 / 3000, 3),
                                                      "left_lung": round(100 * 1 / 420, 3),
                                                      "both_lungs": round(100 * 251 / 3420, 3)}
    right = report["right_lung"]
    assert (right["high_opacity_voxels"], right["high_opacity_ml"]) == (250, pytest.approx(0.5))
    # All of it lies in the right upper third (z 25..34) and the dorsal half.
    assert right["zones"]["upper"]["high_opacity_percent"] == pytest.approx(25.0)
    assert right["zones"]["dorsal"]["high_opacity_voxels"] == 250
    assert right["zones"]["lower"]["high_opacity_voxels"] == 0
    # Consolidation outside the infection mask (the 40 HU soft tissue) never counts.
    assert report["both_lungs"]["high_opacity_voxels"] == 251
    assert severity["high_opacity_threshold_hu"] == -200
    json.dumps(report, allow_nan=False)


def test_zone_score_of_the_six_zones():
    """Right lung: upper third 500/1000 = 50 % -> 3, middle and lower 0; left lung: lower third 70/140 = 50 %
    -> 3, middle and upper 0. Total 6 of 24."""
    lungs, infection = two_box_lungs()
    report = quantify(lungs, infection, SPACING_ZYX)
    severity = report["severity"]
    assert severity["zone_scores"] == {"right_upper": 3, "right_middle": 0, "right_lower": 0,
                                       "left_upper": 0, "left_middle": 0, "left_lower": 3}
    assert (severity["zone_score"], severity["zone_score_max"]) == (6, 24)
    assert report["right_lung"]["zone_score"] == 3 and report["left_lung"]["zone_score"] == 3
    assert report["both_lungs"]["zone_score"] == 6
    assert report["right_lung"]["zones"]["upper"]["zone_score"] == 3
    assert "zone_score" not in report["right_lung"]["zones"]["dorsal"]   # scored over the thirds only
    # Without an HU image the high-opacity measures are undefined, not 0.
    assert severity["percentage_of_high_opacity"] == {"right_lung": None, "left_lung": None, "both_lungs": None}


@pytest.mark.parametrize("infected, lung, points", [
    (0, 100, 0), (1, 100, 1), (24, 100, 1), (25, 100, 2), (49, 100, 2), (50, 100, 3), (74, 100, 3),
    (75, 100, 4), (100, 100, 4), (1, 3, 2), (0, 0, None),
    # exact counts, not the rounded percentage: 24.99996 % rounds to 25.000 % but is still < 25 %
    (2_499_996, 10_000_000, 1),
])
def test_zone_score_scale_bounds(infected, lung, points):
    """Wu et al. 2020: 0 none, 1 < 25 %, 2 25 to < 50 %, 3 50 to < 75 %, 4 >= 75 %."""
    assert zone_score(infected, lung) == points


def test_zone_score_of_a_missing_lung_counts_the_scored_zones_only():
    lungs, infection = two_box_lungs()
    lungs[lungs == LABEL_LEFT_LUNG] = 0
    severity = quantify(lungs, infection, SPACING_ZYX)["severity"]
    assert severity["zone_scores"]["left_upper"] is None
    assert (severity["zone_score"], severity["zone_score_max"]) == (3, 12)
    assert severity["percentage_of_opacity"]["left_lung"] is None


def test_severity_columns_in_csv():
    lungs, infection = two_box_lungs()
    report = quantify(lungs, infection, SPACING_ZYX, hu=two_box_hu(lungs, infection))
    row = flatten_for_csv(report)
    assert row["right_po_pct"] == report["right_lung"]["infected_percent"]
    assert row["both_pho_pct"] == round(100 * 251 / 3420, 3)
    assert row["zone_score"] == 6
    assert set(SEVERITY_CSV_COLUMNS) <= set(CSV_COLUMNS)
