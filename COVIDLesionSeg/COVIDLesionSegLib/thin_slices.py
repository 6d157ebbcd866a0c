"""Thin-slice scans: the infection model runs on slabs of consecutive slices at least 1.25 mm thick.

Why: on a scan of slices thinner than :data:`THIN_SLICE_MM` (a 512 x 512 x 1000 scan of 0.3 mm slices, say)
the infection step is where time and memory go: the built-in model smooths and thresholds every voxel at
full resolution, a 2D network runs once per slice, and the post-processing labels and measures distances on
the whole lung box. None of that resolves more along z than the grids the models decide on: the built-in
model makes its decisions on a 1.25 mm grid (``infection_hu.WORKING_SPACING_MM``) and the shipped networks
were trained on 1-2.5 mm slices. So :func:`slab_factor` groups every ``k`` consecutive slices (``k`` the
largest with ``k x spacing <= 1.25 mm``; 0.3 mm -> 4, 0.625 mm -> 2, 1 mm and up -> 1, unchanged), the
infection model runs on their mean (what the scanner would have reconstructed as one thicker slice: the mean
of HU is the HU of the thicker slab, and its noise is lower), and its mask comes back to every thin slice of
its slab, cut to that slice's own lung mask, so the infection never leaves the lungs and the lung borders
keep the scan's resolution. The case's notes say so (:func:`note`). The lungs and the quantification always
use every slice.

The mean is computed slab by slab (a float32 temporary of one slice), so the only new full-size array is
the returned mask. A last slab of fewer than ``k`` slices (``nz`` not a multiple of
``k``) is the mean of those it has and sits on the regular grid like the others: its centre is at most
``(k - 1) / 2`` thin slices off, within the slab's own thickness.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from .volume import CTVolume

#: Slices thinner than this are grouped into slabs at most this thick (module docstring); 1.25 mm is the
#: built-in infection model's working grid.
THIN_SLICE_MM = 1.25


def slab_factor(slice_spacing_mm: float) -> int:
    """How many consecutive slices make one slab: the largest ``k`` with ``k x spacing <= THIN_SLICE_MM``
    (at least 1: 2 mm -> 1, 1.25 mm -> 1, 1 mm -> 1, 0.625 mm -> 2, 0.5 mm -> 2, 0.3 mm -> 4)."""
    return max(1, int(math.floor(THIN_SLICE_MM / float(slice_spacing_mm) + 1e-6)))


def slab_slices(nz: int, k: int) -> list[slice]:
    """The thin slices of each slab, in order: ``k`` at a time, the last one what remains."""
    return [slice(start, min(nz, start + k)) for start in range(0, nz, k)]


def thick_slabs(volume: CTVolume, lungs: np.ndarray, k: int) -> tuple[CTVolume, np.ndarray]:
    """The scan as slabs of ``k`` slices (their mean HU, the input's pixel type) and the lung labels of each
    slab's middle slice: what the infection model runs on (module docstring)."""
    if k < 2:
        raise ValueError(f"a slab factor of {k} leaves the scan as it is; call this only for k >= 2")
    hu = volume.hu
    nz = hu.shape[0]
    slabs = slab_slices(nz, k)
    out = np.empty((len(slabs),) + hu.shape[1:], dtype=hu.dtype)
    integer = np.issubdtype(hu.dtype, np.integer)
    for i, s in enumerate(slabs):
        mean = hu[s].mean(axis=0, dtype=np.float32)
        out[i] = np.rint(mean) if integer else mean
    middle = np.array([(s.start + s.stop - 1) // 2 for s in slabs])
    image = sitk.GetImageFromArray(out)
    spacing = list(volume.image.GetSpacing())
    spacing[2] *= k
    image.SetSpacing(spacing)
    image.SetDirection(volume.image.GetDirection())
    # The first slab's centre: halfway between its first and last thin slice.
    image.SetOrigin(volume.image.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, (k - 1) / 2.0)))
    thick = CTVolume.from_image(image, name=volume.name, source=volume.source)
    return thick, np.ascontiguousarray(np.asarray(lungs)[middle])


def to_thin_slices(mask: np.ndarray, k: int, lungs: np.ndarray) -> np.ndarray:
    """A slab mask (bool, one slice per slab) on every thin slice of its slab, inside that slice's lungs."""
    lungs = np.asarray(lungs)
    out = np.repeat(np.asarray(mask, dtype=bool), k, axis=0)[:lungs.shape[0]]
    np.logical_and(out, lungs, out=out)
    return out


def note(slice_spacing_mm: float, k: int) -> str:
    """The case note of a run on slabs."""
    return (f"thin slices ({slice_spacing_mm:.2f} mm): the infection model ran on slabs of {k} slices "
            f"({k * slice_spacing_mm:.2f} mm, their mean HU) and each slab's mask was applied to its slices inside "
            "their own lung mask; the lungs and the measurements used every slice")
