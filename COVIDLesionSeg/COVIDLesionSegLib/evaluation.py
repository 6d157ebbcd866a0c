"""Comparing a predicted segmentation with a reference file (``covidlesionseg evaluate``).

Both files may be a Slicer ``.seg.nrrd`` (segments compared by name), a labelmap with the project's label
convention (0 background, 1 right lung, 2 left lung, 3 infection) or a binary mask (0/1, taken to be an
infection mask, the usual form of public COVID-19 ground truth). From a labelmap the engine derives:

- "Lungs": labels 1, 2 and 3 (infection lies inside the lungs);
- "COVID-19 infection": label 3;
- "Right lung" / "Left lung": labels 1 / 2, only when no infection label is present (in a single labelmap the
  infection label hides which lung an infected voxel belongs to).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .metrics import case_metrics
from .segments import SEGMENTS

LUNGS = "Lungs"


def read_masks(path: str | Path) -> tuple[dict[str, np.ndarray], tuple[float, float, float]]:
    """Named boolean masks (z, y, x) of a segmentation file and its spacing in array order."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.name.lower().endswith(".seg.nrrd"):
        from .outputs import read_segmentation_nrrd

        masks, geometry = read_segmentation_nrrd(path)
        masks = {name: np.asarray(m, bool) for name, m in masks.items()}
        if SEGMENTS.right_lung.name in masks and SEGMENTS.left_lung.name in masks:
            masks[LUNGS] = masks[SEGMENTS.right_lung.name] | masks[SEGMENTS.left_lung.name]
        return masks, tuple(reversed(geometry.spacing))
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"{path}: not a readable labelmap or .seg.nrrd") from None
    labels = sitk.GetArrayFromImage(image)
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1, 2, 3}:
        raise InputError(f"{path}: label values {sorted(values)[:10]} are not the 0-3 convention or a 0/1 mask")
    spacing = tuple(reversed(image.GetSpacing()))
    if values <= {0, 1} and 1 in values:
        return {SEGMENTS.infection.name: labels == 1, "mask": labels == 1}, spacing
    masks = {LUNGS: labels > 0, SEGMENTS.infection.name: labels == 3}
    if 3 not in values:
        masks[SEGMENTS.right_lung.name] = labels == 1
        masks[SEGMENTS.left_lung.name] = labels == 2
    return masks, spacing


def evaluate_files(pred: str | Path, ref: str | Path, tau_mm: float = 3.0) -> dict:
    """Metrics per segment present in both files (see module docstring for the naming)."""
    pred_masks, pred_spacing = read_masks(pred)
    ref_masks, ref_spacing = read_masks(ref)
    shapes = {m.shape for m in pred_masks.values()} | {m.shape for m in ref_masks.values()}
    if len(shapes) != 1:
        raise InputError(f"the prediction and the reference have different sizes {sorted(shapes)}; both must be "
                         "on the same voxel grid")
    if not np.allclose(pred_spacing, ref_spacing, rtol=1e-3):
        raise InputError(f"voxel spacing differs: prediction {pred_spacing} mm, reference {ref_spacing} mm")
    common = [name for name in ref_masks if name in pred_masks and name != "mask"]
    if not common:
        raise InputError(f"no segment in common: prediction has {sorted(pred_masks)}, reference {sorted(ref_masks)}")
    result = {"prediction": str(pred), "reference": str(ref), "tau_mm": tau_mm, "segments": {}}
    for name in common:
        metrics = case_metrics(pred_masks[name], ref_masks[name], spacing=ref_spacing, tau_mm=tau_mm)
        result["segments"][name] = {k: (None if v is None or not np.isfinite(v) else round(float(v), 6))
                                    for k, v in metrics.items()}
    return result


__all__ = ["read_masks", "evaluate_files"]
