"""Multi-lesion multi-task pre-training of 000 (Wang et al., section 3.2) and single-lesion pre-training.

000 pre-trains the nnU-Net on non-COVID lung lesions - separately on MSD lung tumour, StructSeg lung GTV and
NSCLC pleural effusion, and as one *multi-lesion* model "fusing these lesions to train a multi-task
segmentation model" - and then transfers it to COVID-19 (``transfer.py``). Optimisation is the nnU-Net's:
SGD lr 0.01, Nesterov momentum 0.99, poly decay ``(1 - epoch/max)^0.9``, batch 2, Dice + CE with deep
supervision (section 4.2); those are the config defaults (``training.config``).

How the multi-lesion model is organised (000 does not spell it out; Fig. 1 shows one "Multi-lesion
pre-trained model" box fed by the three data sets, and section 3.2 calls it multi-task learning that
"can exploit the shared knowledge"). The reading implemented here: **one shared encoder-decoder and one
output per task** - the network's 1x1 heads get ``out_channels = number of tasks`` sigmoid channels, and a
batch of task ``k`` is supervised on channel ``k`` only. Because the heads are 1x1 convolutions, one
channel per task is exactly one separate linear head per task on the shared decoder features. Separate
*decoders* per task were rejected: the transfer strategies of 000 copy "all parameters of the pre-trained
model" (Body Fine-tuning) and "the decoding parts" (Pre-trained Lesion Representations), which presumes a
single decoder. The lesion labels differ (tumour, GTV, effusion), so a shared single output would ask one
channel to mean three things; per-task heads avoid that conflict. Transfer to COVID-19 takes every shared
weight; the per-task heads are re-initialised or taken from one task (``transfer.py``, option
``head_task``).

Each step draws one batch from every task's data set (the trainer's multi-data-set stream), runs them
through the network in one forward pass (instance norm is per sample, so concatenation does not mix
them) and sums the tasks' Dice + CE losses with ``task_weights`` (default 1 each: every task contributes
equally per step, whatever its size - the small effusion set is not drowned by the tumour set).

With a single task (``tasks: [main]``, ``out_channels: 1``) this is the single-lesion pre-training
(plain supervised training) with one extra: ``schedule_epochs``, the horizon of the poly schedule.
Continual Learning (``transfer.ContinualLearningProcedure``) continues the poly-decayed learning rate
"throughout the training process" into the COVID-19 training; a pre-training run with
``schedule_epochs = pre-training epochs + COVID-19 epochs`` stops part-way along that one curve, and the
continual run picks it up exactly where it stopped.

Validation and testing use the ``data`` set (task 0, the ``main`` batch) and its output channel.
``export_model`` ships a 1-channel ``nnunet`` with task 0's heads (or ``export_task``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from training.paths import ConfigError

from . import Procedure, ProcedureError, StepInfo, StepOutput, register_procedure


class ShiftedPoly:
    """Picklable poly factor of a schedule that started ``offset`` epochs earlier and ends at ``horizon``:
    ``(1 - (offset + epoch) / horizon) ** power``, floored at ``floor`` (000 section 3.3)."""

    def __init__(self, offset: int, horizon: int, power: float = 0.9, floor: float = 0.0):
        if horizon <= 0:
            raise ValueError(f"poly horizon must be > 0, got {horizon}")
        self.offset, self.horizon, self.power, self.floor = int(offset), int(horizon), float(power), float(floor)

    def __call__(self, epoch: int) -> float:
        return max(self.floor, max(0.0, 1.0 - (self.offset + epoch) / self.horizon) ** self.power)


def poly_scheduler(optimizer: torch.optim.Optimizer, offset: int, horizon: int, power: float, min_lr: float):
    """LambdaLR with :class:`ShiftedPoly` per parameter group."""
    fns = [ShiftedPoly(offset, horizon, power, min_lr / g["lr"] if g["lr"] > 0 else 0.0)
           for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fns)


def select_channel(outputs: Any, channel: int) -> Any:
    """Channel ``channel`` (kept as a 1-channel tensor) of logits or of a deep-supervision list."""
    if isinstance(outputs, (list, tuple)):
        return [o[:, channel:channel + 1] for o in outputs]
    return outputs[:, channel:channel + 1]


def head_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the 1x1 output heads of an ``nnunet`` state dict (``decoder.heads.*``)."""
    return [k for k in state_dict if k.startswith("decoder.heads.")]


@register_procedure
class MultiLesionProcedure(Procedure):
    """Multi-task pre-training over several lesion data sets (module docstring).

    Options:
        tasks: batch keys of the task data sets in output-channel order: ``main`` (= ``data``) and names of
            ``aux_data``. ``null``: ``main`` followed by every ``aux_data`` entry in config order.
        task_weights: loss weight per task (``null``: 1 each).
        schedule_epochs: horizon of the poly schedule (``null``: ``train.epochs``); larger values stop the
            run part-way along the curve, for Continual Learning.
        export_task: which task's output channel the exported 1-channel model keeps.
    """

    name = "multilesion"
    paper = "wang_hybrid_encoder"
    summary = "multi-lesion multi-task pre-training: shared nnU-Net, one output channel (head) per lesion data set"
    options = {"tasks": None, "task_weights": None, "schedule_epochs": None, "export_task": 0}

    @classmethod
    def check_options(cls, options: dict[str, Any], source: str) -> None:
        tasks = options["tasks"]
        if tasks is not None and (not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks)):
            raise ConfigError(f"{source}: procedure.tasks must be a non-empty list of batch keys (main, aux names)")
        if tasks is not None and tasks[0] != "main":
            raise ConfigError(f"{source}: procedure.tasks must start with 'main' (the data set that is validated "
                              f"and tested), got {tasks}")
        w = options["task_weights"]
        if w is not None and (not isinstance(w, list) or any(not isinstance(x, (int, float)) or x < 0 for x in w)):
            raise ConfigError(f"{source}: procedure.task_weights must be a list of non-negative numbers")
        se = options["schedule_epochs"]
        if se is not None and (not isinstance(se, int) or se < 1):
            raise ConfigError(f"{source}: procedure.schedule_epochs must be a positive integer or null")

    # -- tasks -------------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        tasks = self.opts["tasks"]
        if tasks is None:
            tasks = ["main"] + list(self.config["aux_data"])
        unknown = [t for t in tasks[1:] if t not in self.config["aux_data"]]
        if unknown:
            raise ProcedureError(f"procedure.tasks names {unknown}, which are not in aux_data "
                                 f"(have: {', '.join(self.config['aux_data']) or 'none'})")
        return list(tasks)

    def task_target(self, task: str) -> str:
        spec = self.config["data"] if task == "main" else self.config["aux_data"][task]
        return spec["target"]

    def weights(self) -> list[float]:
        w = self.opts["task_weights"]
        n = len(self.tasks)
        if w is None:
            return [1.0] * n
        if len(w) != n:
            raise ProcedureError(f"procedure.task_weights has {len(w)} entries for {n} tasks {self.tasks}")
        return [float(x) for x in w]

    # -- hooks -----------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        model = super().build_model()
        n_out = int(self.config["model"]["args"].get("out_channels", 1))
        if n_out != len(self.tasks):
            raise ProcedureError(f"multi-task pre-training over {len(self.tasks)} task(s) {self.tasks} needs "
                                 f"model.args.out_channels = {len(self.tasks)} (one sigmoid output per task), "
                                 f"got {n_out}")
        return model

    def build_scheduler(self, optimizer: torch.optim.Optimizer):
        s = self.config["schedule"]
        horizon = self.opts["schedule_epochs"]
        if horizon is None or s["name"] != "poly":
            return super().build_scheduler(optimizer)
        if horizon < self.max_epochs:
            raise ProcedureError(f"procedure.schedule_epochs ({horizon}) must be >= train.epochs ({self.max_epochs})")
        return poly_scheduler(optimizer, 0, horizon, float(s["power"]), float(s["min_lr"]))

    def train_datasets(self) -> dict[str, Any]:
        out = {}
        for task in self.tasks:
            out[task] = self.trainer.dataset("data", "train") if task == "main" else \
                self.trainer.dataset(f"aux_data.{task}", "all")
            if out[task] is None:
                raise ProcedureError(f"task {task!r} has no training data")
        return out

    def training_step(self, model: nn.Module, batches: dict[str, dict[str, Any]], step: StepInfo) -> StepOutput:
        tasks, weights = self.tasks, self.weights()
        images = [batches[t]["image"] for t in tasks]
        sizes = [int(x.shape[0]) for x in images]
        out = model(torch.cat(images, dim=0))
        outs = out if isinstance(out, (list, tuple)) else [out]
        total = outs[0].new_zeros(())
        logs: dict[str, Any] = {}
        start = 0
        for k, (task, n) in enumerate(zip(tasks, sizes, strict=True)):
            part = [o[start:start + n, k:k + 1] for o in outs]
            start += n
            loss_k = self.loss_fn(part if isinstance(out, (list, tuple)) else part[0], batches[task][self.task_target(task)])
            logs[f"loss_{task}"] = loss_k.detach()
            total = total + weights[k] * loss_k
        total = total / max(sum(weights), 1e-12)
        return StepOutput(total, logs, n_samples=sum(sizes))

    def predict_logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = super().predict_logits(model, x)
        return y[:, 0:1]   # task 0 = the ``data`` set that is validated and tested

    @classmethod
    def export_model(cls, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A 1-channel ``nnunet`` with the heads of task ``export_task`` (the engine's sigmoid contract)."""
        k = int(config["procedure"].get("export_task", 0))
        sd = dict(state_dict)
        for key in head_keys(sd):
            if sd[key].dim() >= 1 and sd[key].shape[0] > 1:
                sd[key] = sd[key][k:k + 1].clone()
        args = dict(config["model"]["args"])
        args["out_channels"] = 1
        return sd, {"arch": config["model"]["arch"], "args": args}


__all__ = ["MultiLesionProcedure", "ShiftedPoly", "head_keys", "poly_scheduler", "select_channel"]
