"""Relation-driven collaborative learning losses of 002 (Zhang et al., section III-B, eqs. 1, 2, 4, 5).

- :func:`relation_matrix` (eqs. 1-2): features ``F`` ``(N, C, *spatial)`` averaged over the batch ("we
  average the features within each batch to get the mean representation"), reshaped to ``A`` (C x HWD),
  channel-wise Gram matrix ``G = A A^T``, and ``R`` = ``G`` with each row L2-normalised.
- :func:`general_relation_loss` (eq. 4): ``L_G = lambda_G ||R_G(X^n) - R_G(X^c)||^2``, updates the general
  encoder G (both arguments keep their graph).
- :func:`target_relation_loss` (eq. 5): ``L_T = -lambda_T ||R_G(X^c) - R_T(X^c)||^2``, updates the target
  encoder T only: ``R_G(X^c)`` is detached here (Algorithm 1: "Update θT with L_T").
- :func:`sigmoid_rampup` / :class:`RelationLossWeights`: the ramp-up of lambda_G, lambda_T.

Norm convention: the paper writes ``||.||^2`` of a matrix difference without any normalisation, i.e. the
squared Frobenius norm (sum over the C x C entries): ``reduction="sum"``, the default. ``"mean"`` divides by
the C^2 entries (mean-squared error, as mean-teacher consistency losses do) for experiments. Because rows
of R have unit norm, each row of the difference has squared norm <= 4, so the sum is bounded by 4C and the
negative target loss cannot run away.

Loss weights: the paper ramps lambda_G and lambda_T up "to mitigate the disturbance of consistency loss at
early training stage" but gives neither their final values nor the ramp length. Chosen defaults (documented
guesses, set them in the training config): the mean-teacher sigmoid ramp-up ``exp(-5 (1 - t/T)^2)`` over the
first 40 epochs (as in the semi-supervised segmentation work that popularised it for 3D), lambda_G_max = 1
(G receives no other gradient, so its weight only sets G's step size) and lambda_T_max = 0.1 (the negative
term competes with the segmentation loss on T; a smaller weight keeps segmentation in charge). With the
"sum" norm the per-entry gradient 2 lambda (R1 - R2) has the magnitude of an ordinary per-voxel loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def relation_matrix(features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-normalised channel-wise Gram matrix ``R`` (C x C) of 002 eqs. 1-2.

    Args:
        features: ``(N, C, *spatial)`` encoder features (2D or 3D); averaged over the batch first.
        eps: guards the row normalisation of an all-zero channel.
    """
    if not isinstance(features, torch.Tensor) or features.dim() < 3:
        raise ValueError("relation_matrix expects features (N, C, *spatial), got "
                         f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}")
    a = features.float().mean(dim=0).flatten(1)      # A: C x HWD (batch mean representation)
    gram = a @ a.t()                                   # eq. 1: G_mn = <A_m, A_n>
    return F.normalize(gram, p=2, dim=1, eps=eps)     # eq. 2: each row divided by its L2 norm


def relation_distance(r1: torch.Tensor, r2: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """``||r1 - r2||^2``: squared Frobenius norm (``"sum"``, the paper's) or its mean over entries (``"mean"``)."""
    if r1.shape != r2.shape or r1.dim() != 2:
        raise ValueError(f"relation matrices must be equal-shaped C x C, got {tuple(r1.shape)} and {tuple(r2.shape)}")
    sq = (r1 - r2).pow(2)
    if reduction == "sum":
        return sq.sum()
    if reduction == "mean":
        return sq.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def general_relation_loss(r_general_noncovid: torch.Tensor, r_general_covid: torch.Tensor, weight: float,
                          reduction: str = "sum") -> torch.Tensor:
    """Eq. 4: ``lambda_G ||R_G(X^n) - R_G(X^c)||^2`` (gradient to G through both relation matrices)."""
    return weight * relation_distance(r_general_noncovid, r_general_covid, reduction)


def target_relation_loss(r_general_covid: torch.Tensor, r_target_covid: torch.Tensor, weight: float,
                         reduction: str = "sum") -> torch.Tensor:
    """Eq. 5: ``-lambda_T ||R_G(X^c) - R_T(X^c)||^2``; ``R_G(X^c)`` is detached so only T is updated."""
    return -weight * relation_distance(r_general_covid.detach(), r_target_covid, reduction)


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """Mean-teacher sigmoid ramp-up ``exp(-5 (1 - t/T)^2)``, ``t`` clipped to ``[0, T]``; 1 when ``T <= 0``."""
    if rampup_length <= 0:
        return 1.0
    t = min(max(float(current), 0.0), float(rampup_length)) / float(rampup_length)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


@dataclass(frozen=True)
class RelationLossWeights:
    """lambda_G(t), lambda_T(t) of 002 with the mean-teacher ramp-up (module docstring for the defaults).

    ``t`` and ``rampup_length`` share a unit chosen by the trainer (epochs by default).
    """

    lambda_general_max: float = 1.0
    lambda_target_max: float = 0.1
    rampup_length: float = 40.0

    def __call__(self, t: float) -> tuple[float, float]:
        ramp = sigmoid_rampup(t, self.rampup_length)
        return self.lambda_general_max * ramp, self.lambda_target_max * ramp


def collaborative_relation_losses(features_covid: dict[str, torch.Tensor], features_general_noncovid: torch.Tensor,
                                  weights: tuple[float, float], reduction: str = "sum"
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 lines 5 and 8: ``(L_G, L_T)`` from the model's features.

    Args:
        features_covid: ``{"general": F_G(X^c), "target": F_T(X^c)}`` from
            ``CollaborativeUNet.forward(x_c, return_features=True)``.
        features_general_noncovid: ``F_G(X^n)`` from ``CollaborativeUNet.general_features(x_n)``.
        weights: ``(lambda_G, lambda_T)`` at this step (``RelationLossWeights(t)``).
    """
    r_g_c = relation_matrix(features_covid["general"])
    r_t_c = relation_matrix(features_covid["target"])
    r_g_n = relation_matrix(features_general_noncovid)
    lam_g, lam_t = weights
    return (general_relation_loss(r_g_n, r_g_c, lam_g, reduction),
            target_relation_loss(r_g_c, r_t_c, lam_t, reduction))
