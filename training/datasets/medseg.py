"""MedSeg "COVID-19 CT segmentation dataset" (medicalsegmentation.com/covid19), the data of 004.

Full release layout::

    ROOT/
      tr_im.nii.gz                  100 axial slices of ~40 patients (SIRM), stacked along the 3rd axis
      tr_mask.nii.gz                0 background, 1 ground glass, 2 consolidation, 3 pleural effusion
      tr_lungmasks_updated.nii.gz   lung masks of the 100 slices (optional)
      rp_im/<n>.nii.gz              optional: the 9 Radiopaedia volumes (829 slices, 004's test set)
      rp_msk/<n>.nii.gz             their lesion masks (same labels as tr_mask)
      rp_lung_msk/<n>.nii.gz        their lung masks

The 100 slices carry no patient ids, so every slice is its own group (as in 004, whose 80/20 split is by
slice; slices of one patient can fall on both sides, which the paper accepted and this project cannot
avoid). Targets: ``lesion`` = all positive classes merged (004: "the positive classes ... are merged into
one"), ``infection`` = ground glass + consolidation, ``ggo``, ``consolidation``, ``effusion``, ``lung``.

The shared 2D copy ``../shared/data/medseg100`` (``medseg100.npz``: ``images`` uint8 ``(100, 512, 512)``,
``masks`` with the same 4 classes, ``slices.csv`` with Inf-Net's 50/48 split) is read by
:func:`read_medseg100`. Its images are 8-bit, stretched per slice (:data:`~.base.NOT_HU`).
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .base import NOT_HU, Case, DatasetError, LabelRef, image_files, require, strip_image_suffix

SOURCE = "medseg"
LAYOUT = """  ROOT/tr_im.nii.gz, ROOT/tr_mask.nii.gz, [ROOT/tr_lungmasks_updated.nii.gz]
  [ROOT/rp_im/<n>.nii.gz, ROOT/rp_msk/<n>.nii.gz, ROOT/rp_lung_msk/<n>.nii.gz]"""
NPZ_LAYOUT = """  DIR/medseg100.npz (images (N, H, W) uint8, masks (N, H, W) 0..3)
  DIR/slices.csv    (optional; columns index, infnet_split, ...)"""


def _lesion_labels(source) -> dict[str, LabelRef]:
    return {"lesion": LabelRef(source, (1, 2, 3)), "infection": LabelRef(source, (1, 2)),
            "ggo": LabelRef(source, (1,)), "consolidation": LabelRef(source, (2,)),
            "effusion": LabelRef(source, (3,))}


def _canonical_slice_order(path: Path) -> list[int]:
    """Canonical (LPS) z index of each stacked slice of ``path`` in file order, from the header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = reader.GetSize()
    if len(size) != 3:
        raise DatasetError(f"{SOURCE}: {path} must be a 3D stack of slices, got size {size}")
    d = np.array(reader.GetDirection()).reshape(3, 3)
    # The file axis that points most towards superior becomes the canonical z axis.
    axis = int(np.argmax(np.abs(d[2])))
    n = size[2]
    if axis != 2:
        raise DatasetError(f"{SOURCE}: {path}: the header does not stack slices along the third axis "
                           "(direction matrix); cannot map slices to axial images")
    return list(range(n)) if d[2, 2] > 0 else list(range(n - 1, -1, -1))


def read_medseg(root: str | Path, include_radiopaedia: bool = True) -> list[Case]:
    """Cases of the full release: 100 2D slice cases ``medseg_000``.. (in file order) and, when present,
    the Radiopaedia volumes as 3D cases ``medseg_rp_<n>`` (group ``medseg_rp_<n>``)."""
    root = require(Path(root), "data set folder", LAYOUT, SOURCE)
    im = require(root / "tr_im.nii.gz", "tr_im.nii.gz", LAYOUT, SOURCE)
    mask = require(root / "tr_mask.nii.gz", "tr_mask.nii.gz", LAYOUT, SOURCE)
    lung = root / "tr_lungmasks_updated.nii.gz"
    order = _canonical_slice_order(im)
    cases = []
    for i, k in enumerate(order):
        labels = _lesion_labels(mask)
        if lung.exists():
            labels["lung"] = LabelRef(lung)
        cid = f"medseg_{i:03d}"
        cases.append(Case(id=cid, group=cid, source=SOURCE, image=im, labels=labels, dim=2, slice_index=k,
                          meta={"file_slice": i}))
    rp = root / "rp_im"
    if include_radiopaedia and rp.is_dir():
        for path in image_files(rp):
            n = strip_image_suffix(path.name)
            msk = require(root / "rp_msk" / path.name, f"lesion mask of Radiopaedia volume {n}", LAYOUT, SOURCE)
            labels = _lesion_labels(msk)
            if (root / "rp_lung_msk" / path.name).exists():
                labels["lung"] = LabelRef(root / "rp_lung_msk" / path.name)
            cid = f"medseg_rp_{n}"
            cases.append(Case(id=cid, group=cid, source=SOURCE, image=path, labels=labels,
                              meta={"source_group": "radiopaedia"}))
    return cases


@functools.lru_cache(maxsize=2)
def _load_npz(path: str, mtime: float) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def read_medseg100(folder: str | Path) -> list[Case]:
    """The shared ``medseg100`` set: 100 slice cases with in-memory arrays (module docstring)."""
    folder = require(Path(folder), "medseg100 folder", NPZ_LAYOUT, "medseg100")
    npz = require(folder / "medseg100.npz", "medseg100.npz", NPZ_LAYOUT, "medseg100")
    data = _load_npz(str(npz.resolve()), npz.stat().st_mtime)
    for key in ("images", "masks"):
        if key not in data:
            raise DatasetError(f"medseg100: {npz} has no {key!r} array (has {sorted(data)})\nExpected layout:\n{NPZ_LAYOUT}")
    images, masks = data["images"], data["masks"]
    if images.shape != masks.shape or images.ndim != 3:
        raise DatasetError(f"medseg100: images {images.shape} and masks {masks.shape} must be equal (N, H, W) stacks")
    rows = {}
    if (folder / "slices.csv").exists():
        rows = {int(r["index"]): r for r in csv.DictReader((folder / "slices.csv").open(newline=""))}
    cases = []
    for i in range(images.shape[0]):
        cid = f"medseg_{i:03d}"
        cases.append(Case(id=cid, group=cid, source="medseg100", image=images[i], labels=_lesion_labels(masks[i]),
                          dim=2, notes=[NOT_HU, "8bit_per_slice_stretch"],
                          meta={"infnet_split": rows.get(i, {}).get("infnet_split", "")}))
    return cases
