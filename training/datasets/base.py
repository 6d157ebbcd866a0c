"""Common base of the dataset readers: the :class:`Case` record, loading into arrays, and MONAI helpers.

Every reader in :mod:`training.datasets` turns one public layout into a list of :class:`Case` records.
A case is one training unit: a 3D volume, or one 2D slice (of an ``.npz`` stack or of a 3D file).

Groups are first-class. ``Case.group`` names the patient (or, where no patient id exists, the smallest
unit known to be independent: a volume, or for MedSeg one slice). :mod:`training.splits` never puts one
group on both sides of a split.

Loading (:func:`load_case`) gives MONAI-ready dictionaries, channel-first::

    {"image": float32 (1, z, y, x) or (1, h, w),
     "<target>": uint8 {0, 1} of the same shape, one key per requested target ("infection", "lung", ...),
     "id", "group", "source", "spacing" (mm, array axis order), "notes"}

3D volumes are read with the engine's reader (``COVIDLesionSegLib.io``) and reoriented to the engine's
canonical LPS orientation (``volume.py``): a network trained here sees exactly the array layout the engine
gives it at inference. Labels are reoriented the same way and must lie on the image's grid.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from COVIDLesionSegLib.errors import InputError
from COVIDLesionSegLib.io import read_image
from COVIDLesionSegLib.volume import CANONICAL_ORIENTATION

#: Note flag of volumes whose intensities were windowed and rescaled to 0..255 by the data set's authors.
WINDOWED_0_255 = "windowed_0_255"
#: Note flag of 2D data that are not Hounsfield units (8-bit, per-slice stretched).
NOT_HU = "not_hu"


class DatasetError(InputError):
    """A data set folder is missing, incomplete or malformed. The message names the missing file or folder
    and the layout the reader expects."""


def require(path: Path, what: str, layout: str, dataset: str) -> Path:
    """Return ``path`` when it exists, else raise :class:`DatasetError` naming it and the expected layout."""
    if not Path(path).exists():
        raise DatasetError(f"{dataset}: {what} not found: {path}\nExpected layout:\n{layout}")
    return Path(path)


@dataclass
class LabelRef:
    """Where one target's mask comes from, and which of its values count as foreground.

    ``source`` is a file path, an in-memory array, or an object with ``to_image(reference: sitk.Image)
    -> sitk.Image`` (e.g. the LIDC consensus rasteriser, which needs the image's geometry). ``values``
    lists the label values that make up the target; ``None`` means any nonzero value.
    """

    source: Any
    values: tuple[int, ...] | None = None

    def binarise(self, array: np.ndarray) -> np.ndarray:
        if self.values is None:
            return (array != 0).astype(np.uint8)
        return np.isin(array, np.asarray(self.values)).astype(np.uint8)


@dataclass
class Case:
    """One training/test unit of a public data set.

    Attributes:
        id: unique case id within its source (e.g. ``coronacases_001``, ``ctseg2d_0042``).
        group: patient/volume id used by every split (no group on both sides).
        source: data set name (``covid19ctseg``, ``msd_lung``, ``ctseg2d``, ...).
        image: path of a NIfTI/NRRD/MHA file or DICOM folder, or an array (2D slice sets).
        labels: target name -> :class:`LabelRef` ("infection", "lung", "lesion", "nodule", "effusion", ...).
        dim: 3 for volumes, 2 for slices.
        slice_index: for a 2D case cut from a 3D file, the index along the first axis (z) of the
            *canonical* (LPS) array - MedSeg stores its 100 slices as one stacked file.
        spacing: voxel spacing (array axis order) for array images, when known.
        notes: flags such as :data:`WINDOWED_0_255` or :data:`NOT_HU`, and remarks for the user.
        meta: anything else (source group, slice-level labels, window of pre-windowed data, ...).
    """

    id: str
    group: str
    source: str
    image: Any
    labels: dict[str, LabelRef] = field(default_factory=dict)
    dim: int = 3
    slice_index: int | None = None
    spacing: tuple[float, ...] | None = None
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.labels)

    def has(self, *targets: str) -> bool:
        return all(t in self.labels for t in targets)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``monai.data.Dataset``: paths (or arrays) under ``image`` and each target, plus
        ``case`` (this record), ``id`` and ``group``. Use :class:`training.transforms.LoadCased` (or
        :func:`load_case`) as the first transform to get arrays."""
        d: dict[str, Any] = {"case": self, "id": self.id, "group": self.group, "source": self.source,
                             "image": self.image}
        for name, ref in self.labels.items():
            d[name] = ref.source
        return d


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------

def _canonical(image: sitk.Image) -> sitk.Image:
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION) if image.GetDimension() == 3 else image


@functools.lru_cache(maxsize=2)
def _read_canonical_cached(path: str, mtime: float) -> tuple[np.ndarray, tuple[float, ...], sitk.Image]:
    # Small cache so that 100 MedSeg slices cut from one stacked file read it once, not 100 times.
    image, _ = read_image(path)
    canon = _canonical(image)
    return sitk.GetArrayFromImage(canon), tuple(reversed(canon.GetSpacing())), canon


def read_volume(path: str | os.PathLike, canonical: bool = True) -> tuple[np.ndarray, tuple[float, ...], sitk.Image]:
    """Read a 3D image file or DICOM folder; returns ``(array (z, y, x), spacing_zyx, sitk image)``.

    With ``canonical`` (default) the image is reoriented to LPS like the engine does at inference.
    """
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"image not found: {p}")
    if canonical:
        return _read_canonical_cached(str(p.resolve()), p.stat().st_mtime)
    image, _ = read_image(p)
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing())), image


def _read_label_on(ref: LabelRef, reference: sitk.Image, case: Case, target: str) -> np.ndarray:
    src = ref.source
    if hasattr(src, "to_image"):
        label = src.to_image(reference)
    elif isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if not p.exists():
            raise DatasetError(f"{case.source} case {case.id!r}: {target} mask not found: {p}")
        label = sitk.ReadImage(str(p)) if p.is_file() else read_image(p)[0]
    else:
        raise DatasetError(f"{case.source} case {case.id!r}: unsupported {target} label source {type(src).__name__}")
    label = _canonical(label)
    if label.GetSize() != reference.GetSize():
        raise DatasetError(
            f"{case.source} case {case.id!r}: {target} mask size {label.GetSize()} does not match the image "
            f"{reference.GetSize()} (after reorientation to LPS); masks must lie on the image's voxel grid")
    return sitk.GetArrayFromImage(label)


def hu_from_0_255(array: np.ndarray, window: Sequence[float] = (-1250.0, 250.0)) -> np.ndarray:
    """Approximate HU of a volume that was clipped to ``window`` and rescaled to 0..255.

    COVID-19-CT-Seg's 10 Radiopaedia volumes were "adjusted to lung window [-1250, 250], and then normalized
    to [0, 255]" (the benchmark's README). Inverting the linear map puts them back on the HU scale so one
    HU normalisation serves all 20 volumes; values outside the window were clipped by the authors and stay
    at the window's ends.
    """
    lo, hi = float(window[0]), float(window[1])
    return (np.asarray(array, dtype=np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)).astype(np.float32)


def load_case(case: Case, targets: Sequence[str] | None = None, restore_hu: bool = True,  # noqa: C901 (one branch per label source)
              missing: str = "error") -> dict[str, Any]:
    """Load a case into MONAI-ready arrays (see the module docstring for the keys).

    Args:
        targets: which label targets to load (default: all of the case's).
        restore_hu: map pre-windowed 0..255 volumes (:data:`WINDOWED_0_255`, with ``meta["window"]``)
            back to approximate HU with :func:`hu_from_0_255`, so HU normalisations apply to every case.
        missing: ``"error"`` (default) raises when a requested target is absent; ``"zeros"`` gives an
            all-zero mask and adds ``"<target>_missing": True`` (for multi-task training over data sets
            that each annotate a different lesion).
    """
    targets = list(case.labels) if targets is None else list(targets)
    out: dict[str, Any] = {"id": case.id, "group": case.group, "source": case.source, "notes": list(case.notes)}
    if case.dim == 3 or case.slice_index is not None:
        if isinstance(case.image, np.ndarray):
            image = np.asarray(case.image)
            spacing = tuple(case.spacing or (1.0,) * image.ndim)
            reference = None
        else:
            image, spacing, reference = read_volume(case.image)
        label_arrays: dict[str, np.ndarray] = {}
        for t in targets:
            if t not in case.labels:
                continue
            ref = case.labels[t]
            if isinstance(ref.source, np.ndarray):
                raw = ref.source
            elif reference is None:
                raise DatasetError(f"case {case.id!r}: file labels need a file image")
            else:
                raw = _cached_label(ref, reference, case, t)
            label_arrays[t] = ref.binarise(raw)
        if case.slice_index is not None:
            k = int(case.slice_index)
            image = image[k]
            label_arrays = {t: a[k] for t, a in label_arrays.items()}
            spacing = tuple(spacing[1:])
    else:
        image = np.asarray(case.image)
        spacing = tuple(case.spacing or (1.0,) * image.ndim)
        label_arrays = {t: case.labels[t].binarise(np.asarray(case.labels[t].source)) for t in targets
                        if t in case.labels}
    # always a private copy: volumes come from a small read cache, and transforms may work in place
    image = np.array(image, dtype=np.float32, copy=True)
    if restore_hu and WINDOWED_0_255 in case.notes:
        image = hu_from_0_255(image, case.meta.get("window", (-1250.0, 250.0)))
        out["notes"].append("hu_restored_from_0_255")
    out["image"] = image[None]
    out["spacing"] = tuple(float(s) for s in spacing)
    for t in targets:
        if t in label_arrays:
            out[t] = label_arrays[t][None]
        elif missing == "zeros":
            out[t] = np.zeros_like(out["image"], dtype=np.uint8)
            out[f"{t}_missing"] = True
        else:
            raise DatasetError(f"{case.source} case {case.id!r} has no {t!r} label (it has: {', '.join(case.labels) or 'none'})")
    for key in ("slice_infected", "slice_lobes"):
        if key in case.meta:
            arr = np.asarray(case.meta[key])
            if case.dim == 3 and case.slice_index is None:
                n = image.shape[0]
                # COVID-CT-MD pads its label arrays to the longest scan: trim to this volume's slices.
                if arr.shape[0] < n or np.any(arr[n:]):
                    raise DatasetError(f"{case.source} case {case.id!r}: {key} has {arr.shape[0]} entries "
                                       f"(nonzero beyond slice {n}) for a volume of {n} slices")
                arr = arr[:n]
            out[key] = arr
    return out


# Stacked-slice files (MedSeg) hold labels for many cases: cache the last few reoriented label arrays.
_LABEL_CACHE: dict[tuple, np.ndarray] = {}


def _cached_label(ref: LabelRef, reference: sitk.Image, case: Case, target: str) -> np.ndarray:
    if case.slice_index is None or not isinstance(ref.source, (str, os.PathLike)):
        return _read_label_on(ref, reference, case, target)
    p = Path(ref.source)
    key = (str(p.resolve()) if p.exists() else str(p), p.stat().st_mtime if p.exists() else 0.0)
    if key not in _LABEL_CACHE:
        if len(_LABEL_CACHE) >= 4:
            _LABEL_CACHE.pop(next(iter(_LABEL_CACHE)))
        _LABEL_CACHE[key] = _read_label_on(ref, reference, case, target)
    return _LABEL_CACHE[key]


def slice_items(loaded: Mapping[str, Any], keys: Sequence[str] = ("image",), axis: int = 0,
                require_positive: str | None = None) -> list[dict[str, Any]]:
    """Cut a loaded 3D item (channel-first ``(1, z, y, x)`` arrays) into 2D items ``(1, y, x)`` along ``axis``.

    ``require_positive`` keeps only slices where that target has foreground (the 2D COVID-19-CT-Seg data
    and nCoVSegNet's training slices keep infected slices only).
    """
    n = np.asarray(loaded[keys[0]]).shape[1 + axis]
    items = []
    for k in range(n):
        if require_positive is not None and not np.take(np.asarray(loaded[require_positive])[0], k, axis=axis).any():
            continue
        item = {key: np.take(np.asarray(loaded[key]), k, axis=1 + axis) for key in keys}
        item.update({"id": f"{loaded['id']}_z{k:04d}", "group": loaded["group"], "source": loaded.get("source", ""),
                     "slice_index": k,
                     "spacing": tuple(s for i, s in enumerate(loaded.get("spacing", (1.0, 1.0, 1.0))) if i != axis)})
        items.append(item)
    return items


def make_dataset(items: Sequence[Mapping[str, Any]], transform: Callable | None, cache: str | None = "memory",
                 cache_dir: str | os.PathLike | None = None, cache_rate: float = 1.0, num_workers: int = 0):
    """A MONAI dataset over ``items`` (``Case.to_dict()`` or loaded dicts).

    ``cache="memory"``: ``monai.data.CacheDataset`` (deterministic transforms - loading, resampling,
    normalisation - run once; random ones every epoch); ``"disk"``: ``PersistentDataset`` under
    ``cache_dir`` (3D volumes on machines with little RAM); ``None``: plain ``Dataset``.
    ``num_workers`` is for filling the cache; 0 keeps it in-process (2-core CPU machines).
    """
    from monai.data import CacheDataset, Dataset, PersistentDataset

    items = list(items)
    if cache is None:
        return Dataset(items, transform=transform)
    if cache == "memory":
        return CacheDataset(items, transform=transform, cache_rate=cache_rate, num_workers=num_workers or None,
                            progress=False, copy_cache=True)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("make_dataset(cache='disk') needs cache_dir")
        # PersistentDataset hashes each item to name its cache file; Case objects are not JSON, so hash ids.
        return PersistentDataset(items, transform=transform, cache_dir=cache_dir,
                                 hash_func=lambda item: _hash_item(item))
    raise ValueError(f"unknown cache {cache!r}; use 'memory', 'disk' or None")


def _hash_item(item: Mapping[str, Any]) -> bytes:
    import hashlib

    text = f"{item.get('source', '')}|{item.get('id', '')}|{item.get('image', '') if not isinstance(item.get('image'), np.ndarray) else 'array'}"
    return hashlib.md5(text.encode()).hexdigest().encode()


def find_first(folder: Path, patterns: Iterable[str]) -> Path | None:
    """First existing file in ``folder`` matching any of the glob ``patterns`` (sorted, deterministic)."""
    for pattern in patterns:
        hits = sorted(p for p in folder.glob(pattern) if not p.name.startswith("._"))
        if hits:
            return hits[0]
    return None


def strip_image_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def image_files(folder: Path) -> list[Path]:
    """NIfTI/NRRD/MHA files of ``folder`` (not macOS ``._`` resource forks), sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("._")
                  and strip_image_suffix(p.name) != p.name)
