"""nCoVSegNet's two-stage cross-domain transfer of 003 (Liu et al., sections 3.3 and 4.2).

Three starting points, two training stages, one procedure (``ncovsegnet``) run twice:

0. ImageNet: the ResNet-50 backbone starts from torchvision's ImageNet weights. Nothing is downloaded
   here: ``procedure.imagenet_weights`` names a local torchvision file (``models/pretrained.py``; e.g.
   ``resnet50-0676ba61.pth``). Without one the backbone starts from random weights and the run records a
   warning note - the result is then a single-stage transfer (003's ablation), not the paper's method.
1. Stage 1 (``configs/ncovsegnet_stage1_lidc.yaml``): LIDC-IDRI nodules, Adam lr 1e-4, batch 4, 100 epochs,
   learning rate x0.1 every 50 epochs (``schedule: step``).
2. Stage 2 (``configs/ncovsegnet_stage2_covid.yaml``): the COVID-19 data, ``model.init`` = the stage-1 run,
   Adam lr 5e-5, 50 epochs, early stopping on the validation Dice (003 does not give the patience; 10
   validation rounds here) over a validation quarter of the training data.

What every step does (003 section 4.2 and the authors' Inf-Net-derived training loop): the batch (flips and
random crop from ``transforms.ncovsegnet_transforms``, lung bounding-box crop, inputs in (0, 1), 3 channels)
is rescaled to each multi-scale rate in ``{0.75, 1, 1.25}`` (``transforms.multiscale_batch``; sides rounded
to multiples of 32), and for each rate the StructureLoss summed over the four deeply supervised outputs
(eqs. 5-8) is back-propagated and the optimiser stepped - three updates per batch, as in the authors' loop
(one update on the summed loss would be the other reading; three updates is what their code does and
what the paper's "multi-scale training strategy" reports). Gradients are clipped to ``train.grad_clip``
(the authors clip at 0.5 by value; norm clipping is the trainer's mechanism, set the config value).
The logged loss is the mean over the rates.

The network needs a batch of at least 2 in training (DAF's batch-normalised channel attention).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.paths import ConfigError, expand_path

from . import Procedure, ProcedureError, StepInfo, StepOutput, load_weights, register_procedure


@register_procedure
class NCoVSegNetProcedure(Procedure):
    """Multi-scale StructureLoss training of ``ncovsegnet`` (module docstring). Options:
    ``rates`` (multi-scale rates), ``imagenet_weights`` (local torchvision ResNet-50 file or null),
    ``multiple`` (side lengths are rounded to multiples of this, 32 for the network)."""

    name = "ncovsegnet"
    paper = "liu_ncovsegnet"
    summary = "nCoVSegNet transfer stage: multi-scale {0.75,1,1.25} StructureLoss over 4 outputs (ImageNet -> LIDC -> COVID)"
    options = {"rates": [0.75, 1.0, 1.25], "imagenet_weights": None, "multiple": 32}
    manual_optimization = True

    @classmethod
    def check_options(cls, options: dict[str, Any], source: str) -> None:
        rates = options["rates"]
        if not isinstance(rates, list) or not rates or any(not isinstance(r, (int, float)) or r <= 0 for r in rates):
            raise ConfigError(f"{source}: procedure.rates must be a non-empty list of positive numbers, got {rates!r}")
        if not isinstance(options["multiple"], int) or options["multiple"] < 1:
            raise ConfigError(f"{source}: procedure.multiple must be a positive integer")

    def build_model(self) -> nn.Module:
        from COVIDLesionSegLib.models import build

        arch = self.config["model"]["arch"]
        if arch != "ncovsegnet":
            raise ProcedureError(f"procedure 'ncovsegnet' trains the ncovsegnet architecture, not {arch!r}")
        args = dict(self.config["model"]["args"])
        init = self.config["model"].get("init")
        imagenet = self.opts["imagenet_weights"]
        if imagenet and not init:
            args["imagenet_weights"] = expand_path(imagenet)
        try:
            model = build({"arch": arch, "args": args})
        except (FileNotFoundError, ValueError) as exc:
            raise ProcedureError(f"ncovsegnet: {exc}") from None
        if init:
            model.load_state_dict(load_weights(init), strict=True)
            self.trainer.note("ncovsegnet: weights from model.init (the previous transfer stage)")
        elif imagenet:
            self.trainer.note(f"ncovsegnet: ResNet-50 backbone initialised from ImageNet weights {imagenet}")
        else:
            self.trainer.note("WARNING ncovsegnet: no procedure.imagenet_weights file given - the backbone starts "
                              "from random weights (003 starts from ImageNet; this is a single-stage transfer)")
        if self.config["train"]["batch_size"] < 2:
            raise ProcedureError("ncovsegnet needs train.batch_size >= 2 (DAF's batch-normalised channel attention); "
                                 "003 uses 4")
        return model

    def training_step(self, model: nn.Module, batches: dict[str, dict[str, Any]], step: StepInfo) -> StepOutput:
        from training.transforms import multiscale_batch

        x, y = batches["main"]["image"], batches["main"][self.target]
        base = int(x.shape[-1])
        losses: dict[str, Any] = {}
        total = 0.0
        for rate in self.opts["rates"]:
            xs, ys = multiscale_batch(x, y, float(rate), base_size=base, multiple=int(self.opts["multiple"]))
            loss = self.loss_fn(model(xs), ys)
            if torch.isfinite(loss):
                self.trainer.backward_step(loss)
            losses[f"loss_{rate:g}"] = loss.detach()
            total = total + loss.detach()
        mean = total / len(self.opts["rates"])
        return StepOutput(mean, losses)


__all__ = ["NCoVSegNetProcedure"]
