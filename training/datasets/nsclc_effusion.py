"""NSCLC pleural effusion: PleThora (Kiser et al. 2020, TCIA) masks on NSCLC-Radiomics CTs.

PleThora publishes the effusion (and thoracic cavity) segmentations as NIfTI files; the CTs are the
NSCLC-Radiomics DICOM series. This reader supports the layout below, where each CT is either a NIfTI
conversion or the DICOM series folder itself::

    ROOT/
      images/LUNG1-001.nii.gz          or  images/LUNG1-001/  (a DICOM series folder, searched recursively)
      effusion/LUNG1-001*.nii.gz       effusion mask(s) of the patient; a name containing "effusion" is
                                       preferred, and among several the first reviewer's ("first")
      [thoracic/LUNG1-001*.nii.gz]     optional thoracic cavity masks -> target "lung"

Only patients with an effusion mask are returned (PleThora segmented effusions in 78 of 402 CTs). The
benchmark's nnU-Net conversion (``Task204_NSCLCPE``: ``imagesTr``/``labelsTr``/``dataset.json``) is read
by :func:`training.datasets.msd.read_msd` with ``target="effusion"``.
"""

from __future__ import annotations

from pathlib import Path

from .base import Case, DatasetError, LabelRef, image_files, require, strip_image_suffix

SOURCE = "nsclc_effusion"
LAYOUT = """  ROOT/images/<patient>.nii.gz  or  ROOT/images/<patient>/ (DICOM series folder)
  ROOT/effusion/<patient>*.nii.gz   (effusion mask; e.g. LUNG1-001_effusion_first_reviewer.nii.gz)
  ROOT/thoracic/<patient>*.nii.gz   (optional thoracic cavity mask)"""


def _pick(files: list[Path], patient: str, keyword: str) -> Path | None:
    mine = [f for f in files if f.name.startswith(patient) and not f.name[len(patient):len(patient) + 1].isdigit()]
    if not mine:
        return None
    preferred = [f for f in mine if keyword in f.name.lower()] or mine
    first = [f for f in preferred if "first" in f.name.lower()]
    return (first or preferred)[0]


def read_nsclc_effusion(root: str | Path) -> list[Case]:
    root = require(Path(root), "data set folder", LAYOUT, SOURCE)
    images_dir = require(root / "images", "images folder", LAYOUT, SOURCE)
    eff_dir = require(root / "effusion", "effusion mask folder", LAYOUT, SOURCE)
    eff_files = image_files(eff_dir)
    thor_files = image_files(root / "thoracic") if (root / "thoracic").is_dir() else []
    images = {strip_image_suffix(p.name): p for p in images_dir.iterdir()
              if not p.name.startswith(".") and (p.is_dir() or strip_image_suffix(p.name) != p.name)}
    cases = []
    for patient in sorted(images):
        eff = _pick(eff_files, patient, "effusion")
        if eff is None:
            continue
        labels = {"effusion": LabelRef(eff)}
        thor = _pick(thor_files, patient, "thor")
        if thor is not None:
            labels["lung"] = LabelRef(thor)
        cases.append(Case(id=patient, group=patient, source=SOURCE, image=images[patient], labels=labels))
    if not cases:
        raise DatasetError(f"{SOURCE}: no patient in {images_dir} has an effusion mask in {eff_dir}\n"
                           f"Expected layout:\n{LAYOUT}")
    return cases
