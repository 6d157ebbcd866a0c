"""A deterministic synthetic chest CT with ground truth, for the demo and for tests.

No paper describes a phantom; this one is built to exercise exactly what the engine must get right on
real scans, with known answers:

- outside air (-1000 HU) and a patient table below the body, so "nothing outside the body" is tested;
- a body ellipse (muscle ~40 HU, a subcutaneous fat layer ~-100 HU), ribs (~+700 HU) and a vertebra;
- two lungs (~-850 HU with texture) that **touch at the anterior junction** (one air component), over a
  domed diaphragm, with the heart carving the left lung and an upper mediastinal column between them;
- a **trachea** (air column at the midline) splitting at the carina into two **main bronchi** that run
  through the mediastinum and open into the lungs as walled lobar bronchi (so the airway is connected to
  both lungs, as at CT resolution in real scans);
- **vessels** (~+40 HU tubes) branching from each hilum;
- a **gastric air bubble** below the left diaphragm (gas that is not lung);
- optional ground-glass blobs (-500..-300 HU), a **dense consolidation** (~+30 HU) centred on the costal
  pleura of the right lower lobe, and a small solid nodule attached to the left lung's pleura.

Geometry is defined in millimetres around the volume centre and sampled on the requested grid, so any
shape/spacing gives the same anatomy. The image is in LPS (identity direction): x grows towards the
patient's left, y posterior, z superior, i.e. already the engine's canonical orientation.

Ground truth (canonical (z, y, x) arrays): ``right_lung``/``left_lung`` (bool; the lung regions, which
include vessels, lesions and intrapulmonary bronchi but not the trachea or the mediastinal main bronchi;
the two are split at the midline where they touch), ``infection`` (bool; lesions inside the lungs),
``body`` (bool) and ``consolidation`` / ``nodule`` (bool; subsets of the lungs) for targeted tests.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

DEFAULT_SHAPE_ZYX = (64, 128, 128)
DEFAULT_SPACING_ZYX = (4.0, 2.8, 2.8)


def make_chest_phantom(shape_zyx: tuple[int, int, int] = DEFAULT_SHAPE_ZYX,
                       spacing_zyx: tuple[float, float, float] = DEFAULT_SPACING_ZYX,
                       seed: int = 0, infection: bool = True, consolidation: bool = True,
                       nodule: bool = False, noise_hu: float = 15.0) -> tuple[sitk.Image, dict[str, np.ndarray]]:
    """Build the phantom.

    Args:
        shape_zyx: grid size (z, y, x). The anatomy spans about 256 mm (z) x 330 mm (y) x 360 mm (x);
            the default grid covers it at 4 x 2.8 x 2.8 mm (about 0.1 s to build).
        spacing_zyx: voxel spacing in mm.
        seed: seed of the noise, the vessel directions and the lesion placement.
        infection: add ground-glass blobs.
        consolidation: add a dense consolidation attached to the costal pleura of the right lower lobe.
        nodule: add a solid 20 mm nodule attached to the left lung's lateral pleura.
        noise_hu: standard deviation of the Gaussian noise.

    Returns:
        (image, truth): an int16 HU image in LPS and the ground-truth masks described in the module
        docstring.
    """
    shape = tuple(int(n) for n in shape_zyx)
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape_zyx must be three sizes >= 8, got {shape_zyx!r}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing_zyx must be three positive spacings in mm, got {spacing_zyx!r}")
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    sz, sy, sx = spacing
    # Physical coordinates (mm) of voxel centres, centred on the volume; broadcastable grids.
    zc = ((np.arange(nz) - (nz - 1) / 2.0) * sz).astype(np.float32)
    yc = ((np.arange(ny) - (ny - 1) / 2.0) * sy).astype(np.float32)
    xc = ((np.arange(nx) - (nx - 1) / 2.0) * sx).astype(np.float32)
    Z, Y, X = zc[:, None, None], yc[None, :, None], xc[None, None, :]
    grid = (Z, Y, X)

    # Body: an ellipse slightly narrower towards the neck.
    taper = np.clip(1.0 - np.maximum(Z - 60.0, 0.0) / 250.0, 0.6, 1.0)
    ax, ay = 160.0 * taper, 115.0 * taper
    body = (X / ax) ** 2 + (Y / ay) ** 2 <= 1.0
    fat = (X / (ax - 14.0)) ** 2 + (Y / (ay - 11.0)) ** 2 > 1.0
    cavity_a, cavity_b = ax - 26.0, ay - 22.0
    cavity = (X / cavity_a) ** 2 + ((Y - 3.0) / cavity_b) ** 2 <= 1.0

    # Mediastinum: a posterior column (aorta, oesophagus, spine side), an upper column (great vessels,
    # trachea), a thin anterior septum except at the anterior junction, and the heart.
    upper = Z > -30.0
    junction = (Y < -55.0) & (Z > -5.0) & (Z < 55.0)
    half_width = np.where(Y > 25.0, 30.0, np.where(upper & (Y > -45.0), 28.0, np.where(junction, 0.0, 9.0)))
    mediastinum = np.abs(X) < half_width
    heart = ((X - 18.0) / 68.0) ** 2 + ((Y + 18.0) / 55.0) ** 2 + ((Z + 60.0) / 48.0) ** 2 <= 1.0
    spine = np.broadcast_to((X / 22.0) ** 2 + ((Y - 78.0) / 24.0) ** 2 <= 1.0, shape)
    mediastinum = mediastinum | heart | spine

    # Diaphragm domes (the right one higher, over the liver) and apices.
    dome = -105.0 + 48.0 * np.exp(-((np.abs(X) - 62.0) ** 2 + Y ** 2) / (2 * 55.0 ** 2)) + 10.0 * (X < 0)
    below_apex = (Z <= 50.0) | (((np.abs(X) - 62.0) / 62.0) ** 2 + ((Y - 5.0) / 80.0) ** 2
                                <= np.clip((118.0 - Z) / 68.0, 0, 1))
    lungs = cavity & ~mediastinum & (Z > dome) & below_apex
    right_lung = lungs & (X < 0)
    left_lung = lungs & (X >= 0)

    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = 40.0
    hu[body & fat] = -100.0
    # Ribs: arcs in the chest wall every 24 mm, sparing the sternum and the spine.
    angle = np.degrees(np.arctan2(Y, X))
    rib_ring = np.abs(np.sqrt((X / (ax - 20.0)) ** 2 + (Y / (ay - 16.0)) ** 2) - 1.0) * np.minimum(ax, ay) < 4.5
    rib_band = np.mod(Z + 300.0, 24.0) < 9.0
    rib_angles = (np.abs(angle + 90.0) > 18.0) & (np.abs(angle - 90.0) > 22.0)
    hu[body & rib_ring & rib_band & rib_angles] = 700.0
    hu[spine] = 400.0
    hu[np.broadcast_to((X / 7.0) ** 2 + ((Y - 104.0) / 7.0) ** 2 <= 1.0, shape)] = 20.0  # spinal canal
    # Liver under the right dome, stomach with a gas bubble under the left dome.
    hu[body & ~lungs & (Z <= dome) & (X < 20.0) & ~spine] = 55.0
    stomach_gas = ((X - 65.0) / 32.0) ** 2 + ((Y + 25.0) / 25.0) ** 2 + ((Z - dome + 22.0) / 12.0) ** 2 <= 1.0
    stomach_gas &= (Z <= dome - 8.0)
    hu[stomach_gas & body] = -1000.0

    # Lung parenchyma with a smooth texture (gravity-dependent density gradient, as in supine scans).
    texture = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.0) * 25.0
    hu[lungs] = (-860.0 + 0.25 * np.broadcast_to(Y, shape) + texture)[lungs]

    # Airways: trachea down to the carina, main bronchi through the mediastinum, walled lobar bronchi
    # that open into each lung. Lumen is air; walls are soft tissue where they lie inside a lung.
    carina = (0.0, -10.0, 15.0)  # (x, y, z) mm
    top = (0.0, -10.0, float(zc[-1]) + 10.0)
    lumen = _tube(grid, top, carina, 8.0)
    wall = np.zeros(shape, bool)
    airway_in_mediastinum = lumen.copy()
    for side in (-1.0, 1.0):
        hilum = (side * 42.0, -2.0, -5.0)
        end = (side * 78.0, 12.0, -35.0)
        main = _tube(grid, carina, hilum, 6.0)
        lobar = _tube(grid, hilum, end, 4.5)
        # The wall stops short of the lumen's end so the bronchus opens into the parenchyma.
        wall_end = tuple(np.add(hilum, 0.8 * np.subtract(end, hilum)))
        lobar_wall = _tube(grid, hilum, wall_end, 6.5) & ~lobar
        lumen |= main | lobar
        wall |= lobar_wall
        airway_in_mediastinum |= main & ~lungs
    hu[wall & lungs] = 40.0
    hu[lumen] = -1000.0

    # Vessels: tubes from each hilum to random peripheral points, clipped to the lung.
    vessels = np.zeros(shape, bool)
    for side, lung in ((-1.0, right_lung), (1.0, left_lung)):
        origin = (side * 40.0, 5.0, -10.0)
        for _ in range(7):
            direction = rng.normal(size=3) * np.array([0.6, 0.8, 1.0]) + np.array([side * 0.9, 0.0, 0.0])
            direction /= np.linalg.norm(direction)
            length = rng.uniform(50.0, 90.0)
            end = tuple(np.array(origin) + direction * length)
            vessels |= _tube(grid, origin, end, rng.uniform(2.0, 3.5)) & lung
    hu[vessels & ~lumen] = 40.0

    lesions = np.zeros(shape, bool)
    consolidation_mask = np.zeros(shape, bool)
    nodule_mask = np.zeros(shape, bool)
    if infection:
        # Ground glass: soft-edged blobs in the peripheral lung, -500..-300 HU.
        for centre, radii in (((-95.0, 30.0, -20.0), (24.0, 20.0, 22.0)),
                              ((92.0, -10.0, 20.0), (20.0, 24.0, 20.0)),
                              ((-70.0, -40.0, 50.0), (16.0, 14.0, 16.0))):
            jitter = rng.uniform(-4.0, 4.0, size=3)
            d = _ellipsoid_distance(grid, tuple(np.add(centre, jitter)), radii)
            blob = (d <= 1.0) & lungs & ~vessels
            level = -480.0 + 150.0 * np.clip(1.0 - d, 0.0, 1.0)
            hu[blob] = (level + 0.5 * texture)[blob]
            lesions |= blob
    if consolidation:
        # Centred just inside the costal pleura of the right lower lobe, posterolateral: a large part of
        # the sphere lies in the chest wall (already soft tissue), so in the image the lesion is a
        # dense bulge on the pleura whose lung part (about 24 mL) must stay inside the lung mask.
        centre = _on_cavity_boundary(np.radians(35.0), -30.0, Z, cavity_a, cavity_b, side=-1.0, inset=6.0)
        sphere = _ellipsoid_distance(grid, centre, (22.0, 22.0, 20.0)) <= 1.0
        consolidation_mask = sphere & lungs
        hu[consolidation_mask] = 30.0 + 0.3 * texture[consolidation_mask]
        lesions |= consolidation_mask
    if nodule:
        centre = _on_cavity_boundary(np.radians(20.0), 30.0, Z, cavity_a, cavity_b, side=1.0, inset=4.0)
        ball = _ellipsoid_distance(grid, centre, (10.0, 10.0, 10.0)) <= 1.0
        nodule_mask = ball & lungs
        hu[ball & body] = 35.0

    # Patient table below the body.
    table_y = float(np.max(ay)) + 12.0
    hu[np.broadcast_to((np.abs(Y - table_y - 4.0) < 4.0) & (np.abs(X) < 200.0), shape)] = 150.0

    hu += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    # A slight blur stands in for the scanner's point-spread function (partial-volume edges).
    hu = ndi.gaussian_filter(hu, sigma=(0.4, 0.6, 0.6))
    image = sitk.GetImageFromArray(np.clip(np.rint(hu), -1024, 3071).astype(np.int16))
    image.SetSpacing((sx, sy, sz))
    image.SetOrigin((float(xc[0]), float(yc[0]), float(zc[0])))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    truth = {
        "right_lung": np.ascontiguousarray(right_lung),
        "left_lung": np.ascontiguousarray(left_lung),
        "infection": np.ascontiguousarray(lesions & lungs),
        "body": np.ascontiguousarray(np.broadcast_to(body, shape)),
        "consolidation": consolidation_mask,
        "nodule": nodule_mask,
        "airway": np.ascontiguousarray(airway_in_mediastinum),
    }
    return image, truth


def labels_from_truth(truth: dict[str, np.ndarray]) -> np.ndarray:
    """uint8 labelmap of the ground truth in the project's convention (0 bg, 1 right, 2 left, 3 infection)."""
    labels = np.zeros(truth["right_lung"].shape, np.uint8)
    labels[truth["right_lung"]] = 1
    labels[truth["left_lung"]] = 2
    labels[truth["infection"]] = 3
    return labels


def _on_cavity_boundary(angle: float, z_mm: float, Z: np.ndarray, cavity_a, cavity_b,
                        side: float, inset: float = 0.0) -> tuple[float, float, float]:
    """(x, y, z) mm of the thoracic cavity's boundary at polar ``angle`` (0 = lateral, >0 posterior),
    moved ``inset`` mm inwards along the ray."""
    iz = int(np.argmin(np.abs(Z.ravel() - z_mm)))
    a = float(np.broadcast_to(cavity_a, (Z.shape[0], 1, 1))[iz, 0, 0])
    b = float(np.broadcast_to(cavity_b, (Z.shape[0], 1, 1))[iz, 0, 0])
    c, s = np.cos(angle), np.sin(angle)
    t = 1.0 / np.sqrt((c / a) ** 2 + (s / b) ** 2) - inset
    return (side * t * c, 3.0 + t * s, z_mm)


def _ellipsoid_distance(grid, centre_xyz, radii_xyz) -> np.ndarray:
    """Normalised ellipsoid 'radius' (1 on the surface) of every voxel; broadcast (z, y, x)."""
    Z, Y, X = grid
    (cx, cy, cz), (rx, ry, rz) = centre_xyz, radii_xyz
    return np.sqrt(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 + ((Z - cz) / rz) ** 2)


def _tube(grid, p0_xyz, p1_xyz, radius: float) -> np.ndarray:
    """Voxels within ``radius`` mm of the segment p0-p1 (x, y, z in mm), evaluated in its bounding box."""
    Z, Y, X = grid
    shape = (Z.shape[0], Y.shape[1], X.shape[2])
    p0, p1 = np.array(p0_xyz, np.float32), np.array(p1_xyz, np.float32)
    lo, hi = np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius
    xs = np.nonzero((X.ravel() >= lo[0]) & (X.ravel() <= hi[0]))[0]
    ys = np.nonzero((Y.ravel() >= lo[1]) & (Y.ravel() <= hi[1]))[0]
    zs = np.nonzero((Z.ravel() >= lo[2]) & (Z.ravel() <= hi[2]))[0]
    out = np.zeros(shape, bool)
    if xs.size == 0 or ys.size == 0 or zs.size == 0:
        return out
    sl = (slice(zs[0], zs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    x, y, z = X[:, :, sl[2]], Y[:, sl[1], :], Z[sl[0], :, :]
    d = p1 - p0
    length2 = float(d @ d) or 1.0
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / length2, 0.0, 1.0)
    dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
    out[sl] = dist2 <= radius * radius
    return out
