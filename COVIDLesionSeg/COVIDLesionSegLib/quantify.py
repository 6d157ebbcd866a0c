"""Quantification: lung and infection volumes, infected percentage per lung, both lungs and lung zone.

The papers report segmentation quality (DSC, NSD), not clinical quantities; the quantities here are the
ones CT severity scoring uses: the percentage of each lung that is infected, overall and by region
(upper/middle/lower and ventral/dorsal parts, as in lobe- and zone-based CT severity scores). Zones are
geometric, not anatomical lobes: no lobe segmentation is needed and the definition is the same for every
scan.

Inputs are on the engine's canonical grid (``volume.py``): array axes (z, y, x) of an LPS image, so
z increases towards Superior and y towards Posterior.

Definitions (all counts are voxels; volumes are counts x voxel volume):

- lung volume: voxels labelled 1 (right) or 2 (left) in ``lungs``.
- infection volume of a lung: infection voxels inside that lung. Infection outside both lungs is not
  counted anywhere; its volume is reported separately (``infection_outside_lungs_ml``) as a quality hint.
- infected percentage: 100 x infection volume / lung volume of the same lung, both lungs or zone;
  ``None`` (JSON null) when the denominator is empty, with a note.
- zones, per lung, from that lung's own bounding box: its z extent [zmin, zmax] (voxel indices) spans the
  physical interval [zmin - 1/2, zmax + 1/2] of height H = zmax - zmin + 1 voxels. The interval is cut
  into three equal parts; a voxel belongs to the part that contains its centre: lower (smallest z),
  middle, upper (largest z). Likewise the y extent is cut into two halves: ventral (smaller y, anterior)
  and dorsal (larger y, posterior). Parts are half-open [start, end), so a voxel centre lying exactly on
  a cut (only possible for the ventral/dorsal cut of a lung with an odd number of rows) belongs to the
  later part: dorsal. Thirds never have ties (H/3 - 1/2 is never an integer). The membership is computed
  in integer arithmetic: part = floor(n (2 (k - kmin) + 1) / (2 H)) for n parts.
- "both" zones add the two lungs' zones (each lung keeps its own thirds and halves).

Rounding: volumes to 0.001 mL (1 uL), percentages to 0.001 %; voxel counts are exact integers. Rounding
is applied once, to the reported numbers; percentages are computed from the exact counts.

Severity measures (``"severity"`` in the report; ``hu`` must be given for the high-opacity ones):

- percentage of opacity (PO) and percentage of high opacity (PHO), per lung and for both lungs, as defined by
  Chaganti S, Grenier P, Balachandran A, et al. "Automated Quantification of CT Patterns Associated with
  COVID-19 from Chest CT." Radiology: Artificial Intelligence 2020;2(4):e200048 (doi:10.1148/ryai.2020200048):
  PO = 100 x infection volume / lung volume (the same number as ``infected_percent``: one count, two names);
  PHO = 100 x volume of the infection voxels above -200 HU (:data:`HIGH_OPACITY_HU`; consolidation rather
  than ground glass) / lung volume. Each lung uses its own volume; "both" uses the sum.
- zone score: each of the six zones (upper, middle, lower third of each lung) gets 0-4 from its infected
  percentage p: 0 no infection, 1 p < 25 %, 2 25 % <= p < 50 %, 3 50 % <= p < 75 %, 4 p >= 75 %; the total
  is 0-24. This is the six-zone CT score of Wu J, Wu X, Zeng W, et al. "Chest CT Findings in Patients With
  Coronavirus Disease 2019 and Its Relationship With Clinical Features." Investigative Radiology
  2020;55(5):257-261 (doi:10.1097/RLI.0000000000000670), computed from the voxel counts instead of read
  visually. Difference from the paper: its zones are anatomical (upper above the carina, middle down to
  the inferior pulmonary veins, lower below them); ours are the geometric thirds above, which need no
  landmark detection. Any infected voxel makes a zone score at least 1, as in the paper's scale ("0 %
  involvement" is the only 0). The comparisons use the exact counts (e.g. score 1 when 4 x infection <
  lung voxels). A zone without lung voxels has no score (null); the total then sums the scored zones and
  ``zone_score_max`` says out of how many points.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from . import LABEL_LEFT_LUNG, LABEL_RIGHT_LUNG
from .checks import as_binary_mask
from .preprocessing import bounding_box

LUNGS: tuple[str, ...] = ("right", "left")
VERTICAL_ZONES: tuple[str, ...] = ("upper", "middle", "lower")
AP_ZONES: tuple[str, ...] = ("ventral", "dorsal")
ZONES: tuple[str, ...] = VERTICAL_ZONES + AP_ZONES
#: Infection voxels above this (HU) are "high opacity" (Chaganti et al. 2020, module docstring).
HIGH_OPACITY_HU = -200.0
#: Points per zone of the six-zone score, and the zones it is summed over (Wu et al. 2020).
ZONE_SCORE_POINTS = 4
SCORED_ZONES: tuple[str, ...] = VERTICAL_ZONES
ML_DECIMALS = 3
PERCENT_DECIMALS = 3

_LUNG_LABELS = {"right": LABEL_RIGHT_LUNG, "left": LABEL_LEFT_LUNG}
#: Report key of each lung and of the two together.
REPORT_KEYS = {"right": "right_lung", "left": "left_lung", "both": "both_lungs"}

ZONE_DEFINITION = (
    "Zones per lung from its own bounding box: upper/middle/lower = thirds of its z extent (superior = "
    "upper), ventral/dorsal = halves of its y extent (anterior = ventral); a voxel belongs to the part "
    "containing its centre, parts are half-open so a centre on a cut belongs to the posterior/superior part.")


def _part_counts(lung_counts: np.ndarray, other_counts: Sequence[np.ndarray], n_parts: int) -> list[np.ndarray]:
    """Split per-slice counts into ``n_parts`` zones of the *lung's* occupied extent (module docstring).

    ``lung_counts[k]`` is the lung voxel count of slice (or row) k, ``other_counts`` are counts of subsets
    of the lung (infection, high-opacity infection) per slice. The zone boundaries come from the lung
    alone, so the subsets are counted in the lung's zones. Returns the per-part totals of the lung and of
    each subset, in increasing index order.
    """
    occupied = np.flatnonzero(lung_counts)
    out = [np.zeros(n_parts, dtype=np.int64) for _ in range(1 + len(other_counts))]
    if occupied.size == 0:
        return out
    kmin, kmax = int(occupied[0]), int(occupied[-1])
    height = kmax - kmin + 1
    k = np.arange(kmin, kmax + 1, dtype=np.int64)
    part = (n_parts * (2 * (k - kmin) + 1)) // (2 * height)
    for total, counts in zip(out, (lung_counts, *other_counts)):
        np.add.at(total, part, counts[kmin:kmax + 1].astype(np.int64))
    return out


def _ml(voxels: int, voxel_ml: float) -> float:
    return round(voxels * voxel_ml, ML_DECIMALS)


def _percent(part: int, whole: int) -> float | None:
    if whole == 0:
        return None
    return round(100.0 * part / whole, PERCENT_DECIMALS)


def zone_score(infection_voxels: int, lung_voxels: int) -> int | None:
    """Six-zone score points (0-4) of one zone from exact counts (Wu et al. 2020; module docstring)."""
    if lung_voxels <= 0:
        return None
    if infection_voxels <= 0:
        return 0
    # p < 25 %, p < 50 %, p < 75 % in integer arithmetic: no rounding can move a zone across a bound.
    for points, (num, den) in enumerate(((1, 4), (1, 2), (3, 4)), start=1):
        if infection_voxels * den < num * lung_voxels:
            return points
    return ZONE_SCORE_POINTS


def _entry(lung_voxels: int, infection_voxels: int, voxel_ml: float,
           high_voxels: int | None = None) -> dict[str, Any]:
    entry = {"voxels": int(lung_voxels), "volume_ml": _ml(lung_voxels, voxel_ml),
             "infection_voxels": int(infection_voxels), "infection_ml": _ml(infection_voxels, voxel_ml),
             "infected_percent": _percent(infection_voxels, lung_voxels)}
    if high_voxels is not None:
        entry.update({"high_opacity_voxels": int(high_voxels), "high_opacity_ml": _ml(high_voxels, voxel_ml),
                      "high_opacity_percent": _percent(high_voxels, lung_voxels)})
    return entry


def _validate(lungs: np.ndarray, infection: np.ndarray,
              spacing_zyx: Sequence[float]) -> tuple[np.ndarray, np.ndarray, float]:
    lungs = np.asarray(lungs)
    infection = np.asarray(infection)
    if lungs.ndim != 3:
        raise ValueError(f"lungs must be a 3D (z, y, x) labelmap, got shape {lungs.shape}")
    if infection.shape != lungs.shape:
        raise ValueError(f"infection mask shape {infection.shape} differs from the lung labelmap shape {lungs.shape}")
    if not np.issubdtype(lungs.dtype, np.integer) and lungs.dtype != bool:
        raise ValueError(f"lungs must be an integer labelmap (0 background, 1 right, 2 left), got {lungs.dtype}")
    # The allowed labels are 0..2, so min and max decide (np.unique sorted the whole volume: 0.2 s on P001).
    lo, hi = (int(lungs.min()), int(lungs.max())) if lungs.size else (0, 0)
    bad = ([int(v) for v in np.unique(lungs) if v not in (0, LABEL_RIGHT_LUNG, LABEL_LEFT_LUNG)]
           if lo < 0 or hi > max(LABEL_RIGHT_LUNG, LABEL_LEFT_LUNG) else [])
    if bad:
        raise ValueError(f"lungs labelmap has values {bad}; expected only 0 (background), "
                         f"{LABEL_RIGHT_LUNG} (right lung) and {LABEL_LEFT_LUNG} (left lung)")
    infection = as_binary_mask(infection, "infection")
    spacing = np.asarray(spacing_zyx, dtype=float)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing_zyx must be three positive numbers in mm (z, y, x), got {spacing_zyx!r}")
    return lungs, infection, float(np.prod(spacing)) / 1000.0


#: Slices counted at a time by :func:`_side_counts` (its temporaries are this many slices, not the scan).
COUNT_SLABS = 32


def _side_counts(lungs: np.ndarray, infection: np.ndarray | None, hu: np.ndarray | None, label: int,
                 scan_shape: Sequence[int], box: tuple[slice, ...]):
    """Per-slice (z) and per-row (y) voxel counts of one lung (``label``) and of its infection (and, with
    ``hu``, its high-opacity part), at their scan indices: ``(lung_z, lung_y, [inf_z, (high_z)], [inf_y,
    (high_y)])``. They are all the zones need. The arrays are the lungs' box; it is counted
    :data:`COUNT_SLABS` slices at a time, so no box-sized mask is made (four of them were 0.6 GB more on a
    1000-slice scan). ``infection`` None: it has no voxels (lungs only), its counts are zeros without
    counting (two thirds of the work)."""
    n_sub = 2 if hu is not None else 1
    z = [np.zeros(scan_shape[0], dtype=np.int64) for _ in range(1 + n_sub)]
    y = [np.zeros(scan_shape[1], dtype=np.int64) for _ in range(1 + n_sub)]
    z0, y0 = box[0].start or 0, box[1].start or 0
    for start in range(0, lungs.shape[0], COUNT_SLABS):
        part = slice(start, start + COUNT_SLABS)
        lung = lungs[part] == label
        masks = [lung]
        if infection is not None:
            masks.append(lung & infection[part])
            if hu is not None:
                masks.append(masks[1] & (hu[part] > HIGH_OPACITY_HU))
        for i, mask in enumerate(masks):
            zc = np.count_nonzero(mask, axis=(1, 2))
            z[i][z0 + start:z0 + start + len(zc)] = zc
            y[i][y0:y0 + mask.shape[1]] += np.count_nonzero(mask, axis=(0, 2))
    return z[0], y[0], z[1:], y[1:]


def quantify(lungs: np.ndarray, infection: np.ndarray, spacing_zyx: Sequence[float],
             hu: np.ndarray | None = None) -> dict[str, Any]:
    """Volumes, infected percentages and severity measures of each lung, both lungs and each lung zone.

    Args:
        lungs: (z, y, x) integer labelmap on the canonical grid: 0 background, 1 right, 2 left lung.
        infection: (z, y, x) boolean infection mask on the same grid.
        spacing_zyx: voxel spacing in mm in array axis order (``CTVolume.spacing_zyx``).
        hu: the CT in Hounsfield units on the same grid (``CTVolume.hu``); needed for the high-opacity
            measures, which are null without it.

    Returns a JSON-serialisable dict (see the module docstring for the definitions)::

        {"voxel_volume_ml", "units", "zone_definition",
         "right_lung" | "left_lung": {voxels, volume_ml, infection_voxels, infection_ml, infected_percent,
                                      [high_opacity_voxels, high_opacity_ml, high_opacity_percent: with hu],
                                      zone_score (0-12), extent_voxels (absent for an empty lung),
                                      "zones": {upper|middle|lower|ventral|dorsal: {same keys; the thirds
                                                with their zone_score 0-4}}},
         "both_lungs": {same keys, zone_score 0-24, "zones": {...}},
         "severity": {percentage_of_opacity, percentage_of_high_opacity: {right_lung, left_lung, both_lungs},
                      zone_score, zone_score_max, zone_scores: {right_upper, ...}, definitions},
         "infection_outside_lungs_voxels", "infection_outside_lungs_ml", "notes": [...]}
    """
    lungs, infection, voxel_ml = _validate(lungs, infection, spacing_zyx)
    if hu is not None:
        hu = np.asarray(hu)
        if hu.shape != lungs.shape:
            raise ValueError(f"HU array shape {hu.shape} differs from the lung labelmap shape {lungs.shape}")
    # Every count but the infection outside the lungs lies in the lungs' bounding box: count there, with the per-slice and per-row counts put back at their scan indices.
    scan_shape = lungs.shape
    infection_total = int(np.count_nonzero(infection))
    box = bounding_box(lungs) or tuple(slice(0, 0) for _ in scan_shape)
    lungs, infection = lungs[box], infection[box]
    hu = hu[box] if hu is not None else None
    with_high = hu is not None
    counted = infection if infection_total else None
    side_counts = {side: _side_counts(lungs, counted, hu, _LUNG_LABELS[side], scan_shape, box) for side in LUNGS}

    notes: list[str] = []
    per_lung: dict[str, Any] = {}
    zone_totals = {zone: [0, 0, 0] for zone in ZONES}  # lung, infection, high-opacity voxels, summed over lungs
    totals = [0, 0, 0]
    zone_scores: dict[str, int | None] = {}
    for side in LUNGS:
        lung_z, lung_y, sub_z, sub_y = side_counts[side]
        counts = [int(lung_z.sum())] + [int(c.sum()) for c in sub_z]
        entry = _entry(*counts[:2], voxel_ml, counts[2] if with_high else None)
        if counts[0] == 0:
            notes.append(f"The {side} lung is empty: its volume is 0 and its infected percentages "
                         "are undefined (null).")
        else:
            occupied_z, occupied_y = np.flatnonzero(lung_z), np.flatnonzero(lung_y)
            entry["extent_voxels"] = {"z": [int(occupied_z[0]), int(occupied_z[-1])],
                                      "y": [int(occupied_y[0]), int(occupied_y[-1])]}
        # Index order of the parts is increasing z (lower -> upper) and increasing y (ventral -> dorsal).
        vertical = _part_counts(lung_z, sub_z, 3)
        ap = _part_counts(lung_y, sub_y, 2)
        parts = {"lower": 0, "middle": 1, "upper": 2}
        zone_counts = {zone: [int(c[parts[zone]]) for c in vertical] for zone in VERTICAL_ZONES}
        zone_counts.update({zone: [int(c[i]) for c in ap] for i, zone in enumerate(AP_ZONES)})
        entry["zones"] = {}
        for zone in ZONES:
            z = zone_counts[zone]
            entry["zones"][zone] = _entry(z[0], z[1], voxel_ml, z[2] if with_high else None)
            for i, value in enumerate(z):
                zone_totals[zone][i] += value
        for zone in SCORED_ZONES:
            score = zone_score(zone_counts[zone][1], zone_counts[zone][0])
            entry["zones"][zone]["zone_score"] = zone_scores[f"{side}_{zone}"] = score
        entry["zone_score"] = _score_sum(zone_scores[f"{side}_{zone}"] for zone in SCORED_ZONES)
        per_lung[REPORT_KEYS[side]] = entry
        totals = [t + c for t, c in zip(totals, counts)]

    both = _entry(totals[0], totals[1], voxel_ml, totals[2] if with_high else None)
    both["zone_score"] = _score_sum(zone_scores.values())
    both["zones"] = {zone: _entry(zone_totals[zone][0], zone_totals[zone][1], voxel_ml,
                                  zone_totals[zone][2] if with_high else None) for zone in ZONES}
    per_lung[REPORT_KEYS["both"]] = both

    inside = sum(int(side_counts[side][2][0].sum()) for side in LUNGS)   # infection voxels of each lung
    outside = infection_total - inside
    if outside:
        notes.append(f"{outside} infection voxels ({_ml(outside, voxel_ml)} mL) lie outside both lung masks "
                     "and are not counted.")
    return {
        "voxel_volume_ml": voxel_ml,
        "units": {"volume": "mL", "infected_percent": "percent of the lung or zone volume",
                  "high_opacity_percent": "percent of the lung or zone volume",
                  "zone_score": "points, 0-4 per zone (upper/middle/lower third of each lung)"},
        "zone_definition": ZONE_DEFINITION,
        **per_lung,
        "severity": severity(per_lung, zone_scores),
        "infection_outside_lungs_voxels": outside,
        "infection_outside_lungs_ml": _ml(outside, voxel_ml),
        "notes": notes,
    }


def _score_sum(scores) -> int | None:
    scored = [s for s in scores if s is not None]
    return int(sum(scored)) if scored else None


SEVERITY_DEFINITIONS = {
    "percentage_of_opacity": "100 x infection volume / lung volume (Chaganti et al., Radiology: Artificial "
                             "Intelligence 2020;2(4):e200048); equals infected_percent",
    "percentage_of_high_opacity": f"100 x volume of infection voxels above {HIGH_OPACITY_HU:g} HU / lung volume "
                                  "(Chaganti et al. 2020)",
    "zone_score": "sum over the six zones (upper/middle/lower third of each lung) of 0 (no infection), "
                  "1 (< 25 %), 2 (25 to < 50 %), 3 (50 to < 75 %), 4 (>= 75 % infected); 0-24 (Wu et al., "
                  "Investigative Radiology 2020;55(5):257-261; geometric thirds instead of the paper's "
                  "carina / inferior pulmonary vein levels)",
}


def severity(per_lung: Mapping[str, Any], zone_scores: Mapping[str, int | None]) -> dict[str, Any]:
    """The severity block of a report from its lung entries and zone scores (module docstring)."""
    keys = [REPORT_KEYS[s] for s in LUNGS + ("both",)]
    scored = [s for s in zone_scores.values() if s is not None]
    return {
        "percentage_of_opacity": {k: per_lung[k]["infected_percent"] for k in keys},
        "percentage_of_high_opacity": {k: per_lung[k].get("high_opacity_percent") for k in keys},
        "high_opacity_threshold_hu": HIGH_OPACITY_HU,
        "zone_score": _score_sum(scored),
        "zone_score_max": ZONE_SCORE_POINTS * len(scored),
        "zone_scores": dict(zone_scores),
        "definitions": SEVERITY_DEFINITIONS,
    }


def _csv_items() -> list[tuple[str, tuple[str, ...], str]]:
    """(column, path into the report, key) for every CSV column, in column order."""
    items: list[tuple[str, tuple[str, ...], str]] = []
    for side in LUNGS + ("both",):
        key = REPORT_KEYS[side]
        items += [(f"{key}_ml", (key,), "volume_ml"),
                  (f"{side}_infection_ml", (key,), "infection_ml"),
                  (f"{side}_infected_pct", (key,), "infected_percent")]
    items += _SEVERITY_ITEMS
    for side in LUNGS + ("both",):
        key = REPORT_KEYS[side]
        for zone in ZONES:
            items += [(f"{side}_{zone}_ml", (key, "zones", zone), "volume_ml"),
                      (f"{side}_{zone}_infection_ml", (key, "zones", zone), "infection_ml"),
                      (f"{side}_{zone}_infected_pct", (key, "zones", zone), "infected_percent")]
    return items


#: The severity columns (PO, PHO, zone score): empty, like the infection columns, when nothing was measured.
_SEVERITY_ITEMS: list[tuple[str, tuple[str, ...], str]] = (
    [(f"{side}_po_pct", ("severity", "percentage_of_opacity"), REPORT_KEYS[side]) for side in LUNGS + ("both",)]
    + [(f"{side}_pho_pct", ("severity", "percentage_of_high_opacity"), REPORT_KEYS[side])
       for side in LUNGS + ("both",)]
    + [("zone_score", ("severity",), "zone_score")])
SEVERITY_CSV_COLUMNS: tuple[str, ...] = tuple(c for c, _, _ in _SEVERITY_ITEMS)
_CSV_ITEMS = _csv_items()
#: Column names produced by :func:`flatten_for_csv`, in order (the quantification part of results.csv).
CSV_COLUMNS: tuple[str, ...] = tuple(c for c, _, _ in _CSV_ITEMS) + ("infection_outside_lungs_ml",)


def flatten_for_csv(report: Mapping[str, Any]) -> dict[str, Any]:
    """One flat row (keys :data:`CSV_COLUMNS`, in order) from a :func:`quantify` report; None stays None."""
    row: dict[str, Any] = {}
    for column, path, key in _CSV_ITEMS:
        node: Any = report
        for step in path:
            node = node[step]
        row[column] = node[key]
    row["infection_outside_lungs_ml"] = report["infection_outside_lungs_ml"]
    return row


# ------------------------------------------------------------------------------------------------------------
# Segments held on the input's grid (a Slicer segmentation, edited or not)
# ------------------------------------------------------------------------------------------------------------

def canonical_masks(image, masks: Mapping[str, np.ndarray], name: str = "case"):
    """The CT and its segments on the engine's canonical grid, from the CT as an image on its input grid
    (``sitk.Image``) and the segments as masks on that grid (segment name -> bool (z, y, x), what a Slicer
    segmentation holds). Returns ``(volume, lungs, infection)``: the :class:`~.volume.CTVolume`, the uint8
    lung labelmap (1 right, 2 left) and the infection mask (None when there is no infection segment)."""
    import SimpleITK as sitk

    from .segments import SEGMENTS
    from .volume import CTVolume

    volume = CTVolume.from_image(image, name=name)

    def canonical(name: str):
        if name not in masks:
            return None
        mask = sitk.GetImageFromArray(np.asarray(masks[name], np.uint8))
        mask.CopyInformation(image)
        return sitk.GetArrayFromImage(sitk.DICOMOrient(mask, "LPS")).astype(bool)

    lungs = np.zeros(volume.shape, np.uint8)
    for seg in (SEGMENTS.right_lung, SEGMENTS.left_lung):
        mask = canonical(seg.name)
        if mask is not None:
            lungs[mask & (lungs == 0)] = seg.label
    return volume, lungs, canonical(SEGMENTS.infection.name)


def quantify_masks(image, masks: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """:func:`quantify` of segments on the input's grid (see :func:`canonical_masks`): the numbers of a result
    after the user edited it. Without an infection segment the infection is reported as not segmented."""
    volume, lungs, infection = canonical_masks(image, masks)
    quantities = quantify(lungs, infection if infection is not None else np.zeros_like(lungs, bool),
                          volume.spacing_zyx, hu=volume.hu)
    if infection is None:
        quantities["infection_segmented"] = False
    return quantities
