"""Right/left lung masking of chest CT without trained weights.

nCoVSegNet (Liu et al., MedIA 2021, section 4.1; ``liu_ncovsegnet`` in docs/CITATIONS.md) crops every scan
to the bounding box of an *unsupervised* lung mask (the threshold + connected-component method of Liao et al.
2019) before inference, and the lesion-B experiment of Bizopoulos et al. (``bizopoulos_grid``) multiplies the
slice by a lung mask. This module is the engine's version of that unsupervised mask. It follows the same
family (threshold air inside the body, keep the large components, repair with morphology) but adds what
quantification needs: separate right/left labels, trachea and main bronchi removed, and dense lesions
kept inside the lungs. The papers do not specify the method beyond "unsupervised"; every choice below is
ours and documented where it is made.

Algorithm (all heavy work on a ~2 mm grid; ``LungMaskParams`` holds the constants):

1. **Reduce** the volume by block averaging to about ``target_spacing_mm`` voxels (integer factors per
   axis, slab by slab so memory stays bounded for 1000-slice scans).
2. **Body**: the largest 3D component of ``HU > -500``, holes filled slice by slice. Air outside it
   (room air, table gaps, the outside of the reconstruction circle) is never lung.
3. **Air** inside the body: ``HU < air_threshold_hu`` (-500).
4. **Trachea and main bronchi**: the trachea is found as a roughly round air column (< -900 HU) near
   the body's left-right centre in the upper slices. From it a 3D region growing with *explosion
   control* (Mori et al. style) raises the upper threshold from -990 HU in 10 HU steps and keeps the
   last threshold before the grown volume jumps (the jump is the leak into the parenchyma). The grown
   tree (trachea, main and lobar bronchi at 2 mm resolution) is removed from the air mask, which also
   disconnects the two lungs from each other through the carina.
5. **Lung components**: the largest air component, plus the second one when it is at least 20 % of
   the largest; components of nearly pure gas (mean < -960 HU: stomach, bowel) are rejected.
6. **Right/left split**: when the lungs touch (anterior/posterior junction) they form one component.
   It is split by thresholding its Euclidean distance map at increasing depths (2, 3, ... mm) until two
   large cores appear, and every voxel of the component goes to its nearest core. Sides are decided by
   the x coordinate of each lung's centroid in the canonical LPS array (smaller x = patient's right).
7. **Repair, per lung** (what keeps vessels, airways, consolidation and pleura-attached nodules):
   a. 3D closing with a ball of ``closing_radius_mm`` (exact Euclidean, from two distance maps)
      fills vessels, small juxta-hilar/mediastinal nodules and bronchial walls. It is done per lung so
      it never bridges the mediastinum between the lungs.
   b. *Costal concavities*: in every axial slice the concavities of the lung's convex hull whose
      lid lies on the outer hull of both lungs and within 20 mm of bone (the inner surface of the rib
      cage) are added: that is a consolidation or nodule attached to the costal pleura, of any depth.
      Concavities whose lid crosses the thorax (heart, hilum) or the liver/spleen dome under a thin
      basal crescent are left out. Unlike a 3D closing this does not
      depend on the lesion's size. Limitation: a lesion on the mediastinal or diaphragmatic surface is
      recovered only up to the closing radius of (a), and a pleural effusion that makes the costal
      contour concave would be added too (effusion is not lung; COVID-19 rarely has one).
   c. The repaired lung is intersected with the body and with "not bone" (< 200 HU at 2 mm), the
      trachea/bronchi tree is removed again (the repairs may have reached into it), and holes are
      filled slice by slice, which returns intrapulmonary bronchi (enclosed by lung in 2D) to the lung
      while the trachea and the hilar main bronchi (open towards the mediastinum) stay excluded.
   d. The largest 3D component of each lung is kept; voxels claimed by both lungs go to the nearer one.
8. **Upsample** each lung's 2 mm mask to the input grid by separable (bi)linear interpolation, slab by
   slab with index gathers (no full-resolution float volume), and threshold at 0.5.

Measured on the three real scans in ``../shared/data/ct`` on 2 shared cores: 3.5-5 s per 512x512x~150
scan before issue 14, about half that CPU time since (the same masks: ``docs/default_models.md`` section 8
lists what changed); the fast mode (``FAST_PARAMS``, a 3 mm grid) takes about half again.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from . import progress as _progress
from .errors import InputError
from .morphology import squared_distance_to
from .preprocessing import bounding_box
from .progress import ProgressCallback
from .volume import stable_spacing

RIGHT = 1
LEFT = 2

# 2D (in-plane) connectivity expressed for 3D arrays: operations with it act on each axial slice at once.
_SLICE_STRUCTURE = np.zeros((3, 3, 3), bool)
_SLICE_STRUCTURE[1] = ndi.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class LungMaskParams:
    """Constants of :func:`segment_lungs` (defaults tuned on the three real scans and the phantom)."""

    target_spacing_mm: float = 2.0
    body_threshold_hu: float = -500.0
    air_threshold_hu: float = -500.0
    trachea_threshold_hu: float = -900.0
    airway_max_ml: float = 400.0
    second_lung_min_fraction: float = 0.2
    gas_mean_hu: float = -960.0
    min_lung_ml: float = 20.0
    closing_radius_mm: float = 10.0
    lid_contact: float = 0.6
    rib_distance_mm: float = 20.0
    max_concavity_fraction: float = 0.5
    bone_hu: float = 200.0


#: The fast mode's grid (``HULungModel(fast=True)``, ``covidlesionseg segment --fast``): about 3.4 times fewer
#: voxels than 2 mm for the steps after the block means; docs/default_models.md section 8 measures the cost.
FAST_TARGET_SPACING_MM = 3.0
FAST_PARAMS = LungMaskParams(target_spacing_mm=FAST_TARGET_SPACING_MM)


def segment_lungs(hu: np.ndarray, spacing_zyx: tuple[float, float, float],
                  progress: Optional[ProgressCallback] = None,
                  params: LungMaskParams = LungMaskParams()) -> np.ndarray:
    """Segment the right and left lungs of a chest CT.

    Args:
        hu: (z, y, x) Hounsfield units in the canonical LPS orientation (``CTVolume.hu``): x increases
            towards the patient's left, y posterior, z superior. Any integer or float dtype.
        spacing_zyx: voxel spacing in mm, in array axis order.
        progress: optional ``callback(fraction, message)``; it may raise :class:`progress.Cancelled`.
        params: algorithm constants (see :class:`LungMaskParams`).

    Returns:
        uint8 array of ``hu.shape``: 0 background, 1 right lung, 2 left lung.

    Raises:
        ValueError: the input is not a 3D array with positive spacing (a caller's bug).
        InputError: (a ValueError too) what the scan shows cannot be a chest CT's lungs: no body, no lungs,
            one lung that cannot be split; the message is for the user.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"segment_lungs needs a 3D (z, y, x) array, got shape {hu.shape}")
    if min(hu.shape) < 2:
        raise ValueError(f"volume {hu.shape} is too small for lung segmentation (need >= 2 voxels per axis)")
    spacing = stable_spacing(spacing_zyx)  # the rounding and distance thresholds below must not see 1e-14 noise
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_zyx must be three positive numbers in mm, got {spacing_zyx!r}")

    _progress.report(progress, 0.0, "lungs: reducing resolution")
    factors = tuple(max(1, int(round(params.target_spacing_mm / s))) for s in spacing)
    low = _block_mean(hu, factors)
    low_spacing = tuple(s * f for s, f in zip(spacing, factors))
    voxel_ml = float(np.prod(low_spacing)) / 1000.0

    _progress.report(progress, 0.15, "lungs: body and air")
    body = _body_mask(low, params)
    if not body.any():
        raise InputError("no body found (no voxel above -500 HU): is this a CT in Hounsfield units?")
    air = (low < params.air_threshold_hu) & body
    if air.sum() * voxel_ml < params.min_lung_ml:
        raise InputError(
            "no lungs found: there is almost no air (< -500 HU) inside the body. The input must be a chest "
            "CT in Hounsfield units covering the lungs (not windowed/8-bit, not an abdomen-only scan).")

    _progress.report(progress, 0.3, "lungs: trachea and main bronchi")
    airway = _airway_tree(low, body, low_spacing, params)
    airway_wall = ndi.binary_dilation(airway, ndi.generate_binary_structure(3, 1)) if airway.any() else airway
    air &= ~airway_wall

    _progress.report(progress, 0.45, "lungs: right/left separation")
    right, left = _find_lungs(low, air, body, low_spacing, voxel_ml, params)

    _progress.report(progress, 0.6, "lungs: filling vessels and dense lesions")
    # Every repair stays inside the lungs' bounding box plus 3 voxels (each lung's closing works on its own
    # box, the envelopes on each slice's lung box + 3 voxels, the hole filling needs one voxel of margin), so
    # they run on that box (~40 % of the grid), with the bone distances from bone up to rib_distance_mm
    # outside it: the same masks as on the whole grid.
    aerated = right | left
    box = bounding_box(aerated, 3)
    reach = bounding_box(aerated, [3 + int(np.ceil(params.rib_distance_mm / s)) + 1 for s in low_spacing])
    inner = tuple(slice(b.start - r.start, b.stop - r.start) for b, r in zip(box, reach))
    bone = (low[reach] > params.bone_hu) & body[reach]
    near_bone = (squared_distance_to(bone, low_spacing) <= params.rib_distance_mm ** 2)[inner]
    allowed = body[box] & (low[box] < params.bone_hu) & ~airway_wall[box]
    right_box, left_box = right[box], left[box]
    envelopes = _costal_envelopes(right_box, left_box, near_bone, low_spacing, params)
    repaired = []
    for lung, other, envelope in ((right_box, left_box, envelopes[0]), (left_box, right_box, envelopes[1])):
        m = _close3d(lung, low_spacing, params.closing_radius_mm)
        m |= envelope
        m &= allowed & ~other
        m = fill_holes_2d(m | lung)
        repaired.append(_largest_component(m))
    right_box, left_box = _resolve_overlap(repaired[0], repaired[1], right_box, left_box)
    right, left = np.zeros_like(right), np.zeros_like(left)
    right[box], left[box] = right_box, left_box
    _progress.report(progress, 0.85, "lungs: upsampling")
    labels = _upsample_labels(right, left, factors, hu.shape)
    if not (labels == RIGHT).any() or not (labels == LEFT).any():  # pragma: no cover - guarded by _find_lungs
        raise ValueError("lung segmentation lost a lung while upsampling; the volume may be too small")
    _progress.report(progress, 1.0, "lungs: done")
    return labels


# ----------------------------------------------------------------------------------------------------
# steps


def _block_mean(hu: np.ndarray, factors: tuple[int, int, int], slab: int = 16) -> np.ndarray:
    """Average non-overlapping blocks (last partial block averaged over what exists), slab by slab.

    Values below -1024 HU (outside the reconstruction circle, padding) are clipped to -1024 so that they
    do not pull the block average of tissue at the edge of the field of view to absurd values. The slabs are
    shared among ITK's thread budget (:func:`_in_threads`: numpy releases the GIL in these loops).
    """
    fz, fy, fx = factors
    nz, ny, nx = hu.shape
    oz, oy, ox = -(-nz // fz), -(-ny // fy), -(-nx // fx)
    out = np.empty((oz, oy, ox), np.float32)
    iy, ix = np.arange(0, ny, fy), np.arange(0, nx, fx)
    cy = np.diff(np.append(iy, ny)).astype(np.float32)
    cx = np.diff(np.append(ix, nx)).astype(np.float32)
    step = slab * fz

    def reduce(z0: int) -> None:
        chunk = np.clip(np.asarray(hu[z0:z0 + step], dtype=np.float32), -1024.0, 3071.0)
        iz = np.arange(0, chunk.shape[0], fz)
        cz = np.diff(np.append(iz, chunk.shape[0])).astype(np.float32)
        s = np.add.reduceat(chunk, iz, axis=0) if fz > 1 else chunk
        s = np.add.reduceat(s, iy, axis=1) if fy > 1 else s
        s = np.add.reduceat(s, ix, axis=2) if fx > 1 else s
        s /= cz[:, None, None] * cy[None, :, None] * cx[None, None, :]
        out[z0 // fz:z0 // fz + s.shape[0]] = s

    _in_threads(reduce, range(0, nz, step), hu.size)
    return out


#: Above this many voxels (a 512 x 512 x 380 scan; the pipeline writes such scans' outputs one after the other too)
#: the slice loops run on one thread: each thread's slab and the memory its malloc heap keeps cost more than the
#: time gained (on the 512 x 512 x 1000 scan about 40 MB more peak for no measurable gain).
SERIAL_VOXELS = 100_000_000


def _in_threads(work, items, voxels: int = 0) -> None:
    """``work(item)`` for every item, on as many threads as ITK may use (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``,
    the same budget as the distance maps), or on one for a volume of more than :data:`SERIAL_VOXELS`: for loops
    over slices whose work is numpy's (which releases the GIL), e.g. the block means take 0.12 s instead of
    0.20 s on P001 on two cores. The first error is raised."""
    items = list(items)
    threads = 1 if voxels > SERIAL_VOXELS else min(len(items), max(1, sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()))
    if threads <= 1:
        for item in items:
            work(item)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for done in [pool.submit(work, item) for item in items]:
            done.result()


def _body_mask(low: np.ndarray, params: LungMaskParams) -> np.ndarray:
    """Largest 3D component above ``body_threshold_hu`` with holes filled in every axial slice."""
    tissue = low > params.body_threshold_hu
    # A small in-plane opening detaches the table and thin blankets that touch the skin.
    tissue = ndi.binary_opening(tissue, structure=_SLICE_STRUCTURE, iterations=1)
    body = _largest_component(tissue)
    return fill_holes_2d(body)


def fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """Holes filled in every axial slice: ``ndi.binary_fill_holes(mask, structure=_SLICE_STRUCTURE)``.

    The same result from one labelling of the background (4-connected in each slice) instead of scipy's
    iterative propagation from the border, which took ~0.2 s per call on a 2 mm lung grid: a background
    component is a hole exactly when it touches no in-plane edge of its slice (the slice structure has no
    z neighbours, so the first and last slices' faces are not "outside").
    """
    background, n = ndi.label(~mask, structure=_SLICE_STRUCTURE)
    outside = np.zeros(n + 1, bool)
    for edge in (background[:, 0, :], background[:, -1, :], background[:, :, 0], background[:, :, -1]):
        outside[edge] = True
    outside[0] = False          # label 0 is the mask itself
    return ~outside[background]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask.copy() if n == 1 else np.zeros_like(mask, bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _trachea_seeds(low: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float],
                   params: LungMaskParams) -> list[tuple[int, int, int]]:
    """Seed voxels (z, y, x) in the trachea: a round air column near the body's left-right centre.

    Searched from the top slice down through the upper half of the body: in each slice the candidate is
    an air component (< -900 HU) of 40-800 mm^2 (trachea diameter 7-32 mm), compact (fills >= 45 % of its
    bounding box, aspect <= 2.5), whose centroid lies within 12 % of the body width from the body's
    centre. Lung apices are lateral and the oesophagus is smaller and posterior, so the most central,
    largest such component is taken. Returns one seed per slice of the topmost run of >= 3 slices.
    """
    _, sy, sx = spacing
    zs = np.nonzero(body.any(axis=(1, 2)))[0]
    if zs.size == 0:
        return []
    z_top, z_bottom = int(zs.max()), int(zs.min())
    z_stop = z_bottom + (z_top - z_bottom) // 2
    seeds: list[tuple[int, int, int]] = []
    previous = None
    for z in range(z_top, z_stop - 1, -1):
        b = body[z]
        xs = np.nonzero(b.any(axis=0))[0]
        if xs.size == 0:
            continue
        width = (xs.max() - xs.min() + 1)
        centre_x = 0.5 * (xs.max() + xs.min())
        lab, n = ndi.label((low[z] < params.trachea_threshold_hu) & b)
        best = None
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            if sl is None:
                continue
            comp = lab[sl] == i
            area = comp.sum() * sy * sx
            if not 40.0 <= area <= 800.0:
                continue
            h, w = comp.shape
            if comp.sum() < 0.45 * h * w or max(h * sy, w * sx) > 2.5 * min(h * sy, w * sx):
                continue
            cyx = ndi.center_of_mass(comp)
            cy, cx = cyx[0] + sl[0].start, cyx[1] + sl[1].start
            if abs(cx - centre_x) > 0.12 * width:
                continue
            if previous is not None and np.hypot((cy - previous[0]) * sy, (cx - previous[1]) * sx) > 15.0:
                continue
            score = abs(cx - centre_x) / width - area / 800.0
            if best is None or score < best[0]:
                best = (score, cy, cx, comp, sl)
        if best is None:
            if len(seeds) >= 3:
                break
            seeds, previous = [], None
            continue
        _, cy, cx, comp, sl = best
        # The seed is the component voxel nearest its centroid (the centroid may miss a C-shaped lumen).
        py, px = np.nonzero(comp)
        k = int(np.argmin((py + sl[0].start - cy) ** 2 + (px + sl[1].start - cx) ** 2))
        seeds.append((z, int(py[k] + sl[0].start), int(px[k] + sl[1].start)))
        previous = (cy, cx)
        if len(seeds) >= 6:
            break
    return seeds if len(seeds) >= 3 else []


def _airway_tree(low: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float],
                 params: LungMaskParams) -> np.ndarray:
    """Trachea and large bronchi by explosion-controlled region growing from the trachea seeds.

    The upper threshold goes from -990 HU up in 10 HU steps; the grown volume is recorded and the last
    threshold before it "explodes" (more than doubles and grows by > 50 mL, or passes ``airway_max_ml``)
    is kept. At 2 mm the bronchial walls separate the lumen (~-1000 HU) from the parenchyma
    (~-850 HU) until the threshold reaches the parenchyma's values, where the growth floods a lung.
    Returns an empty mask when no trachea is visible (e.g. a scan of the lung bases only).
    """
    seeds = _trachea_seeds(low, body, spacing, params)
    empty = np.zeros(low.shape, bool)
    if not seeds:
        return empty
    voxel_ml = float(np.prod(spacing)) / 1000.0
    # Restrict growth to the upper part of the body's bounding box around the seeds' column would be
    # arbitrary; instead growth is limited by the threshold and the explosion test.
    candidates = low.copy()
    candidates[~body] = 1000.0
    image = sitk.GetImageFromArray(candidates)
    seed_values = candidates[tuple(np.array(seeds).T)]
    best = empty
    previous_ml = 0.0
    for threshold in np.arange(-990.0, -840.0, 10.0):
        inside = [s for s, v in zip(seeds, seed_values) if v < threshold]
        if not inside:
            continue
        # The 6-connected component(s) of "below the threshold" holding the seeds, grown from the seeds
        # (ITK's flood fill visits only the grown region; labelling the whole grid at each of the 15
        # thresholds cost ~0.5 s). Its range is inclusive: the largest float32 below the threshold.
        upper = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
        grown = sitk.GetArrayFromImage(sitk.ConnectedThreshold(
            image, seedList=[(x, y, z) for z, y, x in inside], lower=-np.inf, upper=upper, replaceValue=1,
            connectivity=sitk.ConnectedThresholdImageFilter.FaceConnectivity)).view(bool)
        ml = grown.sum() * voxel_ml
        exploded = ml > params.airway_max_ml or (previous_ml > 0 and ml > 2.0 * previous_ml
                                                  and ml - previous_ml > 50.0)
        if exploded:
            break
        best, previous_ml = grown, ml
    return best


def _find_lungs(low: np.ndarray, air: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float],
                voxel_ml: float, params: LungMaskParams) -> tuple[np.ndarray, np.ndarray]:
    """Pick the lung components of the air mask and return (right, left) boolean masks."""
    lab, n = ndi.label(air)
    if n == 0:
        raise InputError("no lungs found: no air region inside the body")
    sizes = np.bincount(lab.ravel())
    # ndi.mean(low, lab, index=range(n + 1)) from the same bincount sums, without scipy's label bookkeeping.
    means = np.bincount(lab.ravel(), weights=low.ravel(), minlength=n + 1) / np.maximum(sizes, 1)
    sizes[0] = 0
    order = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i] > 0]
    lungs = [i for i in order if means[i] >= params.gas_mean_hu]
    if not lungs or sizes[lungs[0]] * voxel_ml < params.min_lung_ml:
        raise InputError(
            f"no lungs found: the largest air region inside the body is "
            f"{(sizes[lungs[0]] if lungs else 0) * voxel_ml:.0f} mL (need >= {params.min_lung_ml:.0f} mL). "
            "Check that the scan covers the chest and is in Hounsfield units.")
    return split_right_left(np.isin(lab, lungs), spacing, body=body,
                            second_lung_min_fraction=params.second_lung_min_fraction, keep_fragments=False)


def split_right_left(mask: np.ndarray, spacing: tuple[float, float, float], body: np.ndarray | None = None,
                     second_lung_min_fraction: float = LungMaskParams.second_lung_min_fraction,
                     keep_fragments: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Split a binary lung mask (z, y, x, canonical LPS) into ``(right, left)`` boolean masks.

    One rule for the HU lung model (on its gas components) and for learned binary lung models
    (``network_predictor``): the two largest 3D components are the two lungs when the second holds at
    least ``second_lung_min_fraction`` of the largest; otherwise the largest holds both lungs (they touch
    at the anterior or posterior junction) and :func:`_split_component` separates them. The sides come
    from anatomy: in canonical LPS arrays x grows towards the patient's left. Every other component is
    given to the lung with the nearer centroid when ``keep_fragments`` (a network's detached pieces of
    lung), or dropped (the HU model: gas outside the two lungs is not lung). ``body`` only serves
    :func:`_split_component`'s last-resort mid-sagittal cut; without it the mask's own extent is used.
    An empty mask gives two empty masks.
    """
    mask = np.asarray(mask, dtype=bool)
    lab, n = ndi.label(mask)
    if n == 0:
        return np.zeros_like(mask), np.zeros_like(mask)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    first = lab == order[0]
    if n > 1 and sizes[order[1]] >= second_lung_min_fraction * sizes[order[0]]:
        a, b = first, lab == order[1]
        used = {int(order[0]), int(order[1])}
    else:
        a, b = _split_component(first, body if body is not None else mask, spacing)
        used = {int(order[0])}
    # Sides from anatomy: in canonical LPS arrays x grows towards the patient's left.
    if _mean_x(a) > _mean_x(b):
        a, b = b, a
    fragments = [i for i in range(1, n + 1) if i not in used]
    if keep_fragments and fragments:
        scale = np.asarray(spacing, dtype=np.float64)
        centre_a = np.asarray(ndi.center_of_mass(a), dtype=np.float64) * scale
        centre_b = np.asarray(ndi.center_of_mass(b), dtype=np.float64) * scale
        centres = np.asarray(ndi.center_of_mass(mask, lab, fragments), dtype=np.float64).reshape(-1, 3) * scale
        to_a = np.linalg.norm(centres - centre_a, axis=1) <= np.linalg.norm(centres - centre_b, axis=1)
        a = a | np.isin(lab, np.asarray(fragments)[to_a])
        b = b | np.isin(lab, np.asarray(fragments)[~to_a])
    return a, b


def _mean_x(mask: np.ndarray) -> float:
    """Mean x index of a mask's voxels (``np.nonzero(mask)[2].mean()``, from the voxel counts per x)."""
    counts = np.count_nonzero(mask, axis=(0, 1))
    return float(np.dot(counts, np.arange(counts.size))) / max(int(counts.sum()), 1)


def _split_component(component: np.ndarray, body: np.ndarray,
                     spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Split one air component holding both lungs (they touch at the anterior/posterior junction).

    The component's distance map is thresholded at increasing depths until two cores each >= 10 % of
    the larger appear, on opposite sides in x; each voxel then goes to its nearest core. If no depth
    up to 30 mm separates it, the component is cut at the body's mid-sagittal plane (a fallback for
    e.g. a single remaining lung after pneumonectomy would need the user's correction anyway).
    """
    sl = ndi.find_objects(component.astype(np.uint8))[0]
    sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
    comp = component[sl]
    depth_sq = squared_distance_to(~comp, spacing)
    for d in np.arange(2.0, 31.0, 1.0):
        lab, n = ndi.label(depth_sq > d * d)
        if n < 2:
            if n == 0:
                break
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        i, j = np.argsort(sizes)[::-1][:2]
        if sizes[j] < 0.1 * sizes[i]:
            continue
        seeds = np.where(lab == i, 1, np.where(lab == j, 2, 0)).astype(np.uint8)
        idx = ndi.distance_transform_edt(seeds == 0, sampling=spacing, return_distances=False, return_indices=True)
        nearest = seeds[tuple(idx)]
        a = np.zeros_like(component)
        b = np.zeros_like(component)
        a[sl] = comp & (nearest == 1)
        b[sl] = comp & (nearest == 2)
        return a, b
    xs = np.nonzero(body.any(axis=(0, 1)))[0]
    mid = int(round(0.5 * (xs.min() + xs.max())))
    a = component.copy()
    a[:, :, mid:] = False
    b = component & ~a
    if not a.any() or not b.any():
        raise InputError("only one lung was found and it could not be split into right and left; "
                         "check the scan covers both lungs")
    return a, b


def _close3d(mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Morphological closing with an exact Euclidean ball (two distance maps on the padded bounding box)."""
    out = np.zeros_like(mask)
    found = ndi.find_objects(mask.astype(np.uint8))
    if not found or found[0] is None or radius_mm <= 0:
        return mask.copy()
    pad = [int(np.ceil(radius_mm / s)) + 1 for s in spacing]
    sl = found[0]
    # Pad with zeros beyond the array so that the ball can roll around lungs touching the border.
    inner = mask[sl]
    padded = np.pad(inner, [(p, p) for p in pad])
    dilated = squared_distance_to(padded, spacing) <= radius_mm ** 2
    closed = squared_distance_to(~dilated, spacing) > radius_mm ** 2
    core = closed[pad[0]:pad[0] + inner.shape[0], pad[1]:pad[1] + inner.shape[1], pad[2]:pad[2] + inner.shape[2]]
    out[sl] = core | inner
    return out


def _costal_envelopes(right: np.ndarray, left: np.ndarray, near_bone: np.ndarray,
                      spacing: tuple[float, float, float], params: LungMaskParams) -> tuple[np.ndarray, np.ndarray]:
    """Concavities of the lung's costal side, slice by slice (consolidation / nodules on the pleura).

    In each axial slice the convex hull of the lung is taken: the costal surface of a lung is convex,
    so a concavity there is a lesion pushing the aerated boundary inwards. The lung's hull also covers
    concavities that are *not* lung (the heart, the hilum, the liver dome under a basal crescent). They
    are told apart by where the concavity's *lid* (the part of its boundary on the lung hull) lies: for
    a costal lesion the lid runs along the inner surface of the rib cage, i.e. on the outer hull of
    *both* lungs and within ``rib_distance_mm`` of bone (3D distance, so intercostal spaces count);
    the lid of a mediastinal concavity crosses the inside of the thorax (not on the outer hull) and
    the lid of a basal crescent's concavity crosses the liver or spleen dome (on the outer hull but far
    from the ribs). A concavity is kept when at least ``lid_contact`` of its lid satisfies both and
    its area is at most ``max_concavity_fraction`` of the slice's aerated lung (thin basal crescents
    wrapped around the diaphragm dome otherwise qualify, the ribs being close behind them).

    The lid is a straight chord while the chest wall it replaces is an arc; the kept concavity is
    grown outwards by the arc's sagitta (w^2 / 8R for a lid of length w on a local radius R), at least
    one voxel for lids of 10 mm or more; the caller clips it to the body and to non-bone voxels.

    Both lungs are done in one pass over the slices: the outer hull, its neighbourhood and the crop are
    the same for both, and each concavity's size, lid and lid contact are counted for all concavities of a
    slice at once (``np.bincount`` on their labels); only the kept ones are handled one by one. Each lung's
    hull is computed on its own bounding box (the hull cannot leave it).

    Limitation: when a lesion at the tip of a lung piece merges with a mediastinal or diaphragmatic
    concavity into one concavity (e.g. a basal crescent whose costal end is consolidated), the whole
    concavity is rejected and the lesion is recovered only within the closing radius.
    """
    both = right | left
    nz, ny, nx = both.shape
    _, sy, sx = spacing
    px = max(sy, sx)
    outs = (np.zeros_like(right), np.zeros_like(left))
    ring = ndi.generate_binary_structure(2, 2)
    for z in np.nonzero(both.any(axis=(1, 2)))[0]:
        found = ndi.find_objects(both[z].astype(np.uint8))[0]
        sl = tuple(slice(max(a.start - 3, 0), min(a.stop + 3, n)) for a, n in zip(found, (ny, nx)))
        union = both[z][sl]
        radius = 0.5 * np.hypot((sl[0].stop - sl[0].start) * sy, (sl[1].stop - sl[1].start) * sx)
        near_outside = None
        for lung, out in zip((right, left), outs):
            piece = lung[z][sl]
            piece_voxels = int(np.count_nonzero(piece))
            if piece_voxels < 4:
                continue
            own = ndi.find_objects(piece.astype(np.uint8))[0]
            hull = np.zeros_like(piece)
            hull[own] = convex_hull_2d(piece[own])
            cand = hull & ~piece
            if not cand.any():
                continue
            if near_outside is None:
                near_outside = ndi.binary_dilation(~convex_hull_2d(union), ring) & near_bone[z][sl]
            lid_all = hull & ~ndi.binary_erosion(hull, ring, border_value=0)
            lab, n = ndi.label(cand, ring)
            size = np.bincount(lab.ravel(), minlength=n + 1)
            lid = np.bincount(lab[lid_all], minlength=n + 1)
            contact = np.bincount(lab[lid_all & near_outside], minlength=n + 1)
            # Kept: not the dome of the liver/spleen under a thin basal crescent (too large a share of the
            # slice's lung), and a lid on the rib cage (on the outer hull of both lungs, near bone).
            keep = (size <= params.max_concavity_fraction * piece_voxels) & (lid > 0) & (
                contact >= params.lid_contact * lid)
            keep[0] = False
            if not keep.any():
                continue
            target = out[z][sl]
            # Each concavity's lid extent (rows and columns of its lid voxels), all labels at once.
            ly, lx = np.nonzero(lid_all)
            owner = lab[ly, lx]
            extent = np.zeros((4, n + 1), np.int64)
            extent[0], extent[2] = lab.shape[0], lab.shape[1]
            np.minimum.at(extent[0], owner, ly)
            np.maximum.at(extent[1], owner, ly)
            np.minimum.at(extent[2], owner, lx)
            np.maximum.at(extent[3], owner, lx)
            width = np.hypot((extent[1] - extent[0]) * sy, (extent[3] - extent[2]) * sx)
            # Tiny concavities are boundary noise: taken as they are, all at once.
            tiny = keep & (width < 10.0)
            if tiny.any():
                target |= tiny[lab]
            objects = ndi.find_objects(lab)
            for i in np.flatnonzero(keep & ~tiny):
                obj = objects[i - 1]
                # Local radius of the costal surface: about a third of the thorax's half-width (the
                # posterolateral curvature); at least one voxel since the chord cuts boundary voxels.
                grow = max(1, int(round(width[i] * width[i] / (8.0 * max(radius / 3.0, 1.0)) / px)))
                # The dilation reaches ``grow`` voxels beyond the concavity: work on that window only.
                win = tuple(slice(max(o.start - grow, 0), min(o.stop + grow, n_)) for o, n_ in zip(obj, lab.shape))
                comp = lab[win] == i
                target[win] |= comp | (ndi.binary_dilation(comp, ring, iterations=grow) & ~hull[win])
    return outs


def convex_hull_2d(mask: np.ndarray) -> np.ndarray:
    """The convex hull image of a 2D mask, exactly as ``skimage.morphology.convex_hull_image`` defines it.

    The hull is that of the pixels' edge midpoints (each pixel (r, c) contributes (r +- 0.5, c) and
    (r, c +- 0.5)); a pixel belongs to it when its centre lies inside or on the hull. Why not skimage's
    function: it tests every pixel of the image against every hull edge and imports most of skimage,
    and the costal envelope calls it ~400 times per scan (0.7 s of CPU on P001). Here the hull comes from
    scipy's qhull on the row extremes (the other pixels' midpoints lie on segments between theirs), and
    each row is filled between bounds solved from the edges in integer arithmetic (coordinates doubled
    to integers), so the result is the same pixel for pixel (``test_convex_hull_2d_matches_skimage``).
    """
    from scipy.spatial import ConvexHull

    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return out
    first = mask[rows].argmax(axis=1)
    last = mask.shape[1] - 1 - mask[rows, ::-1].argmax(axis=1)
    r2, lo, hi = 2 * rows, 2 * first, 2 * last
    points = np.concatenate([
        np.stack([r2 - 1, lo], 1), np.stack([r2 + 1, lo], 1), np.stack([r2, lo - 1], 1),
        np.stack([r2 - 1, hi], 1), np.stack([r2 + 1, hi], 1), np.stack([r2, hi + 1], 1)])
    # Distinct points in (row, column) order: ``np.unique(points, axis=0)``, through one integer key per point
    # (4x faster than unique's row comparison; coordinates are >= -1 and columns < 2 * width + 2).
    stride = 2 * mask.shape[1] + 3
    key = np.unique((points[:, 0] + 1) * stride + (points[:, 1] + 1))
    points = np.stack([key // stride - 1, key % stride - 1], 1)
    hull = ConvexHull(points.astype(np.float64))
    v = points[hull.vertices].astype(np.int64)          # counter-clockwise in the (row, col) plane
    e = np.roll(v, -1, axis=0) - v
    # Pixel (r, c) at doubled coordinates (2r, 2c) is inside or on the hull when for every edge i
    # e_i0 * (2c - v_i1) - e_i1 * (2r - v_i0) >= 0, i.e. 2 e_i0 c >= e_i0 v_i1 + e_i1 (2r - v_i0).
    r = np.arange(rows[0], rows[-1] + 1)
    rhs = e[None, :, 0] * v[None, :, 1] + e[None, :, 1] * (2 * r[:, None] - v[None, :, 0])
    a = 2 * e[:, 0]
    big = np.int64(1) << 40
    lower = np.where(a > 0, -((-rhs) // np.where(a > 0, a, 1)), -big).max(axis=1)         # ceil
    upper = np.where(a < 0, rhs // np.where(a < 0, a, -1), big).min(axis=1)              # floor
    ok = np.where(a == 0, rhs <= 0, True).all(axis=1)
    lower, upper = np.maximum(lower, 0), np.minimum(upper, mask.shape[1] - 1)
    cols = np.arange(mask.shape[1])
    out[r] = ok[:, None] & (cols[None, :] >= lower[:, None]) & (cols[None, :] <= upper[:, None])
    return out


def _resolve_overlap(a: np.ndarray, b: np.ndarray, a_seed: np.ndarray,
                     b_seed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Give voxels claimed by both repaired lungs to the lung whose aerated part is nearer."""
    both = a & b
    if both.any():
        da = squared_distance_to(a_seed, (1.0, 1.0, 1.0))
        db = squared_distance_to(b_seed, (1.0, 1.0, 1.0))
        to_a = both & (da <= db)
        a = a & ~(both & ~to_a)
        b = b & ~to_a
    return a, b


def _interp_weights(n_full: int, factor: int, n_low: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (i0, i1) and weight of i1 for linear interpolation from block centres to voxel centres."""
    pos = (np.arange(n_full, dtype=np.float64) + 0.5) / factor - 0.5
    pos = np.clip(pos, 0.0, n_low - 1.0)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_low - 1)
    return i0, i1, (pos - i0).astype(np.float32)


def _upsample_labels(right: np.ndarray, left: np.ndarray, factors: tuple[int, int, int],
                     shape: tuple[int, ...]) -> np.ndarray:
    """Labels on the full grid: per-slice bilinear interpolation of each lung mask, nearest block in z.

    A full-resolution voxel is the right lung where the interpolated right mask ``pr`` and left mask
    ``pl`` give ``pr + pl >= 0.5`` and ``pr >= pl``, the left lung where ``pr + pl >= 0.5`` and ``pr < pl``.
    Where the four low-resolution voxels around it agree (everywhere except a band of about one block
    along the lung borders) that is simply their label, so only the voxels of that band are interpolated
    (the same float32 arithmetic, hence the same labels as interpolating every voxel, ~10x faster).
    Each distinct low-resolution slice is upsampled once and copied to the full slices it covers, so no
    full-resolution float volume is ever held.
    """
    fz, fy, fx = factors
    nz, ny, nx = shape
    out = np.zeros(shape, np.uint8)
    iz = np.minimum(np.arange(nz) // fz, right.shape[0] - 1)
    if fy == 1 and fx == 1:
        out[right[iz]] = RIGHT
        out[left[iz]] = LEFT
        return out
    y0, y1, wy = _interp_weights(ny, fy, right.shape[1])
    x0, x1, wx = _interp_weights(nx, fx, right.shape[2])
    code = right.astype(np.uint8) * RIGHT + left.astype(np.uint8) * LEFT   # 3 only if they overlap
    mixed = 255
    ly, lx = code.shape[1:]
    yn, xn = np.minimum(np.arange(ly) + 1, ly - 1), np.minimum(np.arange(lx) + 1, lx - 1)
    # Window (a, b)..(a+1, b+1) as _interp_weights pairs them: uniform when all four voxels agree.
    uniform = (code == code[:, yn, :]) & (code == code[:, :, xn]) & (code == code[:, yn][:, :, xn]) & (code != 3)
    window = np.where(uniform, code, np.uint8(mixed))

    def upsample(k: int) -> None:
        if not code[k].any():
            return
        plane = window[k][y0][:, x0]
        ys, xs = np.nonzero(plane == mixed)
        if ys.size:
            a, b = right[k].astype(np.float32), left[k].astype(np.float32)
            wyk, wxk = wy[ys], wx[xs]
            ya, yb, xa, xb = y0[ys], y1[ys], x0[xs], x1[xs]

            def up(m: np.ndarray) -> np.ndarray:
                # Exactly the separable interpolation, at these voxels only: y first, then x.
                ta = m[ya, xa] * (1.0 - wyk) + m[yb, xa] * wyk  # noqa: B023
                tb = m[ya, xb] * (1.0 - wyk) + m[yb, xb] * wyk  # noqa: B023
                return ta * (1.0 - wxk) + tb * wxk  # noqa: B023

            pr, pl = up(a), up(b)
            plane[ys, xs] = np.where(pr + pl >= 0.5, np.where(pr >= pl, RIGHT, LEFT), 0)
        out[iz == k] = plane

    _in_threads(upsample, np.unique(iz), out.size)
    return out
