"""Hybrid-encoder (000), Multi-encoder (001) and collaborative (002) U-Nets (models/dual_encoder.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from COVIDLesionSegLib.models import architectures, build
from COVIDLesionSegLib.models.dual_encoder import (
    CollaborativeUNet,
    HybridEncoderUNet,
    MultiEncoderUNet,
    SelectiveFusion,
)
from COVIDLesionSegLib.models.losses import DiceCELoss
from COVIDLesionSegLib.models.nnunet import NnUNet
from COVIDLesionSegLib.models.relation import collaborative_relation_losses

torch.set_num_threads(2)

TINY3 = dict(spatial_dims=3, channels=[4, 8, 16], strides=[1, 2, 2], kernel_sizes=[3, 3, 3])
TINY2 = dict(spatial_dims=2, channels=[4, 8, 16], strides=[1, 2, 2], kernel_sizes=[3, 3, 3])
CLASSES = [HybridEncoderUNet, MultiEncoderUNet, CollaborativeUNet]


def _target(shape):
    y = torch.zeros(shape)
    y[..., 2:6, 3:7] = 1
    return y


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("args,shape", [(TINY3, (2, 1, 8, 8, 12)), (TINY2, (2, 1, 12, 16))])
def test_output_contract(cls, args, shape):
    torch.manual_seed(0)
    net = cls(**args)
    x = torch.randn(*shape)
    net.eval()
    with torch.no_grad():
        y = net(x)
    assert isinstance(y, torch.Tensor) and y.shape == (shape[0], 1) + shape[2:]
    net.train()
    ys = net(x)
    assert isinstance(ys, list) and [tuple(o.shape[2:]) for o in ys] == [shape[2:], tuple(s // 2 for s in shape[2:])]


@pytest.mark.parametrize("arch_id", ["hybrid_encoder_unet", "multi_encoder_unet", "collaborative_unet"])
def test_registered_with_tiny_and_paper_args(arch_id):
    arch = architectures()[arch_id]
    net = build({"arch": arch_id, "args": arch.tiny_args}).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 8, 8, 8)).shape == (1, 1, 8, 8, 8)
    assert arch.paper_args["channels"] == [32, 64, 128, 256, 320, 320]


def _pretrained_state(args, seed=123):
    torch.manual_seed(seed)
    return NnUNet(**args).state_dict()


@pytest.mark.parametrize("cls", [HybridEncoderUNet, MultiEncoderUNet])
def test_adapted_encoder_loaded_frozen_and_untouched_by_training(cls):
    torch.manual_seed(0)
    net = cls(**TINY3)
    sd = _pretrained_state(TINY3)
    net.load_adapted_encoder(sd)
    for k, v in net.adapted_encoder.state_dict().items():
        assert torch.equal(v, sd["encoder." + k])
    trained = net.self_encoder if cls is MultiEncoderUNet else net.dedicated_encoder
    before_adapted = copy.deepcopy(net.adapted_encoder.state_dict())
    before_trained = copy.deepcopy(trained.state_dict())
    before_decoder = copy.deepcopy(net.decoder.state_dict())
    net.train()
    assert net.training and not net.adapted_encoder.training          # kept in eval mode
    assert all(not p.requires_grad for p in net.adapted_encoder.parameters())
    # the optimiser gets *all* parameters, with momentum and weight decay, as a careless trainer would
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    x, y = torch.randn(2, 1, 8, 8, 8), _target((2, 1, 8, 8, 8))
    for _ in range(2):
        opt.zero_grad()
        DiceCELoss()(net(x), y).backward()
        opt.step()
    for k, v in net.adapted_encoder.state_dict().items():
        assert torch.equal(v, before_adapted[k]), k
    assert all(p.grad is None for p in net.adapted_encoder.parameters())
    changed = lambda mod, ref: any(not torch.equal(v, ref[k]) for k, v in mod.state_dict().items())  # noqa: E731
    assert changed(trained, before_trained) and changed(net.decoder, before_decoder)
    if cls is HybridEncoderUNet:
        assert all(p.grad is not None for p in net.fusion.parameters())


def test_dedicated_encoder_can_be_initialised_from_pretraining():
    net = HybridEncoderUNet(**TINY2)
    sd = _pretrained_state(TINY2)
    net.load_adapted_encoder(sd)
    w = net.dedicated_encoder.stages[0].conv1.conv.weight
    assert not torch.equal(w, sd["encoder.stages.0.conv1.conv.weight"])   # 000: Dedicated starts fresh
    net.load_adapted_encoder(sd, init_dedicated=True)
    assert torch.equal(net.dedicated_encoder.stages[0].conv1.conv.weight, sd["encoder.stages.0.conv1.conv.weight"])
    assert net.dedicated_encoder.stages[0].conv1.conv.weight.requires_grad


def test_loading_a_mismatched_pretrained_model_is_a_clear_error():
    net = HybridEncoderUNet(**TINY3)
    other = NnUNet(**dict(TINY3, channels=[4, 8, 32])).state_dict()
    with pytest.raises(ValueError, match="architectures differ"):
        net.load_adapted_encoder(other)


def test_selective_fusion_weights_sum_to_one_and_vary():
    torch.manual_seed(0)
    sf = SelectiveFusion(3, 32, reduction=16)
    assert sf.hidden == 16                       # C/r = 2 is floored
    assert SelectiveFusion(3, 320).hidden == 20  # the paper's bottleneck: C/r
    x_de, x_ad = torch.randn(2, 32, 2, 3, 3), torch.randn(2, 32, 2, 3, 3)
    a, b = sf.attention(x_de, x_ad)
    assert a.shape == (2, 32) and torch.allclose(a + b, torch.ones_like(a), atol=1e-6)
    assert not torch.allclose(a, torch.full_like(a, 0.5), atol=1e-3)   # not the constant 1/2 instance norm gives
    assert not torch.allclose(a[0], a[1], atol=1e-4)                  # depends on the input
    # batch size 1 works and still varies with the input
    a1, _ = sf.attention(x_de[:1], x_ad[:1])
    a2, _ = sf.attention(x_de[:1] * 3 + 1, x_ad[:1])
    assert not torch.allclose(a1, a2, atol=1e-4)


def test_selective_fusion_applies_eq6():
    torch.manual_seed(1)
    sf = SelectiveFusion(2, 16, mapping=False)
    x_de, x_ad = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    out = sf(x_de, x_ad)
    a, b = sf.last_attention
    expected = a[:, :, None, None] * x_de + b[:, :, None, None] * x_ad
    assert torch.allclose(out, expected, atol=1e-6)
    with_mapping = SelectiveFusion(2, 16)(x_de, x_ad)
    assert with_mapping.shape == x_de.shape


def _output_with_perturbed(net, encoder, level, x):
    """Model output when the feature map ``encoder`` hands out at stage ``level`` is replaced by noise.

    Only the returned feature list changes (deeper stages still see the clean map), so the output changes
    only if that level's features reach the decoder directly.
    """
    original = encoder.forward

    def perturbed(inp):
        feats = list(original(inp))
        g = torch.Generator().manual_seed(7)
        feats[level] = feats[level] + 5 * torch.randn(feats[level].shape, generator=g)
        return feats

    encoder.forward = perturbed
    try:
        with torch.no_grad():
            return net(x)
    finally:
        del encoder.forward


@pytest.mark.parametrize("cls,aux,kw", [
    (HybridEncoderUNet, "adapted_encoder", "fusion_levels"),
    (MultiEncoderUNet, "adapted_encoder", "concat_levels"),
])
def test_where_the_auxiliary_encoder_enters(cls, aux, kw):
    """Default: the frozen encoder enters at the bottleneck only; ``"all"`` adds every skip level."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 8, 8, 8)
    net = cls(**TINY3).eval()
    if cls is HybridEncoderUNet:
        assert sorted(net.fusion.keys()) == ["2"] and net.fusion_levels == (2,)
    else:
        assert net.decoder.stages[0].transp_conv.conv.in_channels == 2 * 16     # bottleneck concatenated
        assert net.decoder.stages[1].conv_block.conv1.conv.in_channels == 4 + 4  # skip from Self only
    with torch.no_grad():
        ref = net(x)
    enc = getattr(net, aux)
    assert torch.allclose(_output_with_perturbed(net, enc, 0, x), ref)          # skip level 0: not used
    assert not torch.allclose(_output_with_perturbed(net, enc, 2, x), ref)      # bottleneck: used
    net_all = cls(**TINY3, **{kw: "all"}).eval()
    with torch.no_grad():
        ref_all = net_all(x)
    assert not torch.allclose(_output_with_perturbed(net_all, getattr(net_all, aux), 0, x), ref_all)
    if cls is HybridEncoderUNet:
        assert sorted(net_all.fusion.keys()) == ["0", "1", "2"]
    else:
        assert net_all.decoder.stages[1].conv_block.conv1.conv.in_channels == 4 + 2 * 4


def test_collaborative_features_and_skips():
    torch.manual_seed(0)
    net = CollaborativeUNet(**TINY3).eval()
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        y, feats = net(x, return_features=True)
        ref = net(x)
    assert torch.equal(y, ref)
    assert feats["general"].shape == feats["target"].shape == (2, 16, 2, 2, 2)   # encoder outputs (bottleneck)
    assert torch.allclose(net.general_features(x), feats["general"])
    assert net.decoder.stages[0].transp_conv.conv.in_channels == 32                # T and G concatenated
    # G enters at the bottleneck only; skips come from T
    assert torch.allclose(_output_with_perturbed(net, net.general_encoder, 0, x), ref)
    assert not torch.allclose(_output_with_perturbed(net, net.general_encoder, 2, x), ref)
    assert not torch.allclose(_output_with_perturbed(net, net.target_encoder, 0, x), ref)


def _grads(module):
    return [p.grad for p in module.parameters()]


def test_collaborative_gradient_routing_follows_algorithm_1():
    torch.manual_seed(0)
    net = CollaborativeUNet(**TINY3).train()
    x_c, y_c, x_n = torch.randn(2, 1, 8, 8, 8), _target((2, 1, 8, 8, 8)), torch.randn(2, 1, 8, 8, 8)

    # L_seg updates T and D only
    out, feats = net(x_c, return_features=True)
    DiceCELoss()(out, y_c).backward()
    assert all(g is None for g in _grads(net.general_encoder))
    assert all(g is not None for g in _grads(net.target_encoder))
    assert all(g is not None for g in _grads(net.decoder))

    # L_G updates G only; L_T updates T only
    net.zero_grad(set_to_none=True)
    out, feats = net(x_c, return_features=True)
    l_g, l_t = collaborative_relation_losses(feats, net.general_features(x_n), (1.0, 1.0))
    l_g.backward(retain_graph=True)
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(net.general_encoder))
    assert all(g is None for g in _grads(net.target_encoder)) and all(g is None for g in _grads(net.decoder))
    g_only = [g.clone() for g in _grads(net.general_encoder)]
    net.zero_grad(set_to_none=True)
    l_t.backward()
    assert all(g is None for g in _grads(net.general_encoder)) and all(g is None for g in _grads(net.decoder))
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(net.target_encoder))

    # one combined step (L_seg + L_G + L_T): G's gradient is exactly L_G's
    net.zero_grad(set_to_none=True)
    out, feats = net(x_c, return_features=True)
    l_g, l_t = collaborative_relation_losses(feats, net.general_features(x_n), (1.0, 1.0))
    (DiceCELoss()(out, y_c) + l_g + l_t).backward()
    for g, ref in zip(_grads(net.general_encoder), g_only):
        assert torch.allclose(g, ref, rtol=1e-4, atol=1e-7)


def test_collaborative_frozen_general_ablation():
    net = CollaborativeUNet(**TINY2, freeze_general=True)
    sd = _pretrained_state(TINY2)
    net.load_general_encoder(sd)
    net.train()
    assert not net.general_encoder.training
    assert all(not p.requires_grad for p in net.general_encoder.parameters())
    assert len(net.trainable_parameters()) < len(list(net.parameters()))


def test_paper_3d_config_builds_and_runs():
    """000's configuration (002 Table I backbone, patch 56x160x192) on a reduced 16x64x64 patch for speed."""
    net = build({"arch": "hybrid_encoder_unet", "args": architectures()["hybrid_encoder_unet"].paper_args}).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 1, 16, 64, 64))
        a, b = net.fusion["5"].last_attention
    assert y.shape == (1, 1, 16, 64, 64) and torch.isfinite(y).all()
    assert a.shape == (1, 320) and net.fusion["5"].hidden == 20
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(net.dedicated_encoder) == count(net.adapted_encoder)
    assert count(net) == 2 * count(net.dedicated_encoder) + count(net.fusion) + count(net.decoder)
    assert count(net) - count(net.adapted_encoder) == sum(p.numel() for p in net.trainable_parameters())
