"""training.synthesis: COVID-19-like lesions in the lungs of a real HU scan, with their exact mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from Testing.conftest import shared_file
from training import synthesis
from training.synthesis import PATTERNS, LesionConfig, ShapeBank, synthesize


@pytest.fixture(scope="module")
def host():
    """A real HU host (TCGA-DE-A4MA thorax, 121 slices) cut to 24 slices through the lower lungs, with the
    engine's hu-lungs mask: small enough for fast tests, real vessels and lung bases."""
    from training.hard_negatives import read_host

    volume, lung = read_host(shared_file("ct/tcga_de_a4ma_thorax_ct.nii.gz"))
    zs = slice(20, 44)
    return volume.hu[zs].astype(np.float32), lung[zs], volume.spacing_zyx


@pytest.fixture(scope="module")
def bank():
    return ShapeBank.from_ctseg2d(shared_file("covid19ctseg2d/covid19ctseg2d.npz").parent, max_shapes=200)


def _changed(case, hu, tol=1.0):
    return np.abs(case.hu - hu) > tol


@pytest.mark.parametrize("pattern", PATTERNS)
def test_each_pattern_changes_only_lung_voxels_and_its_mask_is_what_changed(host, bank, pattern):
    hu, lung, spacing = host
    case = synthesize(hu, lung, spacing, seed=7, shape_bank=bank, patterns=[pattern],
                      config=LesionConfig(n_lesions=(2, 2), radius_mm=(12.0, 20.0)))
    changed = _changed(case, hu)
    assert case.mask.any(), "no lesion was inserted"
    assert not (changed & ~lung).any(), "voxels outside the lung mask were changed"
    assert not (case.mask & ~lung).any(), "the mask leaves the lungs"
    # Every mask voxel is changed, except consolidation voxels whose host value was already at the target
    # (a vessel crossing it): those lie in the consolidation band already.
    unchanged_in_mask = case.mask & ~changed
    assert unchanged_in_mask.sum() <= 0.01 * case.mask.sum()
    # Changes beyond the mask are only its partial-volume rim (within 3 edge sigmas of the mask).
    rim = ndimage.binary_dilation(case.mask, iterations=3)
    assert not (changed & ~rim).any()
    assert [lesion["pattern"] for lesion in case.lesions] == [pattern] * len(case.lesions)


def test_hu_bands_per_pattern(host, bank):
    hu, lung, spacing = host
    cfg = LesionConfig(n_lesions=(3, 3), radius_mm=(15.0, 25.0), air_bronchogram_prob=0.0)
    means, values = {}, {}
    for pattern in PATTERNS:
        case = synthesize(hu, lung, spacing, seed=3, shape_bank=bank, patterns=[pattern], config=cfg)
        core = ndimage.binary_erosion(case.mask, iterations=2)
        values[pattern] = case.hu[core]
        means[pattern] = float(np.median(values[pattern]))
    assert -750 <= means["ggo"] <= -300                  # ground glass: -750..-300 HU
    assert -100 - 30 <= means["consolidation"] <= 100 + 30  # consolidation -100..+100 HU (+ host noise)
    assert means["ggo"] < means["crazy_paving"] < means["consolidation"]   # septa raise the GGO
    mixed = values["mixed"]                              # ground glass with a consolidated core: both bands
    assert 0.1 <= np.mean((mixed >= -750) & (mixed < -300)) and 0.1 <= np.mean(mixed >= -200)
    assert np.mean(values["ggo"] >= -200) < 0.05         # pure GGO has (almost) no consolidation


def test_ggo_keeps_vessels_visible_and_consolidation_hides_them(host):
    hu, lung, spacing = host
    cfg = LesionConfig(n_lesions=(1, 1), radius_mm=(25.0, 25.0), air_bronchogram_prob=0.0)
    for pattern, visible in (("ggo", True), ("consolidation", False)):
        case = synthesize(hu, lung, spacing, seed=11, patterns=[pattern], config=cfg)
        core = ndimage.binary_erosion(case.mask, iterations=2)
        vessels = core & (hu > -300)                     # dense host structures inside the lesion
        background = core & (hu < -800)
        assert vessels.sum() > 20 and background.sum() > 20
        contrast = float(np.median(case.hu[vessels]) - np.median(case.hu[background]))
        host_contrast = float(np.median(hu[vessels]) - np.median(hu[background]))
        if visible:
            assert contrast > 0.8 * host_contrast        # an additive rise keeps the vessel's contrast
        else:
            assert contrast < 0.2 * host_contrast        # consolidation obscures vessels


def test_reproducible_from_the_seed_and_different_across_seeds(host, bank):
    hu, lung, spacing = host
    a = synthesize(hu, lung, spacing, seed=5, shape_bank=bank)
    b = synthesize(hu, lung, spacing, seed=5, shape_bank=bank)
    c = synthesize(hu, lung, spacing, seed=6, shape_bank=bank)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.mask, b.mask) and a.lesions == b.lesions
    assert not np.array_equal(a.mask, c.mask)


def test_predominance_posterior_and_peripheral_over_many_seeds(host):
    hu, lung, spacing = host
    cfg = LesionConfig(n_lesions=(1, 1), radius_mm=(4.0, 5.0))
    cases = [synthesize(hu, lung, spacing, seed=s, config=cfg) for s in range(40)]
    centers = np.array([c.lesions[0]["center_zyx"] for c in cases if c.lesions])
    assert len(centers) >= 30           # a lesion cut to a speck by the lung border is dropped, rarely
    ys = np.argwhere(lung)[:, 1]
    depth = ndimage.distance_transform_edt(lung, sampling=spacing)
    lung_depth = depth[lung]
    seed_depth = depth[tuple(centers.T)]
    assert np.median(centers[:, 1]) > np.median(ys)               # posterior (y grows dorsally)
    assert np.median(seed_depth) < np.median(lung_depth)          # peripheral / subpleural


def test_synthesize_command_writes_scan_mask_record_and_montage(tmp_path):
    host = shared_file("ct/lungptctdx_a0002_ct.nii.gz")           # 30 slices of 8 mm: fast
    shapes = shared_file("covid19ctseg2d/covid19ctseg2d.npz").parent
    from training.cli import main

    assert main(["synthesize", str(host), "-o", str(tmp_path), "--seed", "2", "--shapes", str(shapes),
                 "--montage"]) == 0
    ct = sitk.ReadImage(str(tmp_path / "lungptctdx_a0002_ct_syn2_ct.nii.gz"))
    mask = sitk.ReadImage(str(tmp_path / "lungptctdx_a0002_ct_syn2_mask.nii.gz"))
    src = sitk.ReadImage(str(host))
    for img in (ct, mask):                                           # the host's exact geometry
        assert img.GetSize() == src.GetSize() and np.allclose(img.GetSpacing(), src.GetSpacing())
        assert np.allclose(img.GetOrigin(), src.GetOrigin()) and np.allclose(img.GetDirection(), src.GetDirection())
    m = sitk.GetArrayFromImage(mask) > 0
    diff = np.abs(sitk.GetArrayFromImage(ct).astype(np.float32) - sitk.GetArrayFromImage(src)) > 1
    meta = json.loads((tmp_path / "lungptctdx_a0002_ct_syn2.json").read_text())
    assert m.any() and meta["lesions"] and meta["seed"] == 2
    assert (m & diff).sum() >= 0.95 * m.sum()
    png = np.asarray(Image.open(tmp_path / "lungptctdx_a0002_ct_syn2.png").convert("RGB"))
    red = (png[..., 0] == 255) & (png[..., 1] == 0) & (png[..., 2] == 0)
    assert png.std() > 20 and red.sum() > 20                        # not blank; the mask outline is drawn
    with pytest.raises(FileExistsError, match="--overwrite"):
        synthesis.synthesize_file(host, tmp_path, 2)


def test_evaluation_scans_are_refused_as_hosts(tmp_path):
    from training.hard_negatives import build

    with pytest.raises(SystemExit, match="evaluation only"):
        synthesis.main(["covidctmd_p001_ct.nii.gz", "-o", str(tmp_path)])
    with pytest.raises(ValueError, match="evaluation only"):
        build(tmp_path, scan=["x/covidctmd_normal001_ct.nii.gz"])
