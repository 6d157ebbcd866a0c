"""The shared 2D COVID-19-CT-Seg slices (``../shared/data/covid19ctseg2d``).

Layout::

    DIR/covid19ctseg2d.npz   images (N, 256, 256) uint8, lung (N, 256, 256) {0,1}, infection {0,1},
                             group (N,) int16 = source volume
    DIR/slices.csv           per slice: row, group, source_group (coronacases | radiopaedia), volume_guess, ...

Groups 0-7 are coronacases volumes, 10-19 Radiopaedia volumes whose boundaries are approximate (one
patient's slices may straddle two groups), so splits must keep groups 10-19 together on one side
(:func:`training.splits.ctseg2d_protocol_folds`). Intensities are the data set's own domain (per-slice
stretch + CLAHE, not HU: note ``ctseg2d_domain``); HU scans are mapped into it by the engine's
``preprocessing.ctseg2d_domain``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .base import NOT_HU, Case, DatasetError, LabelRef, require
from .medseg import _load_npz

SOURCE = "ctseg2d"
LAYOUT = """  DIR/covid19ctseg2d.npz (images, lung, infection: (N, 256, 256); group: (N,))
  DIR/slices.csv         (columns row, group, source_group, volume_guess)"""


def read_covid19ctseg2d(folder: str | Path) -> list[Case]:
    """One 2D case per slice (``ctseg2d_0000``...), with ``group`` = the volume group as a string ("0".."19")
    and ``meta["source_group"]`` = ``coronacases`` or ``radiopaedia``."""
    folder = require(Path(folder), "covid19ctseg2d folder", LAYOUT, SOURCE)
    npz = require(folder / "covid19ctseg2d.npz", "covid19ctseg2d.npz", LAYOUT, SOURCE)
    data = _load_npz(str(npz.resolve()), npz.stat().st_mtime)
    missing = [k for k in ("images", "lung", "infection", "group") if k not in data]
    if missing:
        raise DatasetError(f"{SOURCE}: {npz} lacks arrays {missing} (has {sorted(data)})\nExpected layout:\n{LAYOUT}")
    images, lung, inf, group = data["images"], data["lung"], data["infection"], data["group"]
    n = images.shape[0]
    if not (lung.shape == inf.shape == images.shape and group.shape == (n,)):
        raise DatasetError(f"{SOURCE}: inconsistent shapes images {images.shape}, lung {lung.shape}, "
                           f"infection {inf.shape}, group {group.shape}")
    rows: dict[int, dict] = {}
    csv_path = folder / "slices.csv"
    if csv_path.exists():
        rows = {int(r["row"]): r for r in csv.DictReader(csv_path.open(newline=""))}
        if len(rows) != n:
            raise DatasetError(f"{SOURCE}: {csv_path} has {len(rows)} rows for {n} slices")
    cases = []
    for i in range(n):
        g = int(group[i])
        row = rows.get(i, {})
        source_group = row.get("source_group") or ("coronacases" if g < 10 else "radiopaedia")
        notes = [NOT_HU, "ctseg2d_domain"]
        if source_group == "radiopaedia":
            notes.append("group_boundaries_approximate")
        cases.append(Case(id=f"ctseg2d_{i:04d}", group=str(g), source=SOURCE, image=images[i],
                          labels={"infection": LabelRef(inf[i]), "lung": LabelRef(lung[i])}, dim=2, notes=notes,
                          meta={"source_group": source_group, "volume_guess": row.get("volume_guess", ""),
                                "row": i}))
    return cases


def ctseg2d_arrays(folder: str | Path) -> dict[str, np.ndarray]:
    """The raw arrays (``images``, ``lung``, ``infection``, ``group``) for vectorised use (cached)."""
    npz = require(Path(folder) / "covid19ctseg2d.npz", "covid19ctseg2d.npz", LAYOUT, SOURCE)
    return _load_npz(str(npz.resolve()), npz.stat().st_mtime)
