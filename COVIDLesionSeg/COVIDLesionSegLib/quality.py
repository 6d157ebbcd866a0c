"""Quality warnings: things about a scan or its result that a reader must see before trusting the numbers.

Each warning has a stable ``code`` (for scripts, the ``warnings`` column of ``results.csv``) and a message
that says what was found, why it matters and what to do. They go into the case's JSON (``"warnings"``), its
notes (printed by the command line, the ``notes`` column), the PDF/HTML report and the Slicer log.

Inputs are on the engine's canonical grid (``volume.py``: array axes (z, y, x) of an LPS image; z = 0 is
the most inferior slice, small x is the patient's right). The checks and why their limits are where they are:

- ``lungs_cut_by_scan_range`` / ``lungs_cut_by_field_of_view``: lung on the first or last slice, or on a side
  of the field of view, over at least 2 % of the lungs' largest cross-section parallel to that face and
  100 mm^2 (a few stray voxels or the end of the trachea at the top slice do not count). The scan then
  does not hold the whole lungs: volumes are too small and the percentages describe the scanned part only
  (COVID-19 opacities favour the lower lobes, so cut bases usually mean a too-low percentage).
- ``thick_slices``: slices thicker than 5 mm (DICOM Slice Thickness, else the slice spacing). Partial-volume
  averaging over thick slices hides small and faint ground-glass opacities and blurs the lung border
  (lungs are read and measured on thin-section reconstructions).
- ``gantry_tilt``, ``uneven_slice_spacing``: from the DICOM slice positions (``io.py``); a tilted series is
  sheared and an unevenly spaced one has no single voxel height, so the voxel grid is approximate.
- ``implausible_lung_volume``: both lungs together below 1.5 L or above 9 L. Adult total lung capacity is
  about 4-8 L and chest CT at full inspiration measures somewhat less (the healthy adults in the shared test
  data: 3.5-3.8 L); far outside that the lung mask has probably failed, the scan is not of the whole chest,
  or it is not an adult's inspiratory scan.
- ``lung_imbalance``: the smaller lung under 60 % of the larger one's volume. Normally the left lung is about
  80-90 % of the right; a larger difference means collapse, effusion, resection or a failed lung mask, and
  the per-lung percentages are then not comparable.
- ``infection_at_image_border``: infection on any face of the image over at least 10 mm^2: the opacity may
  continue outside the scan.
- ``contrast_enhanced``: the DICOM Contrast/Bolus Agent is set, or, from the image, a fifth or more of the
  mediastinal soft tissue between the lungs (anterior 60 % of their depth, middle third of their height) is
  at 150-600 HU, the density of iodinated blood; unenhanced blood and muscle are 30-60 HU. Measured on the
  shared data: 0.3-2.5 % in the four unenhanced scans, 68 % in the enhanced LIDC-IDRI-0001. Contrast raises
  the density of vessels and of perfused lung, so Hounsfield-unit bands (the built-in infection baseline,
  the high-opacity share above -200 HU) read more tissue as opacity.
- ``metal``: at least 0.1 mL denser than 2500 HU. Bone stays below about 2000 HU (and 12-bit CT stops at
  3071); metal (wires, clips, ports, pacemaker leads, implants) causes streak artefacts that look like or
  hide opacities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from . import LABEL_LEFT_LUNG, LABEL_RIGHT_LUNG
from .preprocessing import axis_counts

MAX_SLICE_THICKNESS_MM = 5.0
LUNG_VOLUME_RANGE_ML = (1500.0, 9000.0)
MIN_LUNG_RATIO = 0.6
EDGE_SHARE, EDGE_AREA_MM2 = 0.02, 100.0
INFECTION_EDGE_AREA_MM2 = 10.0
CONTRAST_HU = (150.0, 600.0)
SOFT_TISSUE_HU = (-100.0, 600.0)
CONTRAST_SHARE = 0.20
METAL_HU, METAL_MIN_ML = 2500.0, 0.1

#: Every warning code, in the order the checks run (and the report lists them).
CODES = ("lungs_cut_by_scan_range", "lungs_cut_by_field_of_view", "thick_slices", "gantry_tilt",
         "uneven_slice_spacing", "implausible_lung_volume", "lung_imbalance", "infection_at_image_border",
         "contrast_enhanced", "metal")


@dataclass(frozen=True)
class QualityWarning:
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


# Names of the six faces of the canonical grid, per axis: (low index, high index).
_FACES = (("the lowest slice (the lung bases)", "the highest slice (the lung apices)"),
          ("the front of the field of view", "the back of the field of view"),
          ("the patient's right side of the field of view", "the patient's left side of the field of view"))


def _faces_reached(mask: np.ndarray, spacing_zyx: Sequence[float], min_area_mm2: float,
                   share: float = 0.0) -> list[tuple[int, str]]:
    """(axis, face name) of each face of the grid that ``mask`` reaches over at least ``min_area_mm2`` and
    ``share`` of its largest cross-section parallel to that face."""
    found = []
    for axis, ((low, high), counts) in enumerate(zip(_FACES, axis_counts(mask))):
        pixel_mm2 = float(np.prod([s for a, s in enumerate(spacing_zyx) if a != axis]))
        limit = max(share * counts.max(initial=0), min_area_mm2 / pixel_mm2)
        found += [(axis, name) for name, count in ((low, counts[0]), (high, counts[-1]))
                  if count > 0 and count >= limit]
    return found


def _coverage(lungs: np.ndarray, spacing_zyx) -> list[QualityWarning]:
    faces = _faces_reached(lungs, spacing_zyx, EDGE_AREA_MM2, EDGE_SHARE)   # nonzero = lung
    out = []
    along = [name for axis, name in faces if axis == 0]
    if along:
        out.append(QualityWarning(
            "lungs_cut_by_scan_range",
            f"the lungs reach {' and '.join(along)} of the scan: the scan does not cover the whole lungs, so the "
            "lung volumes are too small and the infected percentages are of the scanned part only (too low when "
            "infected bases are cut off); use a scan from above the apices to below the costophrenic angles"))
    across = [name for axis, name in faces if axis != 0]
    if across:
        out.append(QualityWarning(
            "lungs_cut_by_field_of_view",
            f"the lungs reach {' and '.join(across)}: part of the lungs may lie outside the reconstructed field "
            "of view; volumes and infected percentages are of the part inside it (reconstruct with a larger "
            "field of view)"))
    return out


def _slice_thickness(volume, dicom) -> tuple[float, str]:
    """(mm, where it comes from): DICOM Slice Thickness when present, else the slice spacing."""
    if dicom is not None:
        try:
            return float(dicom.header["SliceThickness"]), "DICOM Slice Thickness"
        except (KeyError, ValueError):
            pass
    return float(volume.spacing_zyx[0]), "slice spacing"


def _contrast_share(hu: np.ndarray, lungs: np.ndarray) -> Optional[float]:
    """Share of the mediastinal soft-tissue voxels at the density of iodinated blood (module docstring), or
    None when the lungs do not frame a mediastinum (one lung missing, lungs touching)."""
    # Slice by slice: whole-scan right/left masks were 0.5 GB on a 1000-slice scan.
    both = np.array([(lungs[k] == LABEL_RIGHT_LUNG).any() and (lungs[k] == LABEL_LEFT_LUNG).any()
                     for k in range(lungs.shape[0])], dtype=bool)
    both_z = np.flatnonzero(both)
    if both_z.size < 3:
        return None
    z0, z1 = int(both_z[0]), int(both_z[-1])
    third = (z1 - z0 + 1) // 3
    dense = total = 0
    for k in range(z0 + third, z1 - third + 1):
        r_cols = np.flatnonzero((lungs[k] == LABEL_RIGHT_LUNG).any(axis=0))
        l_cols = np.flatnonzero((lungs[k] == LABEL_LEFT_LUNG).any(axis=0))
        rows = np.flatnonzero((lungs[k] > 0).any(axis=1))
        if r_cols.size == 0 or l_cols.size == 0 or rows.size == 0:
            continue
        x0, x1 = int(r_cols.max()) + 1, int(l_cols.min())   # between the right lung's medial edge and the left's
        if x1 <= x0:
            continue
        y0 = int(rows[0])
        y1 = y0 + int(0.6 * (int(rows[-1]) - y0 + 1))        # the anterior 60 %: heart and great vessels, not spine
        box = hu[k, y0:y1, x0:x1]
        tissue = (box >= SOFT_TISSUE_HU[0]) & (box < SOFT_TISSUE_HU[1])
        dense += int(np.count_nonzero(tissue & (box >= CONTRAST_HU[0])))
        total += int(np.count_nonzero(tissue))
    return dense / total if total else None


def _contrast_agent(dicom) -> Optional[str]:
    agent = (dicom.header.get("ContrastBolusAgent", "") if dicom is not None else "").strip()
    return agent if agent and agent.upper() not in ("NONE", "NO", "N", "0") else None


def assess(volume, lungs: np.ndarray, infection: Optional[np.ndarray], quantities: Mapping[str, Any],
           dicom=None) -> list[QualityWarning]:
    """The quality warnings of one case (module docstring), in :data:`CODES` order.

    Args:
        volume: the :class:`~.volume.CTVolume` (canonical HU and spacing).
        lungs, infection: canonical masks (``infection`` None when it was not segmented).
        quantities: the case's :func:`~.quantify.quantify` report (lung volumes).
        dicom: the :class:`~.io.DicomSource` when the input was a DICOM series (its header and slice
            geometry); None otherwise (the checks that need it are then skipped).
    """
    spacing = [float(s) for s in volume.spacing_zyx]
    warnings = _coverage(lungs, spacing)

    thickness, where = _slice_thickness(volume, dicom)
    if thickness > MAX_SLICE_THICKNESS_MM:
        warnings.append(QualityWarning(
            "thick_slices",
            f"the slices are {thickness:g} mm thick ({where}), more than {MAX_SLICE_THICKNESS_MM:g} mm: partial-volume "
            "averaging hides small and faint ground-glass opacities and blurs the lung border, so the infection "
            "is likely underestimated; use a thin-slice reconstruction of the same scan if there is one"))
    if dicom is not None:
        tilt_notes = [n for n in dicom.geometry_notes if "gantry tilt" in n]
        if dicom.tilt_deg > 0 or tilt_notes:
            warnings.append(QualityWarning("gantry_tilt", tilt_notes[0] if tilt_notes else
                                           f"gantry tilt of {dicom.tilt_deg:.1f} degrees: the voxel grid is approximate"))
        spacing_notes = [n for n in dicom.geometry_notes if "uneven slice spacing" in n]
        if dicom.uneven_spacing:
            warnings.append(QualityWarning(
                "uneven_slice_spacing", spacing_notes[0] if spacing_notes else
                "the slices are not evenly spaced (the series was resampled onto its true slice positions); "
                "volumes are approximate near the irregular steps"))

    right_ml = float(quantities["right_lung"]["volume_ml"])
    left_ml = float(quantities["left_lung"]["volume_ml"])
    total_ml = right_ml + left_ml
    low, high = LUNG_VOLUME_RANGE_ML
    if not low <= total_ml <= high:
        warnings.append(QualityWarning(
            "implausible_lung_volume",
            f"the lungs measure {total_ml / 1000:.2f} L together, outside the {low / 1000:g}-{high / 1000:g} L of an "
            "adult chest CT at inspiration: check the lung masks (a failed or leaking mask makes every percentage "
            "wrong), whether the scan covers the whole chest, and whether it is an expiratory or a child's scan"))
    larger, smaller = max(right_ml, left_ml), min(right_ml, left_ml)
    if larger > 0 and smaller < MIN_LUNG_RATIO * larger:
        small_side = "left" if left_ml < right_ml else "right"
        warnings.append(QualityWarning(
            "lung_imbalance",
            f"the {small_side} lung ({smaller:.0f} mL) is {100 * smaller / larger:.0f} % of the other's volume "
            f"({larger:.0f} mL); normally the left is about 80-90 % of the right. Collapse, effusion, resection or "
            "a failed lung mask: check the masks before comparing the lungs' percentages"))

    if infection is not None and infection.any():
        faces = _faces_reached(infection, spacing, INFECTION_EDGE_AREA_MM2)
        if faces:
            warnings.append(QualityWarning(
                "infection_at_image_border",
                f"infection reaches {' and '.join(name for _, name in faces)} of the image: the opacity may "
                "continue outside the scan, so its volume is a lower bound"))

    agent = _contrast_agent(dicom)
    share = _contrast_share(volume.hu, lungs)
    if agent is not None or (share is not None and share >= CONTRAST_SHARE):
        found = []
        if agent is not None:
            found.append(f'the DICOM header names a contrast agent ("{agent}")')
        if share is not None and share >= CONTRAST_SHARE:
            found.append(f"{100 * share:.0f} % of the mediastinal soft tissue is at "
                         f"{CONTRAST_HU[0]:g}-{CONTRAST_HU[1]:g} HU, the density of contrast-enhanced blood")
        warnings.append(QualityWarning(
            "contrast_enhanced",
            f"the scan looks contrast-enhanced ({'; '.join(found)}): enhanced vessels and lung read denser, so "
            "Hounsfield-unit based measures (the high-opacity share, the built-in infection baseline) read more "
            "tissue as opacity than on the unenhanced scans they were defined on"))

    hu = volume.hu
    metal_voxels = sum(int(np.count_nonzero(hu[i:i + 32] >= METAL_HU)) for i in range(0, hu.shape[0], 32))
    metal_ml = float(metal_voxels) * volume.voxel_volume_ml
    if metal_ml >= METAL_MIN_ML:
        warnings.append(QualityWarning(
            "metal",
            f"{metal_ml:.1f} mL of the image is denser than {METAL_HU:g} HU (metal: wires, clips, a port, leads or "
            "an implant): its streak artefacts can look like or hide opacities near it; check those slices"))
    return warnings


def codes(warnings: Sequence[Mapping[str, str]]) -> str:
    """The codes of a report's warnings, as the ``warnings`` column of ``results.csv`` holds them."""
    return " ".join(w["code"] for w in warnings)
