"""Intensity transforms named in checkpoint input specs, and the geometric helpers of the network predictor.

One implementation for inference and training: ``training/`` imports these functions, so a network sees
at inference exactly the intensities it was trained on.

Intensity transforms
--------------------
Each transform is a pure function ``f(array, **params) -> float32 array`` of a float32 array in Hounsfield
units (HU). A checkpoint's input spec names one, with its parameters, e.g.
``{"name": "hu_window_01", "lo": -1250, "hi": 250}``; :func:`apply_intensity` dispatches by name.

- ``ct_zscore``: nnU-Net's CT normalisation (used by the 3D U-Nets of 000/001/002, which all follow
  nnU-Net's preprocessing): clip to the [0.5, 99.5] percentiles of the *foreground* (label) voxels of the
  training set, then subtract the foreground mean and divide by the foreground standard deviation. The
  four numbers are dataset statistics; :func:`fit_ct_zscore` computes them and the spec stores them.
- ``hu_window_01``: clip to a HU window [lo, hi] and scale to [0, 1]; nCoVSegNet (003) normalises its
  inputs "to (0,1)" and crops the lungs first; the window is the reading that makes a fixed (0,1) scaling
  of HU CT well defined.
- ``mu_sigma``: ``(x - mu) / sigma`` with 004's mu = -500, sigma = 500 (its Section 3, preprocessing).
- ``ctseg2d_domain``: maps HU CT into the domain of the shared 2D COVID-19-CT-Seg slices
  (``covid19ctseg2d.npz``), see :func:`ctseg2d_domain`.

Geometry
--------
The engine's canonical array is LPS (``volume.py``): x (last axis) grows towards the patient's left,
y towards posterior. An axial canonical slice ``hu[z]`` indexed ``[y, x]`` and shown with row 0 at the top
therefore has the anterior side at the top and the patient's right (small x) on the image's left: it is
already in *radiological display* orientation, the orientation of the shared 2D slice data sets. No flip is
needed; :func:`axial_display_slices` documents (and tests pin down) this, and can produce the neurological
convention (left on the left) by flipping x for data made that way.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# Intensity transforms
# ----------------------------------------------------------------------------------------------------------

#: OpenCV's ``createCLAHE(clipLimit=7)`` expressed as scikit-image's ``equalize_adapthist(clip_limit=...)``.
#: OpenCV clips each tile histogram (256 bins) at ``clipLimit * tile_pixels / 256``, i.e. ``clipLimit``
#: times the mean bin count; scikit-image clips at ``clip_limit * kernel_pixels`` (its ``_clahe``:
#: ``clim = int(clip_limit * kernel_elements)``) with ``nbins=256``. Equal absolute clip counts need
#: ``clip_limit = clipLimit / 256``. OpenCV's default 8x8 tile grid is scikit-image's default kernel of
#: 1/8 of each image side, so the tiles match too.
CTSEG2D_CLIP_LIMIT = 7.0 / 256.0

#: HU window applied before the per-slice min-max stretch of :func:`ctseg2d_domain` (see its docstring).
CTSEG2D_WINDOW = (-1024.0, 1500.0)


def _as_float32(array: Any) -> np.ndarray:
    out = np.asarray(array, dtype=np.float32)
    return out


def ct_zscore(array: np.ndarray, *, mean: float, std: float, lower: float, upper: float) -> np.ndarray:
    """nnU-Net CT normalisation: ``(clip(x, lower, upper) - mean) / std``.

    ``lower``/``upper`` are the 0.5 and 99.5 percentiles and ``mean``/``std`` the mean and standard
    deviation of the foreground voxels of the training data (:func:`fit_ct_zscore`); nnU-Net computes the
    mean and std on the unclipped foreground intensities, and so does this project.
    """
    if not std > 0:
        raise ValueError(f"ct_zscore: std must be > 0, got {std}")
    if not lower <= upper:
        raise ValueError(f"ct_zscore: lower ({lower}) must not exceed upper ({upper})")
    x = np.clip(_as_float32(array), lower, upper)
    x -= np.float32(mean)
    x /= np.float32(std)
    return x


def fit_ct_zscore(foreground_values: np.ndarray | Sequence[np.ndarray]) -> dict[str, float]:
    """Parameters of :func:`ct_zscore` from the foreground (label) voxel intensities of a training set.

    Accepts one array or a sequence of arrays (one per case). Returns ``{"mean", "std", "lower", "upper"}``
    ready to store in an input spec (``{"name": "ct_zscore", **params}``).
    """
    if isinstance(foreground_values, np.ndarray):
        values = foreground_values.ravel()
    else:
        values = np.concatenate([np.asarray(v).ravel() for v in foreground_values]) if len(foreground_values) else np.array([])
    if values.size == 0:
        raise ValueError("fit_ct_zscore: no foreground voxels given (are the label masks empty?)")
    values = values.astype(np.float64)
    lower, upper = np.percentile(values, [0.5, 99.5])
    return {"mean": float(values.mean()), "std": float(max(values.std(), 1e-8)),
            "lower": float(lower), "upper": float(upper)}


def hu_window_01(array: np.ndarray, *, lo: float, hi: float) -> np.ndarray:
    """Clip to the HU window ``[lo, hi]`` and scale linearly to [0, 1] (nCoVSegNet's "(0,1)" inputs)."""
    if not hi > lo:
        raise ValueError(f"hu_window_01: hi ({hi}) must be greater than lo ({lo})")
    x = np.clip(_as_float32(array), lo, hi)
    x -= np.float32(lo)
    x /= np.float32(hi - lo)
    return x


def mu_sigma(array: np.ndarray, *, mu: float = -500.0, sigma: float = 500.0) -> np.ndarray:
    """``(x - mu) / sigma``; 004 normalises its HU inputs with mu = -500, sigma = 500."""
    if not sigma > 0:
        raise ValueError(f"mu_sigma: sigma must be > 0, got {sigma}")
    x = _as_float32(array) - np.float32(mu)
    x /= np.float32(sigma)
    return x


def ctseg2d_domain(array: np.ndarray, *, window: Sequence[float] = CTSEG2D_WINDOW, size: int = 256,
                   clip_limit: float = CTSEG2D_CLIP_LIMIT, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    """Map HU CT slices into the intensity domain of the shared 2D COVID-19-CT-Seg slices.

    The slices of ``covid19ctseg2d.npz`` were made (by a third party) from the 20 COVID-19-CT-Seg volumes:
    each axial slice resized to 256 x 256, min-max stretched to 0..255 and CLAHE-enhanced with OpenCV
    (clip limit 7, default 8 x 8 tiles). This function repeats those steps on HU slices:

    1. clip to ``window`` (HU),
    2. resize each slice to ``size`` x ``size`` (bilinear, no anti-aliasing, like ``cv2.resize``) when it
       is not that size already (the network predictor resizes before calling this),
    3. per-slice min-max stretch to [0, 1] and 8-bit quantisation (the source stored ``uint8``),
    4. CLAHE with scikit-image at ``clip_limit`` (:data:`CTSEG2D_CLIP_LIMIT` = 7/256 is OpenCV's
       ``clipLimit=7``), 256 bins, 8 x 8 tiles, quantised to 0..255 again,
    5. ``(v / 255 - mean) / std`` (defaults: plain ``/255``; a model may store its own normalisation).

    The window. The coronacases volumes were HU CT, and the stretch was per slice, so the question is which
    range was stretched. Measured on the shared data (see ``Testing/engine/test_preprocessing.py``): with
    the full stored range (no window) the soft tissue around the lungs and the share of saturated pixels
    of real HU scans (COVID-CT-MD P001, normal001, LIDC-0001) match the coronacases slices (groups 0-7)
    closely - ring of tissue around the lungs, percentiles 5/25/50/75/95 = 103/144/173/197/229 for
    normal001 vs 98/143/174/199/232 in the 2D data; pixels >= 250: 0.13 % vs 0.14 % - while a lung
    window (e.g. [-1000, 400]) saturates all bone (1.2-1.8 % of pixels >= 250, about 10x too many) and
    brightens soft tissue far beyond the data. So the data were stretched over (almost) the full HU range,
    as the public Kaggle notebooks behind this data set do (min-max of the raw slice). The default window
    [-1024, 1500] keeps that behaviour for ordinary scans (their per-slice maxima, cortical bone, are
    1100-1550 HU) while making it robust: padding below air (-2048/-3024 outside the reconstruction
    circle) and metal or out-of-range values (LIDC-0001 reaches 3071) no longer compress the stretch.

    Args:
        array: one HU slice ``(h, w)`` or a stack ``(n, h, w)``.
    Returns:
        float32 ``(size, size)`` or ``(n, size, size)``.
    """
    from skimage import exposure

    x = _as_float32(array)
    if x.ndim not in (2, 3):
        raise ValueError(f"ctseg2d_domain expects a slice (h, w) or a stack (n, h, w), got shape {x.shape}")
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"ctseg2d_domain: window {window} must be increasing")
    if not std > 0:
        raise ValueError(f"ctseg2d_domain: std must be > 0, got {std}")
    stack = x[None] if x.ndim == 2 else x
    stack = np.clip(stack, lo, hi)
    if stack.shape[1:] != (size, size):
        stack = resize_slices(stack, (size, size), mode="bilinear")
    out = np.empty((stack.shape[0], size, size), dtype=np.float32)
    for i, s in enumerate(stack):
        smin, smax = float(s.min()), float(s.max())
        u8 = np.round((s - smin) * (255.0 / max(smax - smin, 1e-6)))
        # CLAHE on the 8-bit image as OpenCV did; equalize_adapthist rescales its input to its own range,
        # which for a stretched slice is 0..255 already.
        eq = exposure.equalize_adapthist(u8 / 255.0, clip_limit=clip_limit, nbins=256)
        out[i] = np.round(eq * 255.0)
    out /= np.float32(255.0)
    if mean != 0.0 or std != 1.0:
        out -= np.float32(mean)
        out /= np.float32(std)
    return out[0] if x.ndim == 2 else out


#: Intensity transforms by the name used in checkpoint input specs.
INTENSITY_TRANSFORMS: dict[str, Callable[..., np.ndarray]] = {
    "ct_zscore": ct_zscore,
    "hu_window_01": hu_window_01,
    "mu_sigma": mu_sigma,
    "ctseg2d_domain": ctseg2d_domain,
}

#: Transforms that work slice by slice (2D only); the others are voxel-wise and work in 2D and 3D.
SLICE_WISE_TRANSFORMS = frozenset({"ctseg2d_domain"})


def _split_spec(spec: Mapping[str, Any]) -> tuple[str, Callable[..., np.ndarray], dict[str, Any]]:
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"an intensity spec is a dict with a 'name' key (one of {sorted(INTENSITY_TRANSFORMS)}), "
                         f"got {spec!r}")
    name = spec["name"]
    if name not in INTENSITY_TRANSFORMS:
        raise ValueError(f"unknown intensity transform {name!r}; known: {', '.join(sorted(INTENSITY_TRANSFORMS))}")
    return name, INTENSITY_TRANSFORMS[name], {k: v for k, v in spec.items() if k != "name"}


def validate_intensity_spec(spec: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` when ``spec`` names an unknown transform or has missing/unexpected parameters."""
    name, fn, params = _split_spec(spec)
    try:
        inspect.signature(fn).bind(np.zeros((1, 1), np.float32), **params)
    except TypeError as exc:
        raise ValueError(f"intensity transform {name!r}: bad parameters {sorted(params)}: {exc}") from None


def apply_intensity(array: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """Apply the intensity transform named by ``spec["name"]`` with the spec's other keys as parameters."""
    name, fn, params = _split_spec(spec)
    validate_intensity_spec(spec)
    return fn(array, **params)


# ----------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------

def axial_display_slices(canonical: np.ndarray, indices: Sequence[int] | np.ndarray | slice | None = None,
                         convention: str = "radiological") -> np.ndarray:
    """Axial slices ``(n, y, x)`` of a canonical LPS ``(z, y, x)`` array in display orientation.

    ``radiological`` (patient right on the image's left, anterior at the top: the 2D data sets' orientation)
    is the canonical layout itself, so this returns ``canonical[indices]`` without a flip. ``neurological``
    (patient left on the image's left) flips x.
    """
    sel = canonical if indices is None else canonical[indices]
    if convention == "radiological":
        return sel
    if convention == "neurological":
        return sel[..., ::-1]
    raise ValueError(f"unknown display convention {convention!r}; use 'radiological' or 'neurological'")


def _float_tensor(data: Any) -> tuple[Any, bool]:
    """``(tensor, was_numpy)``: numpy arrays become float32 tensors (copied only when read-only, e.g. a view of
    a SimpleITK image, which torch cannot wrap); tensors pass through."""
    import torch

    if isinstance(data, torch.Tensor):
        return data, False
    array = np.ascontiguousarray(data, dtype=np.float32)
    return torch.from_numpy(array if array.flags.writeable else array.copy()), True


def _interpolate(t: Any, size: tuple[int, ...], mode: str, linear: str) -> Any:
    """Resize the trailing spatial dims of ``t`` (N, C, *spatial): ``linear`` (half-pixel centres) or nearest."""
    import torch.nn.functional as F

    if tuple(t.shape[-len(size):]) == size:
        return t
    if not t.is_floating_point():
        t = t.float()
    if mode == linear:
        return F.interpolate(t, size=size, mode=linear, align_corners=False)
    if mode == "nearest":
        return F.interpolate(t, size=size, mode="nearest-exact")
    raise ValueError(f"unknown resize mode {mode!r}; use {linear!r} or 'nearest'")


def resize_slices(slices: Any, size: Sequence[int], mode: str = "bilinear") -> Any:
    """Resize a stack of slices ``(n, h, w)`` or ``(n, c, h, w)`` to ``size = (h', w')``.

    ``bilinear`` (for images and probabilities, half-pixel centres like ``cv2.resize``, no anti-aliasing)
    or ``nearest`` (for labels). Accepts numpy arrays (returns float32 numpy) or torch tensors (returns a
    tensor on the same device), so the predictor can resize on the GPU.
    """
    size = (int(size[0]), int(size[1]))
    t, is_numpy = _float_tensor(slices)
    if t.ndim not in (3, 4):
        raise ValueError(f"resize_slices expects (n, h, w) or (n, c, h, w), got shape {tuple(t.shape)}")
    squeeze = t.ndim == 3
    t = _interpolate(t[:, None] if squeeze else t, size, mode, "bilinear")
    if squeeze:
        t = t[:, 0]
    return t.numpy().astype(np.float32, copy=False) if is_numpy else t


def square_padding(h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((top, bottom), (left, right))`` that centre an ``h x w`` slice in a square of side ``max(h, w)``."""
    side = max(h, w)
    return ((side - h) // 2, side - h - (side - h) // 2), ((side - w) // 2, side - w - (side - w) // 2)


def pad_to_square(slices: np.ndarray, value: float = -1024.0) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Pad a stack ``(n, h, w)`` to ``(n, s, s)``, ``s = max(h, w)``, with ``value`` (air in HU), and return
    the ``(rows, cols)`` slices that cut the original back out.

    Why: the 2D networks see whole axial slices resized to a square (the COVID-19-CT-Seg slices were square
    512 x 512 reconstructions). A scan cropped to the body (e.g. 429 x 225) would otherwise be stretched
    two-fold in one direction, a shape no training slice had; padding keeps the anatomy's proportions.
    """
    slices = np.asarray(slices)
    (t, b), (le, r) = square_padding(*slices.shape[-2:])
    if t == b == le == r == 0:
        return slices, (slice(None), slice(None))
    padded = np.pad(slices, ((0, 0), (t, b), (le, r)), constant_values=value)
    return padded, (slice(t, t + slices.shape[-2]), slice(le, le + slices.shape[-1]))


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """Grid size after resampling ``shape`` at ``spacing`` to ``new_spacing`` (same physical extent)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))


def resize_volume(volume: Any, shape: Sequence[int], mode: str = "trilinear") -> Any:
    """Resize a ``(d, h, w)`` or ``(c, d, h, w)`` volume (numpy or torch) to ``shape = (d', h', w')``.

    Trilinear with half-voxel centres (``align_corners=False``): the grids share their outer boundary,
    which is what resampling between spacings over the same physical extent means. ``nearest`` for labels.
    """
    shape = tuple(int(s) for s in shape)
    t, is_numpy = _float_tensor(volume)
    if t.ndim not in (3, 4):
        raise ValueError(f"resize_volume expects (d, h, w) or (c, d, h, w), got shape {tuple(t.shape)}")
    squeeze = t.ndim == 3
    t = _interpolate(t[None, None] if squeeze else t[None], shape, mode, "trilinear")
    t = t[0, 0] if squeeze else t[0]
    return t.numpy().astype(np.float32, copy=False) if is_numpy else t


def axis_counts(mask: np.ndarray, step: int = 32) -> tuple[np.ndarray, ...]:
    """Nonzero voxels of a 3D array per index of each axis: ``(per z, per y, per x)``, counted ``step``
    slices at a time (``np.count_nonzero(a, axis=...)`` converts a whole non-bool array to bool first)."""
    counts = [np.zeros(n, dtype=np.int64) for n in mask.shape]
    for start in range(0, mask.shape[0], step):
        part = np.asarray(mask[start:start + step]) != 0
        counts[0][start:start + len(part)] = np.count_nonzero(part, axis=(1, 2))
        counts[1] += np.count_nonzero(part, axis=(0, 2))
        counts[2] += np.count_nonzero(part, axis=(0, 1))
    return tuple(counts)


def bounding_box(mask: np.ndarray, margin: Sequence[int] | int = 0) -> tuple[slice, ...] | None:
    """Smallest box (tuple of slices) holding every nonzero voxel of ``mask``, grown by ``margin`` voxels
    per axis and clipped to the array; ``None`` when the mask is empty."""
    if not np.any(mask):
        return None
    margins = [int(margin)] * mask.ndim if np.isscalar(margin) else [int(m) for m in margin]  # type: ignore[arg-type]
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(np.any(mask, axis=other))
        box.append(slice(max(0, int(idx[0]) - margins[axis]), min(mask.shape[axis], int(idx[-1]) + 1 + margins[axis])))
    return tuple(box)


def margin_voxels(margin_mm: float, spacing: Sequence[float]) -> tuple[int, ...]:
    """A physical margin in mm as whole voxels per axis (rounded up)."""
    return tuple(int(math.ceil(margin_mm / float(s))) for s in spacing)
