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
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from . import LABEL_LEFT_LUNG, LABEL_RIGHT_LUNG
from .checks import as_binary_mask

LUNGS: tuple[str, ...] = ("right", "left")
VERTICAL_ZONES: tuple[str, ...] = ("upper", "middle", "lower")
AP_ZONES: tuple[str, ...] = ("ventral", "dorsal")
ZONES: tuple[str, ...] = VERTICAL_ZONES + AP_ZONES
ML_DECIMALS = 3
PERCENT_DECIMALS = 3

_LUNG_LABELS = {"right": LABEL_RIGHT_LUNG, "left": LABEL_LEFT_LUNG}
#: Report key of each lung and of the two together.
REPORT_KEYS = {"right": "right_lung", "left": "left_lung", "both": "both_lungs"}

ZONE_DEFINITION = (
    "Zones per lung from its own bounding box: upper/middle/lower = thirds of its z extent (superior = "
    "upper), ventral/dorsal = halves of its y extent (anterior = ventral); a voxel belongs to the part "
    "containing its centre, parts are half-open so a centre on a cut belongs to the posterior/superior part.")


def _part_counts(lung_counts: np.ndarray, other_counts: np.ndarray, n_parts: int) -> tuple[np.ndarray, np.ndarray]:
    """Split per-slice counts into ``n_parts`` zones of the *lung's* occupied extent (module docstring).

    ``lung_counts[k]`` / ``other_counts[k]`` are the lung / infection voxel counts of slice (or row) k.
    The zone boundaries come from the lung alone, so the infection is counted in the lung's zones.
    Returns the per-part totals of both, in increasing index order.
    """
    occupied = np.flatnonzero(lung_counts)
    lung_out = np.zeros(n_parts, dtype=np.int64)
    other_out = np.zeros(n_parts, dtype=np.int64)
    if occupied.size == 0:
        return lung_out, other_out
    kmin, kmax = int(occupied[0]), int(occupied[-1])
    height = kmax - kmin + 1
    k = np.arange(kmin, kmax + 1, dtype=np.int64)
    part = (n_parts * (2 * (k - kmin) + 1)) // (2 * height)
    np.add.at(lung_out, part, lung_counts[kmin:kmax + 1].astype(np.int64))
    np.add.at(other_out, part, other_counts[kmin:kmax + 1].astype(np.int64))
    return lung_out, other_out


def _ml(voxels: int, voxel_ml: float) -> float:
    return round(voxels * voxel_ml, ML_DECIMALS)


def _percent(part: int, whole: int) -> float | None:
    if whole == 0:
        return None
    return round(100.0 * part / whole, PERCENT_DECIMALS)


def _entry(lung_voxels: int, infection_voxels: int, voxel_ml: float) -> dict[str, Any]:
    return {"voxels": int(lung_voxels), "volume_ml": _ml(lung_voxels, voxel_ml),
            "infection_voxels": int(infection_voxels), "infection_ml": _ml(infection_voxels, voxel_ml),
            "infected_percent": _percent(infection_voxels, lung_voxels)}


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


def quantify(lungs: np.ndarray, infection: np.ndarray, spacing_zyx: Sequence[float]) -> dict[str, Any]:
    """Volumes and infected percentages of each lung, both lungs and each lung zone.

    Args:
        lungs: (z, y, x) integer labelmap on the canonical grid: 0 background, 1 right, 2 left lung.
        infection: (z, y, x) boolean infection mask on the same grid.
        spacing_zyx: voxel spacing in mm in array axis order (``CTVolume.spacing_zyx``).

    Returns a JSON-serialisable dict (see the module docstring for the definitions)::

        {"voxel_volume_ml", "units", "zone_definition",
         "right_lung" | "left_lung": {voxels, volume_ml, infection_voxels, infection_ml, infected_percent,
                                      extent_voxels (absent for an empty lung),
                                      "zones": {upper|middle|lower|ventral|dorsal: {same five keys}}},
         "both_lungs": {same keys, "zones": {...}},
         "infection_outside_lungs_voxels", "infection_outside_lungs_ml", "notes": [...]}
    """
    lungs, infection, voxel_ml = _validate(lungs, infection, spacing_zyx)
    notes: list[str] = []
    per_lung: dict[str, Any] = {}
    zone_totals = {zone: [0, 0] for zone in ZONES}  # lung voxels, infection voxels, summed over lungs
    total_lung = total_inf = 0
    counts = _slab_counts(lungs, infection)
    for side in LUNGS:
        # Per-slice (z) and per-row (y) counts are all the zones need; no full-size zone masks.
        lung_z, inf_z, lung_y, inf_y = counts[_LUNG_LABELS[side]]
        n_lung, n_inf = int(lung_z.sum()), int(inf_z.sum())
        entry = _entry(n_lung, n_inf, voxel_ml)
        if n_lung == 0:
            notes.append(f"The {side} lung is empty: its volume is 0 and its infected percentages "
                         "are undefined (null).")
        else:
            occupied_z, occupied_y = np.flatnonzero(lung_z), np.flatnonzero(lung_y)
            entry["extent_voxels"] = {"z": [int(occupied_z[0]), int(occupied_z[-1])],
                                      "y": [int(occupied_y[0]), int(occupied_y[-1])]}
        # Index order of the parts is increasing z (lower -> upper) and increasing y (ventral -> dorsal).
        lung_v, inf_v = _part_counts(lung_z, inf_z, 3)
        lung_ap, inf_ap = _part_counts(lung_y, inf_y, 2)
        zone_counts = {"lower": (lung_v[0], inf_v[0]), "middle": (lung_v[1], inf_v[1]),
                       "upper": (lung_v[2], inf_v[2]),
                       "ventral": (lung_ap[0], inf_ap[0]), "dorsal": (lung_ap[1], inf_ap[1])}
        entry["zones"] = {zone: _entry(int(zone_counts[zone][0]), int(zone_counts[zone][1]), voxel_ml)
                          for zone in ZONES}
        for zone in ZONES:
            zone_totals[zone][0] += int(zone_counts[zone][0])
            zone_totals[zone][1] += int(zone_counts[zone][1])
        per_lung[REPORT_KEYS[side]] = entry
        total_lung += n_lung
        total_inf += n_inf

    both = _entry(total_lung, total_inf, voxel_ml)
    both["zones"] = {zone: _entry(zone_totals[zone][0], zone_totals[zone][1], voxel_ml) for zone in ZONES}
    per_lung[REPORT_KEYS["both"]] = both

    outside = counts["outside"]
    if outside:
        notes.append(f"{outside} infection voxels ({_ml(outside, voxel_ml)} mL) lie outside both lung masks "
                     "and are not counted.")
    return {
        "voxel_volume_ml": voxel_ml,
        "units": {"volume": "mL", "infected_percent": "percent of the lung or zone volume"},
        "zone_definition": ZONE_DEFINITION,
        **per_lung,
        "infection_outside_lungs_voxels": outside,
        "infection_outside_lungs_ml": _ml(outside, voxel_ml),
        "notes": notes,
    }


def _slab_counts(lungs: np.ndarray, infection: np.ndarray, slab: int = 32) -> dict[Any, Any]:
    """Per lung label: lung and infection voxels per slice (z) and per row (y); and the infection voxels
    outside both lungs. Counted over slabs of ``slab`` slices, so the masks are never built for the whole
    volume (three full-size bool arrays on a 1000-slice scan were 0.8 GB)."""
    nz, ny = lungs.shape[:2]
    out: dict[Any, Any] = {label: (np.zeros(nz, np.int64), np.zeros(nz, np.int64), np.zeros(ny, np.int64),
                                   np.zeros(ny, np.int64)) for label in _LUNG_LABELS.values()}
    outside = 0
    for z0 in range(0, nz, slab):
        part, inf_part = lungs[z0:z0 + slab], infection[z0:z0 + slab]
        for label, (lung_z, inf_z, lung_y, inf_y) in out.items():
            lung = part == label
            inf = lung & inf_part
            lung_z[z0:z0 + slab] = np.count_nonzero(lung, axis=(1, 2))
            inf_z[z0:z0 + slab] = np.count_nonzero(inf, axis=(1, 2))
            lung_y += np.count_nonzero(lung, axis=(0, 2))
            inf_y += np.count_nonzero(inf, axis=(0, 2))
        outside += int(np.count_nonzero(inf_part & (part == 0)))
    out["outside"] = outside
    return out


def _csv_items() -> list[tuple[str, tuple[str, ...], str]]:
    """(column, path into the report, key) for every CSV column, in column order."""
    items: list[tuple[str, tuple[str, ...], str]] = []
    for side in LUNGS + ("both",):
        key = REPORT_KEYS[side]
        items += [(f"{key}_ml", (key,), "volume_ml"),
                  (f"{side}_infection_ml", (key,), "infection_ml"),
                  (f"{side}_infected_pct", (key,), "infected_percent")]
    for side in LUNGS + ("both",):
        key = REPORT_KEYS[side]
        for zone in ZONES:
            items += [(f"{side}_{zone}_ml", (key, "zones", zone), "volume_ml"),
                      (f"{side}_{zone}_infection_ml", (key, "zones", zone), "infection_ml"),
                      (f"{side}_{zone}_infected_pct", (key, "zones", zone), "infected_percent")]
    return items


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
