"""2D feature encoders over MONAI backbones, shared by the comparison grid (grid.py) and nCoVSegNet.

Every encoder returns the list of its feature maps at strides ``2, 4, 8, 16, 32`` (the first ``depth`` of
them), finest first, and exposes their channel counts as ``out_channels``. The input itself (stride 1) is
not part of the list: none of the grid's decoders uses a full-resolution skip (the Unet's last block has
no skip, as in segmentation-models-pytorch, which paper 004 used).

Encoders available here (``bizopoulos_grid`` in docs/CITATIONS.md, section 2.3), built without torchvision:

- ``resnet18/34/50/101/152``: MONAI :class:`monai.networks.nets.ResNet` configured to the torchvision
  layout (7x7 stride-2 stem, max-pool, projection shortcuts "B" without bias, stride on the 3x3 conv of the
  bottleneck, i.e. ResNet v1.5), so that torchvision ImageNet state dicts load key for key (pretrained.py).
  MONAI's own ``resnet18``/``resnet34`` factories use the parameter-free shortcut "A" and a stride-1 stem,
  which would not match ImageNet weights; we therefore call the ``ResNet`` constructor directly.
- ``efficientnet-b0`` ... ``efficientnet-b6``: MONAI :class:`~monai.networks.nets.EfficientNetBNFeatures`
  (a port of efficientnet-pytorch) with its classification head (1x1 ``_conv_head`` to 1280·w channels,
  ``_bn1``, ``_fc``) removed: the features never pass through it, so it would be dead weight.
- ``densenet121/161/169/201``: MONAI :class:`~monai.networks.nets.DenseNet` features (``class_layers``
  removed). Stage outputs: relu0 (s2), denseblock1 (s4), transition1+denseblock2 (s8), transition2+
  denseblock3 (s16), transition3+denseblock4+norm5+ReLU (s32).
- ``vgg11/13/19``: written here (MONAI has no VGG). Plain VGG **without** batch norm, as torchvision's
  ``vgg11``/``vgg13``/``vgg19`` that paper 004's encoder names refer to (the ``_bn`` variants are separate
  names there and here: ``vgg11_bn`` ...). Features are the conv-block outputs before each max-pool at
  strides 2..16 and the last max-pool (stride 32), as segmentation-models-pytorch splits VGG; the first
  block's stride-1 output only feeds the second block.

ResNeXt, DPN, MobileNet-v2, Xception and Inception-v4 of the paper's 25 encoders have no MONAI
implementation and are not provided.

A truncated encoder (``depth < 5``, PSPNet uses 3) does not build its unused stages: no dead parameters.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import DenseNet, EfficientNetBNFeatures, ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

__all__ = [
    "FeatureEncoder", "ResNetEncoder", "EfficientNetFeatureEncoder", "DenseNetEncoder", "VGGEncoder",
    "ENCODER_NAMES", "build_encoder", "build_torchvision_layout_resnet", "RESNET_SPECS",
]

# name -> (block, blocks per stage), as torchvision / He et al. 2016 Table 1
RESNET_SPECS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (ResNetBlock, (2, 2, 2, 2)),
    "resnet34": (ResNetBlock, (3, 4, 6, 3)),
    "resnet50": (ResNetBottleneck, (3, 4, 6, 3)),
    "resnet101": (ResNetBottleneck, (3, 4, 23, 3)),
    "resnet152": (ResNetBottleneck, (3, 8, 36, 3)),
}

EFFICIENTNET_NAMES = tuple(f"efficientnet-b{i}" for i in range(7))

# name -> (init_features, growth_rate, block_config), as torchvision / Huang et al. 2017
DENSENET_SPECS: dict[str, tuple[int, int, tuple[int, ...]]] = {
    "densenet121": (64, 32, (6, 12, 24, 16)),
    "densenet161": (96, 48, (6, 12, 36, 24)),
    "densenet169": (64, 32, (6, 12, 32, 32)),
    "densenet201": (64, 32, (6, 12, 48, 32)),
}

# Simonyan & Zisserman 2015, configurations A (11), B (13), E (19): conv widths per block (max-pool after each)
VGG_SPECS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}

STAGE_STRIDES = (2, 4, 8, 16, 32)


def _check_depth(depth: int) -> int:
    if not isinstance(depth, int) or not 1 <= depth <= 5:
        raise ValueError(f"encoder depth must be an integer in 1..5 (number of stride-2 stages), got {depth!r}")
    return depth


class FeatureEncoder(nn.Module):
    """Base class: ``forward(x)`` returns ``depth`` feature maps at strides 2, 4, ..., 2**depth."""

    out_channels: tuple[int, ...]
    depth: int
    name: str

    @property
    def output_stride(self) -> int:
        return 2 ** self.depth

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Default for encoders built as ``self.stages``: each stage's output is one feature map."""
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


# ----------------------------------------------------------------------------------------------- ResNet
def build_torchvision_layout_resnet(name_or_layers: str | tuple[int, ...], *, block: type[nn.Module] | None = None,
                                    in_channels: int = 3, width: float = 1.0) -> ResNet:
    """A 2D MONAI ``ResNet`` with torchvision's layout and parameter names, without the fc layer.

    Args:
        name_or_layers: ``"resnet18"`` ... ``"resnet152"`` or the four stage lengths.
        block: residual block class (MONAI ``ResNetBlock``/``ResNetBottleneck`` or a subclass with the same
            constructor, e.g. nCoVSegNet's ECA bottleneck); defaults to the named ResNet's.
        in_channels: input channels of the 7x7 stem.
        width: multiplier of every channel count (1.0 = the published network).
    """
    if isinstance(name_or_layers, str):
        if name_or_layers not in RESNET_SPECS:
            raise ValueError(f"unknown ResNet {name_or_layers!r}; known: {', '.join(RESNET_SPECS)}")
        default_block, layers = RESNET_SPECS[name_or_layers]
        block = block or default_block
    else:
        layers = tuple(name_or_layers)
        if block is None:
            raise ValueError("give the block class when passing stage lengths")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    inplanes = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
    return ResNet(block=block, layers=list(layers), block_inplanes=inplanes, spatial_dims=2,
                  n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2, no_max_pool=False,
                  shortcut_type="B", bias_downsample=False, feed_forward=False)


class ResNetEncoder(FeatureEncoder):
    """ResNet features: stem (s2), layer1 (s4, after the max-pool), layer2..layer4 (s8..s32).

    The MONAI network is kept whole as ``self.resnet`` so its state-dict keys equal torchvision's; stages
    beyond ``depth`` are set to ``None`` (not built into the forward, no parameters) and pretrained.py
    skips their keys.
    """

    def __init__(self, name: str = "resnet34", in_channels: int = 1, depth: int = 5, *,
                 block: type[nn.Module] | None = None, layers: tuple[int, ...] | None = None, width: float = 1.0):
        super().__init__()
        self.depth = _check_depth(depth)
        self.name = name
        self.resnet = build_torchvision_layout_resnet(layers if layers is not None else name, block=block,
                                                      in_channels=in_channels, width=width)
        r = self.resnet
        widths = [r.conv1.out_channels] + [getattr(r, f"layer{k}")[-1].conv1.weight.shape[0] * r.layer1[0].expansion
                                           for k in range(1, 5)]
        self.out_channels = tuple(widths[:depth])
        for stage in range(depth, 5):  # depth d keeps layer1..layer(d-1)
            setattr(r, f"layer{stage}", None)
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        r = self.resnet
        x = r.act(r.bn1(r.conv1(x)))
        features = [x]
        if self.depth >= 2:
            x = r.maxpool(x)
            for stage in range(1, self.depth):
                x = getattr(r, f"layer{stage}")(x)
                features.append(x)
        return features


# ------------------------------------------------------------------------------------------ EfficientNet
class EfficientNetFeatureEncoder(FeatureEncoder):
    """MONAI EfficientNet-B* features at the ends of the stacks that precede a stride-2 stack, plus the
    last stack (strides 2, 4, 8, 16, 32; e.g. 16, 24, 40, 112, 320 channels for b0)."""

    def __init__(self, name: str = "efficientnet-b0", in_channels: int = 1, depth: int = 5):
        super().__init__()
        self.depth = _check_depth(depth)
        self.name = name
        net = EfficientNetBNFeatures(name, pretrained=False, progress=False, spatial_dims=2, in_channels=in_channels)
        # the classification head is never used by the feature maps: drop it (no dead parameters)
        net._conv_head = None
        net._bn1 = None
        net._fc = None
        ends = [i for i in net.extract_stacks if i > 0]  # feature k is taken after stack ends[k]-1
        if len(ends) != 5 or 0 in net.extract_stacks:
            raise RuntimeError(f"unexpected EfficientNet stack layout for {name}: {net.extract_stacks}")
        self._ends = ends[:depth]
        net._blocks = net._blocks[: self._ends[-1]]  # stages beyond depth are not built into the forward
        self.net = net
        self.out_channels = tuple(net._blocks_args[e - 1].output_filters for e in self._ends)
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(n._conv_stem_padding(x))))
        features = []
        for i, stack in enumerate(n._blocks):
            x = stack(x)
            if i + 1 in self._ends:
                features.append(x)
        return features


# ---------------------------------------------------------------------------------------------- DenseNet
class DenseNetEncoder(FeatureEncoder):
    """MONAI DenseNet features regrouped into five stride stages (see the module docstring)."""

    def __init__(self, name: str = "densenet121", in_channels: int = 1, depth: int = 5):
        super().__init__()
        self.depth = _check_depth(depth)
        self.name = name
        if name not in DENSENET_SPECS:
            raise ValueError(f"unknown DenseNet {name!r}; known: {', '.join(DENSENET_SPECS)}")
        init_features, growth, blocks = DENSENET_SPECS[name]
        f = DenseNet(spatial_dims=2, in_channels=in_channels, out_channels=1, init_features=init_features,
                     growth_rate=growth, block_config=blocks).features
        stages = [
            nn.Sequential(OrderedDict(conv0=f.conv0, norm0=f.norm0, relu0=f.relu0)),
            nn.Sequential(OrderedDict(pool0=f.pool0, denseblock1=f.denseblock1)),
            nn.Sequential(OrderedDict(transition1=f.transition1, denseblock2=f.denseblock2)),
            nn.Sequential(OrderedDict(transition2=f.transition2, denseblock3=f.denseblock3)),
            nn.Sequential(OrderedDict(transition3=f.transition3, denseblock4=f.denseblock4, norm5=f.norm5,
                                      relu5=nn.ReLU(inplace=False))),
        ]
        self.stages = nn.ModuleList(stages[:depth])
        channels, c = [init_features], init_features
        for i, n_layers in enumerate(blocks):
            c = c + n_layers * growth
            channels.append(c)
            if i < len(blocks) - 1:
                c //= 2
        self.out_channels = tuple(channels[:depth])
        self.in_channels = in_channels


# --------------------------------------------------------------------------------------------------- VGG
class VGGEncoder(FeatureEncoder):
    """VGG-11/13/19 (Simonyan & Zisserman 2015) convolutional part, optionally with batch norm.

    Stage k (k = 1..4) = [max-pool] + conv block k+1, giving the pre-pool output of block k+1 at stride 2**k;
    stage 5 = the last max-pool (stride 32). Block 1 runs at stride 1 inside stage 1.
    """

    def __init__(self, name: str = "vgg11", in_channels: int = 1, depth: int = 5, *, batch_norm: bool | None = None):
        super().__init__()
        self.depth = _check_depth(depth)
        self.name = name
        base = name[:-3] if name.endswith("_bn") else name
        if base not in VGG_SPECS:
            raise ValueError(f"unknown VGG {name!r}; known: {', '.join(VGG_SPECS)} (and their _bn variants)")
        bn = name.endswith("_bn") if batch_norm is None else batch_norm
        cfg = VGG_SPECS[base]

        def block(c_in: int, widths: tuple[int, ...]) -> nn.Sequential:
            layers = []
            for w in widths:
                # conv bias is redundant in front of batch norm
                layers.append(Convolution(2, c_in, w, kernel_size=3, act=("relu", {"inplace": True}),
                                          norm="batch" if bn else None, bias=not bn))
                c_in = w
            return nn.Sequential(*layers)

        blocks, c = [], in_channels
        for widths in cfg:
            blocks.append(block(c, widths))
            c = widths[-1]
        stages = [nn.Sequential(blocks[0], nn.MaxPool2d(2, 2), blocks[1])]
        stages += [nn.Sequential(nn.MaxPool2d(2, 2), blocks[k]) for k in range(2, 5)]
        stages.append(nn.Sequential(nn.MaxPool2d(2, 2)))
        self.stages = nn.ModuleList(stages[:depth])
        channels = [cfg[1][-1], cfg[2][-1], cfg[3][-1], cfg[4][-1], cfg[4][-1]]
        self.out_channels = tuple(channels[:depth])
        self.in_channels = in_channels


# ------------------------------------------------------------------------------------------------ lookup
_FACTORIES: dict[str, Callable[..., FeatureEncoder]] = {}
for _n in RESNET_SPECS:
    _FACTORIES[_n] = ResNetEncoder
for _n in EFFICIENTNET_NAMES:
    _FACTORIES[_n] = EfficientNetFeatureEncoder
for _n in DENSENET_SPECS:
    _FACTORIES[_n] = DenseNetEncoder
for _n in VGG_SPECS:
    _FACTORIES[_n] = VGGEncoder
    _FACTORIES[_n + "_bn"] = VGGEncoder

ENCODER_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def build_encoder(name: str, in_channels: int = 1, depth: int = 5) -> FeatureEncoder:
    """Build a named encoder (see ``ENCODER_NAMES``)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown encoder {name!r}; available: {', '.join(ENCODER_NAMES)}. ResNeXt, DPN, "
                         "MobileNet, Xception and Inception-v4 of paper 004 have no MONAI implementation.")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    return _FACTORIES[name](name, in_channels=in_channels, depth=depth)


def interpolate_to(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bilinear resize of logits/features to ``size`` (used by the heads)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
