"""nnU-Net-style U-Net (2D and 3D), the backbone of papers 000, 001 and 002.

Papers (docs/CITATIONS.md): ``wang_hybrid_encoder`` (Wang et al., section 3.1: "batch normalization and ReLU
are replaced by instance normalization and leaky ReLU ... deep supervision"), ``wang_multi_encoder`` (same
backbone) and ``zhang_collaborative`` (Zhang et al., Table I gives the exact 3D layer table).

Building blocks (the layers of MONAI's nnU-Net blocks, ``monai.networks.blocks.dynunet_block``):

- a *stage* is two ``conv -> InstanceNorm(affine) -> LeakyReLU(0.01)`` layers; the first conv of a stage
  carries the stage's stride (strided-conv down-sampling, no pooling), the second has stride 1;
- a decoder stage is a transposed conv (kernel = stride = the stride of the encoder stage below it), a
  concatenation with the skip feature map, then two conv-IN-lReLU layers;
- one 1x1 head per decoder stage (deep supervision, nnU-Net style).

MONAI's conv layers have no bias before instance norm (the norm's affine shift makes it redundant);
nnU-Net keeps one; the difference is a handful of parameters.

The three blocks (:class:`ConvBlock`, :class:`OutputHead`, :func:`transposed_conv`) are written here with
exactly the layers, paddings, parameter names, creation order and arithmetic of MONAI's ``UnetBasicBlock``,
``UnetOutBlock`` and ``get_conv_layer`` (``test_nnunet_blocks_match_monai`` holds them to it, weights and
outputs), so checkpoints load either way. The reason is start-up time: importing any MONAI module runs
``monai/__init__``, which imports all of MONAI (1.6 s on the 2-core machines, on top of PyTorch's 1.2 s), and
the engine's default infection network is this U-Net; every ``covidlesionseg segment`` paid it.

Why not ``monai.networks.nets.DynUNet`` itself: the dual-encoder models of 000/001/002 need the encoder and
the decoder as separate modules (two encoders, one shared decoder whose input width differs), and
DynUNet's train-mode output stacks heads *upsampled* to full resolution. Here the encoder
(:class:`NnUNetEncoder`) and decoder (:class:`NnUNetDecoder`) are separate and reused by
``dual_encoder.py``; an ``NnUNet`` state dict's ``encoder.*`` keys load straight into their encoders.

Output contract (registry.py): ``eval()`` -> one logits tensor at input size; ``train()`` with
``deep_supervision=True`` -> list ``[full_res, 1/2, 1/4, ...]`` with **each head at its own decoder
resolution** (not upsampled, as nnU-Net does: cheaper, and the loss in ``losses.py`` down-samples the
target with nearest neighbour to each output's size). There is one head per decoder stage
(``len(channels) - 1`` outputs); ``losses.deep_supervision_weights`` gives the lowest-resolution one weight 0,
as nnU-Net does.

Paper 3D configuration (002 Table I, input patch 1x56x160x192; 000 uses 50x160x192), read as nnU-Net stages:

====== ======== ================ ========== ===========================
stage  channels  first-conv stride kernel     feature size (56x160x192)
====== ======== ================ ========== ===========================
0       32       (1,1,1)          (1,3,3)    32 x 56 x 160 x 192  (conv1)
1       64       (1,2,2)          (3,3,3)    64 x 56 x 80 x 96    (down1 + conv2)
2      128       (2,2,2)          (3,3,3)   128 x 28 x 40 x 48    (down2 + conv3)
3      256       (2,2,2)          (3,3,3)   256 x 14 x 20 x 24    (down3 + conv4)
4      320       (2,2,2)          (3,3,3)   320 x 7 x 10 x 12     (down4 + conv5)
5      320       (1,2,2)          (3,3,3)   320 x 7 x 5 x 6       (down5, bottleneck)
====== ======== ================ ========== ===========================

Table I lists "downN: strided conv" with the size *after* the stride and the channel count of the next
stage, i.e. the strided conv is the first conv of the next stage (nnU-Net's layout); every stage has two
convs (nnU-Net). The decoder mirrors it (up6..up10: transposed convs (1,2,2), (2,2,2) x3, (1,2,2), each
followed by concatenation with conv5..conv1 and two convs; conv10 uses (1,3,3) kernels), and a 1x1x1 output
conv with sigmoid (``out_channels=1``). The input must be divisible by the product of the strides per axis:
8 x 32 x 32 for this table.

The 2D default follows nnU-Net's 2D rule for 512x512 slices cut to patches: features doubling from 32,
capped at 480, six stages, 3x3 kernels, first stage without stride (inputs divisible by 32).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import nn

from .registry import register

NORM = ("instance", {"affine": True})
ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})

# 002 Table I (see module docstring).
PAPER_3D_CHANNELS = [32, 64, 128, 256, 320, 320]
PAPER_3D_STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
PAPER_3D_KERNELS = [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
DEFAULT_2D_CHANNELS = [32, 64, 128, 256, 480, 480]
DEFAULT_2D_STRIDES = [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2]]
DEFAULT_2D_KERNELS = [[3, 3]] * 6


def _same_padding(kernel_size: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """MONAI's ``get_padding``: ``(k - s + 1) / 2`` per axis, truncated."""
    return tuple(int((int(k) - int(s) + 1) / 2) for k, s in zip(kernel_size, stride, strict=True))


def _conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size, stride, bias: bool) -> nn.Sequential:
    """A conv in a container whose one child is ``conv`` (MONAI's ``Convolution`` holds it so: same keys)."""
    k = _per_axis(kernel_size, spatial_dims, "kernel size", 0)
    s = _per_axis(stride, spatial_dims, "stride", 0)
    cls = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    return nn.Sequential(OrderedDict(conv=cls(in_channels, out_channels, k, s, padding=_same_padding(k, s), bias=bias)))


def transposed_conv(spatial_dims: int, in_channels: int, out_channels: int, stride) -> nn.Sequential:
    """Up-sampling by a transposed conv of kernel = stride, no bias (MONAI's ``get_conv_layer(...,
    kernel_size=stride, stride=stride, bias=False, is_transposed=True)``)."""
    s = _per_axis(stride, spatial_dims, "stride", 0)
    pad = _same_padding(s, s)
    out_pad = tuple(2 * p for p in pad)   # MONAI's get_output_padding 2p + s - k, with k = s
    cls = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
    return nn.Sequential(OrderedDict(conv=cls(in_channels, out_channels, s, s, padding=pad, output_padding=out_pad,
                                              bias=False)))


class ConvBlock(nn.Module):
    """Two ``conv -> InstanceNorm(affine) -> LeakyReLU(0.01)`` layers, the first with the stage's stride
    (MONAI's ``UnetBasicBlock`` with ``norm_name=NORM, act_name=ACT``: same layers, names and order)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size, stride):
        super().__init__()
        self.conv1 = _conv(spatial_dims, in_channels, out_channels, kernel_size, stride, bias=False)
        self.conv2 = _conv(spatial_dims, out_channels, out_channels, kernel_size, 1, bias=False)
        self.lrelu = nn.LeakyReLU(negative_slope=ACT[1]["negative_slope"], inplace=ACT[1]["inplace"])
        norm = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
        self.norm1 = norm(out_channels, **NORM[1])
        self.norm2 = norm(out_channels, **NORM[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lrelu(self.norm1(self.conv1(x)))
        return self.lrelu(self.norm2(self.conv2(x)))


class OutputHead(nn.Module):
    """A 1x1 conv with bias to the logits (MONAI's ``UnetOutBlock``)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = _conv(spatial_dims, in_channels, out_channels, 1, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _per_axis(value: Any, spatial_dims: int, what: str, stage: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (int(value),) * spatial_dims
    values = tuple(int(v) for v in value)
    if len(values) != spatial_dims:
        raise ValueError(f"{what} of stage {stage} is {list(values)}: expected an int or {spatial_dims} values "
                         f"(one per spatial axis)")
    return values


def network_plan(spatial_dims: int, channels: Sequence[int] | None = None, strides: Sequence[Any] | None = None,
                 kernel_sizes: Sequence[Any] | None = None):
    """Validated ``(channels, strides, kernel_sizes)`` per stage, filling in the defaults for ``spatial_dims``.

    Strides and kernels may be ints or per-axis sequences; they come back as per-axis tuples.

    Raises:
        ValueError: wrong dimensionality, mismatched list lengths, fewer than 2 stages, a first-stage stride
            (the full-resolution output needs a stride-free first stage), or kernel/stride combinations a
            transposed conv cannot invert.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if channels is None:
        channels = PAPER_3D_CHANNELS if spatial_dims == 3 else DEFAULT_2D_CHANNELS
    n = len(channels)
    if strides is None:
        strides = PAPER_3D_STRIDES if spatial_dims == 3 else DEFAULT_2D_STRIDES
        strides = strides[:n] if n <= len(strides) else list(strides) + [2] * (n - len(strides))
    if kernel_sizes is None:
        kernel_sizes = PAPER_3D_KERNELS if spatial_dims == 3 else DEFAULT_2D_KERNELS
        kernel_sizes = kernel_sizes[:n] if n <= len(kernel_sizes) else list(kernel_sizes) + [3] * (n - len(kernel_sizes))
    if n < 2:
        raise ValueError(f"a U-Net needs at least 2 stages, got channels={list(channels)}")
    if len(strides) != n or len(kernel_sizes) != n:
        raise ValueError(f"channels, strides and kernel_sizes need one entry per stage: got {n} channels, "
                         f"{len(strides)} strides, {len(kernel_sizes)} kernel sizes")
    chans = tuple(int(c) for c in channels)
    if any(c < 1 for c in chans):
        raise ValueError(f"channels must be positive, got {list(chans)}")
    st = tuple(_per_axis(s, spatial_dims, "stride", i) for i, s in enumerate(strides))
    ks = tuple(_per_axis(k, spatial_dims, "kernel size", i) for i, k in enumerate(kernel_sizes))
    if any(s != 1 for s in st[0]):
        raise ValueError(f"the first stage must not down-sample (stride {list(st[0])}): the network's output "
                         "must be at input size")
    for i, (s, k) in enumerate(zip(st, ks, strict=True)):
        for si, ki in zip(s, k, strict=True):
            if si < 1 or ki < 1 or ki % 2 == 0:
                raise ValueError(f"stage {i}: strides must be >= 1 and kernels odd, got stride {list(s)}, "
                                 f"kernel {list(k)}")
            if si > ki + 1:   # MONAI's 'same' padding (k - s + 1) / 2 would be negative
                raise ValueError(f"stage {i}: stride {list(s)} is too large for kernel {list(k)}")
    return chans, st, ks


def size_divisor(strides: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Per-axis number the input size must be a multiple of (product of the strides)."""
    div = [1] * len(strides[0])
    for s in strides:
        div = [d * int(si) for d, si in zip(div, s, strict=True)]
    return tuple(div)


def check_input(x: torch.Tensor, spatial_dims: int, in_channels: int, strides) -> None:
    """Raise a clear ``ValueError`` when ``x`` cannot go through a U-Net with these strides."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != spatial_dims + 2:
        raise ValueError(f"expected input (N, C, {'D, H, W' if spatial_dims == 3 else 'H, W'}) with "
                         f"{spatial_dims + 2} dimensions, got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"expected {in_channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
    div = size_divisor(strides)
    bad = [(int(s), d) for s, d in zip(x.shape[2:], div, strict=True) if s % d]
    if bad:
        raise ValueError(f"input spatial size {tuple(x.shape[2:])} must be a multiple of {div} per axis (the "
                         f"product of the strides); pad or crop it (e.g. to {tuple(-(-int(s) // d) * d for s, d in zip(x.shape[2:], div, strict=True))})")
    deepest = [int(s) // d for s, d in zip(x.shape[2:], div, strict=True)]
    if all(s == 1 for s in deepest):
        # instance norm over a single voxel is undefined (and torch refuses it)
        raise ValueError(f"input spatial size {tuple(x.shape[2:])} is too small: the bottleneck would hold a single "
                         f"voxel; use at least twice {div} along one axis")


class NnUNetEncoder(nn.Module):
    """Encoder: one :class:`ConvBlock` (two conv-IN-lReLU, first strided) per stage.

    ``forward`` returns the list of stage outputs ``[stage0 (full res), ..., bottleneck]``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels, strides, kernel_sizes):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.channels = tuple(channels)
        self.strides = tuple(strides)
        self.kernel_sizes = tuple(kernel_sizes)
        stages = []
        prev = in_channels
        for c, s, k in zip(self.channels, self.strides, self.kernel_sizes, strict=True):
            stages.append(ConvBlock(spatial_dims, prev, c, kernel_size=k, stride=s))
            prev = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class _DecoderStage(nn.Module):
    """Transposed conv up-sampling, concatenation with the skip, two conv-IN-lReLU (nnU-Net decoder stage).

    Written here instead of MONAI's ``UnetUpBlock`` because that block assumes the skip has as many channels
    as the stage's output; the Multi-encoder variant concatenates wider skips.
    """

    def __init__(self, spatial_dims, in_channels, skip_channels, out_channels, kernel_size, up_stride):
        super().__init__()
        self.transp_conv = transposed_conv(spatial_dims, in_channels, out_channels, up_stride)
        self.conv_block = ConvBlock(spatial_dims, out_channels + skip_channels, out_channels, kernel_size, 1)

    def forward(self, x, skip):
        return self.conv_block(torch.cat((self.transp_conv(x), skip), dim=1))


class NnUNetDecoder(nn.Module):
    """Decoder with one 1x1 head per stage.

    Args:
        channels, strides, kernel_sizes: the *encoder's* plan (the decoder mirrors it).
        out_channels: classes (1 = sigmoid).
        deep_supervision: return all heads in train mode.
        bottleneck_channels: width of the tensor entering the decoder (default ``channels[-1]``; twice that
            when two encoders are concatenated).
        skip_channels: width of each skip, shallow to deep (default ``channels[:-1]``).
    """

    def __init__(self, spatial_dims: int, channels, strides, kernel_sizes, out_channels: int,
                 deep_supervision: bool = True, bottleneck_channels: int | None = None,
                 skip_channels: Sequence[int] | None = None):
        super().__init__()
        n = len(channels)
        self.deep_supervision = bool(deep_supervision)
        skip_channels = list(channels[:-1]) if skip_channels is None else list(skip_channels)
        if len(skip_channels) != n - 1:
            raise ValueError(f"need {n - 1} skip widths, got {skip_channels}")
        prev = channels[-1] if bottleneck_channels is None else int(bottleneck_channels)
        stages, heads = [], []
        # deepest decoder stage first: it up-samples by the stride of the encoder stage below it
        for level in range(n - 2, -1, -1):
            stages.append(_DecoderStage(spatial_dims, prev, skip_channels[level], channels[level],
                                        kernel_sizes[level], strides[level + 1]))
            heads.append(OutputHead(spatial_dims, channels[level], out_channels))
            prev = channels[level]
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)   # heads[i] belongs to stages[i] (deep -> shallow)

    def forward(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor]):
        """``skips`` shallow to deep (``len(stages)`` of them). Returns logits or ``[full, 1/2, ...]``."""
        if len(skips) != len(self.stages):
            raise ValueError(f"decoder needs {len(self.stages)} skip tensors, got {len(skips)}")
        want_all = self.deep_supervision and self.training
        x = bottleneck
        outputs = []
        for i, stage in enumerate(self.stages):
            x = stage(x, skips[len(skips) - 1 - i])
            if want_all or i == len(self.stages) - 1:
                outputs.append(self.heads[i](x))
        if not want_all:
            return outputs[-1]
        return outputs[::-1]   # full resolution first


@register("nnunet", dims=(2, 3), paper="zhang_collaborative",
          summary="nnU-Net-style U-Net: 2 conv-IN-LeakyReLU per stage, strided-conv down-sampling, transposed-conv "
                  "up-sampling, concatenation skips, deep-supervision heads (002 Table I in 3D)",
          tiny_args={"spatial_dims": 3, "channels": [4, 8, 16], "strides": [1, 2, 2], "kernel_sizes": [3, 3, 3]},
          paper_args={"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": PAPER_3D_CHANNELS,
                      "strides": PAPER_3D_STRIDES, "kernel_sizes": PAPER_3D_KERNELS, "deep_supervision": True})
class NnUNet(nn.Module):
    """nnU-Net-style U-Net (see the module docstring for the 002 Table I configuration, the default in 3D).

    Args:
        in_channels: input channels (1 for CT).
        out_channels: 1 = sigmoid (Table I's output), >= 2 = softmax classes.
        spatial_dims: 2 or 3.
        channels, strides, kernel_sizes: per stage; ``None`` = the default plan for ``spatial_dims``.
        deep_supervision: in train mode return ``[full_res, 1/2, ...]`` logits (each at its own resolution).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, spatial_dims: int = 3,
                 channels: Sequence[int] | None = None, strides=None, kernel_sizes=None,
                 deep_supervision: bool = True):
        super().__init__()
        chans, st, ks = network_plan(spatial_dims, channels, strides, kernel_sizes)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels, self.strides, self.kernel_sizes = chans, st, ks
        self.encoder = NnUNetEncoder(spatial_dims, in_channels, chans, st, ks)
        self.decoder = NnUNetDecoder(spatial_dims, chans, st, ks, out_channels, deep_supervision)

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @property
    def size_divisor(self) -> tuple[int, ...]:
        return size_divisor(self.strides)

    def forward(self, x: torch.Tensor):
        check_input(x, self.spatial_dims, self.in_channels, self.strides)
        feats = self.encoder(x)
        return self.decoder(feats[-1], feats[:-1])


def encoder_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder part of a pre-trained state dict, keys relative to :class:`NnUNetEncoder`.

    Accepts an :class:`NnUNet` state dict (``encoder.*`` keys, decoder keys ignored), a checkpoint dict
    wrapping one under ``"state_dict"``/``"model"``, or an encoder-only state dict (``stages.*`` keys).
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"expected a state dict, got {type(state_dict).__name__}")
    for wrapper in ("state_dict", "model", "network_weights"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    keys = list(state_dict)
    if any(k.startswith("encoder.") for k in keys):
        return {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    if any(k.startswith("stages.") for k in keys):
        return dict(state_dict)
    raise ValueError("the state dict holds no U-Net encoder (no 'encoder.*' or 'stages.*' keys); expected the "
                     f"state dict of an 'nnunet' model. First keys: {keys[:5]}")


def load_encoder(encoder: NnUNetEncoder, state_dict: dict[str, torch.Tensor], what: str = "encoder") -> None:
    """Load :func:`encoder_state_dict` of ``state_dict`` into ``encoder`` strictly, with a readable error."""
    sd = encoder_state_dict(state_dict)
    own = encoder.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            detail.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            detail.append(f"shape mismatch at {k}: pre-trained {tuple(sd[k].shape)} vs {tuple(own[k].shape)}")
        raise ValueError(f"cannot load the pre-trained weights into the {what}: the architectures differ "
                         f"({'; '.join(detail)}). Build the model with the pre-trained network's channels, strides "
                         "and kernel_sizes.")
    encoder.load_state_dict(sd, strict=True)
