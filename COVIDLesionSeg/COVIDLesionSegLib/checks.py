"""Input checks done before any work: is this a 3D chest CT in Hounsfield units? And :func:`load_volume`, the
one path from an input (file, DICOM folder or image) to a checked :class:`~.volume.CTVolume`.

Every failure is an :class:`~.errors.InputError` whose message says what was found and what to do. The most
common silent failure of CT tools is an image already windowed to 0-255 (many public COVID-19 datasets, e.g.
the Radiopaedia volumes of COVID-19-CT-Seg): its "HU" are meaningless. Such an image is refused unless the
user declares the window it was made with (``input_window=(level, width)``), in which case the grey values are
mapped back to approximate HU: ``HU = level - width/2 + value / 255 * width``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .volume import CTVolume

MIN_IN_PLANE = 64        # voxels; smaller images are thumbnails, not diagnostic CT
MIN_SLICES = 5           # a CT volume needs several slices for 3D lung masking
AIR_HU = -500            # anything below is air or lung in HU
MIN_AIR_SHARE = 0.02     # a chest CT has lungs and air around the body: at least 2 % of voxels below -500 HU
# Physical size of the image's longest side. A human chest CT spans 150-500 mm in-plane and up to ~2 m for a
# whole-body scan; a side below 50 mm or above 2.5 m means a spacing in other units (cm, m, um) or missing.
MIN_EXTENT_MM = 50.0
MAX_EXTENT_MM = 2500.0


@dataclass(frozen=True)
class IntensitySummary:
    minimum: float
    maximum: float
    p01: float
    p99: float
    air_share: float       # share of voxels below AIR_HU
    integer_valued: bool


def summarize(array: np.ndarray, max_samples: int = 4_000_000) -> IntensitySummary:
    """Robust intensity statistics on a regular subsample (cheap even for 512 x 512 x 1000 volumes)."""
    flat = array.reshape(-1)
    step = max(1, flat.size // max_samples)
    sample = np.asarray(flat[::step], dtype=np.float64)
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        raise InputError("every voxel of the image is NaN or infinite; the file is damaged or not an image")
    p01, p99 = np.percentile(finite, [1, 99])
    return IntensitySummary(
        minimum=float(np.min(array)), maximum=float(np.max(array)), p01=float(p01), p99=float(p99),
        air_share=float(np.mean(finite < AIR_HU)), integer_valued=bool(np.all(finite == np.round(finite))),
    )


def check_ct(image: sitk.Image, input_window: tuple[float, float] | None = None) -> tuple[sitk.Image, list[str]]:
    """Validate a CT image (input geometry, before reorientation) and return it, possibly converted.

    Args:
        image: the image as read.
        input_window: (level, width) the image was windowed with, for 8-bit images made from HU CT. Without it
            such images are refused.

    Returns:
        the image in HU (int16 or float32) and notes for the user.

    Raises:
        InputError: with the reason and the way out.
    """
    notes = _check_geometry(image)
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise InputError(f"the image has {bad} NaN or infinite voxels; it is damaged or was exported incorrectly")
    stats = summarize(array)
    if stats.maximum == stats.minimum:
        raise InputError(f"every voxel has the same value ({stats.minimum:g}); the image is empty")

    looks_8bit = stats.minimum >= 0 and stats.maximum <= 255 and stats.integer_valued
    if input_window is not None:
        hu, window_note = _from_window(image, stats, looks_8bit, input_window)
        return hu, notes + [window_note]
    _check_hounsfield(stats, looks_8bit)
    return image, notes


def _check_geometry(image: sitk.Image) -> list[str]:
    """One scalar 3D volume, large enough, with a spacing a chest CT can have; returns the notes."""
    notes: list[str] = []
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"the image has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector "
            "image, e.g. a screenshot or a rendered view); a CT in Hounsfield units has one"
        )
    size = image.GetSize()
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and min(size) == 1):
        raise InputError(
            f"the image is 2D (size {tuple(size)}); this tool segments 3D CT volumes. For a DICOM series give "
            "the folder that holds all its slices"
        )
    if image.GetDimension() != 3:
        raise InputError(f"the image is {image.GetDimension()}D; a 3D CT volume is needed")
    if min(size[:2]) < MIN_IN_PLANE or size[2] < MIN_SLICES:
        raise InputError(
            f"the image is too small to be a chest CT ({size[0]} x {size[1]} voxels x {size[2]} slices; at least "
            f"{MIN_IN_PLANE} x {MIN_IN_PLANE} x {MIN_SLICES} are needed)"
        )
    if min(image.GetSpacing()) <= 0:
        raise InputError(f"the voxel spacing {image.GetSpacing()} is not positive; the file's header is broken")
    extent = [n * s for n, s in zip(size, image.GetSpacing(), strict=True)]
    if not MIN_EXTENT_MM <= max(extent) <= MAX_EXTENT_MM:
        raise InputError(
            f"the image's physical extent is {' x '.join(f'{e:.3g}' for e in extent)} mm (size {tuple(size)} x "
            f"spacing {tuple(float(f'{s:.4g}') for s in image.GetSpacing())} mm), impossible for a chest CT: the "
            "voxel spacing in the header is missing or in other units (cm, m, um). Export the scan again from "
            "the DICOM, or fix the spacing (e.g. Slicer's Volumes module, Volume Information)")
    if np.allclose(image.GetSpacing(), 1.0, rtol=0, atol=1e-9):
        notes.append("the voxel spacing is exactly 1 x 1 x 1 mm, the value of files saved without a spacing; if "
                     "the scan's real spacing differs, every volume in mL is wrong: check the file's header")
    return notes


def _from_window(image: sitk.Image, stats: IntensitySummary, looks_8bit: bool,
                 input_window: tuple[float, float]) -> tuple[sitk.Image, str]:
    """An 8-bit image mapped back to approximate HU with the window it was made with, and the note saying so."""
    if not looks_8bit:
        raise InputError(
            f"an input window was given, but the image is not 8-bit grey values (range {stats.minimum:g} to "
            f"{stats.maximum:g}); leave the window option out for CT in Hounsfield units"
        )
    level, width = (float(v) for v in input_window)
    if width <= 0:
        raise InputError(f"the input window width must be positive, got {width:g}")
    hu = sitk.Cast(image, sitk.sitkFloat32) * (width / 255.0) + (level - width / 2.0)
    return hu, (f"grey values 0-255 mapped back to HU with the declared window (level {level:g}, width {width:g}); "
                "results are approximate")


def _check_hounsfield(stats: IntensitySummary, looks_8bit: bool) -> None:
    """Refuse intensities that cannot be CT in Hounsfield units (windowed, no rescale, no air, no tissue)."""
    if looks_8bit:
        raise InputError(
            f"the image looks already windowed to 0-255 (values {stats.minimum:g} to {stats.maximum:g}), not CT in "
            "Hounsfield units: lungs and infection cannot be told apart on it reliably. Use the original DICOM or "
            "NIfTI in HU, or, if you know the window the image was made with, declare it "
            "(command line: --input-window LEVEL,WIDTH, e.g. --input-window -600,1500)"
        )
    if stats.minimum >= 0 and stats.p99 > 900 and stats.air_share == 0:
        raise InputError(
            f"no voxel is below 0 (values {stats.minimum:g} to {stats.maximum:g}): this looks like CT stored without "
            "its rescale intercept (HU = value - 1024) or not CT at all. Convert it to Hounsfield units first"
        )
    if stats.air_share < MIN_AIR_SHARE or stats.p01 > AIR_HU:
        raise InputError(
            f"this does not look like a chest CT in Hounsfield units: only {100 * stats.air_share:.2f} % of voxels "
            f"are below {AIR_HU} HU (1st percentile {stats.p01:g}); a chest CT has air-filled lungs. Check that the "
            "file is a CT (not MR or PET) and in HU"
        )
    if stats.p99 < 0:
        raise InputError(
            f"99 % of voxels are below 0 (values {stats.minimum:g} to {stats.maximum:g}): there is no body tissue; "
            "this is not a chest CT in Hounsfield units"
        )


def load_volume(source: str | os.PathLike | sitk.Image, *, name: Optional[str] = None,
                source_label: Optional[str] = None, input_window: tuple[float, float] | None = None,
                allow_slice_gaps: bool = False, notes: Sequence[str] = (),
                on_progress: Optional[Callable[[str, float, str], None]] = None,
                timings: Optional[dict[str, float]] = None) -> CTVolume:
    """The one path from an input to the engine's volume: read -> :func:`check_ct` -> :class:`~.volume.CTVolume`.

    Every entry point takes it (the command line and batch through ``Pipeline.segment_file``, the Slicer worker,
    the in-process Slicer logic, the training package's host scans), so a check added to :func:`check_ct` or a
    reader fixed in ``io.py`` holds for all of them. As lungmask's ``LMInferer.apply`` does, it takes either
    what to read or an image already in memory.

    Args:
        source: a file or DICOM folder (read with :func:`~.io.read_image`), or a SimpleITK image (a volume node's
            image in Slicer), used as it is.
        name: case name for the outputs (default: from the file name; "CT" for an image).
        source_label: where it came from, for the report (default: the path).
        input_window: (level, width) of an 8-bit image, see :func:`check_ct`.
        allow_slice_gaps: read a DICOM series with missing slices, interpolating them (:func:`~.io.read_image`).
        notes: notes known before reading (they come first in the volume's notes).
        on_progress: ``(stage, fraction, message)``, told when the "read" and "check" stages start.
        timings: receives the seconds of the "read" and "check" stages.

    Returns:
        the volume; ``volume.dicom`` is the :class:`~.io.DicomSource` of a DICOM folder (None otherwise).

    Raises:
        InputError: the input cannot be read or is not a chest CT in Hounsfield units (the message says why).
    """
    from . import io

    timings = {} if timings is None else timings
    notes = list(notes)
    dicom = None
    if isinstance(source, sitk.Image):
        image = source
        name = name or "CT"
    else:
        start = time.perf_counter()
        if on_progress is not None:
            on_progress("read", 0.0, f"reading {os.path.basename(os.fspath(source))}")
        image, read_notes, dicom = io.read_input(source, allow_slice_gaps=allow_slice_gaps)
        notes += read_notes
        timings["read"] = time.perf_counter() - start
        name = name or io.case_name(source)
        source_label = str(source) if source_label is None else source_label
    start = time.perf_counter()
    if on_progress is not None:
        on_progress("check", 0.0, "checking the image")
    image, check_notes = check_ct(image, input_window)
    volume = CTVolume.from_image(image, name=name, source=source_label or "", notes=notes + check_notes)
    volume.dicom = dicom
    timings["check"] = time.perf_counter() - start
    return volume


def as_binary_mask(mask: np.ndarray, name: str) -> np.ndarray:
    """Return ``mask`` as a bool array, refusing anything that is not a boolean or 0/1 mask (one helper for
    metrics, writers and quantification)."""
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi > 1:
            raise ValueError(
                f"{name} must be a boolean or 0/1 mask, found values in [{lo}, {hi}]; select one label first "
                f"(e.g. labelmap == 3 for infection)")
        return arr.astype(bool)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError(
                f"{name} must be a boolean or 0/1 mask but holds other values (probabilities?); threshold it "
                f"first (e.g. prob >= 0.5)")
        return arr.astype(bool)
    raise ValueError(f"{name} has unsupported dtype {arr.dtype}; expected bool or a 0/1 integer array")
