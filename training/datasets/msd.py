"""Medical Segmentation Decathlon layout (MSD Task06_Lung, and nnU-Net raw tasks in the same format).

Layout::

    ROOT/                      e.g. Task06_Lung/
      dataset.json             {"training": [{"image": "./imagesTr/lung_001.nii.gz",
                                              "label": "./labelsTr/lung_001.nii.gz"}, ...],
                                "labels": {"0": "background", "1": "cancer"}, ...}
      imagesTr/lung_001.nii.gz ...
      labelsTr/lung_001.nii.gz ...

Only ``dataset.json``'s ``training`` entries have labels (``imagesTs`` has none) and are returned. MSD's
tar files carry macOS ``._`` resource forks beside each volume; they are ignored. Each MSD case is one
patient, so ``group = id``. MSD Task06_Lung's label 1 ("cancer") becomes the target ``lesion`` (000/001/002
pre-train on it as a non-COVID lung lesion); pass ``target=`` for other tasks (e.g. ``effusion`` for the
benchmark's nnU-Net conversion of NSCLC pleural effusion, ``Task204_NSCLCPE``).
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import Case, DatasetError, LabelRef, require, strip_image_suffix

LAYOUT = """  ROOT/dataset.json   ({"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]})
  ROOT/imagesTr/*.nii.gz
  ROOT/labelsTr/*.nii.gz"""


def read_msd(root: str | Path, target: str = "lesion", source: str = "msd_lung",
             label_values: tuple[int, ...] | None = None) -> list[Case]:
    """Read an MSD/nnU-Net task folder; ``label_values`` picks the foreground values (default: any nonzero)."""
    root = require(Path(root), "task folder", LAYOUT, source)
    manifest = require(root / "dataset.json", "dataset.json", LAYOUT, source)
    try:
        meta = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{source}: {manifest} is not valid JSON ({exc})\nExpected layout:\n{LAYOUT}") from None
    entries = meta.get("training") if isinstance(meta, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{source}: {manifest} has no 'training' list of image/label pairs\nExpected layout:\n{LAYOUT}")
    cases = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DatasetError(f"{source}: training entry {i} of {manifest} needs 'image' and 'label', got {entry!r:.200}")
        image = require(root / entry["image"], f"image of training entry {i}", LAYOUT, source)
        label = require(root / entry["label"], f"label of training entry {i}", LAYOUT, source)
        cid = strip_image_suffix(image.name)
        if cid.endswith("_0000"):  # nnU-Net raw names carry a channel suffix
            cid = cid[:-5]
        cases.append(Case(id=cid, group=cid, source=source, image=image,
                          labels={target: LabelRef(label, label_values)},
                          meta={"labels": meta.get("labels", {})}))
    return cases
