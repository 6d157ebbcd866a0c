"""Comparison grid of paper 004 (models/grid.py, models/encoders.py): every decoder x encoder combination
runs at input size, encoder strides, Table 1 hyper-parameters, Table 2 parameter counts, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import EfficientNetBNFeatures

from COVIDLesionSegLib.models import architectures, build
from COVIDLesionSegLib.models.encoders import ENCODER_NAMES, build_encoder
from COVIDLesionSegLib.models.grid import DECODERS, GridSegmenter, paper_table2_params_m

torch.set_num_threads(2)

HEAVY = ("efficientnet-b5", "efficientnet-b6", "resnet152", "densenet161", "densenet201")
# one encoder per family for the real (numeric) forward passes; every combination is shape-checked
FAMILY = ("resnet18", "efficientnet-b0", "densenet121", "vgg11")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_every_combination_outputs_at_input_size():
    # PyTorch's meta device propagates shapes through every layer without computing values, so the whole
    # grid (4 decoders x 22 encoders) is checked in seconds; numeric runs follow below. Each encoder is
    # built once per depth and shared by the decoders. Encoder maps must sit at strides 2, 4, 8, 16, 32.
    for encoder in ENCODER_NAMES:
        with torch.device("meta"):
            encoders = {5: build_encoder(encoder, depth=5), 3: build_encoder(encoder, depth=3)}
            feats = encoders[5](torch.empty(2, 1, 64, 96))
            assert [tuple(f.shape[2:]) for f in feats] == [(64 // s, 96 // s) for s in (2, 4, 8, 16, 32)], encoder
            assert tuple(f.shape[1] for f in feats) == encoders[5].out_channels, encoder
            for decoder in DECODERS:
                depth = 3 if decoder == "pspnet" else 5
                model = GridSegmenter(decoder, encoders[depth]).eval()
                # a truncated encoder's maps are the first ones of the full encoder: reuse them
                y = model.decoder(feats[:depth], (64, 96))
                assert y.shape == (2, 1, 64, 96), (decoder, encoder, tuple(y.shape))


def _forward(decoder: str, encoders) -> None:
    x = torch.randn(1, 1, 64, 64)
    for encoder in encoders:
        model = GridSegmenter(decoder, encoder).eval()
        with torch.no_grad():
            y = model(x)
        assert y.shape == (1, 1, 64, 64), (decoder, encoder, tuple(y.shape))
        assert torch.isfinite(y).all(), (decoder, encoder)


@pytest.mark.parametrize("decoder", DECODERS)
def test_numeric_forward_one_encoder_per_family(decoder):
    _forward(decoder, FAMILY)


@pytest.mark.slow
@pytest.mark.parametrize("decoder", DECODERS)
def test_numeric_forward_heavy_encoders(decoder):
    _forward(decoder, HEAVY)


def test_truncated_encoders_build_no_unused_stage():
    for name in ("resnet18", "efficientnet-b0", "densenet121", "vgg11"):
        full, short = build_encoder(name, depth=5), build_encoder(name, depth=3)
        assert len(short.out_channels) == 3 and short.out_channels == full.out_channels[:3]
        assert n_params(short) < n_params(full)
        with torch.no_grad():
            feats = short(torch.randn(1, 1, 32, 32))
        assert [f.shape[-1] for f in feats] == [16, 8, 4]
        # every parameter of the truncated encoder takes part in its output
        short.train()
        sum(f.mean() for f in short(torch.randn(2, 1, 32, 32))).backward()
        assert all(p.grad is not None for p in short.parameters()), name


def test_parameter_counts_match_paper_table2():
    """Our counts against Table 2 (realigned, see docs/grid_parameters.md). Exact to the printed 0.01 M for
    ResNet, DenseNet and VGG; EfficientNet differs by exactly the unused 1x1 head conv + BN that the
    paper's library keeps and we drop. Four printed Linknet values are inconsistent in the paper itself."""
    paper = paper_table2_params_m()
    misprinted = {("linknet", "vgg11"), ("linknet", "resnet101"), ("linknet", "densenet169"),
                  ("linknet", "efficientnet-b1")}
    checked = 0
    for decoder in ("unet", "linknet"):
        for encoder, millions in paper[decoder].items():
            if encoder not in ENCODER_NAMES or (decoder, encoder) in misprinted:
                continue
            with torch.device("meta"):
                model = GridSegmenter(decoder, encoder)
                extra = 0
                if encoder.startswith("efficientnet"):
                    full = EfficientNetBNFeatures(encoder, pretrained=False, in_channels=1)
                    extra = n_params(full._conv_head) + n_params(full._bn1)
            assert round((n_params(model) + extra) / 1e6, 2) == pytest.approx(millions, abs=0.011), (decoder, encoder)
            checked += 1
    assert checked >= 33


def test_table1_hyper_parameters():
    unet = GridSegmenter("unet", "resnet18")
    widths = [blk.convs.conv_1.conv.out_channels for blk in unet.decoder.decoder.blocks]
    assert widths == [256, 128, 64, 32, 16]
    fpn = GridSegmenter("fpn", "resnet18")
    assert {m.out_channels for m in fpn.decoder.laterals} == {256}
    assert fpn.decoder.merge == "add" and fpn.decoder.dropout.p == 0.2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fpn.decoder.modules())
    psp = GridSegmenter("pspnet", "resnet18")
    assert psp.encoder.depth == 3 and psp.decoder.bottleneck[0].out_channels == 512
    assert psp.decoder.dropout.p == 0.2
    link = GridSegmenter("linknet", "resnet18")
    first = link.decoder.blocks[0]
    assert first.reduce[0].out_channels == 512 // 4 and first.expand[0].out_channels == 256
    assert isinstance(first.up[0], torch.nn.ConvTranspose2d) and first.up[0].stride == (2, 2)


def test_linknet_adds_skips_and_unet_concatenates():
    torch.manual_seed(0)
    link = GridSegmenter("linknet", "resnet18").eval()
    feats = link.encoder(torch.randn(1, 1, 64, 64))
    seen = {}

    def keep(name, value):
        seen[name] = value.clone()   # returns None: the hook must not replace the module's output

    link.decoder.blocks[1].register_forward_hook(lambda m, i, o: keep("in", i[0]))
    link.decoder.blocks[0].register_forward_hook(lambda m, i, o: keep("out0", o))
    with torch.no_grad():
        link.decoder(feats, (64, 64))
    assert torch.allclose(seen["in"], seen["out0"] + feats[-2])   # block 1 sees block 0 + stride-16 skip


def _training_step_reaches_every_parameter(decoder, encoder):
    torch.manual_seed(0)
    model = GridSegmenter(decoder, encoder).train()
    x = torch.randn(2, 1, 64, 64)
    y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 1, 64, 64)   # no deep supervision
    F.binary_cross_entropy_with_logits(y, (x > 0).float()).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert dead == []


@pytest.mark.parametrize("decoder,encoder", [("unet", "resnet18"), ("linknet", "resnet18"), ("fpn", "resnet18"),
                                             ("pspnet", "resnet18"), ("unet", "vgg11")])
def test_training_step_reaches_every_parameter(decoder, encoder):
    _training_step_reaches_every_parameter(decoder, encoder)


@pytest.mark.slow
@pytest.mark.parametrize("decoder,encoder", [("unet", "efficientnet-b0"), ("linknet", "densenet121")])
def test_training_step_reaches_every_parameter_efficientnet_densenet(decoder, encoder):
    # several seconds each on 2 CPU cores (many small layers)
    _training_step_reaches_every_parameter(decoder, encoder)


def test_input_size_checks():
    unet = GridSegmenter("unet", "resnet18").eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        unet(torch.randn(1, 1, 48, 64))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        unet(torch.randn(1, 3, 64, 64))
    psp = GridSegmenter("pspnet", "resnet18").eval()
    with torch.no_grad():
        assert psp(torch.randn(1, 1, 40, 56)).shape == (1, 1, 40, 56)   # depth 3: multiples of 8 suffice
    with pytest.raises(ValueError, match="multiples of 8"):
        psp(torch.randn(1, 1, 36, 40))


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="resnet34"):
        build_encoder("resnext50_32x4d")
    with pytest.raises(ValueError, match="unet, linknet, fpn, pspnet"):
        GridSegmenter("deeplab", "resnet18")
    with pytest.raises(ValueError, match="depth-5"):
        GridSegmenter("unet", "resnet18", encoder_depth=3)


def test_registered_architectures_build_from_config():
    archs = architectures()
    for arch_id in ("grid_unet", "grid_linknet", "grid_fpn", "grid_pspnet"):
        arch = archs[arch_id]
        assert arch.dims == (2,) and arch.paper == "bizopoulos_grid"
        model = build({"arch": arch_id, "args": {**arch.tiny_args, "encoder": "efficientnet-b0"}}).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    vgg = build({"arch": "grid_unet", "args": {"encoder": "vgg11"}})
    assert not isinstance(vgg.decoder.center, torch.nn.Identity)     # VGG Unet gets the center block
    assert isinstance(build({"arch": "grid_unet", "args": {"encoder": "resnet18"}}).decoder.center,
                      torch.nn.Identity)
