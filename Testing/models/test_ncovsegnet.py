"""nCoVSegNet (models/ncovsegnet.py, paper 003): exact size of the authors' network, output contract,
ECA/GCA/DAF behaviour, no dead parameters, input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from COVIDLesionSegLib.models import architectures, build
from COVIDLesionSegLib.models.encoders import build_torchvision_layout_resnet
from COVIDLesionSegLib.models.ncovsegnet import (
    PAPER_PARAMETER_COUNTS,
    DAFModule,
    ECABottleneck,
    ECALayer,
    GCAModule,
    NCoVSegNet,
    parameter_breakdown,
)

torch.set_num_threads(2)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_matches_authors_network_module_by_module():
    # the meta device gives the real parameter shapes without allocating 168 M floats
    with torch.device("meta"):
        net = NCoVSegNet()
        plain_resnet50 = build_torchvision_layout_resnet("resnet50", in_channels=3)
    counts = parameter_breakdown(net)
    assert counts == PAPER_PARAMETER_COUNTS
    assert counts["total"] == 168_169_968
    # backbone = ResNet-50 without fc (torchvision: 25,557,032 - 2,049,000) + one 3-tap ECA per bottleneck
    assert n_params(plain_resnet50) == 25_557_032 - (2048 * 1000 + 1000)
    n_bottlenecks = sum(isinstance(m, ECABottleneck) for m in net.modules())
    assert n_bottlenecks == 3 + 4 + 6 + 3
    assert counts["backbone"] == n_params(plain_resnet50) + 3 * n_bottlenecks


def test_one_channel_variant_differs_only_in_the_stem():
    with torch.device("meta"):
        rgb, grey = NCoVSegNet(in_channels=3), NCoVSegNet(in_channels=1)
    assert n_params(rgb) - n_params(grey) == 64 * 2 * 7 * 7


def test_output_contract_eval_and_train():
    torch.manual_seed(0)
    net = NCoVSegNet(in_channels=3, width=0.125)
    x = torch.randn(2, 3, 64, 96)
    net.eval()
    with torch.no_grad():
        y = net(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 1, 64, 96)
    net.train()
    ys = net(x)
    assert isinstance(ys, list) and len(ys) == 4
    assert all(o.shape == (2, 1, 64, 96) for o in ys)
    # the four heads see different maps (DAF1, DAF2, DAF3, GCA4): coarser heads are smoother
    assert not torch.allclose(ys[0], ys[3])
    coarse_tv = (ys[3][..., 1:] - ys[3][..., :-1]).abs().mean()
    fine_tv = (ys[0][..., 1:] - ys[0][..., :-1]).abs().mean()
    assert coarse_tv < fine_tv


def test_every_parameter_gets_a_gradient_from_the_four_outputs():
    torch.manual_seed(1)
    net = NCoVSegNet(in_channels=1, width=0.125).train()
    # 64x64: the stride-32 maps are 2x2 (at 1x1, batch norm over two samples outputs +-1 whatever the
    # input, so layers in front of it would legitimately get zero gradient)
    x = torch.randn(2, 1, 64, 64)
    target = (torch.rand(2, 1, 64, 64) > 0.7).float()
    loss = sum(F.binary_cross_entropy_with_logits(o, target) for o in net(x))
    loss.backward()
    dead = [name for name, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert dead == []


def test_width_scales_every_module():
    net = NCoVSegNet(in_channels=1, width=0.25)
    assert net.backbone.out_channels == (16, 64, 128, 256, 512)
    assert net.gca1.residual[0].out_channels == 32 and net.gca4.residual[0].out_channels == 256
    assert net.heads[3].in_channels == 256
    full = PAPER_PARAMETER_COUNTS["total"]
    assert n_params(net) < full / 10


def test_eca_layer_is_gap_conv1d_sigmoid_scaling():
    torch.manual_seed(2)
    eca = ECALayer(3)
    x = torch.randn(2, 6, 5, 7)
    w = eca.conv.weight.view(3)
    m = x.mean(dim=(2, 3))
    padded = F.pad(m, (1, 1))
    mixed = w[0] * padded[:, :-2] + w[1] * padded[:, 1:-1] + w[2] * padded[:, 2:]
    expected = x * torch.sigmoid(mixed)[:, :, None, None]
    assert torch.allclose(eca(x), expected, atol=1e-6)
    assert eca.conv.bias is None


def test_eca_sits_after_last_bn_before_residual_add():
    torch.manual_seed(3)
    block = ECABottleneck(32, 8, spatial_dims=2).eval()   # 32 -> 8 -> 32, identity shortcut
    x = torch.randn(1, 32, 6, 6)
    with torch.no_grad():
        block.eca.conv.weight.zero_()                      # sigmoid(0) = 1/2 on every channel
        main = block.bn3(block.conv3(block.act(block.bn2(block.conv2(block.act(block.bn1(block.conv1(x))))))))
        expected = torch.relu(0.5 * main + x)
        assert torch.allclose(block(x.clone()), expected, atol=1e-6)


def test_gca_branches_and_output():
    gca = GCAModule(16, 8)
    gca4 = GCAModule(16, 8, kernel_sizes=(3, 5))
    assert len(gca.branches) == 4 and len(gca4.branches) == 3
    # branch k: 1x1, (1 x k), (k x 1), 3x3 with dilation k
    b7 = gca.branches[3]
    assert [s[0].kernel_size for s in b7] == [(1, 1), (1, 7), (7, 1), (3, 3)]
    assert b7[3][0].dilation == (7, 7)
    assert all(conv.bias is None for conv in gca.modules() if isinstance(conv, torch.nn.Conv2d))
    y = gca.eval()(torch.randn(1, 16, 20, 20))
    assert y.shape == (1, 8, 20, 20) and (y >= 0).all()


def test_daf_attention_gates_only_the_low_level_path():
    torch.manual_seed(4)
    daf = DAFModule(16, 8).eval()
    high, low = torch.randn(1, 16, 4, 4), torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        out = daf(high, low)
        assert out.shape == (1, 8, 8, 8)
        # without a low-level signal only ReLU(BN(Deconv4x4(high))) remains (fresh BN: BN(0) = 0)
        assert torch.allclose(daf(high, torch.zeros_like(low)), torch.relu(daf.fuse_up(high)), atol=1e-6)
        # eqs. 2-4: channel attention from GAP(high), spatial attention = channel-wise max of a x2 deconv
        w_ca = torch.sigmoid(daf.channel_att(high.mean((2, 3), keepdim=True)))
        w_sa = torch.sigmoid(daf.spatial_up(high).max(dim=1, keepdim=True).values)
        assert w_ca.shape == (1, 8, 1, 1) and w_sa.shape == (1, 1, 8, 8)
        assert torch.allclose(out, torch.relu(w_sa * w_ca * daf.low_conv(low) + daf.fuse_up(high)), atol=1e-6)
    deconvs = [m for m in daf.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert all(m.kernel_size == (4, 4) and m.stride == (2, 2) and m.padding == (1, 1) for m in deconvs)


@pytest.mark.parametrize("shape,message", [((1, 3, 48, 64), "multiples of 32"), ((1, 1, 64, 64), "expects"),
                                           ((1, 3, 64), "expects")])
def test_bad_inputs_raise_clear_errors(shape, message):
    net = NCoVSegNet(in_channels=3, width=0.125).eval()
    with pytest.raises(ValueError, match=message):
        net(torch.randn(*shape))


def test_train_mode_needs_batch_of_two():
    net = NCoVSegNet(in_channels=1, width=0.125).train()
    with pytest.raises(ValueError, match="at least 2"):
        net(torch.randn(1, 1, 32, 32))


def test_registered_with_tiny_and_paper_args():
    arch = architectures()["ncovsegnet"]
    assert arch.dims == (2,) and arch.paper == "liu_ncovsegnet"
    assert arch.paper_args == {"in_channels": 3, "out_channels": 1, "width": 1.0}
    net = build({"arch": "ncovsegnet", "args": arch.tiny_args}).eval()
    with torch.no_grad():
        y = net(torch.randn(1, arch.tiny_args["in_channels"], 32, 32))
    assert y.shape == (1, 1, 32, 32)
