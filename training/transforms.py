"""MONAI dictionary transforms and the papers' preprocessing / augmentation pipelines.

Items are dicts from :meth:`training.datasets.Case.to_dict` (or :func:`training.datasets.load_case`).
Every pipeline starts with :class:`LoadCased` and ends with tensors ``image`` (float32, ``(C, ...)``) and one
float32 {0, 1} mask per target key, plus ``id`` and ``group``. Intensity transforms are the engine's
(``COVIDLesionSegLib.preprocessing``): one implementation for training and inference.

Pipelines (factories return a ``monai.transforms.Compose``; ``seed`` makes the random ones repeatable):

- :func:`nnunet_3d_transforms` - 000/001/002 (nnU-Net-style 3D U-Nets): resampling to the data set's
  target spacing (:func:`nnunet_target_spacing`), nnU-Net's CT z-score (engine ``ct_zscore``; parameters
  from :func:`fit_zscore`), patches with 1/3 foreground oversampling, nnU-Net-like augmentation.
- :func:`slice_2d_transforms` - generic 2D slice pipeline (e.g. the shared 2D COVID-19-CT-Seg slices, or
  HU slices mapped into their domain with the engine's ``ctseg2d_domain``).
- :func:`bizopoulos_004_transforms` - 004 exactly: flips, rotation +-180 deg, scale 0.5-1.5 with zero
  padding; normalisation mu = -500, sigma = 500 for HU (or per-slice for 8-bit data); lesion B masking.
- :func:`ncovsegnet_transforms` (+ :func:`multiscale_batch`) - 003: lung bounding-box crop, (0, 1) inputs,
  flips, random crop, multi-scale training {0.75, 1, 1.25}, 3-channel input for the ResNet-50 backbone.

Labels are always resampled / rotated with nearest-neighbour interpolation, so they stay binary.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleCropd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    SpatialPadd,
)

from COVIDLesionSegLib import preprocessing as engine_pre
from training.datasets.base import Case, load_case

#: 004's normalisation of HU inputs (its Section 3): ``(x - mu) / sigma``.
MU_SIGMA_004 = {"name": "mu_sigma", "mu": -500.0, "sigma": 500.0}
#: nCoVSegNet's "(0, 1)" inputs from HU: the lung window [-1250, 250] of COVID-19-CT-Seg's Radiopaedia
#: volumes scaled to [0, 1] (engine ``hu_window_01``).
NCOVSEGNET_WINDOW_01 = {"name": "hu_window_01", "lo": -1250.0, "hi": 250.0}
#: nCoVSegNet's multi-scale training rates (003, Section 4.2).
MULTISCALE_RATES = (0.75, 1.0, 1.25)
#: The 2D data sets' intensity domain: 8-bit images to [0, 1], the same scale ``ctseg2d_domain`` outputs.
UINT8_01 = "uint8_01"


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------

class LoadCased(MapTransform):
    """Load ``item["case"]`` (a :class:`~training.datasets.Case`) into arrays with
    :func:`~training.datasets.load_case`; items that already hold an array ``image`` pass through."""

    def __init__(self, targets: Sequence[str] | None = None, restore_hu: bool = True, missing: str = "error"):
        super().__init__(keys=("case",), allow_missing_keys=True)
        self.targets, self.restore_hu, self.missing = targets, restore_hu, missing

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        case = d.get("case")
        if isinstance(case, Case):
            loaded = load_case(case, self.targets, restore_hu=self.restore_hu, missing=self.missing)
            d = {k: v for k, v in d.items() if k != "case"}
            d.update(loaded)
        elif not isinstance(d.get("image"), (np.ndarray, torch.Tensor)):
            raise ValueError("LoadCased needs an item with a 'case' (Case) or an array 'image'")
        return d


def _intensity_fn(intensity: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    if intensity is None:
        return None
    if intensity == UINT8_01:
        return lambda x: np.asarray(x, dtype=np.float32) / np.float32(255.0)
    if isinstance(intensity, Mapping):
        engine_pre.validate_intensity_spec(intensity)
        spec = dict(intensity)
        return lambda x: engine_pre.apply_intensity(x, spec)
    if callable(intensity):
        return intensity
    raise ValueError(f"intensity must be None, {UINT8_01!r}, an engine spec dict (one of "
                     f"{sorted(engine_pre.INTENSITY_TRANSFORMS)}) or a callable, got {intensity!r}")


class Intensityd(MapTransform):
    """Apply an intensity transform to each channel of ``keys``: an engine spec such as
    ``{"name": "ct_zscore", **fit_zscore(...)}`` (see ``preprocessing.INTENSITY_TRANSFORMS``),
    :data:`UINT8_01`, or any callable ``f(array) -> array``. Slice-wise engine transforms
    (``ctseg2d_domain``) need 2D items already at their output size (resize first, as the engine's
    predictor does)."""

    def __init__(self, keys: Sequence[str] = ("image",), intensity: Any = None):
        super().__init__(keys)
        self.fn = _intensity_fn(intensity)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if self.fn is None:
            return d
        for key in self.key_iterator(d):
            arr = np.asarray(d[key].cpu() if isinstance(d[key], torch.Tensor) else d[key], dtype=np.float32)
            out = np.stack([np.asarray(self.fn(ch), dtype=np.float32) for ch in arr])
            if out.shape != arr.shape:
                raise ValueError(f"intensity transform changed the shape of {key!r} from {arr.shape} to {out.shape}; "
                                 "resize the item to the transform's output size first")
            d[key] = out
        return d


class ResampleToSpacingd(MapTransform):
    """Resample channel-first volumes to ``target_spacing`` (mm, array axis order) with the engine's
    ``resize_volume``: trilinear for ``keys`` (images), nearest for ``label_keys``. Reads and updates
    ``item["spacing"]``. nnU-Net resamples images with third-order splines; trilinear is the engine's
    (and inference's) choice, and costs far less on the CPU."""

    def __init__(self, keys: Sequence[str], target_spacing: Sequence[float], label_keys: Sequence[str] = ()):
        super().__init__(list(keys) + list(label_keys), allow_missing_keys=True)
        self.image_keys, self.label_keys = list(keys), list(label_keys)
        self.target = tuple(float(s) for s in target_spacing)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        spacing = d.get("spacing")
        if spacing is None or len(spacing) != len(self.target):
            raise ValueError(f"ResampleToSpacingd needs item['spacing'] with {len(self.target)} values, got {spacing!r}")
        first = np.asarray(d[self.image_keys[0]])
        shape = engine_pre.resampled_shape(first.shape[1:], spacing, self.target)
        for key in self.image_keys:
            if key in d:
                d[key] = _resize(d[key], shape, "trilinear" if first.ndim == 4 else "bilinear")
        for key in self.label_keys:
            if key in d:
                d[key] = (_resize(d[key], shape, "nearest") > 0.5).astype(np.uint8)
        d["spacing"] = self.target
        return d


def _resize(arr: Any, shape: Sequence[int], mode: str) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 4:
        return engine_pre.resize_volume(a, shape, mode="nearest" if mode == "nearest" else "trilinear")
    return engine_pre.resize_slices(a, shape, mode="nearest" if mode == "nearest" else "bilinear")


class CropToLungBoxd(MapTransform):
    """Crop ``keys`` to the bounding box of the lungs plus ``margin`` voxels (nCoVSegNet, 003 Section 4.1:
    "based on the 3D lung mask, we determine a bounding box ... to crop the 3D region of the lung").

    The lung mask is ``item[lung_key]`` when present; otherwise, for a 3D HU volume, the engine's
    unsupervised lung segmentation (``lungs.segment_lungs``, standing in for Liao et al.'s unsupervised
    method the paper uses). 2D items without a lung mask are left as they are, with a note; so are
    items whose lung mask is empty.
    """

    def __init__(self, keys: Sequence[str], lung_key: str | None = "lung", margin: int | Sequence[int] = 8):
        super().__init__(keys, allow_missing_keys=True)
        self.lung_key, self.margin = lung_key, margin

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        image = np.asarray(d["image"])
        if self.lung_key and self.lung_key in d:
            lung = np.asarray(d[self.lung_key])[0] > 0
        elif image.ndim == 4:
            from COVIDLesionSegLib.lungs import segment_lungs

            lung = segment_lungs(image[0], tuple(d.get("spacing", (1.0, 1.0, 1.0)))) > 0
        else:
            d.setdefault("notes", []).append("no lung mask: lung box crop skipped")
            return d
        box = engine_pre.bounding_box(lung, self.margin)
        if box is None:
            d.setdefault("notes", []).append("empty lung mask: lung box crop skipped")
            return d
        for key in self.key_iterator(d):
            d[key] = np.asarray(d[key])[(slice(None),) + box]
        d["lung_box"] = tuple((s.start, s.stop) for s in box)
        return d


class MaskInputd(MapTransform):
    """Multiply the image by a mask (004's lesion B: "the corresponding lung mask is also applied in the
    input image"). Applied after normalisation, so everything outside the lungs is 0 - the same value the
    augmentation's zero padding gives."""

    def __init__(self, mask_key: str = "lung", image_key: str = "image"):
        super().__init__((image_key,))
        self.mask_key, self.image_key = mask_key, image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if self.mask_key not in d:
            raise KeyError(f"MaskInputd: the item has no {self.mask_key!r} mask (load it as a target)")
        d[self.image_key] = np.asarray(d[self.image_key], dtype=np.float32) * (np.asarray(d[self.mask_key]) > 0)
        return d


class RepeatChanneld(MapTransform):
    """Repeat a 1-channel image to ``n`` channels (ImageNet-style 3-channel backbones: 003, 004)."""

    def __init__(self, keys: Sequence[str] = ("image",), n: int = 3):
        super().__init__(keys)
        self.n = int(n)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            d[key] = x.repeat(self.n, *([1] * (x.ndim - 1))) if isinstance(x, torch.Tensor) else \
                np.repeat(np.asarray(x), self.n, axis=0)
        return d


class Finalized(MapTransform):
    """Last step of every pipeline: float32 tensors for the image and {0, 1} float32 masks, and only keys
    that collate into a batch (``id``, ``group``, ``<target>_missing``)."""

    def __init__(self, label_keys: Sequence[str], image_key: str = "image", extra: Sequence[str] = ()):
        super().__init__([image_key] + list(label_keys))
        self.image_key, self.label_keys, self.extra = image_key, list(label_keys), list(extra)
        self._to_tensor = EnsureTyped(keys=[image_key] + list(label_keys), data_type="tensor", dtype=torch.float32,
                                      track_meta=False)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        keep = [self.image_key] + self.label_keys + ["id", "group"] + self.extra + \
            [f"{k}_missing" for k in self.label_keys]
        d = {k: data[k] for k in keep if k in data}
        missing = [k for k in [self.image_key] + self.label_keys if k not in d]
        if missing:
            raise KeyError(f"item {data.get('id', '?')!r} lacks {missing}; load these targets")
        for k in self.label_keys:
            if f"{k}_missing" not in d:
                d[f"{k}_missing"] = False
        d = self._to_tensor(d)
        for k in self.label_keys:
            d[k] = (d[k] > 0.5).to(torch.float32)
        return d


def _seeded(transforms: list, seed: int | None) -> Compose:
    c = Compose(transforms)
    if seed is not None:
        c.set_random_state(seed=seed)
    return c


# ----------------------------------------------------------------------------------------------------------
# Data set statistics (nnU-Net's fingerprint)
# ----------------------------------------------------------------------------------------------------------

def case_spacing(case: Case) -> tuple[float, ...]:
    """Voxel spacing (array axis order, canonical) of a 3D case from its header (no pixel read for files)."""
    from pathlib import Path

    import SimpleITK as sitk

    if case.spacing is not None:
        return tuple(case.spacing)
    p = Path(case.image)
    if p.is_file():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        reader.ReadImageInformation()
        dummy = sitk.Image([2, 2, 2], sitk.sitkUInt8)
        dummy.SetSpacing(reader.GetSpacing())
        dummy.SetDirection(reader.GetDirection())
        oriented = sitk.DICOMOrient(dummy, "LPS")  # reorientation permutes the spacing like the image's axes
        return tuple(reversed(oriented.GetSpacing()))
    from training.datasets.base import read_volume

    return tuple(read_volume(p)[1])


def nnunet_target_spacing(spacings: Sequence[Sequence[float]], anisotropy_threshold: float = 3.0) -> tuple[float, ...]:
    """nnU-Net's target spacing: the median spacing per axis; when the data are anisotropic (the coarsest
    median axis more than ``anisotropy_threshold`` times the finest), that axis takes the 10th percentile
    instead, so thin-slice scans are not thrown away (nnU-Net's ExperimentPlanner rule)."""
    s = np.asarray(spacings, dtype=np.float64)
    if s.ndim != 2 or len(s) == 0:
        raise ValueError(f"spacings must be a non-empty list of per-case spacings, got shape {s.shape}")
    target = np.median(s, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(s.shape[1]) if i != worst]
    if others and target[worst] > anisotropy_threshold * min(target[others]):
        target[worst] = np.percentile(s[:, worst], 10)
    return tuple(float(v) for v in target)


def fit_zscore(items: Sequence[Mapping[str, Any]], label_key: str, max_voxels_per_case: int = 100_000,
               seed: int = 0) -> dict[str, float]:
    """Parameters of the engine's ``ct_zscore`` (nnU-Net's CT normalisation) from loaded training items:
    the intensities under ``label_key`` (foreground), subsampled to ``max_voxels_per_case`` per case as
    nnU-Net does. Returns ``{"name": "ct_zscore", "mean", "std", "lower", "upper"}``."""
    rng = np.random.default_rng(seed)
    values = []
    for it in items:
        img = np.asarray(it["image"])[0]
        fg = img[np.asarray(it[label_key])[0] > 0]
        if fg.size > max_voxels_per_case:
            fg = rng.choice(fg, max_voxels_per_case, replace=False)
        values.append(fg)
    return {"name": "ct_zscore", **engine_pre.fit_ct_zscore(values)}


# ----------------------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------------------

def nnunet_3d_transforms(label_keys: Sequence[str], target_spacing: Sequence[float] | None,
                         intensity: Any, patch_size: Sequence[int] = (56, 160, 192), train: bool = True,
                         num_samples: int = 2, foreground_fraction: float = 1.0 / 3.0, elastic: bool = False,
                         fg_key: str | None = None, targets: Sequence[str] | None = None, restore_hu: bool = True,
                         missing: str = "error", seed: int | None = None) -> Compose:
    """nnU-Net-style 3D pipeline of 000/001/002.

    Deterministic part (cached by ``CacheDataset``): load (canonical LPS), resample to ``target_spacing``
    (``None`` keeps the native grid), normalise (``intensity``: usually ``fit_zscore(...)``).

    Training part: pad to ``patch_size`` (default 56 x 160 x 192, 002's patch), then ``num_samples`` patches
    per volume by ``RandCropByPosNegLabeld`` with ``pos : neg = f : 1 - f`` for ``foreground_fraction`` f =
    1/3 (nnU-Net forces a third of the patches to contain foreground; the other patches here are centred
    on background voxels rather than uniformly random - a close, documented approximation). Augmentation,
    nnU-Net's default set at moderate strength (its probabilities):
    rotation +-30 deg about each axis and scaling 0.7-1.4 (one affine, p = 0.2); optional elastic
    deformation (``elastic``, p = 0.2; nnU-Net's 3D default leaves it off); Gaussian noise (variance up to
    0.1, p = 0.1); Gaussian blur (sigma 0.5-1, p = 0.2); multiplicative brightness 0.75-1.25 (p = 0.15);
    gamma 0.7-1.5 (p = 0.3); mirroring along every axis (p = 0.5 each). Labels use nearest interpolation.
    """
    label_keys = list(label_keys)
    fg_key = fg_key or label_keys[0]
    steps: list = [LoadCased(targets=targets or label_keys, restore_hu=restore_hu, missing=missing)]
    if target_spacing is not None:
        steps.append(ResampleToSpacingd(["image"], target_spacing, label_keys))
    steps.append(Intensityd(["image"], intensity))
    keys = ["image"] + label_keys
    if train:
        if not 0.0 < foreground_fraction < 1.0:
            raise ValueError(f"foreground_fraction must be in (0, 1), got {foreground_fraction}")
        steps += [
            SpatialPadd(keys, spatial_size=patch_size, mode="constant"),
            RandCropByPosNegLabeld(keys, label_key=fg_key, spatial_size=patch_size, pos=foreground_fraction,
                                   neg=1.0 - foreground_fraction, num_samples=num_samples),
            RandAffined(keys, prob=0.2, rotate_range=(math.pi / 6,) * 3, scale_range=((-0.3, 0.4),) * 3,
                        mode=["bilinear"] + ["nearest"] * len(label_keys), padding_mode="zeros"),
        ]
        if elastic:
            from monai.transforms import Rand3DElasticd

            steps.append(Rand3DElasticd(keys, sigma_range=(9, 13), magnitude_range=(0, 200), prob=0.2,
                                        mode=["bilinear"] + ["nearest"] * len(label_keys), padding_mode="zeros"))
        steps += [
            RandGaussianNoised(["image"], prob=0.1, std=math.sqrt(0.1)),
            RandGaussianSmoothd(["image"], sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
            RandScaleIntensityd(["image"], factors=0.25, prob=0.15),
            RandAdjustContrastd(["image"], gamma=(0.7, 1.5), prob=0.3, retain_stats=True),
            RandFlipd(keys, spatial_axis=0, prob=0.5),
            RandFlipd(keys, spatial_axis=1, prob=0.5),
            RandFlipd(keys, spatial_axis=2, prob=0.5),
        ]
    steps.append(Finalized(label_keys))
    return _seeded(steps, seed)


def slice_2d_transforms(label_keys: Sequence[str], size: int | None = 256, intensity: Any = UINT8_01,
                        train: bool = True, flip: bool = True, rotate_deg: float = 15.0,
                        scale: tuple[float, float] = (0.85, 1.15), channels: int = 1,
                        targets: Sequence[str] | None = None, missing: str = "error",
                        noise_std: float = 0.0, smooth_sigma: tuple[float, float] | None = None,
                        shift: float = 0.0, seed: int | None = None) -> Compose:
    """Generic 2D slice pipeline: resize to ``size`` (bilinear / nearest), intensity (default: 8-bit to
    [0, 1], the scale of the shared 2D data; ``{"name": "ctseg2d_domain"}`` maps HU slices into that
    domain exactly as the engine does at inference), then, for training, left-right and up-down flips
    (p = 0.5 each), rotation +-``rotate_deg`` and scaling ``scale`` (one affine, p = 0.5, zero padding).

    Optional intensity augmentation (all off by default, so the papers' recipes are unchanged), in the
    units of the transformed image (for ``hu_window_01`` over -1024..400 HU, 0.01 is 14.2 HU):
    ``noise_std`` Gaussian noise of a standard deviation drawn from [0, noise_std] (p = 0.5);
    ``smooth_sigma`` a Gaussian blur of sigma drawn from that range in pixels (p = 0.25), so the scanner's
    kernel and dose (how noisy the lung looks) stop being a cue for a lesion; ``shift`` a global offset
    drawn from [-shift, shift] (p = 0.5), so a few tens of HU of calibration or inspiration difference
    are not either. Issue 10 uses them: a network trained on two host scans otherwise learns their
    noise texture as "healthy lung" (docs/default_models.md, section 7).
    """
    label_keys = list(label_keys)
    keys = ["image"] + label_keys
    steps: list = [LoadCased(targets=targets or label_keys, missing=missing)]
    if size is not None:
        steps.append(Resized(keys, spatial_size=(size, size), mode=["bilinear"] + ["nearest"] * len(label_keys)))
    steps.append(Intensityd(["image"], intensity))
    if train:
        if flip:
            steps += [RandFlipd(keys, spatial_axis=1, prob=0.5), RandFlipd(keys, spatial_axis=0, prob=0.5)]
        steps.append(RandAffined(keys, prob=0.5, rotate_range=(math.radians(rotate_deg),),
                                 scale_range=((scale[0] - 1.0, scale[1] - 1.0),),
                                 mode=["bilinear"] + ["nearest"] * len(label_keys), padding_mode="zeros"))
        if smooth_sigma is not None:
            lo, hi = (float(v) for v in smooth_sigma)
            steps.append(RandGaussianSmoothd(["image"], sigma_x=(lo, hi), sigma_y=(lo, hi), prob=0.25))
        if noise_std > 0:
            steps.append(RandGaussianNoised(["image"], prob=0.5, std=float(noise_std), sample_std=True))
        if shift > 0:
            steps.append(RandShiftIntensityd(["image"], offsets=float(shift), prob=0.5))
    if channels > 1:
        steps.append(RepeatChanneld(["image"], channels))
    steps.append(Finalized(label_keys))
    return _seeded(steps, seed)


def bizopoulos_004_transforms(label_keys: Sequence[str], train: bool = True, normalisation: str = "hu",
                              size: int | None = 512, mask_input_with: str | None = None, channels: int = 1,
                              seed: int | None = None) -> Compose:
    """004's preprocessing and augmentation (Bizopoulos et al., Sections 3-4), exactly:

    - resize to ``size`` = 512 ("the CT scan images from the second dataset are resized to 512 x 512");
    - normalisation ``(x - mu) / sigma`` with mu = -500, sigma = 500 (``normalisation="hu"``, the engine's
      ``mu_sigma``). For 8-bit data that never were HU (the shared ``medseg100`` slices),
      ``normalisation="slice"`` uses the slice's own mean and standard deviation instead - a fixed HU
      mu/sigma would be meaningless on 0..255 values;
    - lesion B (``mask_input_with="lung"``): the input multiplied by the lung mask (after normalisation);
    - training augmentation "in each epoch": horizontal and vertical flip each with p = 0.5, rotation by an
      angle uniform in [-180, 180] degrees, and scaling uniform in [0.5, 1.5] "with zero padding" (one
      affine applied to every image; padded pixels are 0 in the normalised input).
    """
    label_keys = list(label_keys)
    keys = ["image"] + label_keys
    targets = label_keys + ([mask_input_with] if mask_input_with and mask_input_with not in label_keys else [])
    steps: list = [LoadCased(targets=targets)]
    if size is not None:
        steps.append(Resized(["image"] + targets, spatial_size=(size, size),
                             mode=["bilinear"] + ["nearest"] * len(targets)))
    if normalisation == "hu":
        steps.append(Intensityd(["image"], MU_SIGMA_004))
    elif normalisation == "slice":
        steps.append(Intensityd(["image"], _per_slice_standardise))
    else:
        raise ValueError(f"normalisation must be 'hu' or 'slice', got {normalisation!r}")
    if mask_input_with:
        steps.append(MaskInputd(mask_input_with))
    if train:
        steps += [
            RandFlipd(keys, spatial_axis=1, prob=0.5),  # horizontal (left-right)
            RandFlipd(keys, spatial_axis=0, prob=0.5),  # vertical (up-down)
            RandAffined(keys, prob=1.0, rotate_range=(math.pi,), scale_range=((-0.5, 0.5),),
                        mode=["bilinear"] + ["nearest"] * len(label_keys), padding_mode="zeros"),
        ]
    if channels > 1:
        steps.append(RepeatChanneld(["image"], channels))
    steps.append(Finalized(label_keys))
    return _seeded(steps, seed)


def _per_slice_standardise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (x - x.mean()) / max(float(x.std()), 1e-6)


def ncovsegnet_transforms(label_keys: Sequence[str], size: int = 352, train: bool = True,
                          intensity: Any = NCOVSEGNET_WINDOW_01, lung_key: str | None = "lung",
                          crop_lungs: bool = True, margin: int = 8, vertical_flip: bool = False,
                          crop_scale: tuple[float, float] = (0.85, 1.0), channels: int = 3,
                          seed: int | None = None) -> Compose:
    """nCoVSegNet's 2D pipeline (003, Sections 4.1-4.2).

    - lung bounding-box crop (:class:`CropToLungBoxd`): from the item's ``lung_key`` mask when it has one
      (the shared 2D slices, whose per-slice lung masks stand in - they are not HU, so the unsupervised
      method cannot run on them), else from the engine's unsupervised lung segmentation for 3D HU volumes
      (crop volumes first with ``CropToLungBoxd`` and :func:`~training.datasets.slice_items`, then run
      this pipeline on the slices with ``crop_lungs=False``);
    - resize to ``size`` = 352 (bilinear for images, nearest for masks - the authors' code resized masks
      bilinearly, which would blur them into non-binary labels);
    - inputs normalised to (0, 1): ``hu_window_01`` over [-1250, 250] for HU, or :data:`UINT8_01`;
    - training: random horizontal flip (p = 0.5; ``vertical_flip`` adds an up-down flip), random crop of
      ``crop_scale`` of each side resized back to ``size``; multi-scale {0.75, 1, 1.25} is a per-batch
      operation (all images of a batch share a size): :func:`multiscale_batch`;
    - the image repeated to ``channels`` = 3 for the ImageNet-style ResNet-50 backbone.
    """
    label_keys = list(label_keys)
    keys = ["image"] + label_keys
    targets = label_keys + ([lung_key] if crop_lungs and lung_key and lung_key not in label_keys else [])
    steps: list = [LoadCased(targets=targets)]
    if crop_lungs:
        steps.append(CropToLungBoxd(["image"] + targets, lung_key=lung_key, margin=margin))
    steps += [Resized(keys, spatial_size=(size, size), mode=["bilinear"] + ["nearest"] * len(label_keys)),
              Intensityd(["image"], intensity)]
    if train:
        steps.append(RandFlipd(keys, spatial_axis=1, prob=0.5))
        if vertical_flip:
            steps.append(RandFlipd(keys, spatial_axis=0, prob=0.5))
        steps += [RandScaleCropd(keys, roi_scale=crop_scale[0], max_roi_scale=crop_scale[1], random_size=True),
                  Resized(keys, spatial_size=(size, size), mode=["bilinear"] + ["nearest"] * len(label_keys))]
    if channels > 1:
        steps.append(RepeatChanneld(["image"], channels))
    steps.append(Finalized(label_keys))
    return _seeded(steps, seed)


def multiscale_batch(image: torch.Tensor, labels: torch.Tensor | Sequence[torch.Tensor], rate: float,
                     base_size: int = 352, multiple: int = 32) -> tuple[torch.Tensor, Any]:
    """Rescale a batch for nCoVSegNet's multi-scale training: to ``round(base_size * rate / multiple) *
    multiple`` pixels a side (the network needs multiples of 32), images bilinearly and masks by nearest
    neighbour (so they stay binary). Call once per rate in :data:`MULTISCALE_RATES` for each batch."""
    import torch.nn.functional as F

    side = int(round(base_size * rate / multiple) * multiple)
    if side < multiple:
        raise ValueError(f"rate {rate} gives a side of {side} px, below {multiple}")
    img = F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False) \
        if tuple(image.shape[-2:]) != (side, side) else image

    def _lab(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t.float(), size=(side, side), mode="nearest-exact") if tuple(t.shape[-2:]) != (side, side) else t

    if isinstance(labels, torch.Tensor):
        return img, _lab(labels)
    return img, [_lab(t) for t in labels]
