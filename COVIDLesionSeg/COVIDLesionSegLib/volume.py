"""A CT volume in the engine's canonical orientation, and the exact way back to the input's geometry.

Every algorithm and model in the engine sees arrays in one orientation, so that "right lung" is decided
by anatomy (the image's direction matrix), never by how a file happened to store its axes:

    array axes (z, y, x) of an LPS-oriented image:
      x (last axis)   increases towards the patient's Left      -> the right lung has the smaller x
      y               increases towards Posterior                -> ventral = small y, dorsal = large y
      z (first axis)  increases towards Superior                 -> z = 0 is the most inferior slice

Reorientation is a permutation and flip of axes (``sitk.DICOMOrient``), so it loses nothing and is
exactly invertible; residual obliqueness stays in the direction matrix. Outputs are mapped back with
:meth:`CTVolume.to_input_geometry`, which restores the input's size, spacing, origin and direction bit
for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

CANONICAL_ORIENTATION = "LPS"


def stable_spacing(spacing) -> tuple[float, ...]:
    """Voxel spacing as the algorithms use it: each value rounded to the nearest float32 (returned as floats).

    Why: the algorithms turn millimetres into whole voxels (block factors, kernel radii with ``round``) and
    compare distance maps with thresholds in mm (``depth > 2.0``, ``distance <= 10.0``). Header spacings such
    as 2.0, 4.0 or 8.0 mm sit exactly on those ties, so the 1e-14 mm of floating-point noise that a format
    conversion, a resample or a different reader adds used to flip a kernel radius or a distance test and
    move a lung by ~2-4 mL and the infection by up to ~12 mL (issue 11, item 3). Rounding to float32 (the
    precision NIfTI stores, ~1e-7 relative: 0.1 um on a 1 mm voxel) maps every such representation of one
    header value to the same number, so results are bit-identical; the volumes it changes are far below the
    reported 0.001 mL. Output files keep the input's exact geometry (:meth:`CTVolume.to_input_geometry`).
    """
    return tuple(float(np.float32(s)) for s in spacing)


def orientation_code(image: sitk.Image) -> str:
    """Three-letter DICOM orientation code of an image (e.g. "LPS", "RAI")."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


@dataclass
class CTVolume:
    """A 3D CT in Hounsfield units, reoriented to canonical LPS.

    Attributes:
        image: the canonical SimpleITK image (float32 or int16 pixels, HU).
        input_geometry: the input's size, spacing, origin and direction, used to map results back.
        name: case name used for output files.
        source: where it was read from (path or DICOM folder), for reports.
        notes: warnings found while reading (gantry tilt, uneven spacing, ...), shown to the user.
        dicom: the DICOM series it was read from (``io.DicomSource``: files, header, tilt), None otherwise;
            DICOM SEG/SR outputs reference it.
    """

    image: sitk.Image
    input_geometry: "Geometry"
    name: str = "case"
    source: str = ""
    notes: list[str] = field(default_factory=list)
    dicom: Any = field(default=None, repr=False)
    _array: np.ndarray | None = field(default=None, repr=False)
    _released: "Geometry | None" = field(default=None, repr=False)   # the canonical geometry, pixels freed

    @classmethod
    def from_image(cls, image: sitk.Image, name: str = "case", source: str = "",
                   notes: list[str] | None = None) -> "CTVolume":
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
        # An image stored in the canonical orientation already (most scans) is used as it is: DICOMOrient
        # would copy it (524 MB for a 512 x 512 x 1000 int16 scan) to change nothing.
        canonical = (image if orientation_code(image) == CANONICAL_ORIENTATION
                     else sitk.DICOMOrient(image, CANONICAL_ORIENTATION))
        return cls(image=canonical, input_geometry=Geometry.of(image), name=name, source=source,
                   notes=list(notes or []))

    def release_pixels(self) -> None:
        """Free the pixels; the geometry stays, and with it everything the outputs and the report need
        (:meth:`to_input_array`, :meth:`to_input_geometry`, ``shape``, ``spacing_zyx``). ``hu`` raises after."""
        if self.image is not None:
            self._released = Geometry.of(self.image)
        self._array = None
        self.image = None  # type: ignore[assignment]

    @property
    def hu(self) -> np.ndarray:
        """(z, y, x) array view of the canonical image (not a copy: do not modify in place)."""
        if self.image is None:
            raise RuntimeError(f"the pixels of {self.name} were released after its segmentation")
        if self._array is None:
            self._array = sitk.GetArrayViewFromImage(self.image)
        return self._array

    @property
    def shape(self) -> tuple[int, int, int]:
        size = self._released.size if self.image is None else self.image.GetSize()
        return tuple(reversed(size))  # type: ignore[return-value]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel spacing in mm in array axis order (z, y, x), as the algorithms use it (:func:`stable_spacing`)."""
        spacing = self._released.spacing if self.image is None else self.image.GetSpacing()
        return stable_spacing(reversed(spacing))  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing_zyx)) / 1000.0

    def canonical_image_from_array(self, array: np.ndarray) -> sitk.Image:
        """Wrap a (z, y, x) array computed on the canonical grid as an image with canonical geometry."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {array.shape} does not match the volume {self.shape}")
        out = sitk.GetImageFromArray(array)
        if self.image is None:
            self._released.apply_to(out)
        else:
            out.CopyInformation(self.image)
        return out

    def to_input_array(self, array: np.ndarray) -> np.ndarray:
        """A canonical (z, y, x) result as a (z, y, x) array on the input's grid: ``array`` itself when the
        input is stored in the canonical orientation (most scans: no copy of the volume), otherwise the
        array of :meth:`to_input_geometry`."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {array.shape} does not match the volume {self.shape}")
        if self.input_geometry.orientation == CANONICAL_ORIENTATION:
            return array
        return sitk.GetArrayFromImage(self.to_input_geometry(array))

    def to_input_geometry(self, array: np.ndarray) -> sitk.Image:
        """Map a canonical (z, y, x) result back onto the input's exact grid (size, spacing, origin, direction)."""
        canonical = self.canonical_image_from_array(array)
        back = sitk.DICOMOrient(canonical, self.input_geometry.orientation)
        if back.GetSize() != self.input_geometry.size:  # pragma: no cover - invariant of DICOMOrient
            raise RuntimeError("reorientation did not restore the input size")
        # DICOMOrient recomputes the origin in floating point; the grid is identical, so copy the input's
        # geometry to make it bit-exact rather than equal to 1e-12.
        self.input_geometry.apply_to(back)
        return back


@dataclass(frozen=True)
class Geometry:
    """Size, spacing, origin and direction of an image (ITK/LPS conventions), without its pixels."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    @property
    def orientation(self) -> str:
        return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(self.direction)

    def apply_to(self, image: sitk.Image) -> None:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def matches(self, image: sitk.Image, tol: float = 1e-6) -> bool:
        other = Geometry.of(image)
        return (other.size == self.size
                and np.allclose(other.spacing, self.spacing, atol=tol)
                and np.allclose(other.origin, self.origin, atol=tol)
                and np.allclose(other.direction, self.direction, atol=tol))
