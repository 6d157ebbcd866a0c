"""Segmentation losses of the papers.

- :class:`DiceCELoss`: nnU-Net's soft Dice + cross-entropy with deep supervision (000 section 3.1-3.2,
  001, 002 eq. 3: ``L_seg = L_dice + L_ce`` "and deep supervision is applied").
- :class:`SoftDiceLoss`: 004 eq. 1, ``1 - 2 sum(Y Yhat) / (sum Y^2 + sum Yhat^2 + eps)``, eps = 1e-5, sigmoid.
- :class:`StructureLoss`: nCoVSegNet's loss (003 eqs. 5-8): per output, pixel-weighted BCE + weighted Dice
  with weights from the local mean of the mask; summed over the four deep-supervision outputs.

All losses take logits (the networks' contract in ``registry.py``): a tensor, or for deep supervision a list
``[full_res, lower_res, ...]``; a lower-resolution output is compared with the target down-sampled by
nearest neighbour (``"nearest-exact"``, i.e. pixel-centre sampling) to its size. Targets are label maps
``(N, 1, *spatial)`` or ``(N, *spatial)``; for C-channel softmax outputs a one-hot ``(N, C, *spatial)``
target is accepted too.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceLoss
from monai.losses import DiceCELoss as _MonaiDiceCELoss
from torch import nn


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """nnU-Net's deep-supervision weights: ``1/2^i`` for output ``i`` (0 = full resolution), the
    lowest-resolution output set to 0 (when there is more than one output), normalised to sum 1."""
    if n_outputs < 1:
        raise ValueError(f"need at least one output, got {n_outputs}")
    w = [0.5 ** i for i in range(n_outputs)]
    if n_outputs > 1:
        w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


def _as_list(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (list, tuple)) and outputs and all(isinstance(o, torch.Tensor) for o in outputs):
        return list(outputs)
    raise TypeError("expected a logits tensor or a non-empty list of logits tensors (deep supervision), got "
                    f"{type(outputs).__name__}")


def _label_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Target as a float ``(N, 1, *spatial)`` label map matching ``logits`` (checked)."""
    n_classes = logits.shape[1]
    if target.dim() == logits.dim() - 1:
        target = target.unsqueeze(1)
    if target.dim() != logits.dim() or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target shape {tuple(target.shape)} does not fit logits {tuple(logits.shape)}: expected "
                         "(N, 1, *spatial) labels, (N, *spatial), or one-hot (N, C, *spatial)")
    if target.shape[1] != 1:
        if target.shape[1] != n_classes or n_classes == 1:
            raise ValueError(f"target has {target.shape[1]} channels; logits have {n_classes}: give labels "
                             "(N, 1, *spatial) or a one-hot target with one channel per class")
        target = target.argmax(dim=1, keepdim=True)
    target = target.float()
    limit = 1 if n_classes == 1 else n_classes - 1
    if target.numel() and (target.min() < 0 or target.max() > limit or torch.any(target != target.round())):
        raise ValueError(f"target labels must be integers in 0..{limit} for {n_classes}-channel logits, got values "
                         f"in [{float(target.min())}, {float(target.max())}]")
    return target


class DiceCELoss(nn.Module):
    """nnU-Net loss: soft Dice + cross-entropy, deep supervision weighted as nnU-Net.

    Built on ``monai.losses.DiceCELoss`` (per output) and ``monai.losses.DeepSupervisionLoss`` (target
    down-sampling and weighting), with the weights of :func:`deep_supervision_weights`.

    - ``C >= 2`` logits: softmax Dice over the foreground classes (nnU-Net's ``do_bg=False``) + CE;
    - ``C == 1`` logits: sigmoid Dice + BCE (Table I of 002 ends in a sigmoid).

    Args:
        batch_dice: sum intersections and sizes over the batch before dividing (nnU-Net's default for its 2D
            and 3D full-resolution plans; with batch 2 and patches that may miss the lesion a per-sample Dice
            is noisy and undefined on empty patches). ``False``: Dice per sample, then averaged.
        smooth: added to numerator and denominator (nnU-Net uses 1e-5).
        lambda_dice, lambda_ce: term weights (1, 1 in the papers).
    """

    def __init__(self, batch_dice: bool = True, smooth: float = 1e-5, lambda_dice: float = 1.0,
                 lambda_ce: float = 1.0):
        super().__init__()
        common = dict(batch=batch_dice, smooth_nr=smooth, smooth_dr=smooth, lambda_dice=lambda_dice,
                      lambda_ce=lambda_ce)
        self.softmax_loss = _MonaiDiceCELoss(include_background=False, to_onehot_y=True, softmax=True, **common)
        self.sigmoid_loss = _MonaiDiceCELoss(include_background=True, sigmoid=True, **common)
        self._ds: dict[tuple[int, int], DeepSupervisionLoss] = {}

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        outs = _as_list(outputs)
        n_classes = outs[0].shape[1]
        if any(o.shape[1] != n_classes for o in outs):
            raise ValueError(f"all outputs must have the same channels, got {[o.shape[1] for o in outs]}")
        target = _label_target(outs[0], target)
        if target.shape[2:] != outs[0].shape[2:]:
            raise ValueError(f"the first output must be at the target's size {tuple(target.shape[2:])}, got "
                             f"{tuple(outs[0].shape[2:])}")
        key = (len(outs), 1 if n_classes == 1 else 2)
        if key not in self._ds:
            base = self.sigmoid_loss if n_classes == 1 else self.softmax_loss
            self._ds[key] = DeepSupervisionLoss(base, weights=deep_supervision_weights(len(outs)))
        return self._ds[key](outs if len(outs) > 1 else outs[0], target)


class SoftDiceLoss(nn.Module):
    """Soft Dice loss of 004 eq. 1 on sigmoid outputs: ``1 - 2 sum(Y Yhat) / (sum Y^2 + sum Yhat^2 + eps)``.

    eps = 1e-5 in the denominator only (as printed; an empty mask with an empty prediction gives loss 1, which
    has zero gradient there). Sums over each image's pixels, per channel; ``batch=False`` (default) averages
    the per-image losses, ``batch=True`` sums over the batch first.
    Built on ``monai.losses.DiceLoss(sigmoid=True, squared_pred=True)``. Multi-channel logits are
    independent sigmoid channels (target of the same shape, or a 1-channel target for 1-channel logits).
    """

    def __init__(self, eps: float = 1e-5, batch: bool = False):
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=eps, batch=batch)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor):
            raise TypeError("SoftDiceLoss takes one logits tensor (004's networks have no deep supervision), got "
                            f"{type(logits).__name__}")
        if target.dim() == logits.dim() - 1:
            target = target.unsqueeze(1)
        if target.shape != logits.shape:
            raise ValueError(f"target shape {tuple(target.shape)} must equal logits shape {tuple(logits.shape)}")
        return self.dice(logits, target.float())


class StructureLoss(nn.Module):
    """nCoVSegNet loss (003 eqs. 5-8): ``L = sum_k (L_BCE^k + L_Dice^k)`` over the deep-supervision outputs.

    Pixel weight (eq. 7, F3Net's): ``w = 1 + gain * |mean_{A_ij}(g) - g_ij|`` where ``A_ij`` is the
    ``kernel_size`` window around the pixel (31, stride 1, padding 15). Eq. 7 averages over the area's
    pixels, so windows clipped at the border average only the pixels inside the image (F3Net's zero-padded
    pooling would dilute the mean near the border).
    ``gain`` is 5 as in F3Net, which 003 follows, and the authors' code; eq. 7 as printed has no factor
    (``boundary_gain=1`` reproduces the printed equation).

    Weighted BCE (eq. 6): ``sum(w * bce) / sum(w)`` per image. As printed, the denominator is ``sum(alpha)``,
    which is zero for a uniform mask; this uses the weighted mean of F3Net. Each pixel's BCE is weighted
    (the authors' code passed a deprecated ``reduce=`` argument that made its BCE an unweighted mean).

    Weighted overlap (eq. 8): the paper calls it a weighted Dice loss with numerator ``sum 2 g p w``; the
    printed denominator ``sum (g + p + g p) w`` cannot be right (a perfect prediction would give 1/3). With
    ``overlap="dice"`` (default): ``1 - (2 sum w g p + s) / (sum w (g + p) + s)``; ``overlap="iou"``: the
    weighted IoU of F3Net/the authors' code, ``1 - (sum w g p + s) / (sum w (g + p) - sum w g p + s)``.
    ``s = smooth = 1`` as in F3Net. ``p = sigmoid(logits)``.

    Per image, then averaged over the batch; outputs summed with ``weights`` (eq. 5: all 1). Outputs below
    the target's size get the target down-sampled by nearest neighbour (the weight map is computed at the
    output's size). Works for 2D and 3D.
    """

    def __init__(self, kernel_size: int = 31, boundary_gain: float = 5.0, overlap: str = "dice",
                 smooth: float = 1.0, weights: Sequence[float] | None = None):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if overlap not in ("dice", "iou"):
            raise ValueError(f"overlap must be 'dice' or 'iou', got {overlap!r}")
        self.kernel_size = kernel_size
        self.boundary_gain = float(boundary_gain)
        self.overlap = overlap
        self.smooth = float(smooth)
        self.weights = None if weights is None else [float(w) for w in weights]

    def pixel_weights(self, target: torch.Tensor) -> torch.Tensor:
        """``1 + gain * |local mean(g) - g|`` (eq. 7), same shape as ``target`` ``(N, 1, *spatial)``."""
        pool = {4: F.avg_pool2d, 5: F.avg_pool3d}.get(target.dim())
        if pool is None:
            raise ValueError(f"expected a 2D or 3D target (N, 1, *spatial), got shape {tuple(target.shape)}")
        # Window mean over the pixels inside the image: box sums of the zero-padded mask divided by box sums
        # of a zero-padded ones map (explicit padding also accepts images smaller than the window).
        r = self.kernel_size // 2
        pad = (r, r) * (target.dim() - 2)
        sums = pool(F.pad(target, pad), self.kernel_size, stride=1)
        counts = pool(F.pad(torch.ones_like(target[:1]), pad), self.kernel_size, stride=1)
        local = sums / counts
        return 1.0 + self.boundary_gain * (local - target).abs()

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Eq. 6 + eq. 8 for one output, averaged over the batch."""
        w = self.pixel_weights(target)
        dims = tuple(range(1, logits.dim()))
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        wbce = (w * bce).sum(dims) / w.sum(dims)
        p = torch.sigmoid(logits)
        inter = (w * p * target).sum(dims)
        total = (w * (p + target)).sum(dims)
        if self.overlap == "dice":
            woverlap = 1.0 - (2.0 * inter + self.smooth) / (total + self.smooth)
        else:
            woverlap = 1.0 - (inter + self.smooth) / (total - inter + self.smooth)
        return (wbce + woverlap).mean()

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        outs = _as_list(outputs)
        if any(o.shape[1] != 1 for o in outs):
            raise ValueError(f"StructureLoss expects 1-channel (sigmoid) logits, got channels {[o.shape[1] for o in outs]}")
        target = _label_target(outs[0], target)
        weights = self.weights or [1.0] * len(outs)
        if len(weights) != len(outs):
            raise ValueError(f"{len(weights)} weights for {len(outs)} outputs")
        total = outs[0].new_zeros(())
        for w, out in zip(weights, outs):
            t = target if out.shape[2:] == target.shape[2:] else F.interpolate(target, size=out.shape[2:],
                                                                                mode="nearest-exact")
            total = total + w * self.single(out.float(), t)
        return total
