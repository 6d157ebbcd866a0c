"""COVID-19-CT-Seg (Ma et al., Zenodo 3757476): 20 CT volumes with lung and infection masks.

Layout (as downloaded from Zenodo and unzipped into one folder)::

    ROOT/
      COVID-19-CT-Seg_20cases/   coronacases_org_001.nii.gz ... coronacases_org_010.nii.gz,
                                 radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm.nii.gz, ... (20 volumes)
      Infection_Mask/            coronacases_001.nii.gz, radiopaedia_10_85902_1.nii.gz, ...
      Lung_Mask/                 same names (1 and 2: the two lungs)
      Lung_and_Infection_Mask/   same names (1, 2 lungs, 3 infection) - optional; used when a mask
                                 folder above is missing

Case ids are the mask names (``coronacases_001``, ``radiopaedia_10_85902_1``): the names the benchmark's
split files use. Image names are matched to them whatever their prefix (``coronacases_org_``,
``radiopaedia_org_covid-19-pneumonia-``, ``-dcm``).

The 10 Radiopaedia volumes were "adjusted to lung window [-1250, 250], and then normalized to [0, 255]"
(benchmark README): their cases carry the note :data:`~.base.WINDOWED_0_255` and ``meta["window"]``, and
:func:`~.base.load_case` maps them back to approximate HU by default.

Groups: a coronacases volume is one patient. Radiopaedia ids are ``radiopaedia_<case>_<study>_<series>``;
the Radiopaedia *case* number is the patient, and two patients contribute two volumes each
(``radiopaedia_10_85902_1``/``_3``: two series of one study; ``radiopaedia_29_86490_1``/``86491_1``), so
the group is ``radiopaedia_<case>``.

The benchmark's split files (``Task1/Task1_COVID_datasplit.pkl`` in the COVID-19-CT-Seg-Benchmark
repository) are nnU-Net ``splits_final.pkl`` files: a list of 5 folds, each ``{"train": array of 4 case
ids, "val": array of 16 case ids}`` (4 training / 16 test volumes). :func:`read_benchmark_split` reads that
pickle (with a restricted unpickler: only lists, dicts and numpy string arrays) and three plain formats:
JSON (the same list of dicts, ``"test"`` accepted for ``"val"``), CSV (``fold,case,subset`` rows) and a
folder of text files ``fold<k>_train.txt`` / ``fold<k>_test.txt`` (one case id per line).
:data:`BENCHMARK_TASK1_TRAIN` records the training cases of the published 5 folds, so the papers'
protocol runs without the file.
"""

from __future__ import annotations

import csv
import json
import pickle
import re
from pathlib import Path
from typing import Any

from .base import WINDOWED_0_255, Case, DatasetError, LabelRef, image_files, require, strip_image_suffix

SOURCE = "covid19ctseg"
LAYOUT = """  ROOT/COVID-19-CT-Seg_20cases/*.nii.gz     (the 20 CT volumes)
  ROOT/Infection_Mask/<case>.nii.gz         (e.g. coronacases_001.nii.gz, radiopaedia_10_85902_1.nii.gz)
  ROOT/Lung_Mask/<case>.nii.gz              (optional)
  ROOT/Lung_and_Infection_Mask/<case>.nii.gz (optional; 1, 2 lungs, 3 infection)"""

#: Window of the Radiopaedia volumes before their 0..255 rescaling (benchmark README).
RADIOPAEDIA_WINDOW = (-1250.0, 250.0)

#: Training cases of the five folds of the benchmark's Task 1 split (``Task1_COVID_datasplit.pkl`` of
#: github.com/JunMa11/COVID-19-CT-Seg-Benchmark, Apache-2.0); in each fold the other 16 volumes are the
#: test set. Each volume trains in exactly one fold. Note that folds 2 and 4 put the two volumes of
#: Radiopaedia patients 10 and 29 on opposite sides (the benchmark splits by volume, not by patient).
BENCHMARK_TASK1_TRAIN: tuple[tuple[str, ...], ...] = (
    ("coronacases_008", "coronacases_007", "radiopaedia_36_86526_0", "radiopaedia_4_85506_1"),
    ("coronacases_009", "coronacases_004", "radiopaedia_14_85914_0", "radiopaedia_7_85703_0"),
    ("coronacases_010", "coronacases_001", "radiopaedia_10_85902_1", "radiopaedia_29_86491_1"),
    ("coronacases_003", "coronacases_005", "radiopaedia_40_86625_0", "radiopaedia_27_86410_0"),
    ("coronacases_002", "radiopaedia_10_85902_3", "coronacases_006", "radiopaedia_29_86490_1"),
)

_CORONA = re.compile(r"^coronacases_(?:org_)?(?:case)?0*(\d+)$")
_RADIO = re.compile(r"^radiopaedia_(?:org_covid-19-pneumonia-)?(\d+)_(\d+)_(\d+)(?:-dcm)?$")


def case_id_from_name(name: str) -> str:
    """Canonical case id of an image or mask file name (``coronacases_org_001.nii.gz`` -> ``coronacases_001``)."""
    stem = strip_image_suffix(Path(name).name).lower()
    m = _CORONA.match(stem)
    if m:
        return f"coronacases_{int(m.group(1)):03d}"
    m = _RADIO.match(stem)
    if m:
        return f"radiopaedia_{m.group(1)}_{m.group(2)}_{m.group(3)}"
    return stem


def group_of(case_id: str) -> str:
    """Patient group: the volume for coronacases, the Radiopaedia case number for Radiopaedia volumes."""
    m = _RADIO.match(case_id)
    return f"radiopaedia_{m.group(1)}" if m else case_id


def read_covid19ctseg(root: str | Path, require_infection: bool = True) -> list[Case]:
    """Read the Zenodo layout (module docstring). Targets: ``infection``, ``lung``, ``left_lung``,
    ``right_lung`` (the latter two by the data set's values 1 = left, 2 = right)."""
    root = require(Path(root), "data set folder", LAYOUT, SOURCE)
    images_dir = require(root / "COVID-19-CT-Seg_20cases", "image folder", LAYOUT, SOURCE)
    inf_dir, lung_dir, both_dir = root / "Infection_Mask", root / "Lung_Mask", root / "Lung_and_Infection_Mask"
    if require_infection and not inf_dir.is_dir() and not both_dir.is_dir():
        raise DatasetError(f"{SOURCE}: neither Infection_Mask/ nor Lung_and_Infection_Mask/ found in {root}\n"
                           f"Expected layout:\n{LAYOUT}")
    masks = {d: {case_id_from_name(p.name): p for p in image_files(d)} if d.is_dir() else {}
             for d in (inf_dir, lung_dir, both_dir)}
    files = image_files(images_dir)
    if not files:
        raise DatasetError(f"{SOURCE}: no NIfTI volumes in {images_dir}\nExpected layout:\n{LAYOUT}")
    cases = []
    for path in files:
        cid = case_id_from_name(path.name)
        labels: dict[str, LabelRef] = {}
        if cid in masks[inf_dir]:
            labels["infection"] = LabelRef(masks[inf_dir][cid])
        elif cid in masks[both_dir]:
            labels["infection"] = LabelRef(masks[both_dir][cid], (3,))
        if cid in masks[lung_dir]:
            lung = masks[lung_dir][cid]
            labels.update(lung=LabelRef(lung), left_lung=LabelRef(lung, (1,)), right_lung=LabelRef(lung, (2,)))
        elif cid in masks[both_dir]:
            both = masks[both_dir][cid]
            # Infection voxels lie inside the lungs; the combined file gives them label 3.
            labels.update(lung=LabelRef(both, (1, 2, 3)), left_lung=LabelRef(both, (1,)),
                          right_lung=LabelRef(both, (2,)))
        if require_infection and "infection" not in labels:
            raise DatasetError(f"{SOURCE}: no infection mask for {path.name} (looked for {cid}.nii.gz in "
                               f"{inf_dir} and {both_dir})")
        case = Case(id=cid, group=group_of(cid), source=SOURCE, image=path, labels=labels,
                    meta={"source_group": "radiopaedia" if cid.startswith("radiopaedia") else "coronacases"})
        if cid.startswith("radiopaedia"):
            case.notes.append(WINDOWED_0_255)
            case.meta["window"] = RADIOPAEDIA_WINDOW
        cases.append(case)
    return cases


# ----------------------------------------------------------------------------------------------------------
# The benchmark's split files
# ----------------------------------------------------------------------------------------------------------

class _SplitUnpickler(pickle.Unpickler):
    """Unpickler for nnU-Net split files that refuses anything but containers and numpy arrays (a pickle
    can run arbitrary code; split files come from the internet)."""

    _ALLOWED = {("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"split file refers to {module}.{name}, which a split file never needs")
        return super().find_class(module, name)


def _normalise_folds(raw: Any, where: Path) -> list[dict[str, list[str]]]:
    if not isinstance(raw, list) or not raw:
        raise DatasetError(f"{where}: a split file holds a non-empty list of folds, got {type(raw).__name__}")
    folds = []
    for k, fold in enumerate(raw):
        if not hasattr(fold, "keys") or "train" not in fold or not ({"val", "test"} & set(fold.keys())):
            raise DatasetError(f"{where}: fold {k} must have 'train' and 'val' (or 'test') lists, got {fold!r:.200}")
        test = fold["val"] if "val" in fold else fold["test"]
        folds.append({"train": [case_id_from_name(str(c)) for c in list(fold["train"])],
                      "test": [case_id_from_name(str(c)) for c in list(test)]})
    return folds


def read_benchmark_split(path: str | Path) -> list[dict[str, list[str]]]:
    """Read a split file: nnU-Net ``.pkl``, ``.json``, ``.csv`` (``fold,case,subset``) or a folder of
    ``fold<k>_train.txt`` / ``fold<k>_test.txt``. Returns ``[{"train": [...], "test": [...]}, ...]``."""
    p = Path(path)
    fmt = ("  a .pkl/.json list of {'train': [...], 'val' or 'test': [...]} per fold,\n"
           "  a .csv with columns fold,case,subset (subset = train or test), or\n"
           "  a folder of fold<k>_train.txt and fold<k>_test.txt files (one case id per line)")
    if not p.exists():
        raise DatasetError(f"split file not found: {p}\nSupported formats:\n{fmt}")
    try:
        if p.is_dir():
            folds = []
            for k in range(100):
                tr, te = p / f"fold{k}_train.txt", p / f"fold{k}_test.txt"
                if not tr.exists():
                    break
                require(te, f"test list of fold {k}", fmt, "split folder")
                folds.append({"train": _lines(tr), "test": _lines(te)})
            return _normalise_folds(folds, p)
        suffix = p.suffix.lower()
        if suffix == ".pkl":
            with open(p, "rb") as f:
                return _normalise_folds(_SplitUnpickler(f).load(), p)
        if suffix == ".json":
            return _normalise_folds(json.loads(p.read_text()), p)
        if suffix == ".csv":
            rows = list(csv.DictReader(p.open(newline="")))
            if not rows or not {"fold", "case", "subset"} <= set(rows[0]):
                raise DatasetError(f"{p}: CSV split files need the columns fold,case,subset\nSupported formats:\n{fmt}")
            n = max(int(r["fold"]) for r in rows) + 1
            folds = [{"train": [], "test": []} for _ in range(n)]
            for r in rows:
                subset = r["subset"].strip().lower()
                subset = "test" if subset in ("val", "validation") else subset
                if subset not in ("train", "test"):
                    raise DatasetError(f"{p}: subset must be train or test, got {r['subset']!r}")
                folds[int(r["fold"])][subset].append(r["case"].strip())
            return _normalise_folds(folds, p)
    except (pickle.UnpicklingError, json.JSONDecodeError, ValueError, EOFError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"{p}: malformed split file ({exc})\nSupported formats:\n{fmt}") from None
    raise DatasetError(f"{p}: unsupported split file type {p.suffix!r}\nSupported formats:\n{fmt}")


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
