"""nnU-Net-style U-Net (models/nnunet.py): output contract, the 002 Table I layout, input checks, training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from COVIDLesionSegLib.models import architectures, build
from COVIDLesionSegLib.models.losses import DiceCELoss
from COVIDLesionSegLib.models.nnunet import (
    PAPER_3D_CHANNELS,
    PAPER_3D_KERNELS,
    PAPER_3D_STRIDES,
    NnUNet,
    encoder_state_dict,
    network_plan,
)

torch.set_num_threads(2)

TINY3 = dict(spatial_dims=3, channels=[4, 8, 16], strides=[1, 2, 2], kernel_sizes=[3, 3, 3])
TINY2 = dict(spatial_dims=2, channels=[4, 8, 16], strides=[1, 2, 2], kernel_sizes=[3, 3, 3])


@pytest.mark.parametrize("args,shape", [(TINY3, (2, 1, 8, 12, 16)), (TINY2, (2, 1, 12, 20))])
@pytest.mark.parametrize("out_channels", [1, 3])
def test_output_contract(args, shape, out_channels):
    torch.manual_seed(0)
    net = NnUNet(out_channels=out_channels, **args)
    x = torch.randn(*shape)
    net.eval()
    with torch.no_grad():
        y = net(x)
    assert isinstance(y, torch.Tensor) and y.shape == (shape[0], out_channels) + shape[2:]
    net.train()
    ys = net(x)
    assert isinstance(ys, list) and len(ys) == 2   # one head per decoder stage
    assert ys[0].shape == y.shape                  # full resolution first
    assert ys[1].shape == (shape[0], out_channels) + tuple(s // 2 for s in shape[2:])   # its own resolution
    # the full-resolution head in train mode is the eval output (instance norm has no running statistics)
    assert torch.allclose(ys[0], y, atol=1e-5)


def test_no_deep_supervision_returns_tensor_in_train_mode():
    net = NnUNet(deep_supervision=False, **TINY2).train()
    y = net(torch.randn(1, 1, 16, 16))
    assert isinstance(y, torch.Tensor) and y.shape == (1, 1, 16, 16)


def test_anisotropic_strides_and_kernels():
    net = NnUNet(spatial_dims=3, channels=[4, 8, 8], strides=[1, [1, 2, 2], 2], kernel_sizes=[[1, 3, 3], 3, 3]).train()
    ys = net(torch.randn(1, 1, 4, 8, 8))
    assert [tuple(y.shape[2:]) for y in ys] == [(4, 8, 8), (4, 4, 4)]
    assert net.encoder.stages[0].conv1.conv.weight.shape[2:] == (1, 3, 3)
    assert net.encoder.stages[1].conv1.conv.stride == (1, 2, 2)


def test_building_blocks_are_nnunet_style():
    net = NnUNet(**TINY3)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)]
    acts = [m for m in net.modules() if isinstance(m, nn.LeakyReLU)]
    assert norms and all(m.affine for m in norms)
    assert acts and all(m.negative_slope == 0.01 for m in acts)
    assert not any(isinstance(m, (nn.MaxPool3d, nn.AvgPool3d, nn.BatchNorm3d)) for m in net.modules())
    ups = [m for m in net.modules() if isinstance(m, nn.ConvTranspose3d)]
    assert len(ups) == 2 and all(m.stride == (2, 2, 2) for m in ups)
    # two convs per encoder stage, the first carrying the stride
    stage1 = net.encoder.stages[1]
    assert stage1.conv1.conv.stride == (2, 2, 2) and stage1.conv2.conv.stride == (1, 1, 1)


def _expected_params(in_ch, out_ch, channels, strides, kernels):
    """Parameter count of the layer table, worked out independently of the implementation."""
    prod = lambda v: math.prod(v)  # noqa: E731
    total, prev = 0, in_ch
    for c, k in zip(channels, kernels):   # encoder: conv(prev->c), conv(c->c), two affine IN (no conv bias)
        total += prod(k) * prev * c + prod(k) * c * c + 4 * c
        prev = c
    for level in range(len(channels) - 2, -1, -1):
        c, k = channels[level], kernels[level]
        total += prod(strides[level + 1]) * channels[level + 1] * c   # transposed conv, no bias
        total += prod(k) * 2 * c * c + prod(k) * c * c + 4 * c       # concat conv + conv + IN
        total += c * out_ch + out_ch                                 # 1x1 head with bias
    return total


def test_paper_3d_config_matches_table_i():
    arch = architectures()["nnunet"]
    assert arch.paper_args["channels"] == [32, 64, 128, 256, 320, 320]
    net = build({"arch": "nnunet", "args": arch.paper_args}).eval()
    assert net.strides == tuple(tuple(s) for s in PAPER_3D_STRIDES)
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == _expected_params(1, 1, PAPER_3D_CHANNELS, PAPER_3D_STRIDES, PAPER_3D_KERNELS)
    # paper patch 56x160x192 (000: 50x160x192 after padding to the divisor); reduced patch here for speed
    assert net.size_divisor == (8, 32, 32) and all(s % d == 0 for s, d in zip((56, 160, 192), net.size_divisor))
    x = torch.randn(1, 1, 16, 64, 64)
    with torch.no_grad():
        feats = net.encoder(x)
        y = net(x)
    # Table I feature sizes, scaled: 56x160x192 -> 56x80x96 -> 28x40x48 -> 14x20x24 -> 7x10x12 -> 7x5x6
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 16, 64, 64), (64, 16, 32, 32), (128, 8, 16, 16),
                                                   (256, 4, 8, 8), (320, 2, 4, 4), (320, 2, 2, 2)]
    assert y.shape == (1, 1, 16, 64, 64) and torch.isfinite(y).all()


def test_2d_default_plan():
    chans, strides, kernels = network_plan(2)
    assert chans[0] == 32 and max(chans) == 480 and strides[0] == (1, 1) and all(k == (3, 3) for k in kernels)


@pytest.mark.parametrize("bad,match", [
    (dict(strides=[2, 2, 2]), "first stage"),
    (dict(strides=[1, 2]), "one entry per stage"),
    (dict(kernel_sizes=[3, [3, 3], 3]), "kernel size of stage 1"),
    (dict(spatial_dims=4), "spatial_dims"),
])
def test_bad_plans_are_rejected(bad, match):
    args = dict(TINY3, **bad)
    with pytest.raises(ValueError, match=match):
        NnUNet(**args)


def test_bad_inputs_get_clear_errors():
    net = NnUNet(**TINY3).eval()
    with pytest.raises(ValueError, match="multiple of"):
        net(torch.randn(1, 1, 8, 10, 16))
    with pytest.raises(ValueError, match="input channel"):
        net(torch.randn(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="dimensions"):
        net(torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        net(torch.randn(1, 1, 4, 4, 4))


def test_encoder_state_dict_extraction():
    net = NnUNet(**TINY2)
    sd = encoder_state_dict({"state_dict": net.state_dict()})
    assert set(sd) == set(net.encoder.state_dict())
    with pytest.raises(ValueError, match="no U-Net encoder"):
        encoder_state_dict({"foo.weight": torch.zeros(1)})


def test_tiny_network_fits_one_sample():
    """The whole chain (network + deep-supervised Dice/CE) learns: the loss falls on a fixed sample."""
    torch.manual_seed(0)
    net = build({"arch": "nnunet", "args": dict(TINY2, out_channels=2)}).train()
    x = torch.randn(2, 1, 16, 16)
    y = torch.zeros(2, 1, 16, 16)
    y[:, :, 4:12, 5:11] = 1
    x = x + 2 * y
    loss_fn = DiceCELoss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    net.eval()
    with torch.no_grad():
        pred = net(x).argmax(1, keepdim=True).float()
    dice = 2 * (pred * y).sum() / (pred.sum() + y.sum())
    assert dice > 0.8


@pytest.mark.parametrize("dims, kernel, stride", [(2, (3, 3), (2, 2)), (3, (3, 3, 3), (2, 2, 2)),
                                                  (3, (1, 3, 3), (1, 2, 2)), (2, (3, 3), (1, 1))])
def test_nnunet_blocks_match_monai(dims, kernel, stride):
    """The U-Net's own blocks (written to keep MONAI's import out of the engine's start) are MONAI's nnU-Net
    blocks: the same parameter names in the same order, the same initial weights from the same seed, the same
    outputs; a checkpoint written with either loads into the other."""
    from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, get_conv_layer

    from COVIDLesionSegLib.models.nnunet import ACT, NORM, ConvBlock, OutputHead, transposed_conv

    x = torch.randn((2, 3) + (8,) * dims)
    pairs = [
        (lambda: UnetBasicBlock(dims, 3, 5, kernel_size=kernel, stride=stride, norm_name=NORM, act_name=ACT),
         lambda: ConvBlock(dims, 3, 5, kernel, stride)),
        (lambda: UnetOutBlock(dims, 3, 2), lambda: OutputHead(dims, 3, 2)),
        (lambda: get_conv_layer(dims, 3, 4, kernel_size=stride, stride=stride, bias=False, act=None, norm=None,
                                conv_only=False, is_transposed=True),
         lambda: transposed_conv(dims, 3, 4, stride)),
    ]
    for make_monai, make_ours in pairs:
        torch.manual_seed(3)
        theirs = make_monai().eval()
        torch.manual_seed(3)
        ours = make_ours().eval()
        a, b = theirs.state_dict(), ours.state_dict()
        assert list(a) == list(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_building_an_nnunet_does_not_import_monai():
    """The engine's default network is an nnU-Net: loading it must not pull in MONAI (1.6 s at every start);
    listing all architectures does."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from COVIDLesionSegLib.models import build\n"
            "build({'arch': 'nnunet', 'args': {'spatial_dims': 2, 'channels': [4, 8], 'strides': [1, 2], "
            "'kernel_sizes': [3, 3]}})\n"
            "assert 'monai' not in sys.modules, 'monai imported'\n"
            "from COVIDLesionSegLib.models import architectures\n"
            "architectures()\n"
            "assert 'monai' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_architecture_modules_are_complete():
    """models/_load_all.py names the module of every architecture the package's modules register."""
    from COVIDLesionSegLib.models._load_all import ARCHITECTURE_MODULES

    own = {arch_id: a.builder.__module__.rsplit(".", 1)[-1] for arch_id, a in architectures().items()
           if a.builder.__module__.startswith("COVIDLesionSegLib.models.")}
    assert own == ARCHITECTURE_MODULES
