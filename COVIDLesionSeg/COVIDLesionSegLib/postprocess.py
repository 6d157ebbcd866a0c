"""Post-processing of a learned infection mask: rules that generalise from one scan to the next.

A 2D network decides slice by slice, so its false positives on healthy lung are small and isolated: specks
on a vessel crossing, a stretch of fissure, partial volume at the diaphragm (docs/default_models.md).
Real COVID-19 opacities are three-dimensional patches of centimetres (Pan et al., Radiology 2020;295:715;
Chung et al., Radiology 2020;295:202) with an attenuation above aerated lung. Five rules, each a
checkpoint setting (``output.postprocess``) chosen on validation data only (never on the external scans):

* ``min_hu``: voxels whose HU (after a Gaussian of ``smoothing_mm``, so single noisy voxels do not
  decide) lies below this are not opacity. Well-aerated lung ends at about -700 HU (Colombi et al.,
  Radiology 2020;296:E86); ground glass starts about 100 HU above the lung around it.
* ``min_rise_hu``: the same floor relative to the scan's own lung: voxels must lie at least this far above
  the median HU of the lung mask. Inflation changes the lung's baseline (expiration raises lung attenuation
  by 100 HU or more), and opacity is defined against the lung around it (Fleischner glossary: "hazy
  increased attenuation").
* ``max_hu``: voxels above this (contrast-filled vessels, calcification, bone at the lung border) are not
  infection either (Gattinoni's non-aerated compartment ends at +100 HU).
* ``min_component_ml``: 3D connected components (26-connected) smaller than this are removed: a
  reportable lesion is a volume, a speck on one or two slices is not.
* ``confirm_hu_threshold``: the result is the engine's Hounsfield-band mask (``hu-threshold``,
  ``infection_hu.py``) restricted to its 3D components that the network marks somewhere, i.e. the network
  used as a false-positive filter of the threshold. The extent is the threshold's; a dense structure the
  network does not recognise as opacity (a vessel bundle, a fissure, dependent density, a nodule) is
  dropped. Measured on the held-out synthetic host, the first combination that a network improved over the
  threshold on (docs/default_models.md, section 7.5).
* ``grow_mm`` (with ``confirm_hu_threshold``): the network's own voxels within this distance of a confirmed
  component join it. The Hounsfield bands find the dense core of an opacity but miss its faint ground-glass
  rim (a radiologist's overlay of a held-out COVID-19 scan: 2.5 % of the lung marked by the threshold against
  8.8 % by a network); the network covers the rim but, on a new scanner, also marks healthy lung far from
  any lesion. Growing only near confirmed cores takes the network's extent where a lesion is and nothing
  elsewhere (docs/default_models.md, section 7.6). Growing into the network's whole connected mask instead
  (hysteresis) was measured and lost: the network's false positives touch the lesions.

The HU rules run first, so that a component is measured by what remains of it; the confirmation runs last,
then the growth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import maximum_filter1d

from .infection_hu import segment_infection_hu
from .preprocessing import bounding_box


@dataclass(frozen=True)
class InfectionPostprocess:
    """Rules applied to a binary infection mask; every default leaves the mask as it is."""

    min_component_ml: float = 0.0
    min_hu: Optional[float] = None
    min_rise_hu: Optional[float] = None
    max_hu: Optional[float] = None
    smoothing_mm: float = 1.0
    confirm_hu_threshold: bool = False
    grow_mm: float = 0.0

    @classmethod
    def from_spec(cls, spec: Optional[Mapping[str, Any]]) -> "InfectionPostprocess":
        if not spec:
            return cls()
        known = set(cls.__dataclass_fields__)
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown post-processing setting(s) {sorted(unknown)}; known: {sorted(known)}")
        rule = cls(**dict(spec))
        if rule.min_component_ml < 0 or rule.smoothing_mm < 0 or rule.grow_mm < 0:
            raise ValueError(f"post-processing sizes must be >= 0, got {rule}")
        if rule.grow_mm > 0 and not rule.confirm_hu_threshold:
            raise ValueError("post-processing grow_mm grows confirmed components: it needs confirm_hu_threshold")
        if rule.min_hu is not None and rule.max_hu is not None and rule.min_hu >= rule.max_hu:
            raise ValueError(f"post-processing min_hu ({rule.min_hu}) must be below max_hu ({rule.max_hu})")
        return rule

    def to_spec(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def is_identity(self) -> bool:
        return (self.min_component_ml <= 0 and self.min_hu is None and self.max_hu is None
                and self.min_rise_hu is None and not self.confirm_hu_threshold)

    def apply(self, mask: np.ndarray, hu: np.ndarray, spacing_zyx: Sequence[float],
              lungs: Optional[np.ndarray] = None, hu_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """The kept part of ``mask`` (bool, same shape as ``hu``); ``lungs`` (the lung mask) is needed for
        ``min_rise_hu`` and ``confirm_hu_threshold``. With ``confirm_hu_threshold`` the result is not a
        subset of ``mask`` but the confirmed components of the Hounsfield-band mask (plus, with ``grow_mm``,
        the network's voxels near them); ``hu_mask`` is that Hounsfield-band mask when the caller has it
        already (``segment_infection_hu(hu, lungs, spacing_zyx)``; a sweep over settings computes it once)."""
        mask = np.asarray(mask, dtype=bool)
        if self.is_identity or not mask.any():
            return mask.copy()
        if self.confirm_hu_threshold and lungs is None:
            raise ValueError("confirm_hu_threshold needs the lung mask")
        out = self._apply_rules(mask, hu, spacing_zyx, lungs)
        if self.confirm_hu_threshold:
            if hu_mask is None:
                hu_mask = segment_infection_hu(hu, lungs, spacing_zyx)
            confirmed = confirmed_components(hu_mask, out)
            out = grown_components(confirmed, out, spacing_zyx, self.grow_mm)
        return out

    def slices_that_matter(self, hu_mask: np.ndarray, spacing_zyx: Sequence[float]) -> Optional[np.ndarray]:
        """The axial slices (bool per z) outside which the network's mask cannot change :meth:`apply`'s
        result, given the Hounsfield-band mask ``hu_mask``; ``None`` when every slice can.

        With ``confirm_hu_threshold`` the result is made of ``hu_mask``'s components and network voxels within
        ``grow_mm`` of them: a slice farther than ``grow_mm`` along z from every ``hu_mask`` voxel cannot
        contribute (one slice more is kept as a margin). The HU rules are voxel-wise; ``min_component_ml``
        measures the network's components across slices, so with it every slice matters. A 2D network then
        runs only these slices (on P001 108 of its 139 lung slices, on a scan with no opacity none).
        """
        if not self.confirm_hu_threshold or self.min_component_ml > 0:
            return None
        has = np.asarray(hu_mask, dtype=bool).any(axis=(1, 2))
        reach = int(math.floor(self.grow_mm / float(spacing_zyx[0]) + 1e-9)) + 1
        return maximum_filter1d(has, size=2 * reach + 1, mode="constant", cval=False)

    def _apply_rules(self, mask: np.ndarray, hu: np.ndarray, spacing_zyx: Sequence[float],
                     lungs: Optional[np.ndarray]) -> np.ndarray:
        """The HU and component rules (all but the confirmation) on a non-empty mask."""
        if (self.min_component_ml <= 0 and self.min_hu is None and self.max_hu is None
                and self.min_rise_hu is None):
            return mask.copy()
        spacing_xyz = tuple(float(s) for s in reversed(spacing_zyx))
        box = bounding_box(mask, [int(math.ceil(3 * self.smoothing_mm / s)) + 1 for s in spacing_zyx])
        kept = mask[box].copy()
        floor = self.min_hu
        if self.min_rise_hu is not None:
            if lungs is None:
                raise ValueError("min_rise_hu needs the lung mask")
            lung_values = np.asarray(hu)[np.asarray(lungs) > 0]
            baseline = float(np.median(lung_values[:: max(1, lung_values.size // 500000)]))
            floor = max(floor if floor is not None else -np.inf, baseline + self.min_rise_hu)
        if floor is not None or self.max_hu is not None:
            img = sitk.GetImageFromArray(np.asarray(hu[box], dtype=np.float32))
            img.SetSpacing(spacing_xyz)
            # GetArrayFromImage copies: a view of a temporary image would dangle once the image is freed.
            smooth = (sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, self.smoothing_mm))
                      if self.smoothing_mm > 0 else np.asarray(hu[box], dtype=np.float32))
            if floor is not None:
                kept &= smooth >= floor
            if self.max_hu is not None:
                kept &= smooth <= self.max_hu
        if self.min_component_ml > 0 and kept.any():
            img = sitk.GetImageFromArray(kept.astype(np.uint8))
            img.SetSpacing(spacing_xyz)
            voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
            labels = sitk.ConnectedComponent(img, True)   # full (26-)connectivity
            min_voxels = int(math.ceil(self.min_component_ml / voxel_ml - 1e-9))
            kept = sitk.GetArrayFromImage(sitk.RelabelComponent(labels, min_voxels)) > 0
        out = np.zeros_like(mask)
        out[box] = kept
        return out


def confirmed_components(candidates: np.ndarray, evidence: np.ndarray) -> np.ndarray:
    """The 3D (26-connected) components of ``candidates`` that overlap ``evidence`` somewhere (bool)."""
    candidates = np.asarray(candidates, dtype=bool)
    out = np.zeros_like(candidates)
    box = bounding_box(candidates)   # components lie inside it: label only the box (a fraction of the scan)
    if box is None:
        return out
    inside = candidates[box]
    hit = inside & np.asarray(evidence, dtype=bool)[box]
    if not hit.any():
        return out
    label_image = sitk.ConnectedComponent(sitk.GetImageFromArray(inside.view(np.uint8)), True)
    # A view of the uint32 labels, used while ``label_image`` lives: a copy was a second box-sized uint32 array
    # (110 MB on P001).
    labels = sitk.GetArrayViewFromImage(label_image)
    keep = np.zeros(int(labels.max()) + 1, dtype=bool)   # a lookup table instead of np.isin's sort
    keep[np.unique(labels[hit])] = True
    keep[0] = False
    out[box] = keep[labels]
    return out


def grown_components(confirmed: np.ndarray, candidates: np.ndarray, spacing_zyx: Sequence[float],
                     grow_mm: float) -> np.ndarray:
    """``confirmed`` plus the voxels of ``candidates`` within ``grow_mm`` (Euclidean, in mm) of it (bool).
    The distance map is computed on the confirmed voxels' bounding box grown by ``grow_mm`` only."""
    confirmed = np.asarray(confirmed, dtype=bool)
    box = bounding_box(confirmed, [int(math.ceil(grow_mm / s)) + 1 for s in spacing_zyx]) if grow_mm > 0 else None
    if box is None:
        return confirmed.copy()
    img = sitk.GetImageFromArray(confirmed[box].astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    distance_image = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False,
                                                  useImageSpacing=True)
    distance = sitk.GetArrayViewFromImage(distance_image)   # a view while the image lives: no second float32 box
    out = confirmed.copy()
    out[box] |= np.asarray(candidates, dtype=bool)[box] & (distance <= grow_mm)
    return out
