"""Non-learned COVID-19 infection baseline: Hounsfield-unit bands inside the lungs, with vessels removed.

This is the engine's reference method that needs no trained weights (model id ``hu-threshold``). It marks
lung voxels whose (lightly smoothed) density lies in the ground-glass or consolidation band and that belong
to blob-like, not thin tubular, structures.

Hounsfield bands (typical clinical values):

* normally aerated lung parenchyma about -900 to -700 HU; Colombi et al., Radiology 2020;296:E86-E96
  ("Well-aerated lung on admitting chest CT to predict adverse outcome in COVID-19 pneumonia":
  well-aerated lung = -950 to -700 HU) and the classic CT
  compartments of Gattinoni et al. (Am J Respir Crit Care Med 2001;164:1701: normally aerated -900 to -500,
  poorly aerated -500 to -100, non-aerated -100 to +100 HU);
* ground-glass opacity (GGO), hazy increased density that does not obscure vessel margins (Fleischner
  glossary, Hansell et al., Radiology 2008;246:697): :data:`GGO_BAND_HU` = [-700, -300) HU. The lower
  bound is where Colombi's well-aerated lung ends; -300 HU splits Gattinoni's poorly aerated compartment
  into its airier part (ground glass) and its denser part, which reads as consolidation;
* consolidation, density that obscures vessels and airway walls: :data:`CONSOLIDATION_BAND_HU` =
  [-300, +100] HU: Gattinoni's non-aerated lung (-100 to +100 HU) extended down to -300 HU so that the two
  bands meet. Lanza et al. (Eur Radiol 2020;30:6770) quantify COVID-19 "compromised lung" as -500 to
  +100 HU, which lies inside the union of the two bands.

The bands are applied to smoothed HU, so thin structures are judged by their mean density, not by single
noisy voxels. The upper bound (+100 HU) leaves out calcification and contrast-filled vessels.

Pipeline (each step is a choice between published alternatives; why is given):

1. **Crop** to the bounding box of the lung mask (+ a margin for the filters): every later step runs on
   roughly half of the CT. Steps 3-6 (the structural decisions) then run on a grid of
   :data:`WORKING_SPACING_MM` (1.25 mm; linear resampling of the smoothed HU, axes coarser than that are
   kept), which makes them ~3x cheaper for 0.75 mm pixels and lets the ball kernels match their radii in
   mm (2.5 mm = 2 voxels); the final mask is that decision upsampled (nearest neighbour) and intersected
   with the full-resolution band and lung mask, so infection borders keep the CT's resolution.
2. **Smooth** the HU with a Gaussian of :data:`SMOOTHING_SIGMA_MM` (1 mm per axis, in mm so that anisotropic
   voxels are treated alike): sharp reconstruction kernels give voxel noise of 30-100 HU, enough to push
   normal parenchyma (-850 HU) into the GGO band. A Gaussian is separable (fast on 2 cores) where a 3D median
   of the same support is not.
3. **Erode the lung mask** by :data:`PLEURA_MARGIN_MM` (2 mm): the lung-mask border is a partial-volume mix of
   lung and pleura / chest wall / mediastinum whose intermediate HU would otherwise be read as GGO along the
   whole lung surface.
4. **Band**: voxels inside the eroded lungs with smoothed HU in [-700, +100].
5. **Remove vessels**, in two parts because vessels of different calibre look different after smoothing:

   a. *Large vessels* keep a dense core (smoothed HU >= -300, the consolidation band): dense voxels are
      opened with a ball of :data:`CONSOLIDATION_MIN_RADIUS_MM` (4 mm). What survives is consolidation at
      least ~8 mm thick (COVID-19 consolidations are patchy, rounded or subpleural areas of centimetres:
      Pan et al., Radiology 2020;295:715; Chung et al., Radiology 2020;295:202); the dense voxels that do
      not survive are tubes (vessels up to ~8 mm, bronchial walls, fissures). They are removed together
      with a :data:`VESSEL_HALO_MM` (2 mm) shell, the partial-volume halo that a dense tube leaves in the
      ground-glass band.
   b. *Small vessels* (2-3 mm) have no dense core left after smoothing: they are ~4 mm tubes in the
      ground-glass band. The remaining band mask is opened with a ball of
      :data:`VESSEL_OPENING_RADIUS_MM` (2.5 mm); an opening keeps exactly the parts that can contain the
      ball, so everything thinner than 5 mm in some cross-section disappears (small vessels, their halos,
      noise specks, fissures) while opacity patches survive.

   A Hessian vesselness filter (Frangi et al., MICCAI 1998; ``sitk.ObjectnessMeasure``) is the usual
   alternative; it was not chosen because it needs the full 3D Hessian at several scales (six float images
   of the crop per scale: tens of seconds and gigabytes on 2 cores for a 512x512x150 CT) and because it also
   answers on the tube-like edges of elongated consolidation and on fissures next to GGO. Known limits of
   the openings: vessels wider than ~8 mm near the hila survive (where the lung mask reaches them), and
   consolidation thinner than ~8 mm is only kept where ground glass surrounds it.
6. **Remove small components** below :data:`MIN_COMPONENT_ML` (0.1 mL, about a 6 mm ball): fragments left
   by the openings where vessels branch (branch points are locally thick) are not reportable lesions.

Measured on the two COVID-CT-MD scans of ``../shared/data/ct`` (``Testing/engine/test_infection_hu.py``;
slice-level = "some infection voxel on the slice" against the radiologists' per-slice labels):

* with the test's crude threshold lung mask (it leaves dense subpleural consolidation outside the lungs):
  P001 14.6 mL = 0.24 % of the lungs, normal001 0.16 mL = 0.005 %; slice-level sensitivity 0.63,
  specificity 0.96 (P001: 50 of 80 infected slices found, 6 of 68 clean slices flagged; normal001: 3 of
  154 slices flagged);
* with ``lungs.segment_lungs`` (its version at the time of writing): P001 0.40 %, normal001 0.06 %;
  sensitivity 0.86, specificity 0.91.

Faint ground glass only ~100 HU above normal parenchyma (-750 HU and below) is missed by design: lowering
the band to -750 HU raised the slice sensitivity to 0.99 but cut the specificity to 0.69 (normal001: 43
of 154 slices flagged; ``segment_lungs`` masks, during development). Run time: about 1.5 s for P001
(512x512x148) on 2 threads; the ball erosion, dilations and openings are ITK's kernels computed from distance
maps (:mod:`.morphology`, the same voxels as ITK's binary morphology filters in half the time).

Output: a bool array on the input grid, True only inside ``lungs > 0``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .morphology import ball_dilate, ball_erode, ball_open
from .preprocessing import bounding_box
from .progress import ProgressCallback, report
from .volume import stable_spacing

GGO_BAND_HU = (-700.0, -300.0)
CONSOLIDATION_BAND_HU = (-300.0, 100.0)
SMOOTHING_SIGMA_MM = 1.0
PLEURA_MARGIN_MM = 2.0
VESSEL_OPENING_RADIUS_MM = 2.5
CONSOLIDATION_MIN_RADIUS_MM = 4.0
VESSEL_HALO_MM = 2.0
FRINGE_MM = 1.5
MIN_COMPONENT_ML = 0.1
WORKING_SPACING_MM = 1.25
#: The fast mode's grid for the decisions (``segment_infection_hu(fast=True)``): the lung mask's 2 mm.
FAST_WORKING_SPACING_MM = 2.0
#: The full-resolution steps run in axial slabs of at most this many voxels (float32: 4 bytes each, and
#: ITK's smoothing holds a few such images): 32 M voxels is a 512 x 512 x 120 crop, so the lung crop of an
#: ordinary scan (about 150-250 slices) is one slab and that of a 1000-slice scan takes about five.
SLAB_VOXELS = 32_000_000
#: Extra slices smoothed on each side of a slab: the recursive Gaussian's response has decayed below float32
#: rounding of HU values by then (sigma 1 mm; 12 sigma), so a slab's core is smoothed as in the whole crop.
SLAB_HALO_MM = 12.0


def _radius_voxels(radius_mm: float, spacing_xyz: Sequence[float]) -> list[int]:
    """Per-axis kernel radius (SimpleITK x, y, z order) approximating a ball of ``radius_mm``."""
    return [max(0, int(round(radius_mm / s))) for s in spacing_xyz]


def _check_inputs(hu: np.ndarray, lungs: np.ndarray, spacing_zyx: Sequence[float]) -> tuple[float, float, float]:
    if hu.ndim != 3:
        raise ValueError(f"expected a 3D CT array (z, y, x), got shape {hu.shape}")
    if lungs.shape != hu.shape:
        raise ValueError(f"lung mask shape {lungs.shape} does not match the CT shape {hu.shape}")
    sp = stable_spacing(spacing_zyx)  # kernel radii are rounded from mm: 1e-14 noise must not flip them
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing_zyx must be three positive voxel sizes in mm (z, y, x), got {spacing_zyx}")
    return sp  # type: ignore[return-value]


def segment_infection_hu(hu: np.ndarray, lungs: np.ndarray, spacing_zyx: Sequence[float],
                         progress: Optional[ProgressCallback] = None, fast: bool = False,
                         slab_voxels: int = SLAB_VOXELS) -> np.ndarray:
    """Infection mask from Hounsfield bands inside the lungs (method in the module docstring).

    Args:
        hu: CT in Hounsfield units, (z, y, x) array in canonical LPS orientation (``CTVolume.hu``).
        lungs: lung labelmap of the same shape (0 background, 1 right lung, 2 left lung; any non-zero
            value counts as lung).
        spacing_zyx: voxel size in mm in array axis order.
        progress: optional ``callback(fraction, message)``; it may raise ``Cancelled`` between steps.
        fast: the fast mode: the decisions (steps 3-6) on a grid of :data:`FAST_WORKING_SPACING_MM`
            instead of :data:`WORKING_SPACING_MM` (the lung mask's 2 mm); smoothing and the band test stay
            at full resolution. The cost in accuracy is measured in ``docs/default_models.md`` section 8.
        slab_voxels: the full-resolution steps (the float32 crop, its smoothing, the band test, the
            resampling to the working grid) run in axial slabs of at most about this many voxels, each
            with :data:`SLAB_HALO_MM` of extra slices on both sides for the smoothing, so memory stays
            bounded on 1000-slice scans. A scan whose crop fits runs as one slab; the slabs give the same
            mask (``test_slabs_give_the_unsplit_result``).

    Returns:
        bool array of the CT's shape; True = infection (ground glass or consolidation). Empty when the lung
        mask is empty.
    """
    hu = np.asarray(hu)
    lungs = np.asarray(lungs)
    sp_zyx = _check_inputs(hu, lungs, spacing_zyx)
    spacing_xyz = tuple(reversed(sp_zyx))
    out = np.zeros(hu.shape, dtype=bool)
    # Margin so that the Gaussian does not see the crop edge inside the lungs (3 sigma).
    margin = [int(math.ceil(3 * SMOOTHING_SIGMA_MM / s)) + 1 for s in sp_zyx]
    box = bounding_box(lungs, margin)
    if box is None:
        report(progress, 1.0, "no lungs: no infection")
        return out

    report(progress, 0.0, "cropping to the lungs")
    lung_full = lungs[box] > 0     # the crop only: no full-size temporary
    crop = hu[box]

    # Structure decisions (erosion, openings, components) on a grid of about WORKING_SPACING_MM: the
    # kernels are a few voxels there and the grid has ~3x fewer voxels than 0.75 mm pixels, which is what
    # makes a 512x512x150 CT take seconds. Boundaries come back from the full-resolution band at the end.
    size_xyz = [int(n) for n in reversed(crop.shape)]
    grid = _working_grid(size_xyz, spacing_xyz, FAST_WORKING_SPACING_MM if fast else WORKING_SPACING_MM)
    smooth_np = np.empty(sitk.GetArrayViewFromImage(grid).shape, np.float32)
    lung_np = np.empty(smooth_np.shape, np.float32)
    in_band_full = np.empty(crop.shape, bool)
    report(progress, 0.1, "smoothing")
    for core, region, rows in _slabs(crop.shape, sp_zyx, grid, slab_voxels):
        # The slab goes to ITK as it is stored (int16 for HU) and is cast there (multithreaded, one copy
        # fewer); only its core's smoothed values are kept, the halo's are the slab edge's.
        smooth_img = sitk.SmoothingRecursiveGaussian(
            sitk.Cast(_image(crop[region], spacing_xyz, region.start * sp_zyx[0]), sitk.sitkFloat32),
            SMOOTHING_SIGMA_MM)  # sigma in mm
        smooth_view = sitk.GetArrayViewFromImage(smooth_img)[core.start - region.start:core.stop - region.start]
        in_band_full[core] = (smooth_view >= GGO_BAND_HU[0]) & (smooth_view <= CONSOLIDATION_BAND_HU[1])
        if rows.stop > rows.start:
            sub = _rows_of(grid, rows)
            # (Views only of images held by a name: a view of a temporary image dangles once it is freed.)
            resampled = sitk.Resample(smooth_img, sub, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
            smooth_np[rows] = sitk.GetArrayViewFromImage(resampled)
            # Linear interpolation of the 0/1 mask, computed in double by ITK from uint8 as from float32
            # (the same fractions), without a float32 copy of the crop.
            lung_img = _image(lung_full[region].view(np.uint8), spacing_xyz, region.start * sp_zyx[0])
            resampled = sitk.Resample(lung_img, sub, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            lung_np[rows] = sitk.GetArrayViewFromImage(resampled)
            del resampled, lung_img
        del smooth_img, smooth_view
    smooth = _like(smooth_np, grid)
    lung_frac = _like(lung_np, grid)
    lung_low = sitk.BinaryThreshold(lung_frac, 0.5, 2.0, 1, 0)
    del smooth_np, lung_np, lung_frac
    kept = _decide(smooth, lung_low, progress)

    report(progress, 0.9, "back to full resolution")
    kept_full = sitk.Resample(kept, size_xyz, sitk.Transform(), sitk.sitkNearestNeighbor, (0.0, 0.0, 0.0),
                              spacing_xyz, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), 0, sitk.sitkUInt8)
    # In place: no crop-sized temporaries (they count on 1000-slice scans).
    np.logical_and(in_band_full, lung_full, out=in_band_full)
    np.logical_and(in_band_full, sitk.GetArrayViewFromImage(kept_full).view(bool), out=in_band_full)
    del kept_full
    out[box] = in_band_full
    report(progress, 1.0, "infection baseline done")
    return out


def _decide(smooth: sitk.Image, lung_low: sitk.Image, progress: Optional[ProgressCallback]) -> sitk.Image:
    """Steps 3-6 of the module docstring on the working grid: the kept opacity (uint8 image).

    The erosion, dilations and openings use ITK's ball kernels through distance maps (:mod:`.morphology`: the
    same voxels as ``sitk.BinaryErode``/``BinaryDilate``/``BinaryMorphologicalOpening`` with ``sitkBall``, in
    about half the time)."""
    low_spacing = lung_low.GetSpacing()

    def radius(mm: float) -> list[int]:          # ITK's per-axis radius (x, y, z), in array order (z, y, x)
        return _radius_voxels(mm, low_spacing)[::-1]

    smooth_np = sitk.GetArrayViewFromImage(smooth)
    lung = sitk.GetArrayViewFromImage(lung_low).astype(bool)
    report(progress, 0.25, "eroding the lung boundary")
    # Lungs touching the crop/array edge are eroded there too (the border counts as background).
    eroded = ball_erode(lung, radius(PLEURA_MARGIN_MM), border_is_foreground=False)

    report(progress, 0.4, "Hounsfield bands")
    band = (smooth_np >= GGO_BAND_HU[0]) & (smooth_np <= CONSOLIDATION_BAND_HU[1]) & eroded
    # Dense voxels over the whole (uneroded) lung, so that vessels entering at the hilum get their halo too.
    dense = (smooth_np >= CONSOLIDATION_BAND_HU[0]) & lung
    del eroded, lung

    report(progress, 0.5, "removing large vessels")
    thick = ball_open(dense, radius(CONSOLIDATION_MIN_RADIUS_MM))
    # The ball opening trims a voxel-wide fringe off every consolidation (kernel discretisation); give the
    # fringe back (dense voxels within FRINGE_MM of the kept part) so that it is not taken for vessels
    # whose halo would then eat the consolidation's border.
    thick = ball_dilate(thick, radius(FRINGE_MM)) & dense
    tubes = dense & ~thick
    halo = ball_dilate(tubes, radius(VESSEL_HALO_MM))
    # The halo may reach into thick consolidation next to a vessel: keep the consolidation.
    band &= ~(halo & ~thick)
    del thick, tubes, halo, dense

    report(progress, 0.65, "removing small vessels")
    opened = sitk.GetImageFromArray(ball_open(band, radius(VESSEL_OPENING_RADIUS_MM)).view(np.uint8))
    opened.CopyInformation(lung_low)

    report(progress, 0.8, "removing small components")
    low_voxel_ml = float(np.prod(low_spacing)) / 1000.0
    components = sitk.ConnectedComponent(opened, True)  # full (26-)connectivity
    return sitk.Cast(sitk.RelabelComponent(components, int(math.ceil(MIN_COMPONENT_ML / low_voxel_ml))) > 0,
                     sitk.sitkUInt8)


def _slabs(shape: Sequence[int], sp_zyx: Sequence[float], grid: sitk.Image, slab_voxels: int):
    """Axial slabs of the full-resolution crop: (core, region, rows) per slab.

    ``core`` (full-resolution slices) partition the crop; ``region`` is the core plus SLAB_HALO_MM of slices
    on each side (what is smoothed); ``rows`` are the working-grid slices whose linear interpolation reads
    full-resolution slices inside the core (plus the next one, inside the halo), so each working slice is
    resampled from exactly one slab.
    """
    nz = int(shape[0])
    per_slice = int(np.prod(shape[1:]))
    halo = int(math.ceil(SLAB_HALO_MM / sp_zyx[0]))
    size = max(1, int(slab_voxels) // per_slice - 2 * halo)
    if nz * per_slice <= slab_voxels:
        size = nz
    # Full-resolution slice (continuous index, origin 0) of each working slice centre, and the slab holding it.
    n_rows = grid.GetSize()[2]
    centre = (grid.GetOrigin()[2] + np.arange(n_rows) * grid.GetSpacing()[2]) / sp_zyx[0]
    first = np.clip(np.floor(centre), 0, nz - 1).astype(int)
    for start in range(0, nz, size):
        stop = min(nz, start + size)
        core = slice(start, stop)
        region = slice(max(0, start - halo), min(nz, stop + halo))
        inside = np.flatnonzero((first >= start) & (first < stop))
        rows = slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0)
        yield core, region, rows


def _rows_of(grid: sitk.Image, rows: slice) -> sitk.Image:
    """The working-grid slices ``rows`` as an image of their own (same spacing, shifted origin)."""
    size = list(grid.GetSize())
    size[2] = rows.stop - rows.start
    sub = sitk.Image(size, sitk.sitkUInt8)
    sub.SetSpacing(grid.GetSpacing())
    sub.SetOrigin(grid.TransformIndexToPhysicalPoint((0, 0, rows.start)))
    sub.SetDirection(grid.GetDirection())
    return sub


def _like(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    return image


def _working_grid(size_xyz: Sequence[int], spacing_xyz: Sequence[float],
                  working_spacing_mm: float = WORKING_SPACING_MM) -> sitk.Image:
    """An empty image covering the crop's physical extent (crop coordinates: origin 0, identity direction)
    with voxels of about ``working_spacing_mm``.

    Axes already coarser than that (e.g. 2 mm slices) keep their spacing and grid.
    """
    spacing = np.array(spacing_xyz, dtype=float)
    size = np.array(size_xyz)
    new_spacing = np.maximum(spacing, working_spacing_mm)
    new_size = np.maximum(1, np.ceil(size * spacing / new_spacing - 1e-6)).astype(int)
    # Same outer edge of the first voxel: origin is a voxel centre, so shift by half a voxel difference.
    origin = (new_spacing - spacing) / 2.0
    grid = sitk.Image([int(n) for n in new_size], sitk.sitkUInt8)
    grid.SetSpacing([float(v) for v in new_spacing])
    grid.SetOrigin([float(v) for v in origin])
    return grid


def _image(array: np.ndarray, spacing_xyz: Sequence[float], z0_mm: float = 0.0) -> sitk.Image:
    """The crop (or slab) as an image: crop coordinates (origin 0), a slab starting ``z0_mm`` along z."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(spacing_xyz))
    if z0_mm:
        image.SetOrigin((0.0, 0.0, float(z0_mm)))
    return image


def band_fractions(hu: np.ndarray, infection: np.ndarray) -> dict[str, float]:
    """Share of an infection mask in the ground-glass and in the consolidation band (raw HU).

    Useful for reports: COVID-19 opacities are mostly ground glass early and consolidate later.
    """
    inf = np.asarray(infection, dtype=bool)
    n = int(np.count_nonzero(inf))
    if n == 0:
        return {"ggo": float("nan"), "consolidation": float("nan")}
    values = np.asarray(hu)[inf]
    ggo = np.count_nonzero(values < GGO_BAND_HU[1])
    return {"ggo": ggo / n, "consolidation": (n - ggo) / n}
