"""StructSeg 2019 lung gross tumour volume (Task 4 "Lung_GTV" of the MICCAI 2019 challenge).

Layout (the challenge's download, unzipped)::

    ROOT/                  e.g. Lung_GTV/
      1/data.nii.gz        CT (HU)
      1/label.nii.gz       GTV mask (1 = gross tumour volume)
      2/ ...               ... 50 numbered patient folders

Folder names are the patient ids (the benchmark's nnU-Net conversion calls them ``train_<n>``); each is one
patient, so ``group = id``. The target is ``lesion`` (000/001 pre-train on the GTV as a non-COVID lesion).
"""

from __future__ import annotations

from pathlib import Path

from .base import Case, DatasetError, LabelRef, require

SOURCE = "structseg_gtv"
LAYOUT = """  ROOT/<patient>/data.nii.gz   (CT)
  ROOT/<patient>/label.nii.gz  (gross tumour volume mask)"""


def read_structseg(root: str | Path, target: str = "lesion") -> list[Case]:
    root = require(Path(root), "data set folder", LAYOUT, SOURCE)
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    cases = []
    for folder in folders:
        data = folder / "data.nii.gz"
        if not data.exists():
            continue
        label = require(folder / "label.nii.gz", f"label of patient {folder.name}", LAYOUT, SOURCE)
        cases.append(Case(id=f"structseg_{folder.name}", group=f"structseg_{folder.name}", source=SOURCE,
                          image=data, labels={target: LabelRef(label)}))
    if not cases:
        raise DatasetError(f"{SOURCE}: no patient folder with data.nii.gz in {root}\nExpected layout:\n{LAYOUT}")
    return cases
