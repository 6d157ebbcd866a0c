"""Preprocessing / augmentation pipelines: shapes, dtypes, binary labels, determinism, real changes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import RandAffined

from COVIDLesionSegLib import preprocessing as engine_pre
from Testing.conftest import shared_file
from training.datasets import Case, LabelRef, load_case, make_dataset, read_covid19ctseg2d
from training.transforms import (
    MU_SIGMA_004,
    UINT8_01,
    CropToLungBoxd,
    Intensityd,
    MaskInputd,
    ResampleToSpacingd,
    bizopoulos_004_transforms,
    case_spacing,
    fit_zscore,
    multiscale_batch,
    ncovsegnet_transforms,
    nnunet_3d_transforms,
    nnunet_target_spacing,
    slice_2d_transforms,
)

torch.set_num_threads(2)


def hu_slice_case(size=64, cid="s0") -> Case:
    """An asymmetric HU slice: body at 40 HU, 'lungs' at -850 HU, an L-shaped lesion in the right lung."""
    img = np.full((size, size), -1000, np.float32)
    img[8:56, 6:58] = 40
    lung = np.zeros((size, size), np.uint8)
    lung[14:50, 10:30] = 1
    lung[14:50, 36:54] = 1
    img[lung > 0] = -850
    lesion = np.zeros((size, size), np.uint8)
    lesion[20:40, 12:18] = 1
    lesion[34:40, 12:26] = 1
    img[lesion > 0] = -300
    return Case(id=cid, group=cid, source="toy", image=img, dim=2,
                labels={"lesion": LabelRef(lesion), "lung": LabelRef(lung)})


def is_binary(t: torch.Tensor) -> bool:
    return bool(torch.all((t == 0) | (t == 1)))


# ----------------------------------------------------------------------------------------------------------
# 2D pipelines
# ----------------------------------------------------------------------------------------------------------

def test_004_normalisation_and_augmentation_ranges():
    case = hu_slice_case()
    val = bizopoulos_004_transforms(["lesion"], train=False, size=None)(case.to_dict())
    assert val["image"].dtype == torch.float32 and val["image"].shape == (1, 64, 64)
    assert torch.allclose(val["image"][0], torch.from_numpy((case.image + 500.0) / 500.0))
    assert torch.equal(val["lesion"][0], torch.from_numpy(case.labels["lesion"].source.astype(np.float32)))
    train = bizopoulos_004_transforms(["lesion"], train=True, size=None, seed=0)
    affine = [t for t in train.transforms if isinstance(t, RandAffined)]
    assert len(affine) == 1 and affine[0].rand_affine.prob == 1.0
    grid = affine[0].rand_affine.rand_affine_grid
    angles, scales = [], []
    for _ in range(300):
        grid.randomize()
        angles.append(grid.rotate_params[0])
        scales.extend(grid.scale_params)
    assert -math.pi <= min(angles) < -2.8 and 2.8 < max(angles) <= math.pi    # uniform in +-180 deg
    assert 0.5 <= min(scales) < 0.6 and 1.4 < max(scales) <= 1.5              # scale 0.5..1.5
    assert list(affine[0].padding_mode) == ["zeros", "zeros"]                   # "with zero padding"
    assert MU_SIGMA_004 == {"name": "mu_sigma", "mu": -500.0, "sigma": 500.0}


def test_004_augmentation_changes_data_keeps_labels_binary_and_is_seeded():
    case = hu_slice_case()
    ref = bizopoulos_004_transforms(["lesion"], train=False, size=None)(case.to_dict())
    outs = [bizopoulos_004_transforms(["lesion"], train=True, size=None, seed=s)(case.to_dict()) for s in range(8)]
    for o in outs:
        assert o["image"].shape == (1, 64, 64) and o["lesion"].shape == (1, 64, 64)
        assert is_binary(o["lesion"])
        assert not torch.equal(o["lesion"], ref["lesion"])                    # rotation/scale always apply
    areas = {float(o["lesion"].sum()) for o in outs}
    assert len(areas) > 4                                                     # random scale changes the area
    again = bizopoulos_004_transforms(["lesion"], train=True, size=None, seed=3)(case.to_dict())
    assert torch.equal(again["image"], outs[3]["image"]) and torch.equal(again["lesion"], outs[3]["lesion"])
    # a pipeline object replays a different sequence on the next call, yet from the same seed again
    tf = bizopoulos_004_transforms(["lesion"], train=True, size=None, seed=5)
    first, second = tf(case.to_dict()), tf(case.to_dict())
    assert not torch.equal(first["image"], second["image"])
    assert torch.equal(bizopoulos_004_transforms(["lesion"], train=True, size=None, seed=5)(case.to_dict())["image"],
                       first["image"])


def test_004_lesion_b_masks_the_input_and_slice_normalisation():
    case = hu_slice_case()
    out = bizopoulos_004_transforms(["lesion"], train=False, size=None, mask_input_with="lung")(case.to_dict())
    lung = torch.from_numpy(case.labels["lung"].source.astype(bool))
    assert torch.all(out["image"][0][~lung] == 0) and torch.all(out["image"][0][lung] != 0)
    assert "lung" not in out                                                  # used for masking only
    per_slice = bizopoulos_004_transforms(["lesion"], train=False, size=None, normalisation="slice")(case.to_dict())
    assert float(per_slice["image"].mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(per_slice["image"].std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="normalisation"):
        bizopoulos_004_transforms(["lesion"], normalisation="minmax")


def test_flips_really_flip():
    case = hu_slice_case()
    base = slice_2d_transforms(["lesion"], size=None, intensity=None, train=False)(case.to_dict())
    seen = set()
    for s in range(12):
        tf = slice_2d_transforms(["lesion"], size=None, intensity=None, train=True, rotate_deg=0.0,
                                 scale=(1.0, 1.0), seed=s)
        o = tf(case.to_dict())
        img, ref = o["image"][0], base["image"][0]
        for name, cand in (("none", ref), ("lr", ref.flip(-1)), ("ud", ref.flip(-2)), ("both", ref.flip(-1).flip(-2))):
            if torch.equal(img, cand):
                seen.add(name)
                assert torch.equal(o["lesion"][0], {"none": base["lesion"][0], "lr": base["lesion"][0].flip(-1),
                                                    "ud": base["lesion"][0].flip(-2),
                                                    "both": base["lesion"][0].flip(-1).flip(-2)}[name])
                break
        else:
            raise AssertionError("with rotation 0 and scale 1 the output must be a flip of the input")
    assert {"lr", "ud"} <= seen or {"both"} <= seen


def test_intensity_augmentation_is_off_by_default_and_changes_only_the_image_when_on():
    """noise_std / smooth_sigma / shift (issue 10): off by default, so the papers' recipes are unchanged;
    when on they alter the image (noise: local variance; shift: a uniform offset) and never the labels."""
    case = hu_slice_case()
    geometric = dict(size=None, intensity=None, train=True, flip=False, rotate_deg=0.0, scale=(1.0, 1.0))
    base = slice_2d_transforms(["lesion"], size=None, intensity=None, train=False)(case.to_dict())
    plain = slice_2d_transforms(["lesion"], seed=3, **geometric)(case.to_dict())
    assert torch.equal(plain["image"], base["image"])                       # nothing on by default
    shifted_any = noisy_any = False
    for s in range(8):
        o = slice_2d_transforms(["lesion"], seed=s, shift=25.0, **geometric)(case.to_dict())
        d = o["image"][0] - base["image"][0]
        assert torch.equal(o["lesion"], base["lesion"])
        if float(d.abs().max()) > 0:
            shifted_any = True
            assert float(d.max() - d.min()) < 1e-3 and float(d.abs().max()) <= 25.0 + 1e-3   # one offset
        o = slice_2d_transforms(["lesion"], seed=s, noise_std=30.0, **geometric)(case.to_dict())
        d = o["image"][0] - base["image"][0]
        assert torch.equal(o["lesion"], base["lesion"])
        if float(d.std()) > 1.0:
            noisy_any = True
            assert float(d.std()) <= 30.0 * 1.1
    assert shifted_any and noisy_any                                        # p = 0.5 each: seen in 8 draws
    blurred = [slice_2d_transforms(["lesion"], seed=s, smooth_sigma=(1.0, 1.5), **geometric)(case.to_dict())
               for s in range(12)]
    edges = [float((b["image"][0].diff(dim=-1).abs()).max()) for b in blurred]
    assert min(edges) < float(base["image"][0].diff(dim=-1).abs().max()) * 0.9   # a blur softens the edges


def test_slice_pipeline_on_shared_ctseg2d_and_batching():
    cases = read_covid19ctseg2d(shared_file("covid19ctseg2d/covid19ctseg2d.npz").parent)[:8]
    tf = slice_2d_transforms(["infection", "lung"], size=128, intensity=UINT8_01, train=True, seed=0)
    ds = make_dataset([c.to_dict() for c in cases], tf, cache="memory")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, num_workers=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 128, 128) and batch["image"].dtype == torch.float32
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0 + 1e-6
    assert is_binary(batch["infection"]) and is_binary(batch["lung"])
    assert list(batch["id"]) == [c.id for c in cases[:4]] and list(batch["group"]) == [c.group for c in cases[:4]]


def test_intensity_uses_the_engine_ctseg2d_domain():
    case = hu_slice_case(size=256)
    out = slice_2d_transforms(["lesion"], size=256, intensity={"name": "ctseg2d_domain"}, train=False)(case.to_dict())
    expected = engine_pre.ctseg2d_domain(case.image)
    assert np.allclose(out["image"][0].numpy(), expected)
    with pytest.raises(ValueError, match="changed the shape"):
        Intensityd(["image"], {"name": "ctseg2d_domain"})({"image": np.zeros((1, 64, 64), np.float32)})
    with pytest.raises(ValueError, match="unknown intensity transform"):
        Intensityd(["image"], {"name": "nope"})


def test_missing_target_zeros_for_multitask():
    case = hu_slice_case()
    tf = slice_2d_transforms(["lesion", "effusion"], size=None, intensity=None, train=False, missing="zeros")
    out = tf(case.to_dict())
    assert out["effusion_missing"] is True and out["lesion_missing"] is False
    assert float(out["effusion"].sum()) == 0.0
    with pytest.raises(RuntimeError) as err:  # MONAI wraps the loader's DatasetError
        slice_2d_transforms(["effusion"], size=None, intensity=None, train=False)(case.to_dict())
    assert "no 'effusion' label" in str(err.value.__cause__)


# ----------------------------------------------------------------------------------------------------------
# nCoVSegNet
# ----------------------------------------------------------------------------------------------------------

def test_ncovsegnet_pipeline_crop_and_multiscale():
    case = hu_slice_case()
    crop = CropToLungBoxd(["image", "lesion", "lung"], lung_key="lung", margin=2)(load_case(case))
    assert crop["image"].shape == (1, 36 + 4, 44 + 4) and crop["lung_box"] == ((12, 52), (8, 56))
    assert crop["lesion"].sum() == case.labels["lesion"].source.sum()         # the lesion lies in the box
    out = ncovsegnet_transforms(["lesion"], size=64, train=True, seed=0)(case.to_dict())
    assert out["image"].shape == (3, 64, 64) and out["lesion"].shape == (1, 64, 64)
    assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) <= 1.0   # (0, 1) inputs
    assert torch.equal(out["image"][0], out["image"][2]) and is_binary(out["lesion"])
    val = ncovsegnet_transforms(["lesion"], size=64, train=False)(case.to_dict())
    outs = [ncovsegnet_transforms(["lesion"], size=64, train=True, seed=s)(case.to_dict()) for s in range(4)]
    assert any(not torch.equal(o["image"], val["image"]) for o in outs)
    img, lab = torch.rand(2, 3, 352, 352), (torch.rand(2, 1, 352, 352) > 0.5).float()
    sides = []
    for rate in (0.75, 1.0, 1.25):
        i2, l2 = multiscale_batch(img, lab, rate)
        assert i2.shape[-1] % 32 == 0 and i2.shape[-2:] == l2.shape[-2:] and is_binary(l2)
        sides.append(i2.shape[-1])
    assert sides == [256, 352, 448]


# ----------------------------------------------------------------------------------------------------------
# nnU-Net-style 3D
# ----------------------------------------------------------------------------------------------------------

def write_nifti(path: Path, array_zyx: np.ndarray, spacing=(0.8, 0.8, 2.5)) -> Path:
    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture()
def volume_case(tmp_path) -> Case:
    rng = np.random.default_rng(0)
    img = rng.normal(-700, 30, (12, 40, 40)).astype(np.int16)
    mask = np.zeros((12, 40, 40), np.uint8)
    mask[5:7, 18:22, 18:22] = 1
    img[mask > 0] = rng.normal(100, 20, int(mask.sum())).astype(np.int16)
    write_nifti(tmp_path / "ct.nii.gz", img)
    write_nifti(tmp_path / "mask.nii.gz", mask)
    return Case(id="v0", group="v0", source="toy", image=tmp_path / "ct.nii.gz",
                labels={"lesion": LabelRef(tmp_path / "mask.nii.gz")})


def test_spacing_statistics(volume_case):
    assert case_spacing(volume_case) == pytest.approx((2.5, 0.8, 0.8))
    assert nnunet_target_spacing([(2.5, 0.8, 0.8), (1.0, 0.7, 0.7), (2.0, 0.9, 0.9)]) == pytest.approx((2.0, 0.8, 0.8))
    # anisotropic data: the coarse axis takes its 10th percentile
    aniso = [(5.0, 0.7, 0.7)] * 8 + [(1.0, 0.7, 0.7)] * 2
    assert nnunet_target_spacing(aniso)[0] == pytest.approx(np.percentile([5.0] * 8 + [1.0] * 2, 10))


def test_resample_and_zscore(volume_case):
    item = load_case(volume_case)
    out = ResampleToSpacingd(["image"], (2.5, 1.6, 1.6), ["lesion"])(item)
    assert out["image"].shape == (1, 12, 20, 20) and out["spacing"] == (2.5, 1.6, 1.6)
    assert set(np.unique(out["lesion"])) == {0, 1} and out["lesion"].sum() == 2 * 2 * 2
    spec = fit_zscore([item], "lesion")
    fg = item["image"][item["lesion"] > 0]
    assert spec["name"] == "ct_zscore" and spec["mean"] == pytest.approx(float(fg.mean()), rel=1e-5)
    z = Intensityd(["image"], spec)(item)["image"]
    assert float(z[item["lesion"] > 0].mean()) == pytest.approx(0.0, abs=0.05)


def test_nnunet_3d_patches_oversample_foreground(volume_case):
    spec = fit_zscore([load_case(volume_case)], "lesion")
    patch = (4, 8, 8)
    with_fg = total = 0
    for s in range(10):
        tf = nnunet_3d_transforms(["lesion"], (2.5, 1.6, 1.6), spec, patch_size=patch, num_samples=3, seed=s)
        samples = tf(volume_case.to_dict())
        assert isinstance(samples, list) and len(samples) == 3
        for smp in samples:
            assert smp["image"].shape == (1, *patch) and smp["image"].dtype == torch.float32
            assert smp["lesion"].shape == (1, *patch) and is_binary(smp["lesion"])
            with_fg += int(smp["lesion"].sum() > 0)
            total += 1
    # 1/3 of the patches are centred on foreground; the foreground is tiny, so background ones rarely hit it
    assert 0.25 <= with_fg / total <= 0.75
    a = nnunet_3d_transforms(["lesion"], (2.5, 1.6, 1.6), spec, patch_size=patch, seed=7)(volume_case.to_dict())
    b = nnunet_3d_transforms(["lesion"], (2.5, 1.6, 1.6), spec, patch_size=patch, seed=7)(volume_case.to_dict())
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    val = nnunet_3d_transforms(["lesion"], (2.5, 1.6, 1.6), spec, train=False)(volume_case.to_dict())
    assert val["image"].shape == (1, 12, 20, 20) and float(val["lesion"].sum()) == 8.0


def test_mask_input_requires_mask():
    with pytest.raises(KeyError, match="no 'lung' mask"):
        MaskInputd("lung")({"image": np.zeros((1, 4, 4), np.float32)})


def test_unsupervised_lung_box_crop_on_real_ct():
    """nCoVSegNet's 3D lung crop without a lung label: the engine's unsupervised lung mask on a real scan."""
    from training.datasets import read_shared_ct

    shared_file("ct/covidctmd_normal001_ct.nii.gz")
    case = next(c for c in read_shared_ct(shared_file("ct")) if c.id == "normal001")
    item = load_case(case, [])
    out = CropToLungBoxd(["image"], lung_key=None, margin=4)(item)
    (z0, z1), (y0, y1), (x0, x1) = out["lung_box"]
    assert out["image"].shape == (1, z1 - z0, y1 - y0, x1 - x0)
    # the box drops the table, the air around the body and the upper abdomen, but keeps both lungs wide
    assert (y1 - y0) < 0.8 * 512 and (x1 - x0) > 0.6 * 512
    inside = out["image"][0]
    assert float((inside < -600).mean()) > 0.15                             # lungs (air) fill much of the box
