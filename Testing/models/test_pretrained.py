"""ImageNet loader (models/pretrained.py): a torchvision-format ResNet state dict, generated here from the
architecture definition (He et al. 2016 / torchvision naming) with random tensors, lands in the right
MONAI tensors; errors for missing, corrupted, mismatched and incomplete files."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import pytest
import torch

from COVIDLesionSegLib.models import build
from COVIDLesionSegLib.models.encoders import ResNetEncoder
from COVIDLesionSegLib.models.ncovsegnet import ECABottleneck
from COVIDLesionSegLib.models.pretrained import (
    IMAGENET_RESNET50_SHA256_PREFIX,
    IMAGENET_RESNET50_URL,
    LEGACY_IMAGENET_RESNET50_SHA256,
    LEGACY_IMAGENET_RESNET50_URL,
    load_torchvision_resnet_state_dict,
    verify_torchvision_file_hash,
)

torch.set_num_threads(2)


def torchvision_resnet_layout(blocks: tuple[int, ...], bottleneck: bool, width: float = 1.0,
                              in_channels: int = 3, classes: int = 1000) -> "OrderedDict[str, tuple]":
    """Key -> shape of a torchvision ResNet state dict, derived from the architecture (not from torchvision):
    7x7 stem, stages of basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1 x4) blocks, projection shortcut
    ``downsample.0/1`` on each stage's first block when the shape changes, fc classifier."""
    layout: OrderedDict[str, tuple] = OrderedDict()

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{prefix}.{name}"] = (c,)
        layout[f"{prefix}.num_batches_tracked"] = ()

    stem = int(round(64 * width))
    layout["conv1.weight"] = (stem, in_channels, 7, 7)
    bn("bn1", stem)
    expansion = 4 if bottleneck else 1
    c_in = stem
    for s, n in enumerate(blocks):
        planes = int(round(64 * width)) * 2 ** s
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            if bottleneck:
                convs = [(planes, c_in, 1, 1), (planes, planes, 3, 3), (planes * 4, planes, 1, 1)]
            else:
                convs = [(planes, c_in, 3, 3), (planes, planes, 3, 3)]
            for k, shape in enumerate(convs, start=1):
                layout[f"{p}.conv{k}.weight"] = shape
                bn(f"{p}.bn{k}", shape[0])
            if b == 0 and (s > 0 or c_in != planes * expansion):
                layout[f"{p}.downsample.0.weight"] = (planes * expansion, c_in, 1, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            c_in = planes * expansion
    layout["fc.weight"] = (classes, c_in)
    layout["fc.bias"] = (classes,)
    return layout


def random_state_dict(layout, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(123, dtype=torch.long)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[key] = torch.randn(shape, generator=g)
    return sd


RESNET50 = (3, 4, 6, 3)


def test_layout_helper_has_resnet50_size():
    layout = torchvision_resnet_layout(RESNET50, bottleneck=True)
    learnable = sum(torch.Size(s).numel() for k, s in layout.items()
                    if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert learnable == 25_557_032  # torchvision's documented ResNet-50 size


def test_resnet50_weights_land_in_ncovsegnet_backbone_with_grey_stem(tmp_path):
    sd = random_state_dict(torchvision_resnet_layout(RESNET50, bottleneck=True))
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(sd, path)
    encoder = ResNetEncoder("resnet50", in_channels=1, block=ECABottleneck)   # nCoVSegNet's backbone, width 1
    eca_before = encoder.resnet.layer2[1].eca.conv.weight.detach().clone()
    report = load_torchvision_resnet_state_dict(encoder, path)
    r = encoder.resnet
    assert torch.equal(r.conv1.weight, sd["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(r.layer3[5].conv2.weight, sd["layer3.5.conv2.weight"])
    assert torch.equal(r.layer4[0].downsample[0].weight, sd["layer4.0.downsample.0.weight"])
    assert torch.equal(r.layer1[0].downsample[1].running_var, sd["layer1.0.downsample.1.running_var"])
    assert torch.equal(r.layer2[3].bn3.bias, sd["layer2.3.bn3.bias"])
    assert torch.equal(r.bn1.running_mean, sd["bn1.running_mean"])
    assert torch.equal(r.layer2[1].eca.conv.weight, eca_before)          # no ImageNet counterpart
    assert report.adapted == ["conv1.weight"]
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]
    assert report.unexpected == []
    assert all(".eca." in k for k in report.not_in_file) and len(report.not_in_file) == 16
    # the grey stem answers a grey image exactly as the RGB stem answers the replicated image
    x = torch.randn(1, 1, 16, 16)
    rgb = torch.nn.functional.conv2d(x.repeat(1, 3, 1, 1), sd["conv1.weight"], stride=2, padding=3)
    assert torch.allclose(r.conv1(x), rgb, atol=1e-4)


def test_loading_through_the_registry_into_a_whole_model(tmp_path):
    layout = torchvision_resnet_layout(RESNET50, bottleneck=True, width=0.125)  # same layout, scaled widths
    sd = random_state_dict(layout, seed=1)
    path = tmp_path / "resnet50-small.pth"
    torch.save(sd, path)
    net = build({"arch": "ncovsegnet", "args": {"in_channels": 3, "width": 0.125, "imagenet_weights": str(path)}})
    assert torch.equal(net.backbone.resnet.conv1.weight, sd["conv1.weight"])  # 3 channels: no adaptation
    assert torch.equal(net.backbone.resnet.layer4[2].conv3.weight, sd["layer4.2.conv3.weight"])


def test_truncated_pspnet_encoder_skips_dropped_stages(tmp_path):
    sd = random_state_dict(torchvision_resnet_layout((2, 2, 2, 2), bottleneck=False), seed=2)
    path = tmp_path / "resnet18.pth"
    torch.save(sd, path)
    net = build({"arch": "grid_pspnet", "args": {"encoder": "resnet18", "imagenet_weights": str(path)}})
    r = net.encoder.resnet
    assert r.layer3 is None and r.layer4 is None
    assert torch.equal(r.layer2[1].conv2.weight, sd["layer2.1.conv2.weight"])
    assert torch.equal(r.layer2[0].downsample[0].weight, sd["layer2.0.downsample.0.weight"])
    report = load_torchvision_resnet_state_dict(net, path)
    assert any(k.startswith("layer4.") for k in report.ignored) and report.unexpected == []


def test_missing_file_names_the_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="resnet50-0676ba61.pth"):
        load_torchvision_resnet_state_dict(ResNetEncoder("resnet18"), tmp_path / "nope.pth")


def test_corrupted_file_is_reported(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(random_state_dict(torchvision_resnet_layout((2, 2, 2, 2), bottleneck=False)), good)
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="could not read"):
        load_torchvision_resnet_state_dict(ResNetEncoder("resnet18"), bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        load_torchvision_resnet_state_dict(ResNetEncoder("resnet18"), junk)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_torchvision_resnet_state_dict(ResNetEncoder("resnet18"), not_a_dict)


def test_shape_mismatch_names_the_key(tmp_path):
    sd = random_state_dict(torchvision_resnet_layout((2, 2, 2, 2), bottleneck=False))
    sd["layer2.1.conv2.weight"] = torch.zeros(128, 128, 5, 5)
    path = tmp_path / "resnet18.pth"
    torch.save(sd, path)
    encoder = ResNetEncoder("resnet18")
    before = encoder.resnet.layer1[0].conv1.weight.detach().clone()
    with pytest.raises(ValueError, match=r"layer2\.1\.conv2\.weight.*\(128, 128, 5, 5\)"):
        load_torchvision_resnet_state_dict(encoder, path)
    assert torch.equal(encoder.resnet.layer1[0].conv1.weight, before)   # nothing half-loaded
    # a ResNet-50 file does not fit a ResNet-18
    path50 = tmp_path / "resnet50.pth"
    torch.save(random_state_dict(torchvision_resnet_layout(RESNET50, bottleneck=True, width=0.25)), path50)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_torchvision_resnet_state_dict(ResNetEncoder("resnet18"), path50)


def test_missing_keys_strict_and_lenient(tmp_path):
    sd = random_state_dict(torchvision_resnet_layout((2, 2, 2, 2), bottleneck=False))
    del sd["layer3.1.bn2.weight"]
    for key in [k for k in sd if k.endswith("num_batches_tracked")]:
        del sd[key]                                   # legacy files predate num_batches_tracked: optional
    path = tmp_path / "resnet18.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"missing 1 key\(s\) \['layer3\.1\.bn2\.weight'\]"):
        load_torchvision_resnet_state_dict(ResNetEncoder("resnet18"), path)
    encoder = ResNetEncoder("resnet18")
    report = load_torchvision_resnet_state_dict(encoder, path, strict=False)
    assert "layer3.1.bn2.weight" in report.not_in_file
    assert torch.equal(encoder.resnet.layer3[1].bn2.bias, sd["layer3.1.bn2.bias"])


def test_torchvision_hash_in_file_name_is_checked(tmp_path):
    sd = random_state_dict(torchvision_resnet_layout((1, 1, 1, 1), bottleneck=False, width=0.25))
    plain = tmp_path / "weights.pth"
    torch.save(sd, plain)
    digest = hashlib.sha256(plain.read_bytes()).hexdigest()
    named = tmp_path / f"resnet10-{digest[:8]}.pth"
    named.write_bytes(plain.read_bytes())
    assert verify_torchvision_file_hash(plain) is None
    assert verify_torchvision_file_hash(named) is True
    wrong = tmp_path / f"resnet10-{'0' * 8 if digest[:8] != '0' * 8 else '1' * 8}.pth"
    wrong.write_bytes(plain.read_bytes())
    with pytest.raises(ValueError, match="corrupted or incomplete"):
        load_torchvision_resnet_state_dict(ResNetEncoder("resnet18"), wrong)


def test_documented_imagenet_constants():
    assert IMAGENET_RESNET50_URL.endswith(f"resnet50-{IMAGENET_RESNET50_SHA256_PREFIX}.pth")
    assert LEGACY_IMAGENET_RESNET50_URL.endswith(f"resnet50-{LEGACY_IMAGENET_RESNET50_SHA256[:8]}.pth")
    assert len(LEGACY_IMAGENET_RESNET50_SHA256) == 64


def test_only_resnet_encoders_take_imagenet_weights(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="ResNet encoders only"):
        build({"arch": "grid_unet", "args": {"encoder": "vgg11", "imagenet_weights": str(path)}})
