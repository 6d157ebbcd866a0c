"""MosMedData (Morozov et al. 2020): COVID-19 chest CTs, 50 of them (category CT-1) with infection masks.

Layout (the public release)::

    ROOT/
      studies/CT-0/study_0001.nii.gz ... studies/CT-4/...   (1110 studies in severity categories CT-0..CT-4)
      masks/study_0255_mask.nii.gz ...                       (50 masks, all for CT-1 studies)

nCoVSegNet (003) trains on 40 of the 50 masked studies and tests on 10. Each study is one patient
(``group = study id``). Only studies with a mask are returned unless ``with_unlabelled=True``.
"""

from __future__ import annotations

from pathlib import Path

from .base import Case, DatasetError, LabelRef, require, strip_image_suffix

SOURCE = "mosmed"
LAYOUT = """  ROOT/studies/CT-<k>/study_<nnnn>.nii.gz
  ROOT/masks/study_<nnnn>_mask.nii.gz"""


def read_mosmed(root: str | Path, with_unlabelled: bool = False) -> list[Case]:
    root = require(Path(root), "data set folder", LAYOUT, SOURCE)
    studies_dir = require(root / "studies", "studies folder", LAYOUT, SOURCE)
    masks_dir = root / "masks"
    if not with_unlabelled:
        require(masks_dir, "masks folder", LAYOUT, SOURCE)
    masks = {}
    if masks_dir.is_dir():
        for p in masks_dir.glob("study_*_mask.nii*"):
            if not p.name.startswith("._"):
                masks[strip_image_suffix(p.name)[: -len("_mask")]] = p
    cases = []
    for category in sorted(d for d in studies_dir.iterdir() if d.is_dir() and d.name.upper().startswith("CT-")):
        for image in sorted(category.glob("study_*.nii*")):
            if image.name.startswith("._"):
                continue
            sid = strip_image_suffix(image.name)
            if sid not in masks and not with_unlabelled:
                continue
            labels = {"infection": LabelRef(masks[sid])} if sid in masks else {}
            cases.append(Case(id=sid, group=sid, source=SOURCE, image=image, labels=labels,
                              meta={"category": category.name}))
    if not cases:
        raise DatasetError(f"{SOURCE}: no study in {studies_dir} has a mask in {masks_dir}\nExpected layout:\n{LAYOUT}")
    missing = sorted(set(masks) - {c.id for c in cases})
    if missing:
        raise DatasetError(f"{SOURCE}: masks without a study file: {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''}\nExpected layout:\n{LAYOUT}")
    return cases
