"""Transfer from non-COVID lesion pre-training to COVID-19: the strategies of 000 and 001.

Every strategy starts from a pre-trained ``nnunet`` named by ``model.init`` (a run folder - its
``best.pt`` -, a training checkpoint, or an engine checkpoint), usually a ``multilesion`` run
(``multilesion.py``), and trains on the COVID-19 data (``data``) with the config's optimiser, loss and
epochs (000: SGD lr 0.01, Nesterov 0.99, poly 0.9, batch 2, Dice + CE with deep supervision).

==========================  ================================================================================
procedure                   what is transferred / trained (paper)
==========================  ================================================================================
``continual``               all weights; all trained; the poly-decayed learning rate continues where the
                            pre-training stopped (000 section 3.3, "Continual Learning")
``body_finetune``           all weights; all trained; a fresh schedule (000 section 3.4.1, "Body Fine-tuning")
``lesion_representations``  all weights; the encoder frozen, the decoder fine-tuned (000 section 3.4.2,
                            "Pre-trained Lesion Representations")
``hybrid_encoder``          ``hybrid_encoder_unet``: frozen Adapted-encoder = the pre-trained encoder,
                            Dedicated-encoder, Selective Fusion and decoder from scratch (000 section 3.5)
``multi_encoder``           ``multi_encoder_unet``: frozen Adapted-encoder = the pre-trained encoder,
                            Self-encoder initialised from it and trained, decoder from scratch (001 E)
==========================  ================================================================================

Output heads. A multi-task pre-trained model has one output channel per lesion task
(``multilesion.py``); the COVID-19 network has one. Tensors whose shapes match are copied; a head with
more channels than the new one is, with ``head_task: k``, cut to task ``k``'s channel, and with
``head_task: null`` (default) left at its fresh initialisation - the COVID-19 infection is a new label,
and none of the lesion heads is a better start for it than another (000 does not say). A single-lesion
pre-trained model's 1-channel heads are copied as they are.

Continual Learning's schedule (000 section 3.3: "The value of the initial learning rate is set as 0.01 and
decays throughout the training process following the 'poly' learning rate policy ... so that the weight
parameters after training non-COVID19 lesion tasks tend to follow its training process while slightly
being updated by the current COVID-19 infection task"). Read as *one* poly curve over pre-training and
COVID-19 training together: COVID-19 epoch ``e`` (0-based) uses
``lr0 * (1 - (E_pre + e) / H) ** 0.9`` with ``E_pre`` the epochs the pre-training *ran* (``pretrain_epochs``,
by default the last epoch of the pre-training run - its ``last.pt`` - not the epoch of the best
validation model that ``model.init`` loads, which may lie far before the end) and ``H`` the curve's
explicit length (``horizon_epochs``, by default the pre-training run's own poly length:
``procedure.schedule_epochs`` of a ``multilesion`` run, else its ``train.epochs``). The COVID-19 phase must
fit on the curve (``E_pre + train.epochs <= H``), so its learning rate stays above 0 to its last epoch;
otherwise the run stops with an error naming the lengths rather than silently training at lr 0 or
silently lengthening the curve. A pre-training meant for Continual Learning is therefore run with
``schedule_epochs = E_pre + E_covid`` (``multilesion_nnunet3d_pretrain.yaml``: 1000 + 1000). The other reading, restarting the poly curve at lr0 on
COVID-19, is exactly Body Fine-tuning, which 000 lists as a separate strategy - so Continual Learning must
keep the decayed rate. ``lr0`` is ``optim.lr`` (0.01 in both phases in 000). The optimiser's momentum is
not carried over (the parameter sets differ whenever the heads do); it rebuilds within a few steps.

Frozen parts (Lesion Representations' encoder, the Adapted-encoders) have ``requires_grad=False``, so the
optimiser never sees them (no update, no weight decay) and they stay bit-identical; they are also kept in
eval mode during training.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from training.paths import ConfigError

from . import Procedure, ProcedureError, StepInfo, StepOutput, load_weights, open_weights_file, register_procedure
from .multilesion import poly_scheduler

# ----------------------------------------------------------------------------------------------------------
# Reading pre-trained weights
# ----------------------------------------------------------------------------------------------------------

def pretrained_info(path: str) -> dict[str, Any]:
    """What a ``model.init`` source tells about its training (``None`` values for engine checkpoints):

    - ``epochs``: the epoch of the checkpoint that is loaded (``best.pt``: the best validation epoch);
    - ``last_epoch``: the epochs the run completed - its ``last.pt`` beside the loaded file when present,
      else ``epochs``;
    - ``max_epochs``: its ``train.epochs``; ``horizon``: the explicit length of its poly curve
      (``procedure.schedule_epochs``, else ``train.epochs``); ``config``: its config.
    """
    from training.runs import TRAINING_FORMAT

    p, head = open_weights_file(path)
    info: dict[str, Any] = {"epochs": None, "last_epoch": None, "max_epochs": None, "horizon": None,
                            "config": None}
    if isinstance(head, dict) and head.get("format") == TRAINING_FORMAT:
        cfg = head.get("config") or {}
        info["config"] = cfg
        info["epochs"] = int(head["epoch"])
        last = p.parent / "last.pt"
        info["last_epoch"] = info["epochs"]
        if last.exists() and last.resolve() != p.resolve():
            _, last_head = open_weights_file(str(last))
            if isinstance(last_head, dict) and last_head.get("format") == TRAINING_FORMAT:
                info["last_epoch"] = int(last_head["epoch"])
        info["max_epochs"] = int(cfg.get("train", {}).get("epochs", head["epoch"]))
        horizon = (cfg.get("procedure") or {}).get("schedule_epochs")
        info["horizon"] = int(horizon) if horizon else info["max_epochs"]
    return info


def transfer_state(model: nn.Module, pretrained: Mapping[str, torch.Tensor], head_task: int | None = None,
                   skip_prefixes: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Copy ``pretrained`` into ``model`` where names and shapes match (see the module docstring for heads).

    Returns ``{"loaded", "head_sliced", "fresh", "unused"}`` key lists. Raises when nothing matches (a
    pre-trained network of another architecture or plan).
    """
    own = model.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "head_sliced": [], "fresh": [], "unused": []}
    new = {}
    for key, tensor in own.items():
        if any(key.startswith(p) for p in skip_prefixes):
            report["fresh"].append(key)
            continue
        src = pretrained.get(key)
        if src is not None and tuple(src.shape) == tuple(tensor.shape):
            new[key] = src.to(tensor.dtype)
            report["loaded"].append(key)
        elif (src is not None and key.startswith("decoder.heads.") and head_task is not None
              and src.dim() == tensor.dim() and src.shape[0] > tensor.shape[0] == 1
              and tuple(src.shape[1:]) == tuple(tensor.shape[1:])):
            if not 0 <= head_task < src.shape[0]:
                raise ProcedureError(f"procedure.head_task {head_task} is out of range: the pre-trained heads have "
                                     f"{src.shape[0]} task channels")
            new[key] = src[head_task:head_task + 1].to(tensor.dtype).clone()
            report["head_sliced"].append(key)
        else:
            report["fresh"].append(key)
    report["unused"] = [k for k in pretrained if k not in own]
    if not report["loaded"]:
        raise ProcedureError("model.init: no tensor of the pre-trained weights fits the model (different "
                             "architecture or network plan?); first pre-trained keys: "
                             f"{list(pretrained)[:4]}, first model keys: {list(own)[:4]}")
    wrong = [k for k in report["fresh"] if k in pretrained and not k.startswith("decoder.heads.")
             and not any(k.startswith(p) for p in skip_prefixes)]
    if wrong:
        k = wrong[0]
        raise ProcedureError(f"model.init: shape mismatch at {k}: pre-trained {tuple(pretrained[k].shape)} vs model "
                             f"{tuple(own[k].shape)}; build the model with the pre-trained network's plan")
    own.update(new)
    model.load_state_dict(own)
    return report


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


class _TransferProcedure(Procedure):
    """Shared plumbing: ``model.init`` is required, architectures are checked, frozen modules stay in eval."""

    #: registry architectures this strategy builds
    archs: tuple[str, ...] = ("nnunet",)
    options = {"head_task": None}

    @classmethod
    def check_options(cls, options: dict[str, Any], source: str) -> None:
        ht = options.get("head_task")
        if ht is not None and (not isinstance(ht, int) or ht < 0):
            raise ConfigError(f"{source}: procedure.head_task must be a task index (>= 0) or null")

    def _base_model(self) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        from COVIDLesionSegLib.models import build

        arch = self.config["model"]["arch"]
        if arch not in self.archs:
            raise ProcedureError(f"procedure {self.name!r} builds {' or '.join(self.archs)}, but model.arch is {arch!r}")
        init = self.config["model"].get("init")
        if not init:
            raise ProcedureError(f"procedure {self.name!r} transfers pre-trained weights: set model.init to the "
                                 "pre-training run folder (its best.pt) or a checkpoint")
        model = build({"arch": arch, "args": dict(self.config["model"]["args"])})
        return model, load_weights(init)

    def frozen_modules(self, model: nn.Module) -> list[nn.Module]:
        return []

    def training_step(self, model: nn.Module, batches: dict[str, dict[str, Any]], step: StepInfo) -> StepOutput:
        for m in self.frozen_modules(model):
            m.eval()   # the trainer puts the whole model in train mode each epoch; frozen parts stay in eval
        return super().training_step(model, batches, step)

    def _report(self, report: Mapping[str, list[str]]) -> None:
        heads = [k for k in report["fresh"] if k.startswith("decoder.heads.")]
        self.trainer.note(f"{self.name}: {len(report['loaded'])} pre-trained tensors loaded, "
                          f"{len(report['head_sliced'])} head tensors from task {self.opts.get('head_task')}, "
                          f"{len(report['fresh'])} freshly initialised ({len(heads)} of them head tensors)")


@register_procedure
class BodyFinetuneProcedure(_TransferProcedure):
    """Body Fine-tuning (000 section 3.4.1): every pre-trained weight as the start, all trained, new schedule."""

    name = "body_finetune"
    paper = "wang_hybrid_encoder"
    summary = "Body Fine-tuning: all weights from model.init, all trained, fresh poly schedule"

    def build_model(self) -> nn.Module:
        model, sd = self._base_model()
        self._report(transfer_state(model, sd, self.opts["head_task"]))
        return model


@register_procedure
class ContinualLearningProcedure(BodyFinetuneProcedure):
    """Continual Learning (000 section 3.3): Body Fine-tuning's weights, the pre-training's decayed poly lr.

    Options (module docstring): ``pretrain_epochs`` (null: the pre-training run's last epoch),
    ``horizon_epochs`` (null: the pre-training run's poly length, ``schedule_epochs`` or ``train.epochs``),
    ``head_task``.
    """

    name = "continual"
    paper = "wang_hybrid_encoder"
    summary = "Continual Learning: all weights from model.init, poly lr continues where pre-training stopped"
    options = {"head_task": None, "pretrain_epochs": None, "horizon_epochs": None}

    @classmethod
    def check_options(cls, options: dict[str, Any], source: str) -> None:
        super().check_options(options, source)
        for key in ("pretrain_epochs", "horizon_epochs"):
            v = options.get(key)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ConfigError(f"{source}: procedure.{key} must be a non-negative integer or null")

    def schedule_offsets(self) -> tuple[int, int]:
        """``(E_pre, H)``: where the COVID-19 training starts on the poly curve (the pre-training's last
        epoch), and the curve's explicit length (module docstring)."""
        info = pretrained_info(self.config["model"]["init"])
        pre = self.opts["pretrain_epochs"]
        if pre is None:
            pre = info["last_epoch"]
        if pre is None:
            raise ProcedureError("continual: model.init is not a training checkpoint, so the pre-training's epochs "
                                 "are unknown; set procedure.pretrain_epochs and procedure.horizon_epochs")
        horizon = self.opts["horizon_epochs"]
        if horizon is None:
            horizon = info["horizon"]
        if horizon is None:
            raise ProcedureError("continual: the pre-training's poly length is unknown (model.init is not a training "
                                 "checkpoint); set procedure.horizon_epochs")
        if pre + self.max_epochs > horizon:
            raise ProcedureError(
                f"continual: the pre-training ran {pre} epochs and train.epochs is {self.max_epochs}, but the poly "
                f"curve is {horizon} epochs long, so the learning rate would reach 0 at COVID-19 epoch "
                f"{max(horizon - pre, 0) + 1}. Pre-train with procedure.schedule_epochs = {pre + self.max_epochs} "
                f"(one curve over both phases), or set procedure.horizon_epochs >= {pre + self.max_epochs}")
        return int(pre), int(horizon)

    def build_scheduler(self, optimizer: torch.optim.Optimizer):
        s = self.config["schedule"]
        if s["name"] != "poly":
            raise ProcedureError(f"continual learning continues the pre-training's poly schedule; schedule.name is "
                                 f"{s['name']!r}")
        pre, horizon = self.schedule_offsets()
        self.trainer.note(f"continual: poly lr continues at epoch {pre} of {horizon} "
                          f"(factor {(1 - pre / horizon) ** float(s['power']):.4f} of optim.lr)")
        return poly_scheduler(optimizer, pre, horizon, float(s["power"]), float(s["min_lr"]))


@register_procedure
class LesionRepresentationsProcedure(_TransferProcedure):
    """Pre-trained Lesion Representations (000 section 3.4.2): the pre-trained encoder frozen, the decoder
    ("fine-tuning and re-training the decoding parts") initialised from pre-training and trained.
    ``init_decoder: false`` re-initialises the decoder instead."""

    name = "lesion_representations"
    paper = "wang_hybrid_encoder"
    summary = "Pre-trained Lesion Representations: encoder from model.init frozen, decoder fine-tuned"
    options = {"head_task": None, "init_decoder": True}

    def build_model(self) -> nn.Module:
        model, sd = self._base_model()
        skip = () if self.opts["init_decoder"] else ("decoder.",)
        self._report(transfer_state(model, sd, self.opts["head_task"], skip_prefixes=skip))
        if not any(k.startswith("encoder.") for k in sd):
            raise ProcedureError("lesion_representations: model.init holds no encoder.* weights")
        _freeze(model.encoder)
        return model

    def frozen_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.encoder]


@register_procedure
class HybridEncoderProcedure(_TransferProcedure):
    """Hybrid-encoder (000 section 3.5): ``hybrid_encoder_unet`` whose Adapted-encoder is the frozen
    pre-trained encoder; the Dedicated-encoder ("reinitializing all the parameters"), the Selective Fusion
    unit and the decoder train from scratch on COVID-19."""

    name = "hybrid_encoder"
    paper = "wang_hybrid_encoder"
    summary = "Hybrid-encoder: Dedicated-encoder from scratch + frozen pre-trained Adapted-encoder, Selective Fusion"
    archs = ("hybrid_encoder_unet",)
    options: dict = {}

    def build_model(self) -> nn.Module:
        model, sd = self._base_model()
        try:
            model.load_adapted_encoder(sd, init_dedicated=False)
        except ValueError as exc:
            raise ProcedureError(f"hybrid_encoder: {exc}") from None
        self.trainer.note("hybrid_encoder: Adapted-encoder loaded from model.init and frozen; Dedicated-encoder, "
                          "fusion and decoder from scratch")
        return model

    def frozen_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.adapted_encoder]


@register_procedure
class MultiEncoderProcedure(_TransferProcedure):
    """Multi-encoder (001 section E): ``multi_encoder_unet``; the Adapted-encoder is the frozen pre-trained
    encoder, the Self-encoder starts from the same weights (001: "It is better to assign initial values
    from pre-trained models to these parameters ... which is adopted in our work"; ``init_self: false``
    starts it from scratch) and trains; the decoder (whose input is twice as wide) trains from scratch."""

    name = "multi_encoder"
    paper = "wang_multi_encoder"
    summary = "Multi-encoder: Self-encoder (init from model.init) + frozen pre-trained Adapted-encoder, concatenated"
    archs = ("multi_encoder_unet",)
    options = {"init_self": True}

    def build_model(self) -> nn.Module:
        model, sd = self._base_model()
        try:
            model.load_adapted_encoder(sd, init_self=bool(self.opts["init_self"]))
        except ValueError as exc:
            raise ProcedureError(f"multi_encoder: {exc}") from None
        return model

    def frozen_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.adapted_encoder]


__all__ = ["BodyFinetuneProcedure", "ContinualLearningProcedure", "HybridEncoderProcedure",
           "LesionRepresentationsProcedure", "MultiEncoderProcedure", "pretrained_info", "transfer_state"]
