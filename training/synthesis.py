"""COVID-19-like lesions inserted into the lungs of real HU chest CT, with their exact voxel mask.

Why: no voxel-labelled COVID-19 CT in Hounsfield units can be had here, yet the engine runs on HU scans and
the shared 2D slices hold only infected slices of one data set. Synthetic lesions in real host scans give
HU training pairs whose negatives (vessels, fissures, lung bases, dependent density) are real, and whose
positives carry an exact mask. Precedents: Yao et al., "Label-free segmentation of COVID-19 lesions in lung
CT", IEEE TMI 2021 (arXiv 2009.06456): lesions synthesised with simple operations in normal CT trained a
network that beat unsupervised anomaly detection on three public COVID-19 sets; Hu et al., "Label-free
liver tumor segmentation", CVPR 2023: synthetic tumours in healthy scans approached real annotations.

What a lesion is (patterns after the Fleischner Society glossary, Hansell et al., Radiology 2008;246:697):

* **ground-glass opacity** (``ggo``): hazy increased attenuation with vessels and bronchial margins
  preserved. Made as an *additive* rise of the host lung's own attenuation, so every vessel inside stays
  visible and keeps its contrast, to a target mean in :attr:`LesionConfig.ggo_hu` (-750..-300 HU: the band
  quantitative COVID-19 CT work uses for GGO, roughly -700..-300, widened to the faint end; Chaganti et al.,
  Radiology: AI 2020), with a smooth multiplicative texture and the host's own noise left in place;
* **consolidation** (``consolidation``): homogeneous attenuation that obscures vessels and airway walls,
  target in :attr:`LesionConfig.consolidation_hu` (-100..+100 HU, Gattinoni's non-aerated compartment, Am J
  Respir Crit Care Med 2001;164:1701). It *replaces* the host value (vessels disappear), with noise of the
  host's measured standard deviation added back; with probability :attr:`LesionConfig.air_bronchogram_prob`
  (0.352: air bronchogram in 35.2 % of patients, meta-analysis of 28 studies, 2655 patients, PMC8119228)
  the host's air-filled bronchi (HU below :attr:`LesionConfig.air_bronchus_hu`) are left as air and left out of
  the mask;
* **crazy paving** (``crazy_paving``): GGO with a superimposed reticular network, modelled as the
  boundaries of random polygonal cells of :attr:`LesionConfig.septal_spacing_mm` (secondary pulmonary
  lobules are 1-2.5 cm; intralobular lines finer) raised by :attr:`LesionConfig.septal_rise_hu`;
* **mixed** (``mixed``): GGO with a consolidated core where the lesion's random field is highest
  (GGO with consolidation in 35.2 % of patients, same meta-analysis).

Pattern frequencies default to :attr:`LesionConfig.pattern_probs` (GGO 71.6 %, GGO with consolidation
35.2 %, septal thickening 43.3 % in the meta-analysis; renormalised over the four patterns, consolidation
alone being the least frequent). Where (Salehi et al., AJR 2020, 919 patients; PMC8119228; PMC7355135):
bilateral, multifocal, peripheral / subpleural, posterior and basal predominance, from 5 mm nodules to lobar
extent. The seed of each lesion is drawn inside the lungs with weight
``exp(-depth / peripheral_scale_mm) * (1 + posterior_weight * y) * (1 + basal_weight * (1 - z))`` (depth =
distance to the lung border in mm, ``y`` and ``z`` normalised 0..1 from ventral and from inferior).

Shapes: (a) smoothed random fields (Gaussian-filtered white noise plus an anisotropic, randomly scaled
ellipsoid envelope, thresholded: lobulated, irregular blobs) or (b) the **shape bank**: connected components
of the real infection masks of the shared COVID-19-CT-Seg slices, scaled to the drawn size and extruded
into 3D with a lens-shaped thickness profile. Both are intersected with the host's lung mask: **nothing is
ever changed outside the lung mask.** Edges get partial volume: the binary shape is blurred by
:attr:`LesionConfig.edge_sigma_mm` into a weight ``alpha`` in [0, 1] that scales the change, and the mask is
``alpha >= 0.5`` (the half-way iso-surface).

Everything is deterministic from the seed (``numpy.random.default_rng``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from scipy import ndimage

PATTERNS = ("ggo", "mixed", "crazy_paving", "consolidation")


@dataclass(frozen=True)
class LesionConfig:
    """Parameters of the lesion synthesiser; each default's source is in the module docstring."""

    n_lesions: tuple[int, int] = (1, 6)                # multifocal: 74.7 % multiple lesions (PMC8119228)
    radius_mm: tuple[float, float] = (2.5, 45.0)       # 5 mm nodules .. lobar extent (log-uniform)
    pattern_probs: dict[str, float] = field(default_factory=lambda: {
        "ggo": 0.45, "mixed": 0.25, "crazy_paving": 0.20, "consolidation": 0.10})
    ggo_hu: tuple[float, float] = (-750.0, -300.0)
    ggo_min_rise_hu: float = 100.0                     # a rise the eye (and a reader) can see over -850 HU lung
    consolidation_hu: tuple[float, float] = (-100.0, 100.0)
    texture_sigma_mm: float = 3.0                      # scale of the smooth GGO texture
    texture_amplitude: float = 0.25                    # relative spread of the rise inside a lesion
    septal_spacing_mm: tuple[float, float] = (6.0, 14.0)
    septal_thickness_mm: float = 1.2
    septal_rise_hu: tuple[float, float] = (120.0, 250.0)
    air_bronchogram_prob: float = 0.352
    air_bronchus_hu: float = -950.0
    mixed_core_fraction: tuple[float, float] = (0.2, 0.5)
    edge_sigma_mm: float = 1.0                         # partial-volume blur of the lesion border
    peripheral_scale_mm: float = 15.0
    posterior_weight: float = 2.0
    basal_weight: float = 2.0
    bilateral_prob: float = 0.716                      # bilateral 71.6 % (PMC8119228)
    shape_bank_prob: float = 0.5
    min_lesion_ml: float = 0.065                       # a 5 mm ball: what is left of a lesion after the lung
                                                       # mask cut it must still be a lesion, not a speck

    def validate(self) -> None:
        lo, hi = self.n_lesions
        if not 0 <= lo <= hi:
            raise ValueError(f"n_lesions must be (low, high) with 0 <= low <= high, got {self.n_lesions}")
        if not 0 < self.radius_mm[0] <= self.radius_mm[1]:
            raise ValueError(f"radius_mm must be increasing and positive, got {self.radius_mm}")
        unknown = set(self.pattern_probs) - set(PATTERNS)
        if unknown or not any(v > 0 for v in self.pattern_probs.values()):
            raise ValueError(f"pattern_probs must weight some of {PATTERNS}, got {self.pattern_probs}")


@dataclass
class SyntheticCase:
    """A host scan with synthetic lesions: ``hu`` (float32, same grid), ``mask`` (bool), one dict per lesion."""

    hu: np.ndarray
    mask: np.ndarray
    lesions: list[dict[str, Any]]
    seed: int

    def summary(self, spacing_zyx: Sequence[float]) -> dict[str, Any]:
        voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
        return {"seed": self.seed, "lesion_volume_ml": round(float(self.mask.sum()) * voxel_ml, 3),
                "lesions": self.lesions}


# --------------------------------------------------------------------------------------------------------
# Shape bank


class ShapeBank:
    """2D lesion outlines from real infection masks, to be scaled and extruded into 3D shapes.

    Built from the connected components (8-connected, at least ``min_pixels``) of the shared COVID-19-CT-Seg
    slices' infection masks; each is stored cropped to its bounding box.
    """

    def __init__(self, shapes: Sequence[np.ndarray]):
        self.shapes = [np.asarray(s, dtype=bool) for s in shapes if np.asarray(s).any()]
        if not self.shapes:
            raise ValueError("the shape bank is empty")

    @classmethod
    def from_masks(cls, masks: np.ndarray, min_pixels: int = 30, max_shapes: int = 2000, seed: int = 0) -> "ShapeBank":
        masks = np.asarray(masks) > 0
        shapes = []
        for m in masks:
            labels, n = ndimage.label(m, structure=np.ones((3, 3)))
            for sl, k in zip(ndimage.find_objects(labels), range(1, n + 1)):
                comp = labels[sl] == k
                if comp.sum() >= min_pixels:
                    shapes.append(comp)
        rng = np.random.default_rng(seed)
        if len(shapes) > max_shapes:
            shapes = [shapes[i] for i in sorted(rng.choice(len(shapes), max_shapes, replace=False))]
        return cls(shapes)

    @classmethod
    def from_ctseg2d(cls, folder: str | Path, **kwargs: Any) -> "ShapeBank":
        with np.load(Path(folder) / "covid19ctseg2d.npz") as data:
            return cls.from_masks(data["infection"], **kwargs)

    def __len__(self) -> int:
        return len(self.shapes)


# --------------------------------------------------------------------------------------------------------
# Helpers


def host_noise_hu(hu: np.ndarray, lung: np.ndarray) -> float:
    """Robust standard deviation (MAD x 1.4826) of the host's voxel noise inside the lungs: the residual of
    a 3 x 3 in-plane median, which removes structure (vessels) but keeps the reconstruction noise."""
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    if zs.size == 0:
        return 0.0
    pick = zs[np.linspace(0, zs.size - 1, min(8, zs.size)).astype(int)]
    residuals = []
    for z in pick:
        s = hu[z].astype(np.float32)
        r = s - ndimage.median_filter(s, size=3)
        residuals.append(r[lung[z]])
    r = np.concatenate(residuals)
    return float(1.4826 * np.median(np.abs(r - np.median(r))))


def _seed_weights(lung: np.ndarray, spacing: np.ndarray, cfg: LesionConfig, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate seed voxels (on a strided grid) and their weights (peripheral, posterior, basal)."""
    sub = lung[:, ::stride, ::stride]
    sub_spacing = spacing * np.array([1, stride, stride])
    depth = ndimage.distance_transform_edt(sub, sampling=sub_spacing)
    idx = np.argwhere(sub)
    z, y = idx[:, 0], idx[:, 1]
    zr = (z - z.min()) / max(1, z.max() - z.min())
    yr = (y - y.min()) / max(1, y.max() - y.min())
    w = (np.exp(-depth[sub] / cfg.peripheral_scale_mm) * (1 + cfg.posterior_weight * yr)
         * (1 + cfg.basal_weight * (1 - zr)))
    idx = idx * np.array([1, stride, stride])
    return idx, w / w.sum()


def _box(center: np.ndarray, half: np.ndarray, shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(0, int(c - h)), min(int(n), int(c + h) + 1)) for c, h, n in zip(center, half, shape))


def _field_shape(rng: np.random.Generator, box_shape: tuple[int, ...], center_local: np.ndarray,
                 spacing: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Lobulated blob from a smoothed random field in a random ellipsoid envelope; returns (shape, field)."""
    axes = radius * rng.uniform(0.6, 1.3, size=3)
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(box_shape, center_local, spacing)],
                        indexing="ij")
    r2 = sum((g / a) ** 2 for g, a in zip(grids, axes))
    noise = rng.standard_normal(box_shape).astype(np.float32)
    sigma = np.maximum(radius / 3.0 / spacing, 0.5)
    fld = ndimage.gaussian_filter(noise, sigma)
    fld /= max(float(fld.std()), 1e-6)
    value = (1.0 - r2) + 0.6 * fld
    return value > 0.0, value


def _bank_shape(rng: np.random.Generator, bank: ShapeBank, box_shape: tuple[int, ...], center_local: np.ndarray,
                spacing: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """A real 2D outline scaled to ``radius`` (equivalent-circle radius) and extruded with a lens profile."""
    outline = bank.shapes[int(rng.integers(len(bank)))]
    outline = np.rot90(outline, int(rng.integers(4)))
    if rng.random() < 0.5:
        outline = outline[:, ::-1]
    eq_radius_px = math.sqrt(outline.sum() / math.pi)
    # Target size in voxels of the host's in-plane grid.
    zoom = (radius / spacing[1:]) / max(eq_radius_px, 1.0)
    scaled = ndimage.zoom(outline.astype(np.float32), zoom, order=1) > 0.5
    if not scaled.any():
        scaled = np.ones((1, 1), dtype=bool)
    sdf = ndimage.distance_transform_edt(np.pad(scaled, 1))[1:-1, 1:-1]
    sdf = sdf / max(float(sdf.max()), 1e-6)
    half_height = max(radius * rng.uniform(0.5, 1.0) / spacing[0], 0.5)
    shape = np.zeros(box_shape, dtype=bool)
    value = np.full(box_shape, -1.0, dtype=np.float32)
    cy, cx = center_local[1] - scaled.shape[0] // 2, center_local[2] - scaled.shape[1] // 2
    ys = slice(max(0, cy), min(box_shape[1], cy + scaled.shape[0]))
    xs = slice(max(0, cx), min(box_shape[2], cx + scaled.shape[1]))
    if ys.stop <= ys.start or xs.stop <= xs.start:
        return shape, value
    sub = sdf[ys.start - cy:ys.stop - cy, xs.start - cx:xs.stop - cx]
    for z in range(box_shape[0]):
        t = abs(z - center_local[0]) / half_height
        if t >= 1.0:
            continue
        v = sub - t ** 2                       # lens: thinner towards its ends
        shape[z, ys, xs] = v > 0
        value[z, ys, xs] = v
    return shape, value


def _cell_boundaries(rng: np.random.Generator, coords_mm: np.ndarray, spacing_mm: float,
                     thickness_mm: float) -> np.ndarray:
    """Boolean per coordinate: on the boundary of random polygonal (Voronoi) cells of about ``spacing_mm``."""
    from scipy.spatial import cKDTree

    lo, hi = coords_mm.min(axis=0) - spacing_mm, coords_mm.max(axis=0) + spacing_mm
    n = max(2, int(np.prod((hi - lo) / spacing_mm)))
    seeds = rng.uniform(lo, hi, size=(n, 3))
    d, _ = cKDTree(seeds).query(coords_mm, k=2)
    return (d[:, 1] - d[:, 0]) < thickness_mm


# --------------------------------------------------------------------------------------------------------
# The synthesiser


def synthesize(hu: np.ndarray, lung: np.ndarray, spacing_zyx: Sequence[float], seed: int,
               config: Optional[LesionConfig] = None, shape_bank: Optional[ShapeBank] = None,
               patterns: Optional[Sequence[str]] = None) -> SyntheticCase:
    """Insert COVID-19-like lesions into the lungs of ``hu``.

    Args:
        hu: host CT in HU, (z, y, x) in the engine's canonical LPS orientation (``CTVolume.hu``).
        lung: lung mask of the same shape (any non-zero value is lung).
        spacing_zyx: voxel size in mm.
        seed: the whole result is a function of ``(hu, lung, spacing, seed, config, shape_bank)``.
        config: :class:`LesionConfig` (defaults documented there).
        shape_bank: real lesion outlines; without it every shape is a random field.
        patterns: force the pattern of every lesion (tests, montages); default drawn from
            ``config.pattern_probs``.

    Returns:
        :class:`SyntheticCase` with the modified HU (float32), the exact mask and a record per lesion.
    """
    cfg = config or LesionConfig()
    cfg.validate()
    hu = np.asarray(hu)
    lung = np.asarray(lung) > 0
    if hu.shape != lung.shape or hu.ndim != 3:
        raise ValueError(f"hu {hu.shape} and lung {lung.shape} must be one 3D grid")
    spacing = np.asarray(spacing_zyx, dtype=float)
    rng = np.random.default_rng(seed)
    out = hu.astype(np.float32, copy=True)
    mask = np.zeros(hu.shape, dtype=bool)
    lesions: list[dict[str, Any]] = []
    if not lung.any():
        return SyntheticCase(out, mask, lesions, seed)

    noise_sd = host_noise_hu(hu, lung)
    lung_hu = float(np.median(hu[lung][:: max(1, int(lung.sum() // 200000))]))
    stride = max(1, int(round(2.0 / spacing[1])))
    seeds, weights = _seed_weights(lung, spacing, cfg, stride)
    midline = float(np.median(seeds[:, 2]))
    names = list(cfg.pattern_probs)
    probs = np.array([cfg.pattern_probs[k] for k in names], dtype=float)
    probs /= probs.sum()
    n_lesions = int(rng.integers(cfg.n_lesions[0], cfg.n_lesions[1] + 1))
    bilateral = rng.random() < cfg.bilateral_prob
    side = int(rng.integers(2))

    for i in range(n_lesions):
        pattern = patterns[i % len(patterns)] if patterns else names[int(rng.choice(len(names), p=probs))]
        if pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {pattern!r}; use one of {PATTERNS}")
        lesion_side = (i % 2 == 0) == bool(side) if bilateral else bool(side)
        pool = (seeds[:, 2] >= midline) if lesion_side else (seeds[:, 2] < midline)
        w = weights * pool
        w = weights if w.sum() == 0 else w / w.sum()
        center = seeds[int(rng.choice(len(seeds), p=w))]
        radius = float(math.exp(rng.uniform(math.log(cfg.radius_mm[0]), math.log(cfg.radius_mm[1]))))
        half = np.ceil((1.6 * radius + 3 * cfg.edge_sigma_mm) / spacing).astype(int) + 1
        box = _box(center, half, hu.shape)
        box_shape = tuple(s.stop - s.start for s in box)
        center_local = np.array([c - s.start for c, s in zip(center, box)])
        use_bank = shape_bank is not None and rng.random() < cfg.shape_bank_prob
        maker = (lambda *a: _bank_shape(rng, shape_bank, *a)) if use_bank else (lambda *a: _field_shape(rng, *a))
        shape, value = maker(box_shape, center_local, spacing, radius)
        lung_box = lung[box]
        shape &= lung_box
        if not shape.any():
            continue
        alpha = ndimage.gaussian_filter(shape.astype(np.float32), cfg.edge_sigma_mm / spacing)
        alpha *= lung_box                                    # never outside the lungs
        inside = alpha >= 0.5
        # The partial-volume rim is the blur within 2 voxels of the mask; thinner parts of the shape that
        # never reach the half-way level are left out, so changed voxels and the mask coincide up to the rim.
        alpha *= ndimage.binary_dilation(inside, iterations=2)
        host = out[box]
        record: dict[str, Any] = {"pattern": pattern, "shape": "bank" if use_bank else "field",
                                  "center_zyx": [int(c) for c in center], "radius_mm": round(radius, 2)}

        def rise_to(target: float, base: np.ndarray) -> np.ndarray:
            """Additive rise that brings the lesion's mean to ``target`` with a smooth texture."""
            lesion_base = float(np.median(base[inside])) if inside.any() else lung_hu  # noqa: B023
            rise = max(target - lesion_base, cfg.ggo_min_rise_hu)
            tex = rng.standard_normal(box_shape).astype(np.float32)  # noqa: B023
            tex = ndimage.gaussian_filter(tex, cfg.texture_sigma_mm / spacing)
            tex /= max(float(tex.std()), 1e-6)
            return rise * np.clip(1.0 + cfg.texture_amplitude * tex, 0.5, 1.5)

        keep_air = np.zeros(box_shape, dtype=bool)
        if pattern in ("ggo", "mixed", "crazy_paving"):
            target = float(rng.uniform(*cfg.ggo_hu))
            delta = rise_to(target, host)
            if pattern == "crazy_paving":
                coords = np.argwhere(inside) * spacing
                septa = np.zeros(box_shape, dtype=bool)
                spacing_mm = float(rng.uniform(*cfg.septal_spacing_mm))
                septa[inside] = _cell_boundaries(rng, coords, spacing_mm, cfg.septal_thickness_mm)
                septa = ndimage.gaussian_filter(septa.astype(np.float32), 0.5)
                delta = delta + septa * float(rng.uniform(*cfg.septal_rise_hu))
                record["septal_spacing_mm"] = round(spacing_mm, 2)
            new = host + alpha * delta
            record["target_hu"] = round(target, 1)
            if pattern == "mixed":
                cut = np.quantile(value[inside], 1.0 - float(rng.uniform(*cfg.mixed_core_fraction)))
                core = ndimage.gaussian_filter(((value >= cut) & inside).astype(np.float32),
                                               cfg.edge_sigma_mm / spacing) * alpha
                new = _consolidate(rng, new, core, cfg, noise_sd, record)
        else:
            new = _consolidate(rng, host.copy(), alpha, cfg, noise_sd, record)
            if rng.random() < cfg.air_bronchogram_prob:
                keep_air = inside & (host < cfg.air_bronchus_hu)
                record["air_bronchogram_voxels"] = int(keep_air.sum())
        lesion_mask = inside & ~keep_air
        if lesion_mask.sum() * float(np.prod(spacing)) / 1000.0 < cfg.min_lesion_ml:
            continue                                     # cut to a speck by the lung border: not inserted
        new = np.where(keep_air, host, new)
        out[box] = np.where(lung_box, new, host)
        mask[box] |= lesion_mask
        record["voxels"] = int(lesion_mask.sum())
        lesions.append(record)
    return SyntheticCase(out, mask, lesions, seed)


def _consolidate(rng: np.random.Generator, values: np.ndarray, weight: np.ndarray, cfg: LesionConfig,
                 noise_sd: float, record: dict[str, Any]) -> np.ndarray:
    """Blend towards a homogeneous consolidation value (vessels obscured) with the host's noise level."""
    target = float(rng.uniform(*cfg.consolidation_hu))
    noise = rng.standard_normal(values.shape).astype(np.float32) * np.float32(noise_sd)
    record["consolidation_hu"] = round(target, 1)
    return (1.0 - weight) * values + weight * (target + noise)


# --------------------------------------------------------------------------------------------------------
# Files


def synthesize_file(host: str | Path, out_dir: str | Path, seed: int, shape_bank: Optional[ShapeBank] = None,
                    config: Optional[LesionConfig] = None, overwrite: bool = False, lung: bool = False,
                    host_read: Optional[tuple[Any, np.ndarray]] = None) -> dict[str, Path]:
    """Read a host HU CT, insert lesions inside the engine's ``hu-lungs`` mask and write
    ``<name>_syn<seed>_ct.nii.gz``, ``_mask.nii.gz`` (in the host's exact geometry) and ``.json``; with
    ``lung`` also ``_lung.nii.gz``, the host's lung mask the lesions were drawn in (what an evaluation
    through the engine's infection model takes as the lungs). ``host_read``: the host's
    ``hard_negatives.read_host`` result, to synthesise several seeds from one reading.
    Refuses to overwrite unless ``overwrite``; every file is written atomically."""
    import SimpleITK as sitk

    from COVIDLesionSegLib.outputs import atomic_write, atomic_write_text
    from training.hard_negatives import read_host  # imports this module: import it here, not at the top

    volume, lung_mask = host_read if host_read is not None else read_host(host)
    case = synthesize(volume.hu, lung_mask, volume.spacing_zyx, seed, config, shape_bank)
    out_dir = Path(out_dir)
    stem = f"{volume.name}_syn{seed}"
    paths = {"ct": out_dir / f"{stem}_ct.nii.gz", "mask": out_dir / f"{stem}_mask.nii.gz",
             "json": out_dir / f"{stem}.json"}
    if lung:
        paths["lung"] = out_dir / f"{stem}_lung.nii.gz"
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist(s); pass --overwrite to replace")
    out_dir.mkdir(parents=True, exist_ok=True)
    ct = volume.to_input_geometry(np.rint(case.hu).astype(np.int16))
    mask = volume.to_input_geometry(case.mask.astype(np.uint8))
    atomic_write(paths["ct"], lambda tmp: sitk.WriteImage(ct, str(tmp), True))
    atomic_write(paths["mask"], lambda tmp: sitk.WriteImage(mask, str(tmp), True))
    if lung:
        lung_image = volume.to_input_geometry(lung_mask.astype(np.uint8))
        atomic_write(paths["lung"], lambda tmp: sitk.WriteImage(lung_image, str(tmp), True))
    meta = {"host": str(host), "config": asdict(config or LesionConfig()), **case.summary(volume.spacing_zyx)}
    atomic_write_text(paths["json"], json.dumps(meta, indent=2))
    return paths


def montage(host_hu: np.ndarray, case: SyntheticCase, path: str | Path, n: int = 4,
            window: tuple[float, float] = (-1350.0, 150.0)) -> Path:
    """A PNG a person can look at: ``n`` axial slices through the lesions, host above, synthetic below
    (lung window), with the mask outline in red on a third row. Written atomically."""
    from PIL import Image

    from COVIDLesionSegLib.outputs import atomic_write

    zs = np.flatnonzero(case.mask.any(axis=(1, 2)))
    if zs.size == 0:
        zs = np.array([host_hu.shape[0] // 2])
    order = zs[np.argsort(-case.mask[zs].sum(axis=(1, 2)))]
    picks = sorted(order[:n].tolist())

    def gray(s: np.ndarray) -> np.ndarray:
        g = (np.clip(s, *window) - window[0]) / (window[1] - window[0])
        return np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=2)

    rows = [[], [], []]
    for z in picks:
        host, syn = gray(host_hu[z]), gray(case.hu[z])
        edge = case.mask[z] & ~ndimage.binary_erosion(case.mask[z])
        outlined = syn.copy()
        outlined[edge] = (255, 0, 0)
        # The display's up is anterior and its left the patient's right (radiological convention).
        for row, img in zip(rows, (host, syn, outlined)):
            row.append(img)
    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    return atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m training synthesize HOST -o OUT [--seed S] [--count N] [--montage]``."""
    import argparse

    from training.config import shared_data_dir

    ap = argparse.ArgumentParser(prog="python -m training synthesize",
                                 description="Insert synthetic COVID-19-like lesions into the lungs of a real HU "
                                             "chest CT; writes the scan, its exact lesion mask and a JSON record "
                                             "per seed (training.synthesis).")
    ap.add_argument("host", help="host CT in Hounsfield units (NIfTI, NRRD, MHA or a DICOM folder)")
    ap.add_argument("-o", "--output", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first copy (each copy: seed, seed+1, ...)")
    ap.add_argument("--count", type=int, default=1, help="number of synthetic copies")
    ap.add_argument("--shapes", default=str(shared_data_dir() / "covid19ctseg2d"),
                    help="COVID-19-CT-Seg 2D folder for the shape bank ('none': random-field shapes only)")
    ap.add_argument("--montage", action="store_true", help="also write <name>_syn<seed>.png (host / synthetic / mask)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    from training.hard_negatives import is_evaluation_scan

    if is_evaluation_scan(args.host):
        raise SystemExit("error: P001 and normal001 are kept for evaluation only; choose another host scan")
    bank = None
    if args.shapes.lower() != "none":
        if not (Path(args.shapes) / "covid19ctseg2d.npz").is_file():
            raise SystemExit(f"error: no covid19ctseg2d.npz in {args.shapes}; pass --shapes none for random-field "
                             "shapes only")
        bank = ShapeBank.from_ctseg2d(args.shapes)
    for seed in range(args.seed, args.seed + args.count):
        paths = synthesize_file(args.host, args.output, seed, bank, overwrite=args.overwrite)
        if args.montage:
            _montage_files(paths, Path(args.output) / f"{paths['ct'].name[:-len('_ct.nii.gz')]}.png")
        meta = json.loads(paths["json"].read_text())
        print(f"{paths['ct']}: {len(meta['lesions'])} lesion(s), {meta['lesion_volume_ml']} mL")
    return 0


def _montage_files(paths: dict[str, Path], png: Path) -> Path:
    """Montage of a written synthetic case against its host (read back from the files just written)."""
    import SimpleITK as sitk

    meta = json.loads(paths["json"].read_text())
    host = sitk.DICOMOrient(sitk.ReadImage(meta["host"]), "LPS")
    syn = sitk.DICOMOrient(sitk.ReadImage(str(paths["ct"])), "LPS")
    mask = sitk.DICOMOrient(sitk.ReadImage(str(paths["mask"])), "LPS")
    case = SyntheticCase(sitk.GetArrayFromImage(syn).astype(np.float32),
                         sitk.GetArrayFromImage(mask) > 0, meta["lesions"], int(meta["seed"]))
    return montage(sitk.GetArrayFromImage(host).astype(np.float32), case, png)
