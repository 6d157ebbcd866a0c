"""The comparison grid of Bizopoulos et al. (``bizopoulos_grid``, docs/CITATIONS.md): Unet, Linknet, FPN and PSPNet
decoders over interchangeable encoders, 2D, 1-channel CT slice in, 1-channel sigmoid logits out.

Registered ids ``grid_unet``, ``grid_linknet``, ``grid_fpn``, ``grid_pspnet``, each with an ``encoder``
argument (``encoders.ENCODER_NAMES``: resnet18..152, efficientnet-b0..b6, densenet121/161/169/201,
vgg11/13/19 and their ``_bn`` variants). Hyper-parameters are the paper's Table 1 (the
segmentation-models-pytorch defaults it used):

=========  =============  =====================================================================
decoder    encoder depth  settings
=========  =============  =====================================================================
Unet       5              decoder channels 256-128-64-32-16, batch norm in the decoder (+ a
                          2-conv center block for VGG encoders)
Linknet    5              LinkNet decoder blocks (1x1 reduce to C/4, 4x4 transposed conv x2, 1x1
                          expand) added to the skips, batch norm in the decoder
FPN        5              pyramid 256, segmentation 128, merge "add", dropout 0.2, no batch norm
                          (group norm, as in Panoptic FPN)
PSPNet     3              pyramid pooling (1, 2, 3, 6), output channels 512, dropout 0.2
=========  =============  =====================================================================

These are written from the architectures' papers (Ronneberger 2015, Chaurasia & Culurciello 2017,
Lin 2017 / Kirillov 2019, Zhao 2017), not from segmentation-models-pytorch, whose code cannot run here;
the Unet decoder is MONAI's ``UNetDecoder`` (itself modelled on segmentation-models-pytorch's).
docs/grid_parameters.md compares the parameter counts with the paper's Table 2: identical for every
ResNet, DenseNet and VGG row; EfficientNet smaller by the unused classification head the paper's library keeps.

Spatial size: H and W must be multiples of ``2**encoder_depth`` (32; 8 for PSPNet). Each network returns one
logits tensor at input size in both train and eval mode (no deep supervision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder
from torch import nn

from .encoders import ENCODER_NAMES, FeatureEncoder, build_encoder
from .registry import register

__all__ = ["GridSegmenter", "UnetDecoderHead", "LinknetDecoder", "FPNDecoder", "PSPDecoder", "DECODERS",
           "build_grid_model", "PAPER_TABLE2_PRINTED_M", "paper_table2_params_m"]

DECODERS = ("unet", "linknet", "fpn", "pspnet")

# Table 2's "Pars(M)" column (millions) as printed in the extracted seed text, Unet and Linknet rows only
# (the FPN and PSPNet rows are cut off in the seed). From the mobilenetv2 row on, the printed column is
# shifted down by one row: a dpn98 row (listed in section 2.3) lost its label, so e.g. the 6.63 printed on
# the xception row is the Unet-MobileNetV2 size and 48.79 printed on efficientnet-b0 is Unet-Inception-v4.
PAPER_TABLE2_PRINTED_M: dict[str, dict[str, float]] = {
    "unet": {"vgg11": 18.25, "vgg13": 18.44, "vgg19": 29.06, "resnet18": 14.32, "resnet34": 24.43,
             "resnet50": 32.51, "resnet101": 51.51, "resnet152": 67.15, "densenet121": 13.60,
             "densenet161": 38.73, "densenet169": 21.20, "densenet201": 28.57, "resnext5032x4d": 31.99,
             "dpn68": 16.95, "mobilenetv2": 71.33, "xception": 6.63, "inceptionv4": 28.77,
             "efficientnet-b0": 48.79, "efficientnet-b1": 6.25, "efficientnet-b2": 8.76,
             "efficientnet-b3": 10.05, "efficientnet-b4": 13.16, "efficientnet-b5": 20.22,
             "efficientnet-b6": 31.22, "(next row)": 43.82},
    "linknet": {"vgg11": 10.67, "vgg13": 10.67, "vgg19": 21.29, "resnet18": 11.66, "resnet34": 21.77,
                "resnet50": 31.17, "resnet101": 51.51, "resnet152": 65.81, "densenet121": 10.42,
                "densenet161": 40.73, "densenet169": 29.14, "densenet201": 28.26, "resnext5032x4d": 30.64,
                "dpn68": 13.64, "mobilenetv2": 74.11, "xception": 4.32, "inceptionv4": 27.26,
                "efficientnet-b0": 46.16, "efficientnet-b1": 4.17, "efficientnet-b2": 4.67,
                "efficientnet-b3": 7.89, "efficientnet-b4": 10.93, "efficientnet-b5": 17.86,
                "efficientnet-b6": 28.74},
}
_SHIFTED = ["dpn98", "mobilenetv2", "xception", "inceptionv4"] + [f"efficientnet-b{i}" for i in range(7)]


def paper_table2_params_m() -> dict[str, dict[str, float]]:
    """Table 2 sizes by encoder with the one-row shift undone (our reading, see PAPER_TABLE2_PRINTED_M);
    the Unet efficientnet-b6 size is the value printed on the line after the b6 row."""
    out = {}
    for decoder, printed in PAPER_TABLE2_PRINTED_M.items():
        rows = {k: v for k, v in printed.items() if k not in _SHIFTED and k != "(next row)"}
        values = [printed[k] for k in _SHIFTED[1:]] + ([printed["(next row)"]] if "(next row)" in printed else [])
        rows.update(dict(zip(_SHIFTED, values, strict=False)))
        out[decoder] = rows
    return out


def _conv_bn_relu(c_in: int, c_out: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


# ------------------------------------------------------------------------------------------------- Unet
class UnetDecoderHead(nn.Module):
    """Unet (Ronneberger et al. 2015) decoder: five x2 nearest upsamplings, each followed by concatenation
    with the encoder map of the same stride (none at stride 1) and two conv3x3-BN-ReLU; 3x3 output conv.

    ``center``: two conv3x3-BN-ReLU at the deepest level before decoding (Unet's bottleneck pair). The
    grid's library adds it for VGG encoders only, whose stride-32 map is a bare max-pool; ``None`` (default)
    does the same, which reproduces Table 2's VGG-Unet sizes (18.25 M for vgg11).
    """

    def __init__(self, in_channels: int, encoder_channels: tuple[int, ...], out_channels: int,
                 decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16), center: bool = False):
        super().__init__()
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError(f"Unet needs one decoder width per encoder stage ({len(encoder_channels)}), "
                             f"got {decoder_channels}")
        deepest = encoder_channels[-1]
        self.center = (nn.Sequential(_conv_bn_relu(deepest, deepest), _conv_bn_relu(deepest, deepest))
                       if center else nn.Identity())
        self.decoder = UNetDecoder(
            spatial_dims=2, encoder_channels=(in_channels, *encoder_channels), decoder_channels=decoder_channels,
            act=("relu", {"inplace": True}), norm="batch", dropout=0.0, bias=False, upsample="nontrainable",
            pre_conv=None, interp_mode="nearest", align_corners=None, is_pad=False)
        self.skips = len(encoder_channels) - 1
        self.head = SegmentationHead(2, decoder_channels[-1], out_channels, kernel_size=3)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        features = [*features[:-1], self.center(features[-1])]
        return self.head(self.decoder(features, self.skips))


# ---------------------------------------------------------------------------------------------- Linknet
class LinknetBlock(nn.Module):
    """LinkNet decoder block (Chaurasia & Culurciello 2017, Fig. 3): 1x1 conv (C -> C/4), transposed conv
    stride 2 (C/4 -> C/4), 1x1 conv (C/4 -> out), each with BN + ReLU. The LinkNet paper's full-convolution
    is 3x3 (with output padding); the grid's library uses a 4x4 kernel with padding 1, which doubles the
    size exactly and reproduces Table 2's Linknet sizes (11.66 M for resnet18), so we use 4x4."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = max(1, c_in // 4)
        self.reduce = _conv_bn_relu(c_in, mid, 1)
        self.up = nn.Sequential(nn.ConvTranspose2d(mid, mid, 4, stride=2, padding=1, bias=False),
                                nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.expand = _conv_bn_relu(mid, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.up(self.reduce(x)))


class LinknetDecoder(nn.Module):
    """LinkNet decoder over a 5-stage encoder: block k upsamples x2 to the next finer encoder map's channel
    count and adds it (the "link"); the last block reaches stride 1 with ``prefinal_channels`` and a 1x1
    conv predicts (the segmentation-models-pytorch arrangement of the paper's final full-convolutions)."""

    def __init__(self, in_channels: int, encoder_channels: tuple[int, ...], out_channels: int,
                 prefinal_channels: int = 32):
        super().__init__()
        targets = list(encoder_channels[:-1][::-1]) + [prefinal_channels]
        inputs = [encoder_channels[-1]] + targets[:-1]
        self.blocks = nn.ModuleList(LinknetBlock(i, o) for i, o in zip(inputs, targets, strict=True))
        self.head = SegmentationHead(2, prefinal_channels, out_channels, kernel_size=1)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        skips = features[:-1][::-1]
        x = features[-1]
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(skips):
                x = x + skips[i]
        return self.head(x)


# -------------------------------------------------------------------------------------------------- FPN
class FPNDecoder(nn.Module):
    """Feature Pyramid Network decoder for segmentation (Lin et al. 2017; semantic branch of Kirillov et al.
    2019 Panoptic FPN): 1x1 laterals to ``pyramid_channels`` on strides 32..4, top-down nearest x2 + add;
    per level conv3x3-GroupNorm(32)-ReLU (+ bilinear x2) blocks up to stride 4 with
    ``segmentation_channels``; levels merged by addition; spatial dropout; 1x1 conv; bilinear x4."""

    def __init__(self, in_channels: int, encoder_channels: tuple[int, ...], out_channels: int,
                 pyramid_channels: int = 256, segmentation_channels: int = 128, merge: str = "add",
                 dropout: float = 0.2):
        super().__init__()
        if len(encoder_channels) != 5:
            raise ValueError("FPN uses the stride 4..32 maps of a depth-5 encoder")
        if merge not in ("add", "cat"):
            raise ValueError(f"merge must be 'add' or 'cat', got {merge!r}")
        self.merge = merge
        c4, c8, c16, c32 = encoder_channels[1:]
        self.laterals = nn.ModuleList(nn.Conv2d(c, pyramid_channels, 1) for c in (c32, c16, c8, c4))

        def seg_block(n_up: int) -> nn.Sequential:
            layers: list[nn.Module] = []
            c = pyramid_channels
            for _ in range(max(n_up, 1)):
                layers += [nn.Conv2d(c, segmentation_channels, 3, padding=1, bias=False),
                           nn.GroupNorm(32 if segmentation_channels % 32 == 0 else 1, segmentation_channels),
                           nn.ReLU(inplace=True)]
                if n_up:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
                c = segmentation_channels
            return nn.Sequential(*layers)

        self.seg_blocks = nn.ModuleList(seg_block(n) for n in (3, 2, 1, 0))
        self.dropout = nn.Dropout2d(dropout)
        merged = segmentation_channels * (4 if merge == "cat" else 1)
        self.head = SegmentationHead(2, merged, out_channels, kernel_size=1, scale_factor=4)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        maps = features[1:][::-1]                     # strides 32, 16, 8, 4
        pyramid = [self.laterals[0](maps[0])]
        for lateral, m in zip(self.laterals[1:], maps[1:], strict=True):
            pyramid.append(F.interpolate(pyramid[-1], scale_factor=2, mode="nearest") + lateral(m))
        levels = [block(p) for block, p in zip(self.seg_blocks, pyramid, strict=True)]
        x = sum(levels) if self.merge == "add" else torch.cat(levels, dim=1)
        return self.head(self.dropout(x))


# ----------------------------------------------------------------------------------------------- PSPNet
class PSPDecoder(nn.Module):
    """Pyramid Scene Parsing decoder (Zhao et al. 2017) on the stride-8 map: average pooling to 1, 2, 3, 6
    bins, 1x1 conv to C/4 + BN + ReLU, bilinear back, concatenated with the map; 1x1 conv to ``out_ch``
    + BN + ReLU; spatial dropout; 3x3 conv; bilinear x8. The 1-bin branch has no batch norm (a 1x1 map
    would make batch statistics degenerate at batch size 1); its conv has a bias instead. The auxiliary
    loss of the PSPNet paper is not used (paper 004 trains with the Dice loss on the output only)."""

    def __init__(self, in_channels: int, encoder_channels: tuple[int, ...], out_channels: int,
                 psp_out_channels: int = 512, dropout: float = 0.2, bins: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        c = encoder_channels[-1]
        branch_c = max(1, c // len(bins))
        self.bins = bins
        self.branches = nn.ModuleList()
        for b in bins:
            if b == 1:
                self.branches.append(nn.Sequential(nn.Conv2d(c, branch_c, 1, bias=True), nn.ReLU(inplace=True)))
            else:
                self.branches.append(_conv_bn_relu(c, branch_c, 1))
        self.bottleneck = _conv_bn_relu(c + branch_c * len(bins), psp_out_channels, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.head = SegmentationHead(2, psp_out_channels, out_channels, kernel_size=3,
                                     scale_factor=2 ** len(encoder_channels))

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = features[-1]
        pooled = [F.interpolate(branch(F.adaptive_avg_pool2d(x, b)), size=x.shape[2:], mode="bilinear",
                                align_corners=False) for b, branch in zip(self.bins, self.branches, strict=True)]
        return self.head(self.dropout(self.bottleneck(torch.cat([x, *pooled], dim=1))))


_DECODER_CLASSES = {"unet": UnetDecoderHead, "linknet": LinknetDecoder, "fpn": FPNDecoder, "pspnet": PSPDecoder}
_DEFAULT_DEPTH = {"unet": 5, "linknet": 5, "fpn": 5, "pspnet": 3}


class GridSegmenter(nn.Module):
    """Encoder + one of the grid's decoders. ``forward`` returns logits ``(N, out_channels, H, W)``.

    ``encoder`` is a name from ``encoders.ENCODER_NAMES`` or an already built :class:`FeatureEncoder`
    (its depth must suit the decoder: 5, or any for PSPNet).
    """

    def __init__(self, decoder: str, encoder: str | FeatureEncoder, in_channels: int = 1, out_channels: int = 1,
                 encoder_depth: int | None = None, **decoder_args):
        super().__init__()
        if decoder not in _DECODER_CLASSES:
            raise ValueError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
        if isinstance(encoder, FeatureEncoder):
            depth = encoder.depth
            if encoder_depth is not None and encoder_depth != depth:
                raise ValueError(f"encoder_depth={encoder_depth} contradicts the given encoder's depth {depth}")
            if encoder.in_channels != in_channels:
                raise ValueError(f"the given encoder takes {encoder.in_channels} channels, not {in_channels}")
        else:
            depth = encoder_depth if encoder_depth is not None else _DEFAULT_DEPTH[decoder]
        if decoder != "pspnet" and depth != 5:
            raise ValueError(f"{decoder} is defined on a depth-5 encoder (paper 004, Table 1), got {depth}")
        if isinstance(encoder, FeatureEncoder):
            self.encoder = encoder
        else:
            self.encoder = build_encoder(encoder, in_channels=in_channels, depth=depth)
        self.decoder_name, self.encoder_name = decoder, self.encoder.name
        self.in_channels, self.out_channels = in_channels, out_channels
        if decoder == "unet" and decoder_args.get("center") is None:
            decoder_args["center"] = self.encoder_name.startswith("vgg")
        self.decoder = _DECODER_CLASSES[decoder](in_channels, self.encoder.out_channels, out_channels,
                                                 **decoder_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self.decoder_name}-{self.encoder_name} expects (N, {self.in_channels}, H, W) "
                             f"input, got {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        stride = self.encoder.output_stride
        if size[0] % stride or size[1] % stride or min(size) < stride:
            raise ValueError(f"{self.decoder_name}-{self.encoder_name} needs H and W to be positive multiples "
                             f"of {stride}, got {size}; pad or resize the slice")
        return self.decoder(self.encoder(x), size)


def build_grid_model(decoder: str, encoder: str = "resnet34", in_channels: int = 1, out_channels: int = 1,
                     imagenet_weights: str | None = None, **decoder_args) -> GridSegmenter:
    """Build one grid model. ``imagenet_weights``: local torchvision ResNet state dict for the encoder
    (ResNet encoders only; see pretrained.py), the paper's "ImageNet" initialisation."""
    model = GridSegmenter(decoder, encoder, in_channels=in_channels, out_channels=out_channels, **decoder_args)
    if imagenet_weights:
        if not encoder.startswith("resnet"):
            raise ValueError(f"ImageNet loading is implemented for ResNet encoders only, not {encoder!r}")
        from .pretrained import load_torchvision_resnet_state_dict

        load_torchvision_resnet_state_dict(model.encoder, imagenet_weights, strict=True)
    return model


_ENC_DOC = f"encoders: {', '.join(ENCODER_NAMES)}"


@register("grid_unet", dims=(2,), paper="bizopoulos_grid",
          summary="Unet (decoder 256-128-64-32-16, BN) over a grid encoder; " + _ENC_DOC,
          tiny_args={"encoder": "resnet18"}, paper_args={"encoder": "resnet34"})
def build_grid_unet(encoder: str = "resnet34", in_channels: int = 1, out_channels: int = 1,
                    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16), center: bool | None = None,
                    imagenet_weights: str | None = None) -> GridSegmenter:
    return build_grid_model("unet", encoder, in_channels, out_channels, imagenet_weights,
                            decoder_channels=tuple(decoder_channels), center=center)


@register("grid_linknet", dims=(2,), paper="bizopoulos_grid",
          summary="Linknet (LinkNet decoder blocks added to the skips, BN) over a grid encoder; " + _ENC_DOC,
          tiny_args={"encoder": "resnet18"}, paper_args={"encoder": "resnet34"})
def build_grid_linknet(encoder: str = "resnet34", in_channels: int = 1, out_channels: int = 1,
                       imagenet_weights: str | None = None) -> GridSegmenter:
    return build_grid_model("linknet", encoder, in_channels, out_channels, imagenet_weights)


@register("grid_fpn", dims=(2,), paper="bizopoulos_grid",
          summary="FPN (pyramid 256, segmentation 128, merge add, dropout 0.2) over a grid encoder; " + _ENC_DOC,
          tiny_args={"encoder": "resnet18"}, paper_args={"encoder": "resnet34"})
def build_grid_fpn(encoder: str = "resnet34", in_channels: int = 1, out_channels: int = 1,
                   pyramid_channels: int = 256, segmentation_channels: int = 128, merge: str = "add",
                   dropout: float = 0.2, imagenet_weights: str | None = None) -> GridSegmenter:
    return build_grid_model("fpn", encoder, in_channels, out_channels, imagenet_weights,
                            pyramid_channels=pyramid_channels, segmentation_channels=segmentation_channels,
                            merge=merge, dropout=dropout)


@register("grid_pspnet", dims=(2,), paper="bizopoulos_grid",
          summary="PSPNet (depth-3 encoder, pooling 1/2/3/6, 512 channels, dropout 0.2) over a grid encoder; "
                  + _ENC_DOC,
          tiny_args={"encoder": "resnet18"}, paper_args={"encoder": "resnet34"})
def build_grid_pspnet(encoder: str = "resnet34", in_channels: int = 1, out_channels: int = 1,
                      psp_out_channels: int = 512, dropout: float = 0.2,
                      imagenet_weights: str | None = None) -> GridSegmenter:
    return build_grid_model("pspnet", encoder, in_channels, out_channels, imagenet_weights,
                            psp_out_channels=psp_out_channels, dropout=dropout)
