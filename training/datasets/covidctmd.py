"""COVID-CT-MD (Afshar et al. 2021): DICOM CTs with slice-level and lobe-level infection labels.

Layout (the Figshare release)::

    ROOT/
      COVID-19 Cases/P001/*.dcm ...     (the category folder names vary between releases:
      Cap Cases/cap001/*.dcm ...         "COVID-19 subjects", "CAP subjects", ...; patient folders are
      Normal Cases/normal001/*.dcm ...   found by their Folder/ID one level below ROOT)
      Index.csv                          Label Index, Diagnosis, Relative Path, Folder/ID
      Slice-level-labels.npy             (n_labelled, n_slices) 0/1 per slice
      Lobe-level-labels.npy              (n_labelled, n_slices, 5): LLL, LUL, RLL, RML, RUL

Slice labels index the slices sorted by Slice Location (dataset README), i.e. inferior to superior - the
canonical z order of :func:`~.base.load_case` - and rows of the ``.npy`` files are Index.csv's Label Index.
There are no voxel masks: cases carry ``meta["slice_infected"]`` / ``meta["slice_lobes"]`` (trimmed to the
volume's slice count on loading) for evaluation and slice-level weak supervision. Unlabelled subjects are
returned only with ``labelled_only=False``. :func:`read_shared_ct` reads the two shared COVID-CT-MD
volumes (and LIDC-0001) from ``../shared/data/ct``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .base import Case, DatasetError, LabelRef, require

SOURCE = "covidctmd"
LOBES = ("LLL", "LUL", "RLL", "RML", "RUL")
LAYOUT = """  ROOT/<category folder>/<Folder/ID>/*.dcm   (e.g. "COVID-19 Cases/P001/")
  ROOT/Index.csv                             (Label Index,Diagnosis,Relative Path,Folder/ID)
  ROOT/Slice-level-labels.npy                (labelled cases x slices)
  ROOT/Lobe-level-labels.npy                 (labelled cases x slices x 5 lobes; optional)"""


def read_covidctmd(root: str | Path, labelled_only: bool = True) -> list[Case]:
    root = require(Path(root), "data set folder", LAYOUT, SOURCE)
    index = require(root / "Index.csv", "Index.csv", LAYOUT, SOURCE)
    slices = require(root / "Slice-level-labels.npy", "Slice-level-labels.npy", LAYOUT, SOURCE)
    slice_labels = np.load(slices, allow_pickle=False)
    lobe_path = root / "Lobe-level-labels.npy"
    lobe_labels = np.load(lobe_path, allow_pickle=False) if lobe_path.exists() else None
    if slice_labels.ndim != 2:
        raise DatasetError(f"{SOURCE}: {slices} must be 2D (cases x slices), got shape {slice_labels.shape}")
    if lobe_labels is not None and (lobe_labels.ndim != 3 or lobe_labels.shape[:2] != slice_labels.shape
                                    or lobe_labels.shape[2] != 5):
        raise DatasetError(f"{SOURCE}: {lobe_path} must be (cases, slices, 5) matching {slices} {slice_labels.shape}, "
                           f"got {lobe_labels.shape}")
    folders = {p.name: p for cat in root.iterdir() if cat.is_dir() for p in cat.iterdir() if p.is_dir()}
    rows = list(csv.DictReader(index.open(newline="", encoding="utf-8-sig")))
    if not rows or not {"Label Index", "Diagnosis", "Folder/ID"} <= set(rows[0]):
        raise DatasetError(f"{SOURCE}: {index} needs the columns Label Index, Diagnosis, Folder/ID\nExpected layout:\n{LAYOUT}")
    cases, labelled = [], set()
    for r in rows:
        pid, li = r["Folder/ID"].strip(), int(r["Label Index"])
        if pid not in folders:
            raise DatasetError(f"{SOURCE}: Index.csv lists {pid}, but no folder {pid}/ exists one level below {root}\n"
                               f"Expected layout:\n{LAYOUT}")
        if li >= slice_labels.shape[0]:
            raise DatasetError(f"{SOURCE}: Label Index {li} of {pid} is outside {slices} ({slice_labels.shape[0]} rows)")
        meta = {"diagnosis": r["Diagnosis"].strip(), "label_index": li,
                "slice_infected": slice_labels[li].astype(np.uint8)}
        if lobe_labels is not None:
            meta["slice_lobes"] = lobe_labels[li].astype(np.uint8)
        cases.append(Case(id=pid, group=pid, source=SOURCE, image=folders[pid], meta=meta))
        labelled.add(pid)
    if not labelled_only:
        for pid, folder in sorted(folders.items()):
            if pid not in labelled:
                cases.append(Case(id=pid, group=pid, source=SOURCE, image=folder,
                                  meta={"diagnosis": folder.parent.name.split()[0]}))
    return cases


SHARED_LAYOUT = """  DIR/lidc_0001_ct.nii.gz, DIR/lidc_0001_nodules.nii.gz
  DIR/covidctmd_p001_ct.nii.gz, DIR/covidctmd_normal001_ct.nii.gz, DIR/covidctmd_slice_labels.csv"""


def read_shared_ct(folder: str | Path) -> list[Case]:
    """The real HU volumes of ``../shared/data/ct``: LIDC-IDRI-0001 (target ``nodule``) and the COVID-CT-MD
    P001 / normal001 scans with their slice labels (``z_index`` 0 = most inferior = canonical z)."""
    folder = require(Path(folder), "shared ct folder", SHARED_LAYOUT, "shared_ct")
    cases = []
    lidc = folder / "lidc_0001_ct.nii.gz"
    if lidc.exists():
        cases.append(Case(id="LIDC-IDRI-0001", group="LIDC-IDRI-0001", source="lidc", image=lidc,
                          labels={"nodule": LabelRef(require(folder / "lidc_0001_nodules.nii.gz", "nodule mask",
                                                             SHARED_LAYOUT, "shared_ct"))}))
    table = folder / "covidctmd_slice_labels.csv"
    per_file: dict[str, list[dict]] = {}
    if table.exists():
        for r in csv.DictReader(table.open(newline="")):
            per_file.setdefault(r["file"], []).append(r)
    for name, cid, diagnosis in (("covidctmd_p001_ct.nii.gz", "P001", "COVID-19"),
                                 ("covidctmd_normal001_ct.nii.gz", "normal001", "Normal")):
        path = folder / name
        if not path.exists():
            continue
        meta: dict = {"diagnosis": diagnosis}
        rows = sorted(per_file.get(name, []), key=lambda r: int(r["z_index"]))
        if rows:
            if [int(r["z_index"]) for r in rows] != list(range(len(rows))):
                raise DatasetError(f"shared_ct: {table}: z_index of {name} must run 0..n-1 without gaps")
            meta["slice_infected"] = np.array([int(r["infected"]) for r in rows], dtype=np.uint8)
            meta["slice_lobes"] = np.array([[int(r[lobe]) for lobe in LOBES] for r in rows], dtype=np.uint8)
        cases.append(Case(id=cid, group=cid, source=SOURCE, image=path, meta=meta))
    if not cases:
        raise DatasetError(f"shared_ct: none of the expected volumes in {folder}\nExpected layout:\n{SHARED_LAYOUT}")
    return cases
