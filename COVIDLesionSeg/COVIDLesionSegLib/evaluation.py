"""Comparing a predicted segmentation with a reference (``covidlesionseg evaluate``): a reference file, or
radiologists' per-slice labels.

Both files may be a Slicer ``.seg.nrrd`` (segments compared by name), a labelmap with the project's label
convention (0 background, 1 right lung, 2 left lung, 3 infection) or a binary mask (0/1, taken to be an
infection mask, the usual form of public COVID-19 ground truth). From a labelmap the engine derives:

- "Lungs": labels 1, 2 and 3 (infection lies inside the lungs);
- "COVID-19 infection": label 3;
- "Right lung" / "Left lung": labels 1 / 2, only when no infection label is present (in a single labelmap the
  infection label hides which lung an infected voxel belongs to).

Files are compared in physical space (:func:`evaluate_files`): a reference stored in another axis order or
flip, or cropped to its segments' bounding box (as Slicer saves segmentations), is placed voxel for voxel on
the other file's grid; files whose voxels do not coincide are refused rather than compared index by index.

Per-slice labels (:func:`read_slice_labels`, :func:`evaluate_slice_labels`) are a CSV in COVID-CT-MD's form:
one row per axial slice with ``file``, ``z_index`` (index along the file's third axis, 0 = most inferior),
``infected`` (0/1) and optionally per-lobe flags ``LLL LUL RLL RML RUL``. A slice counts as predicted infected
when it holds at least one infection voxel (no area threshold); AUC ranks slices by their infected area.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .io import case_name
from .metrics import case_metrics
from .segments import SEGMENTS
from .volume import Geometry

LUNGS = "Lungs"


def read_masks(path: str | Path) -> tuple[dict[str, np.ndarray], tuple[float, float, float]]:
    """Named boolean masks (z, y, x) of a segmentation file and its spacing in array order."""
    masks, geometry = read_masks_with_geometry(path)
    return masks, tuple(reversed(geometry.spacing))  # type: ignore[return-value]


def read_masks_with_geometry(path: str | Path) -> tuple[dict[str, np.ndarray], Geometry]:
    """Named boolean masks (z, y, x, the file's own array order) of a segmentation file and its voxel grid."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.name.lower().endswith(".seg.nrrd"):
        from .outputs import read_segmentation_nrrd

        masks, geometry = read_segmentation_nrrd(path)
        masks = {name: np.asarray(m, bool) for name, m in masks.items()}
        if SEGMENTS.right_lung.name in masks and SEGMENTS.left_lung.name in masks:
            masks[LUNGS] = masks[SEGMENTS.right_lung.name] | masks[SEGMENTS.left_lung.name]
        return masks, geometry
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"{path}: not a readable labelmap or .seg.nrrd") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: a 3D labelmap with one value per voxel is needed, this image is "
                         f"{image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} component(s)")
    labels = sitk.GetArrayFromImage(image)
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1, 2, 3}:
        raise InputError(f"{path}: label values {sorted(values)[:10]} are not the 0-3 convention or a 0/1 mask")
    geometry = Geometry.of(image)
    if values <= {0, 1} and 1 in values:
        return {SEGMENTS.infection.name: labels == 1, "mask": labels == 1}, geometry
    masks = {LUNGS: labels > 0, SEGMENTS.infection.name: labels == 3}
    if 3 not in values:
        masks[SEGMENTS.right_lung.name] = labels == 1
        masks[SEGMENTS.left_lung.name] = labels == 2
    return masks, geometry


def _grid_image(geometry: Geometry, array: np.ndarray | None = None) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8)) if array is not None else \
        sitk.Image([int(n) for n in geometry.size], sitk.sitkUInt8)
    geometry.apply_to(image)
    return image


def _aligned(source: Geometry, target: Geometry, tol: float = 1e-3) -> bool:
    """Whether every voxel centre of ``source`` is a voxel centre of ``target`` (same voxels, the axes possibly
    permuted or flipped and the extent possibly different, as for a bounding-box crop)."""
    src_dir = np.reshape(source.direction, (3, 3)) * np.asarray(source.spacing)   # columns: index steps in mm
    tgt_dir = np.reshape(target.direction, (3, 3)) * np.asarray(target.spacing)
    steps = np.linalg.solve(tgt_dir, src_dir)   # one source index step, in target index steps
    offset = np.linalg.solve(tgt_dir, np.subtract(source.origin, target.origin))
    is_permutation = np.allclose(np.abs(steps).sum(axis=0), 1, atol=tol) and \
        np.allclose(steps, np.round(steps), atol=tol)
    return bool(is_permutation and np.allclose(offset, np.round(offset), atol=tol))


def _onto_grid(masks: dict[str, np.ndarray], geometry: Geometry, target: Geometry,
               what: str) -> dict[str, np.ndarray]:
    """The masks placed exactly onto the ``target`` grid (nearest neighbour between aligned grids is exact), or
    an InputError when the grids do not share their voxels or a mask would lose voxels outside the target."""
    if geometry.size == target.size and np.allclose(geometry.spacing, target.spacing, rtol=1e-6) and \
            np.allclose(geometry.origin, target.origin, atol=1e-3) and \
            np.allclose(geometry.direction, target.direction, atol=1e-6):
        return masks
    if not _aligned(geometry, target):
        raise InputError(
            f"the {what} is on another voxel grid than the other file (origin {_mm(geometry.origin)} vs "
            f"{_mm(target.origin)} mm, spacing {_mm(geometry.spacing)} vs {_mm(target.spacing)} mm, size "
            f"{tuple(geometry.size)} vs {tuple(target.size)}), so voxels cannot be compared one to one. Evaluate "
            "masks made on the same scan, or resample the reference onto the prediction's grid first (nearest "
            "neighbour, e.g. Slicer's Resample Scalar/Vector/DWI Volume)")
    reference = _grid_image(target)
    placed = {}
    for name, mask in masks.items():
        moved = sitk.GetArrayFromImage(sitk.Resample(_grid_image(geometry, mask), reference, sitk.Transform(),
                                                     sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)).astype(bool)
        lost = int(np.count_nonzero(mask)) - int(np.count_nonzero(moved))
        if lost:
            raise InputError(f"{lost} voxels of the {what}'s {name!r} lie outside the other file's grid; are both "
                             "from the same scan?")
        placed[name] = moved
    return placed


def _mm(values) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in values) + ")"


def evaluate_files(pred: str | Path, ref: str | Path, tau_mm: float = 3.0) -> dict:
    """Metrics per segment present in both files (see module docstring for the naming).

    The comparison is made in physical space: both files are placed on the grid of the one with more voxels
    (the reference when equal), so a file stored in another axis order or flip, or cropped to its segments'
    bounding box as Slicer writes segmentations, is compared voxel for voxel with the other. Files whose
    voxels do not coincide (another spacing, a shifted origin, a rotation) are refused.
    """
    pred_masks, pred_geometry = read_masks_with_geometry(pred)
    ref_masks, ref_geometry = read_masks_with_geometry(ref)
    pred_count, ref_count = (int(np.prod(g.size, dtype=np.int64)) for g in (pred_geometry, ref_geometry))
    target = pred_geometry if pred_count > ref_count else ref_geometry
    pred_masks = _onto_grid(pred_masks, pred_geometry, target, "prediction")
    ref_masks = _onto_grid(ref_masks, ref_geometry, target, "reference")
    spacing = tuple(reversed(target.spacing))
    common = [name for name in ref_masks if name in pred_masks and name != "mask"]
    if not common:
        raise InputError(f"no segment in common: prediction has {sorted(pred_masks)}, reference {sorted(ref_masks)}")
    result = {"prediction": str(pred), "reference": str(ref), "tau_mm": tau_mm, "segments": {}}
    for name in common:
        metrics = case_metrics(pred_masks[name], ref_masks[name], spacing=spacing, tau_mm=tau_mm)
        result["segments"][name] = {k: (None if v is None or not np.isfinite(v) else round(float(v), 6))
                                    for k, v in metrics.items()}
    return result


RIGHT_LOBES, LEFT_LOBES = ("RLL", "RML", "RUL"), ("LLL", "LUL")


def read_slice_labels(path: str | Path, file_name: str) -> dict[str, np.ndarray]:
    """Per-slice labels of one scan: ``z`` (int), ``infected`` (bool) and, when the CSV has lobe columns,
    ``right`` (any of RLL, RML, RUL) and ``left`` (LLL or LUL). ``file_name`` matches the ``file`` column
    with or without its extension."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"file", "z_index", "infected"} - set(reader.fieldnames or ())
        if missing:
            raise InputError(f"{path}: not a per-slice label file (missing column(s) {', '.join(sorted(missing))})")
        rows = [r for r in reader if r["file"] == file_name or case_name(r["file"]) == case_name(file_name)]
    if not rows:
        raise InputError(f"{path}: no rows for {file_name!r}")
    out = {"z": np.array([int(r["z_index"]) for r in rows]),
           "infected": np.array([int(r["infected"]) == 1 for r in rows])}
    if all(k in rows[0] for k in RIGHT_LOBES + LEFT_LOBES):
        out["right"] = np.array([any(int(r[k]) for k in RIGHT_LOBES) for r in rows])
        out["left"] = np.array([any(int(r[k]) for k in LEFT_LOBES) for r in rows])
    return out


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN without both classes."""
    from scipy.stats import rankdata

    truth = np.asarray(truth, bool)
    n1, n0 = int(truth.sum()), int((~truth).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[truth].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def slice_agreement(infection: np.ndarray, truth: np.ndarray) -> dict[str, float | int]:
    """Slice-level agreement of a per-slice infected area (or a (z, y, x) infection mask) with per-slice
    truth: sensitivity, specificity, AUC (area as the score) and the counts."""
    area = np.asarray(infection)
    if area.ndim == 3:
        area = area.reshape(area.shape[0], -1).sum(axis=1)
    truth = np.asarray(truth, bool)
    predicted = area > 0
    tp, fn = int((predicted & truth).sum()), int((~predicted & truth).sum())
    tn, fp = int((~predicted & ~truth).sum()), int((predicted & ~truth).sum())
    return {"sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
            "specificity": tn / (tn + fp) if tn + fp else float("nan"),
            "auc": roc_auc(area, truth), "tp": tp, "fn": fn, "tn": tn, "fp": fp}


def evaluate_slice_labels(pred: str | Path, labels_csv: str | Path, file_name: str | None = None) -> dict:
    """A prediction (labelmap or .seg.nrrd, on the scan's own grid) against per-slice labels.

    ``file_name`` picks the CSV rows (default: the prediction's name without the engine's ``_labels`` or
    ``.seg`` suffix). Reports slice-level sensitivity / specificity / AUC, the share of the lungs segmented
    as infection, and, when the prediction keeps the sides (a ``.seg.nrrd``) and the CSV has lobe
    columns, the per-side agreement: a side counts as predicted infected on a slice when infection voxels
    lie in that lung there.
    """
    masks, spacing = read_masks(pred)
    infection = masks.get(SEGMENTS.infection.name)
    if infection is None:
        raise InputError(f"{pred}: no infection segment to compare with per-slice labels")
    if file_name is None:
        stem = case_name(pred)
        file_name = stem[: -len("_labels")] if stem.endswith("_labels") else stem
    labels = read_slice_labels(labels_csv, file_name)
    if labels["z"].min() < 0 or labels["z"].max() >= infection.shape[0]:
        raise InputError(f"{labels_csv}: z_index {labels['z'].min()}..{labels['z'].max()} does not fit the "
                         f"prediction's {infection.shape[0]} slices; is it the same scan?")
    area = infection.reshape(infection.shape[0], -1).sum(axis=1)[labels["z"]]
    result: dict = {"prediction": str(pred), "labels": str(labels_csv), "file": file_name,
                    "n_slices": int(len(labels["z"])), "n_infected_slices": int(labels["infected"].sum()),
                    "slice": _rounded(slice_agreement(area, labels["infected"]))}
    lungs = masks.get(LUNGS)
    if lungs is not None and lungs.any():
        result["infected_share_of_lungs"] = round(float(infection.sum() / lungs.sum()), 6)
    right, left = masks.get(SEGMENTS.right_lung.name), masks.get(SEGMENTS.left_lung.name)
    if "right" in labels and right is not None and left is not None:
        sides = {}
        for side, lung in (("right", right), ("left", left)):
            side_area = (infection & lung).reshape(lung.shape[0], -1).sum(axis=1)[labels["z"]]
            sides[side] = _rounded(slice_agreement(side_area, labels[side]))
        result["sides"] = sides
    return result


def _rounded(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else round(v, 6) if isinstance(v, float) else v)
            for k, v in d.items()}


__all__ = ["read_masks", "read_masks_with_geometry", "evaluate_files", "read_slice_labels", "roc_auc", "slice_agreement",
           "evaluate_slice_labels"]
