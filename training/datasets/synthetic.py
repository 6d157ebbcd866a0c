"""A folder of synthetic-lesion HU volumes written by :func:`training.synthesis.synthesize_file`.

Layout (one case per stem; ``<host>`` is the host scan's case name, ``<seed>`` the synthesis seed)::

    ROOT/<host>_syn<seed>_ct.nii.gz     the host CT with inserted lesions (HU, the host's geometry)
    ROOT/<host>_syn<seed>_mask.nii.gz   the exact lesion mask
    ROOT/<host>_syn<seed>_lung.nii.gz   optional: the host's lung mask the lesions were drawn in
    ROOT/<host>_syn<seed>.json          the synthesis record ({"host": path, "seed": ..., "lesions": [...]})

Any other ``<stem>_ct.nii.gz`` with a ``<stem>_mask.nii.gz`` and a ``<stem>.json`` naming its ``host`` is read
the same way (e.g. a real scan with its own lesion mask, linked in beside the synthetic ones).

Every copy of one host is the same patient, so ``group`` is the host's case name: a split never puts two
copies of one scan on both sides. The lesion mask is the target ``target`` (default ``infection``; ``nodule``
for a folder of non-COVID lesions); the lung mask, where present, is the target ``lung``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import Case, DatasetError, LabelRef, require

LAYOUT = """  ROOT/<host>_syn<seed>_ct.nii.gz    (HU)
  ROOT/<host>_syn<seed>_mask.nii.gz  (lesion mask)
  ROOT/<host>_syn<seed>_lung.nii.gz  (optional lung mask)
  ROOT/<host>_syn<seed>.json         ({"host": ..., "seed": ...})"""

SOURCE = "synthetic"


def _host_name(meta: dict, stem: str) -> str:
    from COVIDLesionSegLib.io import case_name

    host = meta.get("host")
    if host:
        return case_name(str(host)).removesuffix("_ct")
    return stem.split("_syn")[0]


def read_synthetic(root: str | Path, target: str = "infection", source: str = SOURCE) -> list[Case]:
    """Read a folder of synthesised cases (module docstring), sorted by name."""
    root = require(Path(root), "synthetic case folder", LAYOUT, source)
    cases = []
    for ct in sorted(root.glob("*_ct.nii.gz")):
        stem = ct.name[: -len("_ct.nii.gz")]
        mask = root / f"{stem}_mask.nii.gz"
        record = root / f"{stem}.json"
        if not mask.exists() or not record.exists():
            raise DatasetError(f"{source}: {ct.name} has no {mask.name} or {record.name} beside it\n"
                               f"Expected layout:\n{LAYOUT}")
        try:
            meta = json.loads(record.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{source}: {record} is not valid JSON ({exc})") from None
        labels = {target: LabelRef(mask)}
        lung = root / f"{stem}_lung.nii.gz"
        if lung.exists() and target != "lung":
            labels["lung"] = LabelRef(lung)
        cases.append(Case(id=stem, group=_host_name(meta, stem), source=source, image=ct, labels=labels,
                          meta={"seed": meta.get("seed"), "host": meta.get("host"),
                                "lesion_volume_ml": meta.get("lesion_volume_ml")}))
    if not cases:
        raise DatasetError(f"{source}: no *_ct.nii.gz case in {root}\nExpected layout:\n{LAYOUT}")
    return cases


__all__ = ["read_synthetic"]
