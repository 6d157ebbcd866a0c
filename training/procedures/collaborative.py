"""Relation-driven collaborative training of 002 (Zhang et al., section III, Algorithm 1).

Network: ``collaborative_unet`` - general encoder G and target encoder T (same plan as the ``nnunet``),
their bottleneck features concatenated into a shared decoder D, skips from T. G starts from the encoder of
the ``nnunet`` pre-trained on non-COVID lesions (``model.init``: a ``multilesion`` run or any ``nnunet``
weights); T and D start from scratch (``init_target: true`` also copies the pre-trained encoder into T).

Each step (Algorithm 1) draws a COVID-19 batch ``(X^c, Y^c)`` (``data``) and a non-COVID batch ``X^n``
(``aux_data`` entries named by ``noncovid``; with several, one batch of each, concatenated - 002 pools MSD
lung tumour and NSCLC effusion into one non-COVID set) and computes

- ``F_G(X^c), F_T(X^c)`` and the segmentation ``Y^c_hat`` (one forward of the network),
- ``F_G(X^n)`` (G alone),
- ``L_seg = Dice + CE`` with deep supervision on ``(Y^c_hat, Y^c)`` (eq. 3),
- ``L_G = lambda_G ||R_G(X^n) - R_G(X^c)||^2`` (eq. 4) and ``L_T = -lambda_T ||R_G(X^c) - R_T(X^c)||^2``
  (eq. 5) with the relation matrices of eqs. 1-2 (``COVIDLesionSegLib.models.relation``),

and back-propagates ``L_seg + L_G + L_T`` once. The update routing of Algorithm 1 ("Update θT, θD with
L_seg; Update θG with L_G; Update θT with L_T") holds by construction: the network detaches G's features
before the decoder (``detach_general``), so L_seg reaches T and D only; L_G depends on G's parameters only;
L_T detaches R_G(X^c), so it reaches T only. One backward of the sum therefore gives every parameter
exactly the gradient its own loss gives it. When ``lambda_G`` is exactly 0 the L_G term is not built at all,
so G gets no gradient (``None``) and the optimiser leaves it untouched - also no weight decay - which the
tests use to check that G learns from the relation loss alone.

Weights: ``lambda_G(t) = lambda_g * r(t)``, ``lambda_T(t) = lambda_t * r(t)`` with the mean-teacher sigmoid
ramp-up ``r(t) = exp(-5 (1 - t/T)^2)``, ``t`` in epochs (fractional, per step), ``T = rampup_epochs``.
002 gives neither the final weights nor T; defaults are those of ``relation.RelationLossWeights``
(lambda_G = 1, lambda_T = 0.1, T = 40 epochs) and documented there.

Scale of the relation distance (``reduction``). Eqs. 4-5 write ``||R_1 - R_2||^2`` over the C x C
relation entries; ``sum`` (the option's default) is that squared Frobenius norm as written. Each row of R
has unit norm, so a row of the difference has squared norm <= 4 and the sum is bounded by 4C: at 002's
bottleneck width C = 320, L_T can reach -4 C lambda_T = -128 against a segmentation loss near 1, and the
project's own run saw the target encoder maximise the relation distance instead of segmenting
(``training/RESULTS.md``). ``channel`` divides the sum by C - the mean squared distance of one channel's
relation row, in [0, 4] whatever the width - so lambda_T = 0.1 bounds L_T by -0.4 and the paper's weights
keep L_seg the leading term; the full-scale config uses it (``collaborative_nnunet3d.yaml``). ``mean``
divides by C^2 (the mean over entries; bound 4 / C, which fades as the network widens). The non-COVID labels ``Y^n`` are drawn (Algorithm 1 samples them) but unused, as in
the paper's losses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.paths import ConfigError

from . import Procedure, ProcedureError, StepInfo, StepOutput, load_weights, register_procedure


def relation_scale(reduction: str, channels: int) -> tuple[str, float]:
    """``(library reduction, weight factor)`` of a ``procedure.reduction``: ``channel`` is the summed
    distance divided by the C channels (module docstring); ``sum`` and ``mean`` pass through."""
    if reduction == "channel":
        return "sum", 1.0 / max(int(channels), 1)
    return reduction, 1.0


@register_procedure
class CollaborativeProcedure(Procedure):
    """Algorithm 1 of 002 (module docstring). Options: ``noncovid`` (aux_data names; null = all),
    ``lambda_g``, ``lambda_t``, ``rampup_epochs``, ``reduction`` (sum | channel | mean), ``init_target``."""

    name = "collaborative"
    paper = "zhang_collaborative"
    summary = "relation-driven collaborative learning: G (pre-trained, relation loss only) + T + shared decoder"
    options = {"noncovid": None, "lambda_g": 1.0, "lambda_t": 0.1, "rampup_epochs": 40.0, "reduction": "sum",
               "init_target": False}

    @classmethod
    def check_options(cls, options: dict[str, Any], source: str) -> None:
        for key in ("lambda_g", "lambda_t", "rampup_epochs"):
            v = options[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{source}: procedure.{key} must be a non-negative number, got {v!r}")
        if options["reduction"] not in ("sum", "channel", "mean"):
            raise ConfigError(f"{source}: procedure.reduction must be 'sum', 'channel' or 'mean', got "
                              f"{options['reduction']!r}")
        nc = options["noncovid"]
        if nc is not None and (not isinstance(nc, list) or not nc or not all(isinstance(x, str) for x in nc)):
            raise ConfigError(f"{source}: procedure.noncovid must be a non-empty list of aux_data names or null")

    @property
    def noncovid(self) -> list[str]:
        names = self.opts["noncovid"] or list(self.config["aux_data"])
        if not names:
            raise ProcedureError("collaborative training needs non-COVID data: add aux_data entries (e.g. "
                                 "msd / nsclc lesion data sets) and optionally list them in procedure.noncovid")
        unknown = [n for n in names if n not in self.config["aux_data"]]
        if unknown:
            raise ProcedureError(f"procedure.noncovid names {unknown}, not in aux_data "
                                 f"({', '.join(self.config['aux_data'])})")
        return names

    def weights_at(self, t_epochs: float) -> tuple[float, float]:
        from COVIDLesionSegLib.models.relation import RelationLossWeights

        return RelationLossWeights(float(self.opts["lambda_g"]), float(self.opts["lambda_t"]),
                                   float(self.opts["rampup_epochs"]))(t_epochs)

    def build_model(self) -> nn.Module:
        from COVIDLesionSegLib.models import build

        arch = self.config["model"]["arch"]
        if arch != "collaborative_unet":
            raise ProcedureError(f"procedure 'collaborative' builds collaborative_unet, but model.arch is {arch!r}")
        args = dict(self.config["model"]["args"])
        if args.get("detach_general") is False:
            raise ProcedureError("collaborative: model.args.detach_general must stay true (Algorithm 1: the "
                                 "segmentation loss updates T and D only)")
        model = build({"arch": arch, "args": args})
        init = self.config["model"].get("init")
        if init:
            try:
                model.load_general_encoder(load_weights(init), init_target=bool(self.opts["init_target"]))
            except ValueError as exc:
                raise ProcedureError(f"collaborative: {exc}") from None
            self.trainer.note("collaborative: general encoder G initialised from model.init"
                              + (" (and T)" if self.opts["init_target"] else ""))
        else:
            self.trainer.note("collaborative: no model.init - G starts from random weights (002 initialises it "
                              "from the non-COVID pre-trained encoder)")
        return model

    def train_datasets(self) -> dict[str, Any]:
        out = {"main": self.trainer.dataset("data", "train")}
        for name in self.noncovid:
            out[name] = self.trainer.dataset(f"aux_data.{name}", "all")
        return out

    def training_step(self, model: nn.Module, batches: dict[str, dict[str, Any]], step: StepInfo) -> StepOutput:
        from COVIDLesionSegLib.models.relation import general_relation_loss, relation_matrix, target_relation_loss

        xc, yc = batches["main"]["image"], batches["main"][self.target]
        xn = torch.cat([batches[n]["image"] for n in self.noncovid], dim=0)
        lam_g, lam_t = self.weights_at(step.progress * step.max_epochs)
        out, feats = model(xc, return_features=True)
        seg = self.loss_fn(out, yc)
        r_g_c = relation_matrix(feats["general"])
        r_t_c = relation_matrix(feats["target"])
        reduction, per = relation_scale(self.opts["reduction"], int(r_g_c.shape[-1]))
        loss_t = target_relation_loss(r_g_c, r_t_c, lam_t * per, reduction) if lam_t > 0 else seg.new_zeros(())
        if lam_g > 0:
            r_g_n = relation_matrix(model.general_features(xn))
            loss_g = general_relation_loss(r_g_n, r_g_c, lam_g * per, reduction)
        else:
            loss_g = seg.new_zeros(())   # not built: G receives no gradient at all (module docstring)
        total = seg + loss_g + loss_t
        return StepOutput(total, {"seg": seg.detach(), "rel_g": loss_g.detach(), "rel_t": loss_t.detach(),
                                  "lambda_g": lam_g, "lambda_t": lam_t})


__all__ = ["CollaborativeProcedure", "relation_scale"]
