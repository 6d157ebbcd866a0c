"""nCoVSegNet (Liu et al., MedIA 2021; ``liu_ncovsegnet``, docs/CITATIONS.md): ResNet-50 + ECA backbone, GCA
and DAF modules, four deeply supervised outputs.

Layer shapes follow the authors' public code (https://github.com/Jiannan-Liu/nCoVSegNet, named in the paper's
section 4.2), whose modules were counted to fix them: at ``width=1`` the
network has exactly 168,169,968 parameters (backbone 23,508,080; gca1 1,691,392; gca2 6,757,888;
gca3 27,016,192; gca4 72,374,272; daf3 28,052,480; daf2 7,013,888; daf1 1,753,856; heads 1,920). The
authors' module additionally carries 34,407,323 parameters of DAF layers its forward never uses; they are
not built here. Choices that those counts pin down where the paper is silent:

- every convolution inside GCA/DAF is bias-free and followed by batch norm ("conv unit" = conv + BN, no
  ReLU); the only ReLUs are the GCA output (eq. 1) and the DAF output (eq. 2);
- DAF's spatial-attention deconvolution keeps the high-level channel count (high -> high, no BN) before the
  channel-wise max; the fusion deconvolution maps high -> low and is batch-normalised;
- the four 1x1 prediction heads have no bias.

Forward contract (models/registry.py): ``eval()`` returns the finest prediction (head on DAF1, stride 4,
bilinearly upsampled x4) as logits ``(N, 1, H, W)``; ``train()`` returns the four logits maps
``[DAF1 (x4), DAF2 (x8), DAF3 (x16), GCA4 (x32)]``, all at input size, for the deeply supervised loss
(eqs. 5-8). ``H`` and ``W`` must be multiples of 32 (the paper uses 352x352).

Batch size: DAF's channel attention batch-normalises a globally pooled vector (eq. 3 as implemented by the
authors), which needs at least two samples per batch in ``train()`` mode (the paper trains with batch 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.resnet import ResNetBottleneck
from torch import nn

from .encoders import ResNetEncoder
from .registry import register

__all__ = ["ECALayer", "ECABottleneck", "GCAModule", "DAFModule", "NCoVSegNet", "parameter_breakdown",
           "PAPER_PARAMETER_COUNTS"]

# counted on the authors' public code (see the module docstring), used modules only
PAPER_PARAMETER_COUNTS = {
    "backbone": 23_508_080, "gca1": 1_691_392, "gca2": 6_757_888, "gca3": 27_016_192, "gca4": 72_374_272,
    "daf3": 28_052_480, "daf2": 7_013_888, "daf1": 1_753_856, "heads": 1_920, "total": 168_169_968,
}


class ECALayer(nn.Module):
    """Efficient Channel Attention (Wang et al. 2020, ECA-Net), as embedded in every nCoVSegNet block:
    global average pool -> 1D convolution across channels (k = 3, no bias; the paper's code fixes k
    instead of ECA's adaptive choice) -> sigmoid -> channel scaling."""

    def __init__(self, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3))                      # (N, C)
        w = self.conv(w.unsqueeze(1)).squeeze(1)    # neighbouring channels interact, (N, C)
        return x * torch.sigmoid(w)[:, :, None, None]


class ECABottleneck(ResNetBottleneck):
    """MONAI ResNet bottleneck with an ECA layer after the last batch norm, before the residual addition."""

    def __init__(self, in_planes: int, planes: int, spatial_dims: int = 2, stride: int = 1,
                 downsample: nn.Module | None = None, act="relu", norm="batch") -> None:
        if spatial_dims != 2:
            raise ValueError("nCoVSegNet's ECA bottleneck is 2D only")
        super().__init__(in_planes, planes, spatial_dims=spatial_dims, stride=stride, downsample=downsample,
                         act=act, norm=norm)
        self.eca = ECALayer(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.eca(self.bn3(self.conv3(out)))
        return self.act(out + residual)


def _conv_bn(c_in: int, c_out: int, kernel_size, padding=0, dilation=1) -> nn.Sequential:
    """The papers' "convolutional unit": bias-free convolution + batch norm, no activation."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size, padding=padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(c_out))


class GCAModule(nn.Module):
    """Global context-aware module, eq. (1): ``ReLU(Conv3x3(Cat(f1, f3, f5, f7)) + Conv1x1(f_RB))``.

    Branch ``f1`` is a 1x1 unit; branch ``f_k`` (k = 3, 5, 7) is 1x1 -> (1 x k) -> (k x 1) -> 3x3 with
    dilation k (asymmetric convolutions enlarge the receptive field cheaply, after RFB, Liu et al. 2018).
    ``kernel_sizes=(3, 5)`` drops the 7-branch, as the paper does for GCA4.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes: tuple[int, ...] = (3, 5, 7)):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn(in_channels, out_channels, 1)])
        for k in kernel_sizes:
            self.branches.append(nn.Sequential(
                _conv_bn(in_channels, out_channels, 1),
                _conv_bn(out_channels, out_channels, (1, k), padding=(0, k // 2)),
                _conv_bn(out_channels, out_channels, (k, 1), padding=(k // 2, 0)),
                _conv_bn(out_channels, out_channels, 3, padding=k, dilation=k),
            ))
        self.fuse = _conv_bn(out_channels * len(self.branches), out_channels, 3, padding=1)
        self.residual = _conv_bn(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cat = torch.cat([branch(x) for branch in self.branches], dim=1)
        return F.relu(self.fuse(cat) + self.residual(x))


class DAFModule(nn.Module):
    """Dual-attention fusion module, eqs. (2)-(4).

    ``W_CA = sigmoid(BN(Conv1x1(GAP(high))))`` (channel attention, high -> low channels);
    ``W_SA = sigmoid(max_c(Deconv4x4(high)))`` (spatial attention at the low level's resolution);
    ``out = ReLU(W_SA * W_CA * BN(Conv3x3(low)) + BN(Deconv4x4(high)))``.
    Both deconvolutions are ConvTranspose2d(kernel 4, stride 2, padding 1): exactly x2.
    """

    def __init__(self, high_channels: int, low_channels: int):
        super().__init__()
        self.channel_att = _conv_bn(high_channels, low_channels, 1)
        self.low_conv = _conv_bn(low_channels, low_channels, 3, padding=1)
        self.spatial_up = nn.ConvTranspose2d(high_channels, high_channels, 4, stride=2, padding=1, bias=False)
        self.fuse_up = nn.Sequential(
            nn.ConvTranspose2d(high_channels, low_channels, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(low_channels))

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        w_ca = torch.sigmoid(self.channel_att(F.adaptive_avg_pool2d(high, 1)))          # (N, C_low, 1, 1)
        w_sa = torch.sigmoid(self.spatial_up(high).amax(dim=1, keepdim=True))          # (N, 1, H, W)
        return F.relu(w_sa * w_ca * self.low_conv(low) + self.fuse_up(high))


class NCoVSegNet(nn.Module):
    """nCoVSegNet (Fig. 1 of the paper). See the module docstring for shapes and the forward contract.

    Args:
        in_channels: input channels. 3 (default) matches the paper and ImageNet weights; with 1, an
            ImageNet stem is adapted by summing its RGB filters (pretrained.py), which gives the same
            response as feeding the grey image replicated to three channels.
        out_channels: prediction channels (1: sigmoid lesion map, as in the paper).
        width: multiplier of every channel count (1.0 = the paper's network; e.g. 0.25 for CPU-sized runs).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, width: float = 1.0):
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        self.in_channels, self.out_channels, self.width = in_channels, out_channels, width
        self.backbone = ResNetEncoder("resnet50", in_channels=in_channels, depth=5, block=ECABottleneck,
                                      width=width)
        c1, c2, c3, c4 = self.backbone.out_channels[1:]      # 256, 512, 1024, 2048 at width 1
        g1, g2, g3, g4 = c1 // 2, c2 // 2, c3 // 2, c4 // 2  # 128, 256, 512, 1024
        self.gca1 = GCAModule(c1, g1)
        self.gca2 = GCAModule(c2, g2)
        self.gca3 = GCAModule(c3, g3)
        self.gca4 = GCAModule(c4, g4, kernel_sizes=(3, 5))
        self.daf3 = DAFModule(g4, g3)
        self.daf2 = DAFModule(g3, g2)
        self.daf1 = DAFModule(g2, g1)
        # heads on DAF1, DAF2, DAF3, GCA4 (strides 4, 8, 16, 32)
        self.heads = nn.ModuleList([nn.Conv2d(c, out_channels, 1, bias=False) for c in (g1, g2, g3, g4)])

    def forward(self, x: torch.Tensor):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"nCoVSegNet expects (N, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        if size[0] % 32 or size[1] % 32 or min(size) < 32:
            raise ValueError(f"nCoVSegNet needs H and W to be positive multiples of 32 (five stride-2 stages), "
                             f"got {size}; pad or resize the slice (the paper uses 352x352)")
        if self.training and x.shape[0] < 2:
            raise ValueError("nCoVSegNet in train() mode needs a batch of at least 2: DAF's channel attention "
                             "batch-normalises a pooled vector (use eval() for single images)")
        _, r1, r2, r3, r4 = self.backbone(x)
        f1, f2, f3, f4 = self.gca1(r1), self.gca2(r2), self.gca3(r3), self.gca4(r4)
        d3 = self.daf3(f4, f3)
        d2 = self.daf2(d3, f2)
        d1 = self.daf1(d2, f1)

        def up(t: torch.Tensor) -> torch.Tensor:
            return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

        finest = up(self.heads[0](d1))
        if not self.training:
            return finest
        return [finest, up(self.heads[1](d2)), up(self.heads[2](d3)), up(self.heads[3](f4))]


def parameter_breakdown(model: NCoVSegNet) -> dict[str, int]:
    """Parameter counts per top-level module (the keys of ``PAPER_PARAMETER_COUNTS``) and the total."""
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


@register(
    "ncovsegnet", dims=(2,), paper="liu_ncovsegnet",
    summary="nCoVSegNet: ResNet-50+ECA backbone, GCA (eq. 1) and DAF (eqs. 2-4) modules, 4 deeply supervised "
            "sigmoid outputs; 2D slices with sides a multiple of 32 (paper: 352x352, 3 channels).",
    tiny_args={"in_channels": 1, "out_channels": 1, "width": 0.125},
    paper_args={"in_channels": 3, "out_channels": 1, "width": 1.0},
)
def build_ncovsegnet(in_channels: int = 3, out_channels: int = 1, width: float = 1.0,
                     imagenet_weights: str | None = None) -> NCoVSegNet:
    """Build nCoVSegNet; ``imagenet_weights`` = local path of torchvision's ResNet-50 ImageNet state dict
    (see pretrained.py) to initialise the backbone as the paper's first transfer stage does."""
    model = NCoVSegNet(in_channels=in_channels, out_channels=out_channels, width=width)
    if imagenet_weights:
        from .pretrained import load_torchvision_resnet_state_dict

        load_torchvision_resnet_state_dict(model, imagenet_weights, strict=True)
    return model
