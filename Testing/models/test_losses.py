"""Losses (models/losses.py) against hand computations written independently with explicit loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from COVIDLesionSegLib.models.losses import DiceCELoss, SoftDiceLoss, StructureLoss, deep_supervision_weights

SMOOTH = 1e-5


def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def _softmax_dice_ce_by_hand(logits: np.ndarray, labels: np.ndarray, batch_dice: bool) -> float:
    """nnU-Net Dice (foreground classes) + CE for 2D logits (N, C, H, W) and labels (N, H, W)."""
    n, c, h, w = logits.shape
    probs = np.zeros_like(logits)
    ce, count = 0.0, 0
    for b in range(n):
        for i in range(h):
            for j in range(w):
                ex = [math.exp(logits[b, k, i, j]) for k in range(c)]
                for k in range(c):
                    probs[b, k, i, j] = ex[k] / sum(ex)
                ce += -math.log(probs[b, int(labels[b, i, j]), i, j])
                count += 1
    ce /= count
    dice_terms = []
    for k in range(1, c):
        if batch_dice:
            inter = sum(probs[b, k, i, j] * (labels[b, i, j] == k) for b in range(n) for i in range(h) for j in range(w))
            size = sum(probs[b, k, i, j] + (labels[b, i, j] == k) for b in range(n) for i in range(h) for j in range(w))
            dice_terms.append(1 - (2 * inter + SMOOTH) / (size + SMOOTH))
        else:
            for b in range(n):
                inter = sum(probs[b, k, i, j] * (labels[b, i, j] == k) for i in range(h) for j in range(w))
                size = sum(probs[b, k, i, j] + (labels[b, i, j] == k) for i in range(h) for j in range(w))
                dice_terms.append(1 - (2 * inter + SMOOTH) / (size + SMOOTH))
    return float(np.mean(dice_terms)) + ce


def _sigmoid_dice_bce_by_hand(logits: np.ndarray, labels: np.ndarray, batch_dice: bool) -> float:
    n, _, h, w = logits.shape
    bce, count = 0.0, 0
    inters, sizes = [0.0] * n, [0.0] * n
    for b in range(n):
        for i in range(h):
            for j in range(w):
                p, g = _sigmoid(logits[b, 0, i, j]), labels[b, i, j]
                bce += -(g * math.log(p) + (1 - g) * math.log(1 - p))
                count += 1
                inters[b] += p * g
                sizes[b] += p + g
    if batch_dice:
        dice = 1 - (2 * sum(inters) + SMOOTH) / (sum(sizes) + SMOOTH)
    else:
        dice = float(np.mean([1 - (2 * inters[b] + SMOOTH) / (sizes[b] + SMOOTH) for b in range(n)]))
    return dice + bce / count


def test_deep_supervision_weights():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(2) == [1.0, 0.0]
    w = deep_supervision_weights(5)
    raw = [1, 0.5, 0.25, 0.125, 0]
    assert np.allclose(w, [r / sum(raw) for r in raw]) and math.isclose(sum(w), 1.0)
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


@pytest.mark.parametrize("batch_dice", [True, False])
@pytest.mark.parametrize("n_classes", [2, 3])
def test_dice_ce_softmax_matches_hand_computation(batch_dice, n_classes):
    g = torch.Generator().manual_seed(n_classes)
    logits = torch.randn(2, n_classes, 3, 4, generator=g)
    labels = torch.randint(0, n_classes, (2, 3, 4), generator=g)
    expected = _softmax_dice_ce_by_hand(logits.double().numpy(), labels.numpy(), batch_dice)
    got = DiceCELoss(batch_dice=batch_dice)(logits, labels.unsqueeze(1))
    assert math.isclose(float(got), expected, rel_tol=1e-5)
    # labels without the channel axis and one-hot targets give the same loss
    assert math.isclose(float(DiceCELoss(batch_dice=batch_dice)(logits, labels)), expected, rel_tol=1e-5)
    one_hot = torch.nn.functional.one_hot(labels, n_classes).permute(0, 3, 1, 2)
    assert math.isclose(float(DiceCELoss(batch_dice=batch_dice)(logits, one_hot)), expected, rel_tol=1e-5)


@pytest.mark.parametrize("batch_dice", [True, False])
def test_dice_ce_sigmoid_matches_hand_computation(batch_dice):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 1, 4, 4, generator=g)
    labels = (torch.rand(2, 4, 4, generator=g) > 0.6).long()
    expected = _sigmoid_dice_bce_by_hand(logits.double().numpy(), labels.numpy(), batch_dice)
    assert math.isclose(float(DiceCELoss(batch_dice=batch_dice)(logits, labels.unsqueeze(1))), expected, rel_tol=1e-5)


def test_dice_ce_deep_supervision_downsamples_targets_and_weights_outputs():
    g = torch.Generator().manual_seed(6)
    outs = [torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 2, 4, 4, generator=g),
            torch.randn(2, 2, 2, 2, generator=g)]
    labels = torch.randint(0, 2, (2, 8, 8), generator=g)
    # nearest neighbour at pixel centres: output pixel i of a 2x smaller map samples input pixel 2i + 1
    targets = [labels, labels[:, 1::2, 1::2], labels[:, 3::4, 3::4]]
    per_level = [_softmax_dice_ce_by_hand(o.double().numpy(), t.numpy(), True) for o, t in zip(outs, targets)]
    expected = (1 * per_level[0] + 0.5 * per_level[1] + 0 * per_level[2]) / 1.5
    got = DiceCELoss()(outs, labels.unsqueeze(1))
    assert math.isclose(float(got), expected, rel_tol=1e-5)
    # the lowest-resolution output gets no gradient (nnU-Net weight 0)
    outs = [o.requires_grad_() for o in outs]
    DiceCELoss()(outs, labels.unsqueeze(1)).backward()
    assert outs[1].grad.abs().sum() > 0 and outs[2].grad.abs().sum() == 0


def test_dice_ce_rejects_bad_targets():
    logits = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="labels must be integers"):
        DiceCELoss()(logits, torch.full((1, 1, 4, 4), 2))
    with pytest.raises(ValueError, match="channels"):
        DiceCELoss()(logits, torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="first output"):
        DiceCELoss()([torch.randn(1, 2, 2, 2)], torch.zeros(1, 1, 4, 4))
    with pytest.raises(TypeError):
        DiceCELoss()("logits", torch.zeros(1, 1, 4, 4))


def test_soft_dice_matches_004_eq1():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 1, 5, 4, generator=g)
    target = (torch.rand(3, 1, 5, 4, generator=g) > 0.5).float()
    target[2] = 0   # an empty mask
    losses = []
    for b in range(3):
        num = den_y = den_p = 0.0
        for i in range(5):
            for j in range(4):
                p, y = _sigmoid(float(logits[b, 0, i, j])), float(target[b, 0, i, j])
                num += y * p
                den_y += y * y
                den_p += p * p
        losses.append(1 - 2 * num / (den_y + den_p + 1e-5))
    assert math.isclose(float(SoftDiceLoss()(logits, target)), float(np.mean(losses)), rel_tol=1e-5)
    assert math.isclose(float(SoftDiceLoss()(logits, target[:, 0])), float(np.mean(losses)), rel_tol=1e-5)
    with pytest.raises(TypeError):
        SoftDiceLoss()([logits], target)


def _structure_by_hand(logits: np.ndarray, mask: np.ndarray, k: int, gain: float, overlap: str = "dice") -> float:
    """003 eqs. 6-8 for 2D (N, 1, H, W): clipped-window local mean, weighted BCE and weighted Dice/IoU."""
    n, _, h, w = logits.shape
    r = k // 2
    per_image = []
    for b in range(n):
        sw = swb = inter = total = 0.0
        for i in range(h):
            for j in range(w):
                vals = [mask[b, 0, m, q] for m in range(max(0, i - r), min(h, i + r + 1))
                        for q in range(max(0, j - r), min(w, j + r + 1))]
                g = mask[b, 0, i, j]
                wt = 1 + gain * abs(sum(vals) / len(vals) - g)
                p = _sigmoid(logits[b, 0, i, j])
                bce = -(g * math.log(p) + (1 - g) * math.log(1 - p))
                sw += wt
                swb += wt * bce
                inter += wt * g * p
                total += wt * (g + p)
        if overlap == "dice":
            wov = 1 - (2 * inter + 1) / (total + 1)
        else:
            wov = 1 - (inter + 1) / (total - inter + 1)
        per_image.append(swb / sw + wov)
    return float(np.mean(per_image))


def _case(seed, h=6, w=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 1, h, w, generator=g)
    mask = torch.zeros(2, 1, h, w)
    mask[0, 0, 1:4, 2:6] = 1
    mask[1, 0, 3:, :3] = 1
    return logits, mask


@pytest.mark.parametrize("overlap", ["dice", "iou"])
@pytest.mark.parametrize("k", [3, 5])
def test_structure_loss_matches_hand_computation(overlap, k):
    logits, mask = _case(8)
    expected = _structure_by_hand(logits.double().numpy(), mask.numpy(), k, 5.0, overlap)
    got = StructureLoss(kernel_size=k, overlap=overlap)(logits, mask)
    assert math.isclose(float(got), expected, rel_tol=1e-5)
    # the case is discriminating: unweighted (gain 0) differs, so the BCE weighting really acts
    assert not math.isclose(_structure_by_hand(logits.double().numpy(), mask.numpy(), k, 0.0, overlap), expected,
                            rel_tol=1e-3)


def test_structure_loss_default_window_and_deep_supervision_sum():
    logits, mask = _case(9, 8, 8)
    small = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(10))
    # default 31x31 window covers these small images entirely (clipped): local mean = image mean
    full = _structure_by_hand(logits.double().numpy(), mask.numpy(), 31, 5.0)
    low = _structure_by_hand(small.double().numpy(), mask[:, :, 1::2, 1::2].numpy(), 31, 5.0)
    loss = StructureLoss()
    assert math.isclose(float(loss(logits, mask)), full, rel_tol=1e-5)
    assert math.isclose(float(loss([logits, small], mask)), full + low, rel_tol=1e-5)   # eq. 5: plain sum
    w = loss.pixel_weights(mask)
    assert w.shape == mask.shape and float(w.min()) >= 1.0
    assert math.isclose(float(w[0, 0, 0, 0]), 1 + 5 * float(mask[0].mean()), rel_tol=1e-5)


def test_structure_loss_3d_and_errors():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(1, 1, 4, 6, 6, generator=g)
    mask = (torch.rand(1, 1, 4, 6, 6, generator=g) > 0.5).float()
    value = StructureLoss()(logits, mask)
    assert torch.isfinite(value) and value > 0
    with pytest.raises(ValueError, match="1-channel"):
        StructureLoss()(torch.randn(1, 2, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="odd"):
        StructureLoss(kernel_size=4)
