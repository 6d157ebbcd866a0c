"""Two-encoder U-Nets of papers 000, 001 and 002, built on the nnU-Net-style blocks of ``nnunet.py``.

All three share one design: two encoders with the *same* architecture as the ``nnunet`` encoder (so a
pre-trained ``nnunet`` state dict loads into either), their bottleneck features combined, one shared
nnU-Net decoder, and the ``nnunet`` output contract (eval: one logits tensor at input size; train with deep
supervision: ``[full_res, 1/2, ...]``, each head at its own resolution).

- :class:`HybridEncoderUNet` (``"hybrid_encoder_unet"``, 000 section 3.5): Dedicated-encoder (trained) +
  Adapted-encoder (pre-trained, frozen), combined by the Selective Fusion unit (eqs. 2-6).
- :class:`MultiEncoderUNet` (``"multi_encoder_unet"``, 001 section E): Self-encoder + frozen Adapted-encoder,
  features concatenated.
- :class:`CollaborativeUNet` (``"collaborative_unet"``, 002 section III): general encoder G + target encoder T
  concatenated into the decoder, skips from T, features exposed for the relation losses of ``relation.py``.

Where the two encoders meet (a reading of the papers, tested in Testing/models/test_dual_encoder.py):
000 says "At the end of the encoding phase, both Dedicated-encoder and Adapted-encoder representations with
C channels ... are learned separately", fuses *these* (Xde, Xad) and feeds Xsf "into the decoding part";
Fig. 1 shows one Selective Fusion unit. 001 likewise concatenates the two encoders' features "and then fed
into the decoder part". 002, by the same group on the same backbone, states it explicitly: concatenation
at the decoder input and "skip connections between the target encoder and shared decoder". So by default
the encoders meet **at the bottleneck only** and the skips come from the trained encoder
(Dedicated/Self/Target). ``fusion_levels="all"`` (Hybrid) / ``concat_levels="all"`` (Multi) also combine
every skip level, each with its own unit, for experiments.

Multi-encoder decoder width: the decoder keeps the ``nnunet`` decoder's channels at every level; only its
inputs widen (the first transposed conv takes 2C channels, and with ``concat_levels="all"`` each skip is
twice as wide). That keeps the decoder the same size as the single-encoder baseline except for those
input convs, so the comparison with the baseline is about the extra encoder, not a wider decoder.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn

from .nnunet import (
    ACT,
    NORM,
    PAPER_3D_CHANNELS,
    PAPER_3D_KERNELS,
    PAPER_3D_STRIDES,
    NnUNetDecoder,
    NnUNetEncoder,
    check_input,
    load_encoder,
    network_plan,
    size_divisor,
)
from .registry import register

_TINY = {"spatial_dims": 3, "channels": [4, 8, 16], "strides": [1, 2, 2], "kernel_sizes": [3, 3, 3]}
_PAPER = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": PAPER_3D_CHANNELS,
          "strides": PAPER_3D_STRIDES, "kernel_sizes": PAPER_3D_KERNELS, "deep_supervision": True}


def _levels(spec: str | Iterable[int], n_stages: int, what: str) -> tuple[int, ...]:
    """Stage indices (0 = full resolution, n-1 = bottleneck) from "bottleneck", "all" or a list."""
    if isinstance(spec, str):
        if spec == "bottleneck":
            return (n_stages - 1,)
        if spec == "all":
            return tuple(range(n_stages))
        raise ValueError(f"{what} must be 'bottleneck', 'all' or a list of stage indices, got {spec!r}")
    levels = tuple(sorted({int(i) for i in spec}))
    if not levels or levels[0] < 0 or levels[-1] >= n_stages:
        raise ValueError(f"{what} {list(spec)} must be stage indices in 0..{n_stages - 1}")
    return levels


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


class SelectiveFusion(nn.Module):
    """Selective Fusion unit of 000 (eqs. 2-6), after SKNet's selective kernel.

    ``Xf = Xde + Xad`` (2); ``s = GAP(Xf)`` (3); ``z = LeakyReLU(Norm(W s))``, ``W: C -> d`` (4);
    ``a = e^{Az} / (e^{Az} + e^{Bz})``, ``b = 1 - a`` per channel, ``A, B: d -> C`` (5);
    ``Xsf = H(a Xde + b Xad)`` (6).

    Choices where the paper cannot be followed literally:

    - Norm in eq. 4: the paper writes instance norm, but on the pooled ``(N, d)`` vector instance norm
      normalises each channel over a single value and is identically zero (so ``a = b = 1/2`` always).
      SKNet uses batch norm there, which is unreliable at the papers' batch size of 2 and differs between
      train and eval. This uses **LayerNorm** over the ``d`` hidden features of each sample (per-sample, like
      instance norm, but over features), with affine parameters.
    - ``d = max(C // r, min_hidden)`` (capped at C), r = 16: SKNet also floors d (at 32); a floor of 16 keeps
      LayerNorm meaningful for narrow levels (C/r = 2 at 32 channels would leave LayerNorm just a sign).
      At the paper's bottleneck (C = 320) d = 20 = C/r.
    - Eq. 6 applies the mapping H of eq. 1 (conv -> instance norm -> leaky ReLU) to the weighted sum; it is
      a stride-1 conv with the level's kernel and C -> C channels. ``mapping=False`` returns the plain
      weighted sum ``a Xde + b Xad``.

    ``last_attention`` keeps the (detached) ``(a, b)`` of the latest call, each ``(N, C)``, for inspection.
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 16, min_hidden: int = 16,
                 kernel_size: Sequence[int] | int = 3, mapping: bool = True):
        super().__init__()
        if channels < 1 or reduction < 1 or min_hidden < 1:
            raise ValueError(f"channels, reduction and min_hidden must be >= 1, got {channels}, {reduction}, {min_hidden}")
        self.channels = channels
        self.hidden = min(channels, max(channels // reduction, min_hidden))
        self.squeeze = nn.Linear(channels, self.hidden, bias=False)   # W (the norm's shift makes a bias redundant)
        self.norm = nn.LayerNorm(self.hidden)
        self.act = nn.LeakyReLU(0.01)
        self.fc_a = nn.Linear(self.hidden, channels)                 # A
        self.fc_b = nn.Linear(self.hidden, channels)                 # B
        self.mapping = (Convolution(spatial_dims, channels, channels, strides=1, kernel_size=kernel_size,
                                    norm=NORM, act=ACT, bias=False) if mapping else None)
        self.last_attention: tuple[torch.Tensor, torch.Tensor] | None = None

    def attention(self, x_de: torch.Tensor, x_ad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. 2-5: the soft-attention vectors ``(a, b)``, each ``(N, C)``, ``a + b = 1``."""
        if x_de.shape != x_ad.shape:
            raise ValueError(f"Selective Fusion needs equal shapes, got {tuple(x_de.shape)} and {tuple(x_ad.shape)}")
        if x_de.shape[1] != self.channels:
            raise ValueError(f"Selective Fusion built for {self.channels} channels, got {x_de.shape[1]}")
        s = (x_de + x_ad).flatten(2).mean(dim=2)                          # eqs. 2-3
        z = self.act(self.norm(self.squeeze(s)))                           # eq. 4
        weights = torch.softmax(torch.stack((self.fc_a(z), self.fc_b(z))), dim=0)   # eq. 5, across the 2 branches
        return weights[0], weights[1]

    def forward(self, x_de: torch.Tensor, x_ad: torch.Tensor) -> torch.Tensor:
        a, b = self.attention(x_de, x_ad)
        self.last_attention = (a.detach(), b.detach())
        shape = a.shape + (1,) * (x_de.dim() - 2)
        fused = a.view(shape) * x_de + b.view(shape) * x_ad               # eq. 6
        return fused if self.mapping is None else self.mapping(fused)


class _TwoEncoderUNet(nn.Module):
    """Shared plumbing: the plan, input checks, a frozen auxiliary encoder kept in eval mode."""

    def _setup(self, in_channels, out_channels, spatial_dims, channels, strides, kernel_sizes):
        chans, st, ks = network_plan(spatial_dims, channels, strides, kernel_sizes)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.channels, self.strides, self.kernel_sizes = chans, st, ks
        return chans, st, ks

    def _frozen_modules(self) -> list[nn.Module]:
        return []

    @property
    def size_divisor(self) -> tuple[int, ...]:
        return size_divisor(self.strides)

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    def train(self, mode: bool = True):
        # A frozen pre-trained encoder stays in eval mode even while the rest trains (000: "totally freezing
        # its pre-trained parameters"), so nothing mode-dependent (dropout, running statistics) can drift.
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters with ``requires_grad`` (what to hand to the optimiser)."""
        return [p for p in self.parameters() if p.requires_grad]

    @staticmethod
    def _run(encoder: nn.Module, x: torch.Tensor, frozen: bool) -> list[torch.Tensor]:
        if frozen:
            with torch.no_grad():   # no graph for a frozen encoder: saves memory and time
                return encoder(x)
        return encoder(x)


@register("hybrid_encoder_unet", dims=(2, 3), paper="wang_hybrid_encoder",
          summary="Hybrid-encoder U-Net: Dedicated-encoder + frozen pre-trained Adapted-encoder merged by a "
                  "Selective Fusion unit (eqs. 2-6, r = 16), shared nnU-Net decoder",
          tiny_args=dict(_TINY), paper_args=dict(_PAPER, reduction=16, fusion_levels="bottleneck"))
class HybridEncoderUNet(_TwoEncoderUNet):
    """Hybrid-encoder U-Net of 000 (section 3.5, Fig. 1); module docstring explains the fusion level.

    Args:
        in_channels, out_channels, spatial_dims, channels, strides, kernel_sizes, deep_supervision: as ``nnunet``
            (the Adapted-encoder must have the pre-trained network's plan).
        reduction: r of eq. 4 (16 in the paper).
        min_hidden: floor of the Selective Fusion hidden size (see :class:`SelectiveFusion`).
        fusion_levels: ``"bottleneck"`` (default, the paper's reading), ``"all"``, or stage indices
            (0 = full resolution); unfused skip levels come from the Dedicated-encoder.
        fusion_mapping: apply eq. 6's conv-IN-lReLU mapping H after the weighted sum.
        freeze_adapted: freeze the Adapted-encoder (the paper's method; ``False`` only for ablations).

    Use :meth:`load_adapted_encoder` with a pre-trained ``nnunet`` state dict before training.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, spatial_dims: int = 3,
                 channels: Sequence[int] | None = None, strides=None, kernel_sizes=None,
                 deep_supervision: bool = True, reduction: int = 16, min_hidden: int = 16,
                 fusion_levels: str | Sequence[int] = "bottleneck", fusion_mapping: bool = True,
                 freeze_adapted: bool = True):
        super().__init__()
        chans, st, ks = self._setup(in_channels, out_channels, spatial_dims, channels, strides, kernel_sizes)
        self.fusion_levels = _levels(fusion_levels, len(chans), "fusion_levels")
        self.freeze_adapted = bool(freeze_adapted)
        self.dedicated_encoder = NnUNetEncoder(spatial_dims, in_channels, chans, st, ks)
        self.adapted_encoder = NnUNetEncoder(spatial_dims, in_channels, chans, st, ks)
        self.fusion = nn.ModuleDict({
            str(level): SelectiveFusion(spatial_dims, chans[level], reduction, min_hidden, ks[level], fusion_mapping)
            for level in self.fusion_levels})
        self.decoder = NnUNetDecoder(spatial_dims, chans, st, ks, out_channels, deep_supervision)
        if self.freeze_adapted:
            _freeze(self.adapted_encoder)

    def _frozen_modules(self):
        return [self.adapted_encoder] if self.freeze_adapted else []

    def load_adapted_encoder(self, state_dict: dict[str, Any], init_dedicated: bool = False) -> None:
        """Load the Adapted-encoder from a pre-trained ``nnunet`` state dict (its ``encoder.*`` part).

        ``init_dedicated=True`` also initialises the Dedicated-encoder from it (000 re-initialises it, so
        the default leaves it random; 001 initialises its Self-encoder from the pre-trained model).
        """
        load_encoder(self.adapted_encoder, state_dict, "Adapted-encoder")
        if self.freeze_adapted:
            _freeze(self.adapted_encoder)
            self.train(self.training)
        if init_dedicated:
            load_encoder(self.dedicated_encoder, state_dict, "Dedicated-encoder")

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """``(fused_or_dedicated per level, dedicated features, adapted features)``, shallow to deep."""
        f_de = self.dedicated_encoder(x)
        f_ad = self._run(self.adapted_encoder, x, self.freeze_adapted)
        merged = [self.fusion[str(i)](d, a) if str(i) in self.fusion else d
                  for i, (d, a) in enumerate(zip(f_de, f_ad, strict=True))]
        return merged, f_de, f_ad

    def forward(self, x: torch.Tensor):
        check_input(x, self.spatial_dims, self.in_channels, self.strides)
        merged, _, _ = self.encode(x)
        return self.decoder(merged[-1], merged[:-1])


@register("multi_encoder_unet", dims=(2, 3), paper="wang_multi_encoder",
          summary="Multi-encoder U-Net: Self-encoder + frozen pre-trained Adapted-encoder, features "
                  "concatenated (no fusion unit), shared nnU-Net decoder",
          tiny_args=dict(_TINY), paper_args=dict(_PAPER, concat_levels="bottleneck"))
class MultiEncoderUNet(_TwoEncoderUNet):
    """Multi-encoder U-Net of 001 (section E, Fig. 1).

    Args as :class:`HybridEncoderUNet`, with ``concat_levels`` (``"bottleneck"`` default, ``"all"``, or
    stage indices) instead of the fusion options. Concatenation order is ``[self, adapted]``. The decoder
    keeps the ``nnunet`` widths; only its inputs at concatenated levels double (module docstring).

    001 initialises the Self-encoder from the pre-trained model too ("It is better to assign initial values
    from pre-trained models to these parameters ... which is adopted in our work"):
    ``load_adapted_encoder(sd, init_self=True)`` (the default here).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, spatial_dims: int = 3,
                 channels: Sequence[int] | None = None, strides=None, kernel_sizes=None,
                 deep_supervision: bool = True, concat_levels: str | Sequence[int] = "bottleneck",
                 freeze_adapted: bool = True):
        super().__init__()
        chans, st, ks = self._setup(in_channels, out_channels, spatial_dims, channels, strides, kernel_sizes)
        n = len(chans)
        self.concat_levels = _levels(concat_levels, n, "concat_levels")
        self.freeze_adapted = bool(freeze_adapted)
        self.self_encoder = NnUNetEncoder(spatial_dims, in_channels, chans, st, ks)
        self.adapted_encoder = NnUNetEncoder(spatial_dims, in_channels, chans, st, ks)
        widths = [2 * c if i in self.concat_levels else c for i, c in enumerate(chans)]
        self.decoder = NnUNetDecoder(spatial_dims, chans, st, ks, out_channels, deep_supervision,
                                     bottleneck_channels=widths[-1], skip_channels=widths[:-1])
        if self.freeze_adapted:
            _freeze(self.adapted_encoder)

    def _frozen_modules(self):
        return [self.adapted_encoder] if self.freeze_adapted else []

    def load_adapted_encoder(self, state_dict: dict[str, Any], init_self: bool = True) -> None:
        """Load the Adapted-encoder (and, by default as in 001, the Self-encoder) from an ``nnunet`` state dict."""
        load_encoder(self.adapted_encoder, state_dict, "Adapted-encoder")
        if self.freeze_adapted:
            _freeze(self.adapted_encoder)
            self.train(self.training)
        if init_self:
            load_encoder(self.self_encoder, state_dict, "Self-encoder")

    def forward(self, x: torch.Tensor):
        check_input(x, self.spatial_dims, self.in_channels, self.strides)
        f_self = self.self_encoder(x)
        f_ad = self._run(self.adapted_encoder, x, self.freeze_adapted)
        merged = [torch.cat((s, a), dim=1) if i in self.concat_levels else s
                  for i, (s, a) in enumerate(zip(f_self, f_ad, strict=True))]
        return self.decoder(merged[-1], merged[:-1])


@register("collaborative_unet", dims=(2, 3), paper="zhang_collaborative",
          summary="Relation-driven collaborative U-Net: general encoder G + target encoder T concatenated at "
                  "the bottleneck into a shared decoder, skips from T; features exposed for the relation losses",
          tiny_args=dict(_TINY), paper_args=dict(_PAPER))
class CollaborativeUNet(_TwoEncoderUNet):
    """Collaborative dual-encoder U-Net of 002 (section III, Fig. 2, Algorithm 1).

    The two encoders' bottleneck outputs are concatenated ``[target, general]`` into the decoder; the skips
    come from T only (002: "The skip connections between the target encoder and shared decoder").

    Relation features: the encoders' final outputs (the bottleneck, 320 x 7 x 5 x 6 for the paper's patch).
    002 defines the relation on "the extracted feature maps of encoder F", i.e. what the encoder hands to
    the decoder, which is the bottleneck.

    Gradient routing (Algorithm 1: "Update θT, θD with Lseg; Update θG with L_G; Update θT with L_T"):
    with ``detach_general=True`` (default) G's features are **detached before they enter the decoder**, so
    the segmentation loss reaches T and D only; G learns from the general relation loss alone, through the
    un-detached features that ``forward(x, return_features=True)`` and :meth:`general_features` return.
    ``freeze_general=True`` gives the ablation "backbone" (G fixed at its pre-trained weights).

    Args: ``nnunet``'s, plus ``detach_general`` and ``freeze_general``.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, spatial_dims: int = 3,
                 channels: Sequence[int] | None = None, strides=None, kernel_sizes=None,
                 deep_supervision: bool = True, detach_general: bool = True, freeze_general: bool = False):
        super().__init__()
        chans, st, ks = self._setup(in_channels, out_channels, spatial_dims, channels, strides, kernel_sizes)
        self.detach_general = bool(detach_general)
        self.freeze_general = bool(freeze_general)
        self.general_encoder = NnUNetEncoder(spatial_dims, in_channels, chans, st, ks)
        self.target_encoder = NnUNetEncoder(spatial_dims, in_channels, chans, st, ks)
        self.decoder = NnUNetDecoder(spatial_dims, chans, st, ks, out_channels, deep_supervision,
                                     bottleneck_channels=2 * chans[-1])
        if self.freeze_general:
            _freeze(self.general_encoder)

    def _frozen_modules(self):
        return [self.general_encoder] if self.freeze_general else []

    def load_general_encoder(self, state_dict: dict[str, Any], init_target: bool = False) -> None:
        """Initialise G from the ``nnunet`` pre-trained on non-COVID lesions (and T too if ``init_target``)."""
        load_encoder(self.general_encoder, state_dict, "general encoder")
        if self.freeze_general:
            _freeze(self.general_encoder)
            self.train(self.training)
        if init_target:
            load_encoder(self.target_encoder, state_dict, "target encoder")

    def general_features(self, x: torch.Tensor) -> torch.Tensor:
        """G's bottleneck features of ``x`` (Algorithm 1 line 4: ``F_G(X^n)`` of the non-COVID batch)."""
        check_input(x, self.spatial_dims, self.in_channels, self.strides)
        return self._run(self.general_encoder, x, self.freeze_general)[-1]

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits (contract of ``nnunet``); with ``return_features`` also ``{"general": F_G, "target": F_T}``.

        The returned features are *not* detached: ``F_G`` carries gradient to G for L_G, ``F_T`` to T for L_T.
        """
        check_input(x, self.spatial_dims, self.in_channels, self.strides)
        f_t = self.target_encoder(x)
        f_g = self._run(self.general_encoder, x, self.freeze_general)[-1]
        g_in = f_g.detach() if self.detach_general else f_g
        out = self.decoder(torch.cat((f_t[-1], g_in), dim=1), f_t[:-1])
        if return_features:
            return out, {"general": f_g, "target": f_t[-1]}
        return out
