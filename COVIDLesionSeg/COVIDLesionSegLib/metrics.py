"""Segmentation metrics: the one implementation used by evaluation (``covidlesionseg evaluate``), training
and benchmarks.

All functions take two binary masks of the same shape (2D or 3D numpy arrays, ``bool`` or integer/float
arrays holding only 0 and 1) and, for the distance-based metrics, the voxel spacing in mm **in array axis
order** (``(z, y, x)`` for the engine's canonical arrays, see ``volume.py``); anisotropic spacing is
honoured everywhere.

Metrics and the papers that report them (docs/CITATIONS.md):

=============  =====================================================================  ======================
key            definition                                                             reported by
=============  =====================================================================  ======================
dsc            2|P∩R| / (|P|+|R|)                                                     all papers
nsd            normalised surface Dice at tolerance tau mm (Nikolov et al. 2018)       Wang et al. (tau 3 mm)
sensitivity    TP / (TP+FN)  (recall)                                                 Wang, Liu, Bizopoulos
specificity    TN / (TN+FP)                                                           Liu, Bizopoulos
precision      TP / (TP+FP)  (PPV, Liu et al. eq. 12)                                 Liu
f1             2·precision·recall / (precision+recall)                                Wang
accuracy       (TP+TN) / N                                                            Wang
voe            1 - |P∩R| / |P∪R|   (Liu et al. eq. 13)                                 Liu
rvd            | |P| - |R| | / |R|  (absolute value, Liu et al. eq. 14)                 Liu
hd95           95th-percentile symmetric Hausdorff distance in mm (MONAI definition)  (engine addition)
=============  =====================================================================  ======================

Implementation choices:

* Confusion counts (TP, FP, FN, TN) are exact int64 voxel counts from numpy; the ratios are then taken by
  MONAI's ``compute_confusion_matrix_metric`` (``monai.metrics.confusion_matrix``). MONAI's own
  ``get_confusion_matrix`` is not used for the counting because it sums float32 tensors, which stops being
  exact above 2**24 voxels (a 512x512x148 CT has 3.9e7).
* **NSD** is ``monai.metrics.compute_surface_dice`` with ``use_subvoxels=True``: surface elements weighted
  by their area (2D: contour length), the definition of Nikolov et al. 2018 (Wang et al. ref. [39]) and of
  the DeepMind ``surface-distance`` code used by the COVID-19-CT-Seg benchmark that Wang et al. follow. A
  surface element counts as "correct" when its distance to the other surface is <= tau mm.
* **HD95** is ``monai.metrics.compute_hausdorff_distance(percentile=95)``: the 95th percentile of the
  pred->ref boundary distances and of the ref->pred distances, the larger of the two (boundary = mask voxels
  with a background 6-/4-neighbour; distances between boundary voxel centres, in mm).
* Both surface metrics run on the masks cropped to the bounding box of their union plus one voxel of zero
  padding on every side. Distances are measured between surface points (MONAI uses a KD-tree of the
  surface coordinates, or an exact EDT on CUDA), so a crop that contains every surface point gives exactly
  the uncropped result; the padding makes an object touching the array border get a closed surface there
  (the outside of the image is background), which is also what MONAI does when it crops internally. The
  crop is what keeps 512x512x150 volumes fast: MONAI would otherwise build float tensors of the whole
  volume.

Edge cases (one rule: a ratio whose denominator is zero is undefined -> NaN, except the overlap scores,
for which two empty masks are a perfect agreement). ``P`` = prediction, ``R`` = reference:

=======================  =====  =====  ====  ===========  ===========  =========  =====  =====  ======
case                     dsc    nsd    f1    sensitivity  specificity  precision  voe    rvd    hd95
=======================  =====  =====  ====  ===========  ===========  =========  =====  =====  ======
both empty               1      1      1     NaN          1            NaN        0      0      0
R empty, P not           0      0      0     NaN          <1           0          1      NaN    NaN
P empty, R not           0      0      0     0            1 (or NaN)   NaN        1      1      NaN
R covers the whole grid  ...    ...    ...   ...          NaN          ...        ...    ...    ...
=======================  =====  =====  ====  ===========  ===========  =========  =====  =====  ======

F1 is computed from precision and recall as asked by Wang et al.; with the conventions above it equals the
DSC in every case (when TP = 0 it is 0, or 1 when both masks are empty). HD95 with one empty mask is
infinite by definition; it is reported as NaN so that :func:`aggregate` skips and counts it instead of
turning the mean into ``inf``. ``accuracy`` is always defined.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from .checks import as_binary_mask

# Display names, in report order. Keys are the keys of :func:`case_metrics` rows.
METRIC_NAMES: dict[str, str] = {
    "dsc": "DSC",
    "nsd": "NSD",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "precision": "Precision (PPV)",
    "f1": "F1",
    "accuracy": "Accuracy",
    "voe": "VOE",
    "rvd": "|RVD|",
    "hd95": "HD95 (mm)",
}

# Metrics that need surface distances (slow on full CTs); training can leave them out via ``which``.
SURFACE_METRICS = frozenset({"nsd", "hd95"})

DEFAULT_TAU_MM = 3.0  # Wang et al. 2021, section 4.1: tau = 3 mm for COVID-19 infection


# --------------------------------------------------------------------------------------------- inputs

def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = as_binary_mask(pred, "pred")
    r = as_binary_mask(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred and ref must have the same shape, got {p.shape} and {r.shape}")
    if p.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got {p.ndim}D with shape {p.shape}")
    if p.size == 0:
        raise ValueError(f"masks are empty arrays (shape {p.shape})")
    return p, r


def _check_spacing(spacing: Optional[Sequence[float]], ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if np.isscalar(spacing):
        spacing = (float(spacing),) * ndim  # type: ignore[arg-type]
    sp = tuple(float(s) for s in spacing)  # plain floats: MONAI's prepare_spacing rejects numpy float32
    if len(sp) != ndim:
        raise ValueError(f"spacing {sp} has {len(sp)} values but the masks are {ndim}D; give one value per array "
                         f"axis, in array axis order (z, y, x)")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be finite and positive (mm), got {sp}")
    return sp


def _check_tau(tau_mm: float) -> float:
    tau = float(tau_mm)
    if not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau_mm must be a finite non-negative distance in mm, got {tau_mm}")
    return tau


# --------------------------------------------------------------------------------- confusion metrics

def confusion_counts(pred: np.ndarray, ref: np.ndarray) -> dict[str, int]:
    """Exact voxel counts ``{"tp", "fp", "fn", "tn"}`` of two binary masks."""
    p, r = _check_pair(pred, ref)
    n_p = int(np.count_nonzero(p))
    n_r = int(np.count_nonzero(r))
    tp = int(np.count_nonzero(p & r)) if n_p and n_r else 0
    fp, fn = n_p - tp, n_r - tp
    return {"tp": tp, "fp": fp, "fn": fn, "tn": int(p.size) - tp - fp - fn}


def _monai_ratio(name: str, counts: Mapping[str, int]) -> float:
    """MONAI's confusion-matrix metric (NaN when its denominator is zero) from exact counts."""
    from monai.metrics import compute_confusion_matrix_metric

    cm = torch.tensor([counts["tp"], counts["fp"], counts["tn"], counts["fn"]], dtype=torch.float64)
    return float(compute_confusion_matrix_metric(name, cm).item())


def _overlap_metrics(counts: Mapping[str, int], which: Iterable[str]) -> dict[str, float]:
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    both_empty = tp + fp + fn == 0
    out: dict[str, float] = {}
    want = set(which)
    recall = _monai_ratio("sensitivity", counts)
    prec = _monai_ratio("precision", counts)
    if "dsc" in want:
        # MONAI's "f1 score" of the confusion matrix is exactly 2TP / (2TP + FP + FN) = DSC.
        out["dsc"] = 1.0 if both_empty else _monai_ratio("f1 score", counts)
    if "sensitivity" in want:
        out["sensitivity"] = recall
    if "specificity" in want:
        out["specificity"] = _monai_ratio("specificity", counts)
    if "precision" in want:
        out["precision"] = prec
    if "f1" in want:
        if both_empty:
            out["f1"] = 1.0
        elif tp == 0:  # precision or recall is 0 (the other 0 or undefined): no true positive at all
            out["f1"] = 0.0
        else:
            out["f1"] = 2.0 * prec * recall / (prec + recall)
    if "accuracy" in want:
        out["accuracy"] = _monai_ratio("accuracy", counts)
    if "voe" in want:
        # 1 - Jaccard; MONAI's "threat score" is TP / (TP + FN + FP) = Jaccard.
        out["voe"] = 0.0 if both_empty else 1.0 - _monai_ratio("threat score", counts)
    if "rvd" in want:
        v_pred, v_ref = tp + fp, tp + fn
        if v_ref == 0:
            out["rvd"] = 0.0 if v_pred == 0 else float("nan")
        else:
            out["rvd"] = abs(v_pred - v_ref) / v_ref
    return out


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice similarity coefficient 2|P∩R|/(|P|+|R|); 1 when both masks are empty."""
    return _overlap_metrics(confusion_counts(pred, ref), ["dsc"])["dsc"]


def sensitivity(pred: np.ndarray, ref: np.ndarray) -> float:
    """TP/(TP+FN); NaN when the reference is empty."""
    return _overlap_metrics(confusion_counts(pred, ref), ["sensitivity"])["sensitivity"]


def specificity(pred: np.ndarray, ref: np.ndarray) -> float:
    """TN/(TN+FP); NaN when the reference covers the whole grid."""
    return _overlap_metrics(confusion_counts(pred, ref), ["specificity"])["specificity"]


def precision(pred: np.ndarray, ref: np.ndarray) -> float:
    """TP/(TP+FP) (PPV); NaN when the prediction is empty."""
    return _overlap_metrics(confusion_counts(pred, ref), ["precision"])["precision"]


def voe(pred: np.ndarray, ref: np.ndarray) -> float:
    """Volumetric overlap error 1 - |P∩R|/|P∪R| (Liu et al. eq. 13); 0 when both masks are empty."""
    return _overlap_metrics(confusion_counts(pred, ref), ["voe"])["voe"]


def rvd(pred: np.ndarray, ref: np.ndarray) -> float:
    """Absolute relative volume difference | |P|-|R| | / |R| (Liu et al. eq. 14); NaN when only R is empty."""
    return _overlap_metrics(confusion_counts(pred, ref), ["rvd"])["rvd"]


# ----------------------------------------------------------------------------------- surface metrics

def _crop_union(p: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to their union's bounding box and pad one background voxel on every side.

    Only called when the union is non-empty. See the module docstring for why this is exact.
    """
    union = p | r
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        slices.append(slice(int(idx[0]), int(idx[-1]) + 1))
    sl = tuple(slices)
    return np.pad(p[sl], 1), np.pad(r[sl], 1)


def _to_batch(mask: np.ndarray) -> torch.Tensor:
    # MONAI's surface metrics take one-hot, batch-first tensors: [B=1, C=1, *spatial].
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


def _surface_metrics(p: np.ndarray, r: np.ndarray, spacing: tuple[float, ...], tau_mm: float,
                     which: Iterable[str]) -> dict[str, float]:
    want = set(which) & SURFACE_METRICS
    out: dict[str, float] = {}
    if not want:
        return out
    any_p, any_r = bool(p.any()), bool(r.any())
    if not any_p and not any_r:
        # Two empty masks agree perfectly (MONAI would return NaN for both).
        out.update({k: v for k, v in (("nsd", 1.0), ("hd95", 0.0)) if k in want})
        return out
    if any_p != any_r:
        out.update({k: v for k, v in (("nsd", 0.0), ("hd95", float("nan"))) if k in want})
        return out

    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    pc, rc = _crop_union(p, r)
    yp, yr = _to_batch(pc), _to_batch(rc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty classes; empties are handled above
        if "nsd" in want:
            out["nsd"] = float(compute_surface_dice(yp, yr, class_thresholds=[tau_mm], include_background=True,
                                                    spacing=list(spacing), use_subvoxels=True)[0, 0])
        if "hd95" in want:
            out["hd95"] = float(compute_hausdorff_distance(yp, yr, include_background=True, percentile=95,
                                                           spacing=list(spacing))[0, 0])
    return out


def nsd(pred: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]] = None,
        tau_mm: float = DEFAULT_TAU_MM) -> float:
    """Normalised surface Dice at tolerance ``tau_mm`` (Nikolov et al. 2018; Wang et al. eq. 8)."""
    p, r = _check_pair(pred, ref)
    return _surface_metrics(p, r, _check_spacing(spacing, p.ndim), _check_tau(tau_mm), ["nsd"])["nsd"]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """95th-percentile Hausdorff distance in mm; 0 when both masks are empty, NaN when only one is."""
    p, r = _check_pair(pred, ref)
    return _surface_metrics(p, r, _check_spacing(spacing, p.ndim), 0.0, ["hd95"])["hd95"]


# ------------------------------------------------------------------------------------------ per case

def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]] = None,
                 tau_mm: float = DEFAULT_TAU_MM, which: Optional[Iterable[str]] = None) -> dict[str, float]:
    """All metrics (or the subset ``which``) of one case, keyed as in :data:`METRIC_NAMES`.

    Args:
        pred, ref: binary masks of the same 2D or 3D shape.
        spacing: voxel size in mm per array axis (array axis order); ``None`` means 1 mm.
        tau_mm: NSD tolerance in mm (Wang et al.: 3 mm).
        which: metric keys to compute; ``None`` = all. Leaving out ``"nsd"`` and ``"hd95"`` skips the
            surface computations (the only slow part).

    Returns:
        ``{key: float}`` in :data:`METRIC_NAMES` order; undefined values are NaN (module docstring).
    """
    if which is None:
        keys = list(METRIC_NAMES)
    else:
        keys = [which] if isinstance(which, str) else list(which)
        unknown = [k for k in keys if k not in METRIC_NAMES]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
    p, r = _check_pair(pred, ref)
    sp = _check_spacing(spacing, p.ndim)
    tau = _check_tau(tau_mm)
    values: dict[str, float] = {}
    non_surface = [k for k in keys if k not in SURFACE_METRICS]
    if non_surface:
        values.update(_overlap_metrics(confusion_counts(p, r), non_surface))
    values.update(_surface_metrics(p, r, sp, tau, keys))
    return {k: float(values[k]) for k in METRIC_NAMES if k in keys}


# ----------------------------------------------------------------------------------------- aggregate

def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def aggregate(rows: Sequence[Mapping[str, object]]) -> dict[str, dict[str, float]]:
    """Summary statistics per metric over cases, ignoring undefined (NaN) values.

    Every key whose values are numbers is summarised (non-numeric entries such as a ``"case"`` name are
    skipped). Per key: ``mean``, ``std`` (population standard deviation, ddof=0, as numpy), ``median``,
    ``min``, ``max`` over the finite-or-infinite non-NaN values, ``n`` = how many values were used and
    ``n_nan`` = how many rows had NaN or lacked the key. When no value is usable, the statistics are NaN
    and ``n`` is 0. Keys come in :data:`METRIC_NAMES` order, then in order of first appearance.
    """
    keys: list[str] = []
    for row in rows:
        for k, v in row.items():
            if k not in keys and _is_number(v):
                keys.append(k)
    order = list(METRIC_NAMES)
    first_seen = {k: i for i, k in enumerate(keys)}
    keys = sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), first_seen[k]))
    summary: dict[str, dict[str, float]] = {}
    for k in keys:
        vals = np.array([float(row[k]) for row in rows if k in row and _is_number(row[k])], dtype=np.float64)
        used = vals[~np.isnan(vals)]
        n_nan = len(rows) - used.size
        if used.size:
            stats = {"mean": float(np.mean(used)), "std": float(np.std(used)), "median": float(np.median(used)),
                     "min": float(np.min(used)), "max": float(np.max(used))}
        else:
            stats = {s: float("nan") for s in ("mean", "std", "median", "min", "max")}
        stats.update({"n": int(used.size), "n_nan": int(n_nan)})
        summary[k] = stats
    return summary
