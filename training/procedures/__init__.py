"""Training procedures: the hook interface the :class:`~training.trainer.Trainer` drives, and their registry.

A *procedure* is one paper's way of training: which network it builds (and from which pre-trained weights),
which parameters the optimiser updates, what one training step computes (it may draw several batches per
step, e.g. a COVID-19 and a non-COVID batch), the loss, and how a trained network is exported. The trainer
owns everything else - seeds, devices, mixed precision, the epoch loop, checkpoints and resuming, logs,
validation and best-model selection, early stopping, Ctrl-C, the final test - so every procedure gets them.

Writing a procedure::

    from training.procedures import Procedure, StepOutput, register_procedure

    @register_procedure
    class MyProcedure(Procedure):
        name = "my_procedure"                  # config: procedure: {name: my_procedure, ...options}
        paper = "zhang_collaborative"
        summary = "one line for `python -m training procedures`"
        options = {"lambda_g": 1.0}            # defaults of this procedure's config options

        def train_datasets(self):              # every key gives one batch per step
            return {"main": self.trainer.dataset("data", "train"),
                    "noncovid": self.trainer.dataset("aux_data.noncovid", "all")}

        def training_step(self, model, batches, step):
            x, y = batches["main"]["image"], batches["main"][self.target]
            loss = self.loss_fn(model(x), y)
            return StepOutput(loss, {"seg": loss.detach()})

Hooks (all have working defaults in :class:`Procedure`; the plain supervised procedure uses them as is):

===========================  =================================================================================
``build_model()``            the network (registry config ``model`` + optional ``model.init`` weights)
``param_groups(model)``      what the optimiser updates (default: every parameter with ``requires_grad``)
``build_optimizer(groups)``  optimiser from ``optim`` (SGD + Nesterov, Adam, AdamW)
``build_scheduler(opt)``     epoch-wise learning-rate schedule from ``schedule`` (poly, step, cosine, constant)
``build_loss()``             ``loss`` (the losses of ``COVIDLesionSegLib.models.losses``)
``train_datasets()``         ``{"main": dataset, other: dataset, ...}``: one batch of each per step
``training_step(m, b, s)``   returns :class:`StepOutput` (loss tensor + scalars to log), under autocast
``manual_optimization``      True: ``training_step`` does backward/step itself (``trainer.backward_step``)
``predict_logits(m, x)``     eval-mode logits of one batch of network-sized inputs (validation, test)
``validation_loss(l, y)``    loss of eval-mode logits (select_metric ``val_loss``; default ``loss_fn``)
``on_fit_start()``           after everything is built (and restored when resuming)
``on_epoch_start(e)``        before an epoch's first step; ``on_epoch_end(e, logs)`` after its validation
``state_dict()``             procedure state saved in training checkpoints (ramp-up counters, ...);
                             ``load_state_dict(d)`` restores it on resume
``export_model(cfg, sd)``    classmethod: ``(state_dict, model_config)`` of the network to ship
===========================  =================================================================================

Attributes a procedure can use: ``self.trainer`` (device, ``dataset()``, ``to_device()``, ``autocast()``,
``backward_step()``), ``self.config`` (the validated config dict), ``self.opts`` (``options`` updated
with the config's ``procedure`` section), ``self.target`` (``data.target``), ``self.loss_fn``,
``self.model`` (after ``build_model``), ``self.epoch`` / ``self.max_epochs`` (the current epoch, 0-based).
"""

from __future__ import annotations

import copy
import difflib
import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from COVIDLesionSegLib.errors import CovidLesionSegError
from training.paths import ConfigError, expand_path

_PROCEDURES: dict[str, type["Procedure"]] = {}

#: Modules that define procedures; importing them registers their classes. Add new procedure modules here.
PROCEDURE_MODULES: list[str] = ["training.procedures.supervised", "training.procedures.multilesion",
                                 "training.procedures.transfer", "training.procedures.collaborative",
                                 "training.procedures.ncovsegnet", "training.procedures.grid004"]


@dataclass
class StepOutput:
    """What ``training_step`` returns: the loss to back-propagate and scalars to log (averaged per epoch)."""

    loss: torch.Tensor
    logs: dict[str, Any] = field(default_factory=dict)
    n_samples: int | None = None     # samples in the step (default: the main batch's size)


@dataclass
class StepInfo:
    """Where a step sits in the run (given to ``training_step``)."""

    epoch: int                       # 0-based
    iteration: int                   # 0-based within the epoch
    iterations_per_epoch: int
    max_epochs: int
    global_step: int                 # 0-based over the whole run

    @property
    def progress(self) -> float:
        """Fraction of the run done, for ramp-ups: ``(epoch + iteration / n) / max_epochs``."""
        return (self.epoch + self.iteration / max(self.iterations_per_epoch, 1)) / max(self.max_epochs, 1)


class ProcedureError(CovidLesionSegError, ValueError):
    """A procedure cannot run with the given config (missing data set, incompatible model, ...)."""

    kind = "config"


def register_procedure(cls: type["Procedure"]) -> type["Procedure"]:
    """Class decorator adding a :class:`Procedure` subclass to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no procedure name")
    if cls.name in _PROCEDURES and _PROCEDURES[cls.name] is not cls:
        raise ValueError(f"procedure {cls.name!r} registered twice")
    _PROCEDURES[cls.name] = cls
    return cls


def procedures() -> dict[str, type["Procedure"]]:
    """Every registered procedure by name."""
    for module in PROCEDURE_MODULES:
        importlib.import_module(module)
    return dict(_PROCEDURES)


def get_procedure(name: str) -> type["Procedure"]:
    procs = procedures()
    if name not in procs:
        close = difflib.get_close_matches(name, list(procs), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ProcedureError(f"unknown procedure {name!r}{hint} (known: {', '.join(sorted(procs))})")
    return procs[name]


def validate_procedure_options(section: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """The config's ``procedure`` section with the procedure's defaults filled in; unknown options are an
    error naming the closest known one."""
    name = section.get("name", "supervised")
    try:
        cls = get_procedure(name)
    except ProcedureError as exc:
        raise ConfigError(f"{source}: procedure.name: {exc}") from None
    out = {"name": name}
    for key in section:
        if key == "name":
            continue
        if key not in cls.options:
            close = difflib.get_close_matches(key, list(cls.options), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(sorted(cls.options)) or "none"
            raise ConfigError(f"{source}: unknown option procedure.{key} for procedure {name!r}{hint} "
                              f"(its options: {known})")
    for key, default in cls.options.items():
        out[key] = copy.deepcopy(section.get(key, default))
    cls.check_options(out, source)
    return out


# ----------------------------------------------------------------------------------------------------------
# The hook interface
# ----------------------------------------------------------------------------------------------------------

class Procedure:
    """Base class and default behaviour of a training procedure (see the module docstring)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: Defaults of the procedure's own config options (``procedure: {name: ..., <option>: value}``).
    options: ClassVar[dict[str, Any]] = {}
    #: When True, ``training_step`` calls ``self.trainer.backward_step(loss)`` (or its own steps) itself.
    manual_optimization: ClassVar[bool] = False

    def __init__(self, trainer: Any):
        # ``trainer`` is the training.trainer.Trainer driving this procedure; not imported for the annotation,
        # since the trainer imports this module (the dependency runs trainer -> procedures -> paths only).
        self.trainer = trainer
        self.config: dict[str, Any] = trainer.config
        self.opts: dict[str, Any] = {k: v for k, v in self.config["procedure"].items() if k != "name"}
        self.target: str = self.config["data"]["target"]
        self.model: nn.Module | None = None
        self.loss_fn: nn.Module | None = None
        self.epoch = 0
        self.max_epochs = int(self.config["train"]["epochs"])

    # -- options -------------------------------------------------------------------------------------------
    @classmethod
    def check_options(cls, options: dict[str, Any], source: str) -> None:
        """Raise :class:`training.paths.ConfigError` for invalid option values (override in subclasses)."""

    # -- model and optimisation ----------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The registry network of ``model`` with ``model.init`` weights loaded when given."""
        from COVIDLesionSegLib.models import build

        model = build({"arch": self.config["model"]["arch"], "args": dict(self.config["model"]["args"])})
        init = self.config["model"].get("init")
        if init:
            state = load_weights(init)
            strict = bool(self.config["model"].get("init_strict", True))
            result = model.load_state_dict(state, strict=strict)
            if not strict and (result.missing_keys or result.unexpected_keys):
                self.trainer.note(f"model.init {init}: {len(result.missing_keys)} missing, "
                                  f"{len(result.unexpected_keys)} unexpected keys (init_strict: false)")
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Parameter groups for the optimiser; frozen parameters (``requires_grad=False``) are left out."""
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ProcedureError("the model has no trainable parameters")
        return [{"params": params}]

    def build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """``optim``: SGD (momentum, Nesterov; 000/001/002), Adam (003, 004) or AdamW."""
        o = self.config["optim"]
        if o["name"] == "sgd":
            return torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], nesterov=bool(o["nesterov"]) and o["momentum"] > 0,
                                   weight_decay=o["weight_decay"])
        if o["name"] == "adam":
            return torch.optim.Adam(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                                    weight_decay=o["weight_decay"])
        return torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                                 weight_decay=o["weight_decay"])

    def build_scheduler(self, optimizer: torch.optim.Optimizer):
        """Epoch-wise schedule (stepped after every epoch) from ``schedule``:

        - ``poly``: ``lr = lr0 * (1 - epoch / max_epochs) ** power`` (000 section 3.3, nnU-Net; power 0.9),
          never below ``min_lr``;
        - ``step``: ``lr0 * gamma ** (epoch // step_size)`` (003: x0.1 every 50 epochs);
        - ``cosine``: cosine annealing to ``min_lr`` over the run; ``constant``: ``lr0``.
        """
        s = self.config["schedule"]
        epochs = self.max_epochs
        lr0 = [g["lr"] for g in optimizer.param_groups]
        if s["name"] == "poly":
            power, min_lr = float(s["power"]), float(s["min_lr"])
            fns = [_PolyFactor(epochs, power, min_lr / base if base > 0 else 0.0) for base in lr0]
            return torch.optim.lr_scheduler.LambdaLR(optimizer, fns)
        if s["name"] == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=int(s["step_size"]), gamma=float(s["gamma"]))
        if s["name"] == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=float(s["min_lr"]))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [_Constant() for _ in lr0])

    def build_loss(self) -> nn.Module:
        """``loss.name``: ``dice_ce`` (nnU-Net Dice + CE with deep supervision; 000/001/002), ``soft_dice``
        (004 eq. 1), ``structure`` (003 eqs. 5-8), built with ``loss.args``."""
        from COVIDLesionSegLib.models import losses

        cls = {"dice_ce": losses.DiceCELoss, "soft_dice": losses.SoftDiceLoss,
               "structure": losses.StructureLoss}[self.config["loss"]["name"]]
        try:
            return cls(**self.config["loss"]["args"])
        except TypeError as exc:
            raise ProcedureError(f"loss.args {self.config['loss']['args']} do not fit {cls.__name__}: {exc}") from None

    # -- data ------------------------------------------------------------------------------------------------
    def train_datasets(self) -> dict[str, Any]:
        """Datasets to draw one batch from each step; ``"main"`` sets the epoch length."""
        return {"main": self.trainer.dataset("data", "train")}

    # -- steps -----------------------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batches: dict[str, dict[str, Any]], step: StepInfo) -> StepOutput:
        """Supervised step: ``loss_fn(model(image), target)`` on the main batch (deep supervision lists are
        handled by the losses)."""
        batch = batches["main"]
        out = model(batch["image"])
        loss = self.loss_fn(out, batch[self.target])
        return StepOutput(loss, {})

    def predict_logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits ``(N, C, *spatial)`` of network-sized inputs (the first of a deep-supervision list)."""
        y = model(x)
        if isinstance(y, (list, tuple)):
            y = y[0]
        return y

    def validation_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of eval-mode logits against a target (``select_metric: val_loss``, 004's model selection)."""
        return self.loss_fn(logits, target)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        pass

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """Procedure-specific state for training checkpoints (plain data and tensors only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    # -- export ------------------------------------------------------------------------------------------------
    @classmethod
    def export_model(cls, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(state_dict, {"arch", "args"})`` of the network to ship in an engine checkpoint (default: the
        trained network itself)."""
        return dict(state_dict), {"arch": config["model"]["arch"], "args": dict(config["model"]["args"])}


class _PolyFactor:
    """Picklable poly factor ``(1 - epoch / max) ** power`` (LambdaLR stores callable objects' state)."""

    def __init__(self, max_epochs: int, power: float, floor: float = 0.0):
        self.max_epochs, self.power, self.floor = int(max_epochs), float(power), float(floor)

    def __call__(self, epoch: int) -> float:
        return max(self.floor, max(0.0, 1.0 - epoch / self.max_epochs) ** self.power)


class _Constant:
    def __call__(self, epoch: int) -> float:
        return 1.0


def open_weights_file(path: str) -> tuple[Path, Any]:
    """Resolve a ``model.init`` source (a weights file, or a run folder: its ``best.pt``) and read its header
    lazily (memory-mapped). Raises :class:`ProcedureError` for a missing or unreadable file."""
    p = Path(expand_path(path))
    if p.is_dir():
        p = p / "best.pt"
    if not p.exists():
        raise ProcedureError(f"model.init: weights file not found: {p}")
    try:
        head = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ProcedureError(f"model.init: cannot read {p}: {exc}") from None
    return p, head


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """Model weights from an engine checkpoint (``models/checkpoint.py``) or a training checkpoint
    (``last.pt``/``best.pt`` of a run, or a run folder: its ``best.pt``)."""
    from COVIDLesionSegLib.models.checkpoint import FORMAT, load_checkpoint
    from training.runs import TRAINING_FORMAT, load_training_state

    p, head = open_weights_file(path)
    fmt = head.get("format") if isinstance(head, dict) else None
    if fmt == FORMAT:
        return load_checkpoint(p).state_dict
    if fmt == TRAINING_FORMAT:
        return load_training_state(p)["model"]
    raise ProcedureError(f"model.init: {p} is neither a COVIDLesionSeg checkpoint nor a training checkpoint")


def finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


__all__ = ["Procedure", "ProcedureError", "StepInfo", "StepOutput", "get_procedure", "load_weights", "open_weights_file", "procedures",
           "register_procedure", "validate_procedure_options"]
