"""Relation matrices, relation consistency losses and ramp-up of 002 (models/relation.py), against hand
computations written with explicit loops in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from COVIDLesionSegLib.models.relation import (
    RelationLossWeights,
    collaborative_relation_losses,
    general_relation_loss,
    relation_distance,
    relation_matrix,
    sigmoid_rampup,
    target_relation_loss,
)


def _relation_by_hand(f: np.ndarray) -> np.ndarray:
    n, c = f.shape[:2]
    mean = np.zeros(f.shape[1:])
    for i in range(n):
        mean += f[i] / n
    a = mean.reshape(c, -1)
    g = np.zeros((c, c))
    for m in range(c):
        for k in range(c):
            g[m, k] = sum(a[m, j] * a[k, j] for j in range(a.shape[1]))
    r = np.zeros_like(g)
    for m in range(c):
        norm = math.sqrt(sum(v * v for v in g[m]))
        r[m] = g[m] / norm
    return r


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 4, 2, 3, 2)])
def test_relation_matrix_matches_hand_computation(shape):
    torch.manual_seed(0)
    f = torch.randn(*shape)
    r = relation_matrix(f)
    assert r.shape == (shape[1], shape[1])
    assert np.allclose(r.numpy(), _relation_by_hand(f.numpy().astype(np.float64)), atol=1e-5)
    assert torch.allclose(r.norm(dim=1), torch.ones(shape[1]), atol=1e-6)   # unit-norm rows


def test_relation_matrix_uses_the_batch_mean():
    torch.manual_seed(1)
    f = torch.randn(4, 3, 5, 5)
    assert torch.allclose(relation_matrix(f), relation_matrix(f.mean(0, keepdim=True)), atol=1e-6)
    # not the mean of per-sample relations
    per_sample = torch.stack([relation_matrix(f[i:i + 1]) for i in range(4)]).mean(0)
    assert not torch.allclose(relation_matrix(f), per_sample, atol=1e-3)


def test_relation_matrix_is_scale_invariant_and_survives_a_dead_channel():
    f = torch.rand(2, 3, 4, 4)
    assert torch.allclose(relation_matrix(f), relation_matrix(7.5 * f), atol=1e-6)
    f[:, 1] = 0
    r = relation_matrix(f)
    assert torch.isfinite(r).all() and torch.allclose(r[1], torch.zeros(3))


def test_relation_losses_match_hand_computation():
    torch.manual_seed(2)
    r1, r2, r3 = (relation_matrix(torch.randn(2, 4, 3, 3)) for _ in range(3))
    d12 = sum((float(r1[i, j]) - float(r2[i, j])) ** 2 for i in range(4) for j in range(4))
    d13 = sum((float(r1[i, j]) - float(r3[i, j])) ** 2 for i in range(4) for j in range(4))
    assert math.isclose(float(relation_distance(r1, r2)), d12, rel_tol=1e-5)
    assert math.isclose(float(relation_distance(r1, r2, "mean")), d12 / 16, rel_tol=1e-5)
    assert math.isclose(float(general_relation_loss(r1, r2, 0.3)), 0.3 * d12, rel_tol=1e-5)
    assert math.isclose(float(target_relation_loss(r1, r3, 0.2)), -0.2 * d13, rel_tol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        relation_distance(r1, r2, "max")


def test_target_loss_only_reaches_the_target_features_and_is_bounded():
    torch.manual_seed(3)
    fg = torch.randn(2, 5, 3, 3, requires_grad=True)
    ft = torch.randn(2, 5, 3, 3, requires_grad=True)
    loss = target_relation_loss(relation_matrix(fg), relation_matrix(ft), 1.0)
    loss.backward()
    assert fg.grad is None and ft.grad is not None and ft.grad.abs().sum() > 0
    assert loss.item() >= -4 * 5   # unit rows: each row of the difference has squared norm <= 4
    fn = torch.randn(2, 5, 3, 3, requires_grad=True)
    general_relation_loss(relation_matrix(fn), relation_matrix(fg), 1.0).backward()
    assert fn.grad is not None and fg.grad is not None


def test_collaborative_relation_losses_wrapper():
    torch.manual_seed(4)
    fg, ft, fn = torch.randn(2, 4, 2, 2, 2), torch.randn(2, 4, 2, 2, 2), torch.randn(2, 4, 2, 2, 2)
    l_g, l_t = collaborative_relation_losses({"general": fg, "target": ft}, fn, (0.5, 0.25))
    rg, rt, rn = (_relation_by_hand(t.numpy().astype(np.float64)) for t in (fg, ft, fn))
    assert math.isclose(float(l_g), 0.5 * float(((rn - rg) ** 2).sum()), rel_tol=1e-4)
    assert math.isclose(float(l_t), -0.25 * float(((rg - rt) ** 2).sum()), rel_tol=1e-4)


def test_sigmoid_rampup():
    assert math.isclose(sigmoid_rampup(0, 40), math.exp(-5))
    assert math.isclose(sigmoid_rampup(20, 40), math.exp(-5 * 0.25))
    assert sigmoid_rampup(40, 40) == 1.0 and sigmoid_rampup(100, 40) == 1.0
    assert sigmoid_rampup(-3, 40) == sigmoid_rampup(0, 40)
    assert sigmoid_rampup(5, 0) == 1.0
    values = [sigmoid_rampup(t, 40) for t in range(41)]
    assert all(b > a for a, b in zip(values, values[1:]))
    w = RelationLossWeights(lambda_general_max=2.0, lambda_target_max=0.5, rampup_length=10)
    lg, lt = w(5)
    assert math.isclose(lg, 2.0 * math.exp(-1.25)) and math.isclose(lt, 0.5 * math.exp(-1.25))
