"""The training loop shared by every procedure: data, seeds, devices, mixed precision, checkpoints, resuming,
logs, validation and best-model selection, early stopping, Ctrl-C, and the final test.

:class:`Trainer` turns a validated config (``training.config``) into a run folder (``training.runs``)::

    trainer = Trainer(config, run_dir, device="auto", resume=False)
    summary = trainer.fit()          # trains, validates, tests; returns summary.json's content

What a procedure (``training.procedures``) decides - the network, parameter groups, optimiser, schedule,
loss, what one step computes and with which batches - the trainer asks it through its hooks; the rest is
here, once.

Determinism and resuming
------------------------
Every epoch starts by re-seeding Python, NumPy and torch (CPU and CUDA) from ``(seed, epoch)``, and every
data loader of the epoch gets its own ``torch.Generator`` seeded from ``(seed, epoch, dataset, cycle)``;
MONAI's ``DataLoader`` derives the random state of every random transform (and of each worker) from it.
So an epoch's data order and augmentation depend only on the seed and the epoch number, not on what ran
before - the property that makes resuming exact. ``last.pt`` is written after every epoch and, on Ctrl-C,
in the middle of one: it stores the model, optimiser, scheduler, grad scaler, procedure state, epoch and
step, the RNG states and the history. Resuming rebuilds the epoch's loaders, replays the batches already
used (the transforms run again, the network does not) and restores the RNG states, so a run stopped
anywhere and resumed ends with the same weights as an uninterrupted run (bit-identical on the CPU, where
the kernels are deterministic; ``train.deterministic`` asks CUDA for deterministic kernels too).
``monai.utils.set_determinism`` is applied at the start.

Mixed precision and memory layout
---------------------------------
On CUDA, ``train.amp`` (``auto``: bfloat16 where supported, else float16) runs the forward pass and the
loss under ``torch.autocast``; float16 uses a ``GradScaler`` (bfloat16 does not need one). With
``train.channels_last`` (``auto`` = on CUDA) the model and inputs use ``channels_last`` /
``channels_last_3d``. The CPU always trains in float32 with the default layout.

Validation and test
-------------------
Every ``train.val_every`` epochs (and after the last) the model predicts the validation cases with the
evaluation pipeline (no augmentation): 2D items batch-wise at the network's input size; 3D volumes on
their native grid - resampled to the training spacing, MONAI ``sliding_window_inference`` with the
training patch size, overlap ``eval.overlap`` and Gaussian weighting as nnU-Net, and the logits resampled
back - so 3D metrics are measured on the original voxels and spacing. Metrics are
``COVIDLesionSegLib.metrics.case_metrics`` (the one implementation). The best epoch by
``train.select_metric`` is kept as ``best.pt``; ``train.patience`` stops early after that many
validation rounds without an improvement of more than ``train.min_delta``. Without a validation set
(the papers' 5-fold protocol has none) the final model is the best (as nnU-Net uses its final model).
After training the best model is tested on the split's test cases; ``eval.unit: group`` stacks the 2D
slices of one volume group and scores each group as a volume (overlap metrics from the stacked counts;
NSD/HD95 per slice, averaged over the group's slices, since stacked non-adjacent slices have no
meaningful 3D surface). 2D data without known pixel spacing are scored with 1 mm pixels (``tau_mm`` is
then in pixels of the evaluation grid).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from COVIDLesionSegLib.errors import CovidLesionSegError
from COVIDLesionSegLib.metrics import METRIC_NAMES, SURFACE_METRICS, aggregate, case_metrics
from training import datasets as ds
from training import splits as sp
from training import transforms as tf
from training.config import ConfigError, config_diff, dump_config, expand_path, get
from training.procedures import Procedure, StepInfo, StepOutput, get_procedure
from training.runs import RunDir, RunError, load_training_state, read_json, save_training_state, write_json


class TrainingError(CovidLesionSegError, RuntimeError):
    """Training cannot go on (diverged loss, empty data after filtering, ...)."""

    kind = "training"


class TrainingInterrupted(RuntimeError):
    """Ctrl-C (SIGINT) stopped training; ``last.pt`` holds the state to ``--resume`` from."""

    def __init__(self, message: str, run_dir: Path, epoch: int, iteration: int):
        super().__init__(message)
        self.run_dir, self.epoch, self.iteration = run_dir, epoch, iteration


# ----------------------------------------------------------------------------------------------------------
# Data: readers, pipelines, splits
# ----------------------------------------------------------------------------------------------------------

#: Data set readers by config name (``data.reader``); each takes the data set folder first.
READERS: dict[str, Callable[..., list]] = {
    "covid19ctseg": ds.read_covid19ctseg,
    "covid19ctseg2d": ds.read_covid19ctseg2d,
    "msd": ds.read_msd,
    "structseg": ds.read_structseg,
    "nsclc_effusion": ds.read_nsclc_effusion,
    "lidc": ds.read_lidc,
    "mosmed": ds.read_mosmed,
    "medseg": ds.read_medseg,
    "medseg100": ds.read_medseg100,
    "covidctmd": ds.read_covidctmd,
    "shared_ct": ds.read_shared_ct,
    "synthetic": ds.read_synthetic,
}

#: Pipeline factories by config name (``data.transforms``), see ``training/transforms.py``.
PIPELINES: dict[str, Callable[..., Any]] = {
    "slice_2d": tf.slice_2d_transforms,
    "nnunet_3d": tf.nnunet_3d_transforms,
    "bizopoulos_004": tf.bizopoulos_004_transforms,
    "ncovsegnet": tf.ncovsegnet_transforms,
}


def load_cases(spec: Mapping[str, Any], where: str = "data") -> list[ds.Case]:
    """Read a data set spec's cases, keep those with its target, filter ``groups`` and subsample
    ``max_cases_per_group`` (evenly spaced cases of each group, in reading order)."""
    reader = spec["reader"]
    if reader not in READERS:
        raise ConfigError(f"{where}.reader {reader!r} is unknown; known: {', '.join(sorted(READERS))}")
    root = expand_path(spec["root"])
    try:
        cases = READERS[reader](root, **spec["reader_args"])
    except TypeError as exc:
        raise ConfigError(f"{where}.reader_args {spec['reader_args']} do not fit reader {reader!r}: {exc}") from None
    target = spec["target"]
    with_target = [c for c in cases if target in c.labels]
    if not with_target:
        have = sorted({t for c in cases for t in c.labels})
        raise ds.DatasetError(f"{where}: no case of {reader} ({root}) has the target {target!r}; its labels: "
                              f"{', '.join(have) or 'none'}")
    cases = with_target
    if spec.get("groups") is not None:
        keep = {str(g) for g in spec["groups"]}
        cases = [c for c in cases if str(c.group) in keep]
        if not cases:
            raise ds.DatasetError(f"{where}.groups {sorted(keep)} match no case of {reader} ({root})")
    n = spec.get("max_cases_per_group")
    if n:
        by_group: dict[str, list[ds.Case]] = {}
        for c in cases:
            by_group.setdefault(c.group, []).append(c)
        kept = set()
        for members in by_group.values():
            if len(members) <= n:
                kept.update(c.id for c in members)
            else:
                idx = np.unique(np.round(np.linspace(0, len(members) - 1, n)).astype(int))
                kept.update(members[i].id for i in idx)
        cases = [c for c in cases if c.id in kept]
    return cases


def make_split(config: Mapping[str, Any], cases: Sequence[ds.Case]) -> sp.Split:
    """The split of ``protocol`` (fold ``protocol.fold``), with ``val_fraction`` of the training groups
    moved to validation when set. Checked disjoint at the protocol's level (``splits.protocol_groups``:
    patients, or volumes for the benchmark's published folds)."""
    folds = protocol_folds(config, cases)
    p = config["protocol"]
    k = int(p["fold"])
    if not 0 <= k < len(folds):
        raise ConfigError(f"protocol.fold {k} is out of range: protocol {p['name']!r} has {len(folds)} fold(s)")
    split = folds[k]
    if p["val_fraction"] and p["val_fraction"] > 0:
        split = sp.with_validation(split, cases, float(p["val_fraction"]), seed=int(p["seed"]))
    if not split.train:
        raise ConfigError(f"protocol {p['name']!r} fold {k} has no training cases")
    sp.assert_disjoint(split, sp.protocol_groups(split, cases))
    return split


def protocol_folds(config: Mapping[str, Any], cases: Sequence[ds.Case]) -> list[sp.Split]:
    """Every fold of the config's protocol (``cv`` runs one training per fold)."""
    p = config["protocol"]
    name, args, seed = p["name"], dict(p["args"]), int(p["seed"])
    try:
        if name == "all":
            return [sp.Split(name="all", train=tuple(c.id for c in cases), test=())]
        if name == "fixed":
            if not p["train"]:
                raise ConfigError("protocol 'fixed' needs protocol.train (a list of case ids)")
            split = sp.Split(name="fixed", train=tuple(p["train"]), val=tuple(p["val"] or ()),
                             test=tuple(p["test"] or ()))
            sp.select(cases, split.train + split.val + split.test)  # raises naming unknown ids
            return [split]
        if name == "ctseg2d":
            return sp.ctseg2d_protocol_folds(cases, n_folds=int(p["n_folds"]), seed=seed, **args)
        if name == "ctseg2d_kfold":
            return sp.ctseg2d_kfold(cases, n_folds=int(p["n_folds"]), seed=seed, **args)
        if name == "covid19ctseg":
            return sp.covid19ctseg_folds(cases, split_file=expand_path(p["split_file"]), seed=seed, **args)
        if name == "kfold":
            return sp.grouped_kfold(cases, int(p["n_folds"]), seed=seed, **args)
        if name == "holdout":
            kept, held = sp.grouped_holdout(cases, float(args.pop("test_fraction", 0.2)), seed=seed, **args)
            return [sp.Split(name="holdout", train=kept, test=held, meta={"seed": seed})]
    except TypeError as exc:
        raise ConfigError(f"protocol.args {args} do not fit protocol {name!r}: {exc}") from None
    except KeyError as exc:
        raise ConfigError(f"protocol {name!r}: {exc.args[0] if exc.args else exc}") from None
    raise ConfigError(f"unknown protocol {name!r}")  # pragma: no cover - validated in config


def _seed_of(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across runs and platforms, unlike ``hash``)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    """Worker seeds: MONAI's (random transforms) plus Python's and NumPy's global generators."""
    from monai.data.utils import worker_init_fn

    worker_init_fn(worker_id)
    seed = torch.initial_seed() % (2 ** 32)
    random.seed(seed)
    np.random.seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA RNG states as plain data and tensors (``weights_only`` loadable)."""
    py = random.getstate()
    npst = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": {"name": npst[0], "keys": torch.from_numpy(npst[1].astype(np.int64)), "pos": int(npst[2]),
                       "has_gauss": int(npst[3]), "cached_gaussian": float(npst[4])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: None on the CPU or with ``none``; ``auto`` = bfloat16 where supported, else float16."""
    if device.type != "cuda" or setting == "none":
        return None
    if setting == "bf16" or (setting == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------

#: Config keys that may differ when resuming (they do not change what is computed).
RESUME_FREE_KEYS = ("train.progress", "train.num_threads", "data.num_workers", "eval.batch_size")

#: Metrics where lower is better (select_mode ``auto``).
LOWER_IS_BETTER = ("loss", "voe", "rvd", "hd95")


class Trainer:
    """Runs one config (one fold) into one run folder. See the module docstring.

    Args:
        config: a validated config (:func:`training.config.load_config`).
        run_dir: the run folder (created; must not hold a run unless ``resume``).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        resume: continue the run in ``run_dir`` from its ``last.pt``.
        progress: show the tqdm progress bar (default: ``train.progress``).
        log: where one-line messages go (default: stderr).
    """

    def __init__(self, config: Mapping[str, Any], run_dir: str | os.PathLike, device: str = "auto",
                 resume: bool = False, progress: bool | None = None, log: Callable[[str], None] | None = None):
        from COVIDLesionSegLib.network_predictor import resolve_device

        self.config: dict[str, Any] = dict(config)
        self.run = RunDir(run_dir)
        self.device = resolve_device(device)
        self.resume = resume
        self.show_progress = self.config["train"]["progress"] if progress is None else progress
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.notes: list[str] = []
        self.amp_dtype = resolve_amp(self.config["train"]["amp"], self.device)
        cl = self.config["train"]["channels_last"]
        self.channels_last = self.device.type == "cuda" and cl in ("auto", True)
        self.procedure: Procedure = get_procedure(self.config["procedure"]["name"])(self)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: torch.amp.GradScaler | None = None
        self.cases: dict[str, list[ds.Case]] = {}
        self.split: sp.Split | None = None
        self.preprocessing: dict[str, Any] = {}
        self._datasets: dict[tuple[str, str, bool], Any] = {}
        self._geometry: dict[tuple[str, str], dict[str, Any]] = {}
        self._native_volume: tuple[Any, Any] = (None, None)
        self._case_index: dict[str, dict[str, ds.Case]] = {}
        self._stop_requested = False
        self._built = False
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.start_iteration = 0
        self.best: dict[str, Any] = {"metric": None, "value": None, "epoch": None}
        self.bad_rounds = 0
        self._partial: dict[str, Any] | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self.elapsed_train_s = 0.0
        self._stop_after: int | None = None
        self._engine_choice: dict[str, bool] = {}

    # -- messages --------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        self._log(message)

    def note(self, message: str) -> None:
        """A remark kept in summary.json (and logged)."""
        if message not in self.notes:
            self.notes.append(message)
            self.log(f"note: {message}")

    # -- data --------------------------------------------------------------------------------------------------
    def spec(self, key: str) -> dict[str, Any]:
        """A data set spec by config path: ``"data"`` or ``"aux_data.<name>"``."""
        spec = get(self.config, key)
        if not isinstance(spec, Mapping) or "reader" not in spec:
            known = ["data"] + [f"aux_data.{n}" for n in self.config["aux_data"]]
            raise ConfigError(f"no data set {key!r} in the config (known: {', '.join(known)})")
        return dict(spec)

    def cases_of(self, key: str) -> list[ds.Case]:
        if key not in self.cases:
            self.cases[key] = load_cases(self.spec(key), key)
        return self.cases[key]

    def subset_cases(self, key: str, subset: str) -> list[ds.Case]:
        """Cases of data set ``key`` in ``subset`` (train/val/test of the split for ``data``; ``all``)."""
        cases = self.cases_of(key)
        if subset == "all":
            return list(cases)
        if key != "data":
            raise ConfigError(f"{key}: only subset 'all' is defined for auxiliary data sets, got {subset!r}")
        assert self.split is not None
        return self.split.select(cases, subset)

    def _items(self, key: str, cases: Sequence[ds.Case], train: bool = True) -> list[dict[str, Any]]:
        """Dataset items of ``cases``: the cases themselves, or with ``slice`` their volumes cut into slices.

        ``slice_positive`` filters *training* items only: evaluation items (``train=False``: validation,
        test) keep every slice, so a volume is scored on all of its slices as the papers score volumes
        (003 trains nCoVSegNet on infected slices, and tests on whole volumes). With ``crop_lungs`` training
        volumes are cropped to their 3D lung box; evaluation volumes keep every slice, each cropped
        in-plane to that box (slices beyond the lungs are scored too, not dropped). The native geometry of
        every evaluation slice (its volume, index, lung box, pixel spacing) is kept for
        :meth:`evaluate`."""
        spec = self.spec(key)
        if not spec["slice"]:
            return [c.to_dict() for c in cases]
        targets = [spec["target"]] + list(spec["extra_targets"])
        # labels the pipeline itself reads (004's lesion B input mask, nCoVSegNet's 2D lung crop) are cut too
        args = spec["transform_args"]
        wanted = [args.get("mask_input_with")]
        if spec["transforms"] == "ncovsegnet" and args.get("crop_lungs", True):
            wanted.append(args.get("lung_key", "lung"))
        pipeline_labels = [t for t in wanted if t and t not in targets]
        # nCoVSegNet (003) crops each volume to the box of an unsupervised lung mask before cutting slices; the
        # engine's HU lung masking stands in for that mask (lung_key=None forces it even if a lung label exists).
        crop = tf.CropToLungBoxd(["image"] + targets + pipeline_labels, lung_key=None) if spec["crop_lungs"] else None
        positive = spec["slice_positive"] if train else None
        items = []
        for c in cases:
            keys = targets + [t for t in pipeline_labels if t in c.labels]
            loaded = ds.load_case(c, keys)
            full_shape = tuple(np.asarray(loaded["image"]).shape[2:])
            box = None
            if crop is not None:
                cropped = crop(loaded)
                box = cropped.get("lung_box")
                if train or box is None:
                    loaded = cropped
                else:   # evaluation: every slice of the volume, each cropped in-plane to the 3D lung box
                    (y0, y1), (x0, x1) = box[1], box[2]
                    loaded = {**loaded, **{k: np.asarray(loaded[k])[:, :, y0:y1, x0:x1] for k in ["image"] + keys}}
            sliced = ds.slice_items(loaded, keys=["image"] + keys, require_positive=positive)
            if not train:
                for it in sliced:
                    self._geometry[(key, str(it["id"]))] = {
                        "case": c, "z": int(it["slice_index"]), "shape": full_shape,
                        "box": tuple(box[1:]) if box else None, "spacing": tuple(it["spacing"])}
            items += sliced
        if not items:
            raise TrainingError(f"{key}: slicing {len(cases)} volume(s) gave no slices "
                                f"(slice_positive={spec['slice_positive']!r})")
        return items

    def _native_geometry(self, key: str, item_id: str) -> dict[str, Any]:
        """Where an evaluation item's pixels come from: ``shape`` (native in-plane shape), ``box`` (the
        in-plane lung box it was cropped to, or None), ``spacing`` (mm per pixel on the native grid, None
        when unknown: the 8-bit 2D sets) and ``case``/``z`` to read its native reference."""
        gk = (key, item_id)
        if gk not in self._geometry:
            if key not in self._case_index:
                self._case_index[key] = {c.id: c for c in self.cases_of(key)}
            case = self._case_index[key].get(item_id)
            if case is None:
                raise TrainingError(f"{key}: no native geometry for evaluation item {item_id!r}")
            if isinstance(case.image, np.ndarray):
                shape, spacing = tuple(np.asarray(case.image).shape[-2:]), case.spacing
            else:   # a slice of a stacked file (MedSeg): its header knows the spacing
                loaded = ds.load_case(case, [])
                shape, spacing = tuple(np.asarray(loaded["image"]).shape[-2:]), loaded["spacing"]
            self._geometry[gk] = {"case": case, "z": None, "shape": shape, "box": None,
                                  "spacing": tuple(float(v) for v in spacing) if spacing is not None else None}
        return self._geometry[gk]

    def _native_reference(self, key: str, geo: Mapping[str, Any]) -> np.ndarray:
        """The reference mask of an evaluation item on its native grid (the whole uncropped slice)."""
        target = self.spec(key)["target"]
        case = geo["case"]
        if geo["z"] is None:
            return np.asarray(ds.load_case(case, [target])[target])[0] > 0
        if self._native_volume[0] != (key, case.id):   # slices of one volume come together: keep one volume
            self._native_volume = ((key, case.id), np.asarray(ds.load_case(case, [target])[target])[0] > 0)
        return self._native_volume[1][geo["z"]]

    def _prepare_3d(self, key: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        """nnU-Net fingerprint of the training cases: ``target_spacing: auto`` -> median spacing
        (:func:`training.transforms.nnunet_target_spacing`), ``intensity: fit`` (or absent) -> CT z-score
        of the training foreground (:func:`training.transforms.fit_zscore`). Stored in preprocessing.json
        (and reused when resuming).

        Transfer runs (``model.init`` a training run, ``model.init_preprocessing`` true) take ``auto`` /
        ``fit`` values from the pre-training run instead of fitting their own: the frozen or transferred
        encoder (Lesion Representations, the Adapted-encoders, collaborative G) then sees inputs resampled
        and normalised exactly as in its training. ``data`` reuses the pre-training's ``data`` (its task 0);
        an ``aux_data.<name>`` reuses the pre-training's set of the same name when it has one. Explicit
        values in ``transform_args`` always win."""
        if key in self.preprocessing:
            return self.preprocessing[key]
        args = dict(spec["transform_args"])
        out: dict[str, Any] = {}
        inherited = self._init_preprocessing().get(key) or {}
        ts = args.get("target_spacing", "auto")
        intensity = args.get("intensity", "fit")
        if (ts == "auto" and inherited.get("target_spacing") is not None) or (intensity == "fit" and inherited.get("intensity")):
            self.note(f"{key}: preprocessing from model.init's run ({', '.join(k for k in ('target_spacing', 'intensity') if inherited.get(k) is not None)})")
        train_cases = None
        if ts == "auto" and inherited.get("target_spacing") is not None:
            out["target_spacing"] = [float(v) for v in inherited["target_spacing"]]
        elif ts == "auto":
            train_cases = self.subset_cases(key, "train" if key == "data" else "all")
            out["target_spacing"] = list(tf.nnunet_target_spacing([tf.case_spacing(c) for c in train_cases]))
        else:
            out["target_spacing"] = None if ts is None else [float(s) for s in ts]
        if intensity == "fit" and inherited.get("intensity"):
            out["intensity"] = inherited["intensity"]
        elif intensity == "fit":
            train_cases = train_cases or self.subset_cases(key, "train" if key == "data" else "all")
            loaded = [ds.load_case(c, [spec["target"]]) for c in train_cases]
            out["intensity"] = tf.fit_zscore(loaded, spec["target"], seed=int(self.config["seed"]))
        else:
            out["intensity"] = intensity
        self.preprocessing[key] = out
        return out

    def _init_preprocessing(self) -> dict[str, Any]:
        """``preprocessing`` of the ``model.init`` training checkpoint (``{}`` for engine checkpoints, no init,
        or ``model.init_preprocessing: false``)."""
        init = self.config["model"].get("init")
        if not init or not self.config["model"].get("init_preprocessing", True):
            return {}
        from training.procedures import open_weights_file
        from training.runs import TRAINING_FORMAT

        _, head = open_weights_file(init)
        if not isinstance(head, Mapping) or head.get("format") != TRAINING_FORMAT:
            return {}
        return dict(head.get("preprocessing") or {})

    def _pipeline(self, key: str, train: bool):
        spec = self.spec(key)
        name = spec["transforms"]
        if name not in PIPELINES:
            raise ConfigError(f"{key}.transforms {name!r} is unknown; known: {', '.join(sorted(PIPELINES))}")
        args = dict(spec["transform_args"])
        if not train:
            args.update(spec["val_transform_args"])
        labels = [spec["target"]] + [t for t in spec["extra_targets"] if t != spec["target"]]
        if name == "nnunet_3d":
            prep = self._prepare_3d(key, spec)
            args["target_spacing"] = prep["target_spacing"]
            args["intensity"] = prep["intensity"]
            if not train:
                # Evaluation keeps the native grid (metrics on the original voxels); predict() resamples.
                return tf.Compose([tf.LoadCased(targets=labels, restore_hu=args.get("restore_hu", True)),
                                   tf.Intensityd(["image"], prep["intensity"]),
                                   tf.Finalized(labels, extra=["spacing"])])
        args["train"] = train
        if train:
            args["seed"] = int(self.config["seed"])
        try:
            return PIPELINES[name](labels, **args)
        except TypeError as exc:
            raise ConfigError(f"{key}.transform_args {args} do not fit pipeline {name!r}: {exc}") from None

    def dataset(self, key: str, subset: str, train_transforms: bool | None = None):
        """A MONAI dataset of data set ``key`` (``"data"``, ``"aux_data.<name>"``) over ``subset``
        (``train``/``val``/``test``/``all``) with training (augmenting) or evaluation transforms
        (default: training transforms for ``train`` and ``all``). Cached per (key, subset, transforms)."""
        train_t = subset in ("train", "all") if train_transforms is None else train_transforms
        ck = (key, subset, train_t)
        if ck not in self._datasets:
            cases = self.subset_cases(key, subset)
            if not cases:
                self._datasets[ck] = None
                return None
            if subset == "val" and self.config["eval"]["max_val_cases"]:
                cases = _evenly(cases, int(self.config["eval"]["max_val_cases"]))
            spec = self.spec(key)
            cache = None if spec["cache"] == "none" else spec["cache"]
            self._datasets[ck] = ds.make_dataset(self._items(key, cases, train=train_t), self._pipeline(key, train_t),
                                                 cache=cache,
                                                 cache_dir=self.run.path / "cache" / key if cache == "disk" else None,
                                                 num_workers=0)
        return self._datasets[ck]

    def loader_batch_size(self, key: str) -> int:
        """Items per loader batch: ``train.batch_size``, divided by ``num_samples`` for ``nnunet_3d`` (which
        cuts that many patches from each volume, so a batch of 2 patches is 1 volume x 2 patches)."""
        spec = self.spec(key)
        bs = int(self.config["train"]["batch_size"])
        per_item = int(spec["transform_args"].get("num_samples", 2)) if spec["transforms"] == "nnunet_3d" else 1
        return max(1, bs // max(per_item, 1))

    def _loader(self, dataset, key: str, epoch: int, cycle: int):
        from monai.data import DataLoader

        spec = self.spec(key)
        bs = self.loader_batch_size(key)
        g = torch.Generator()
        g.manual_seed(_seed_of(self.config["seed"], "loader", key, epoch, cycle))
        workers = int(spec["num_workers"])
        return DataLoader(dataset, batch_size=bs, shuffle=True, drop_last=len(dataset) >= bs, generator=g,
                          num_workers=workers, worker_init_fn=_worker_init if workers else None,
                          pin_memory=self.device.type == "cuda")

    def _batch_stream(self, datasets: Mapping[str, Any], epoch: int) -> Iterator[dict[str, Any]]:
        """Endless stream of ``{key: batch}`` for one epoch: each loader is restarted (with the next cycle's
        seed) when it runs out, so ``iterations_per_epoch`` may exceed one pass."""
        keys = list(datasets)
        iters: dict[str, Iterator] = {}
        cycles = {k: 0 for k in keys}
        while True:
            batch = {}
            for k in keys:
                if k not in iters:
                    iters[k] = iter(self._loader(datasets[k], self._data_key(k), epoch, cycles[k]))
                try:
                    batch[k] = next(iters[k])
                except StopIteration:
                    cycles[k] += 1
                    iters[k] = iter(self._loader(datasets[k], self._data_key(k), epoch, cycles[k]))
                    batch[k] = next(iters[k])
            yield batch

    def _data_key(self, batch_key: str) -> str:
        """Data set config path behind a procedure's batch key (``main`` -> ``data``, ``x`` -> ``aux_data.x``)."""
        if batch_key == "main":
            return "data"
        return f"aux_data.{batch_key}" if batch_key in self.config["aux_data"] else "data"

    def to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Move a batch's tensors to the device (channels-last for 4D/5D float tensors on CUDA)."""
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, non_blocking=True)
                if hasattr(v, "as_tensor"):
                    v = v.as_tensor()
                if self.channels_last and v.is_floating_point() and v.dim() in (4, 5):
                    v = v.contiguous(memory_format=torch.channels_last if v.dim() == 4 else torch.channels_last_3d)
            out[k] = v
        return out

    # -- building ------------------------------------------------------------------------------------------------
    def autocast(self):
        """Autocast context of the run (a no-op on the CPU)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _setup_torch(self) -> None:
        from monai.utils import set_determinism

        t = self.config["train"]
        if t["num_threads"]:
            torch.set_num_threads(int(t["num_threads"]))
        if t["deterministic"]:
            set_determinism(seed=int(self.config["seed"]) % (2 ** 32))
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.use_deterministic_algorithms(True, warn_only=True)
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        seed_everything(int(self.config["seed"]))

    def setup(self) -> None:
        """Build data, split, model, optimiser, schedule, loss; restore ``last.pt`` when resuming."""
        if self._built:
            return
        self._check_run_folder()
        self._setup_torch()
        self.run.create()
        cases = self.cases_of("data")
        if self.resume and self.run.split.exists():
            self.split = sp.Split.from_dict(read_json(self.run.split))
            sp.assert_disjoint(self.split, sp.protocol_groups(self.split, cases))
        else:
            self.split = make_split(self.config, cases)
        if self.resume and self.run.preprocessing.exists():
            self.preprocessing = read_json(self.run.preprocessing)
        proc = self.procedure
        self.model = proc.build_model().to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last) if self._spatial_dims() == 2 else \
                self.model.to(memory_format=torch.channels_last_3d)
        proc.model = self.model
        proc.loss_fn = proc.build_loss().to(self.device)
        self.optimizer = proc.build_optimizer(proc.param_groups(self.model))
        self.scheduler = proc.build_scheduler(self.optimizer)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.train_sets = proc.train_datasets()
        if "main" not in self.train_sets or self.train_sets["main"] is None:
            raise TrainingError("the procedure's train_datasets() must return a non-empty 'main' data set")
        self.val_set = self.dataset("data", "val", train_transforms=False) if self.split.val else None
        if self.preprocessing:
            write_json(self.run.preprocessing, self.preprocessing)
        if self.resume:
            self._restore(load_training_state(self.run.last, map_location="cpu"))
        else:
            dump_config(self.config, self.run.config)
            used = set(self.split.train + self.split.val + self.split.test)
            write_json(self.run.split, {**self.split.to_dict(),
                                        "groups": {c.id: c.group for c in cases if c.id in used}})
        proc.on_fit_start()
        self._built = True

    def _spatial_dims(self) -> int:
        args = self.config["model"]["args"]
        if "spatial_dims" in args:
            return int(args["spatial_dims"])
        from COVIDLesionSegLib.models import architectures

        dims = architectures()[self.config["model"]["arch"]].dims
        return 2 if dims == (2,) else 3 if dims == (3,) else 3

    def _check_run_folder(self) -> None:
        if self.resume:
            if not self.run.last.exists():
                raise RunError(f"nothing to resume: {self.run.path} has no last.pt (start the run without --resume)")
            stored = self.run.read_config()
            diff = [k for k in config_diff(stored, self.config) if k not in RESUME_FREE_KEYS]
            if diff:
                raise RunError(f"--resume: the config differs from the run's {self.run.config} in: {', '.join(diff)}. "
                               "Resume with the same config (and --set values), or start a new run")
            if self.run.finished:
                raise RunError(f"{self.run.path} already finished (summary.json status "
                               f"{self.run.read_summary().get('status')!r}); nothing to resume")
        elif self.run.last.exists() or self.run.summary.exists():
            raise RunError(f"{self.run.path} already holds a run; continue it with --resume, or choose another "
                           "--out folder (or delete it)")

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _state(self, epoch: int, iteration: int, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "config": self.config,
            "epoch": int(epoch),                 # epochs completed (or the epoch in progress when partial)
            "iteration": int(iteration),         # steps done in the epoch in progress (0: at a boundary)
            "partial": partial,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "procedure": self.procedure.state_dict(),
            "rng": get_rng_state(),
            "best": dict(self.best),
            "bad_rounds": int(self.bad_rounds),
            "history": list(self.history),
            "preprocessing": self.preprocessing,
            "elapsed_train_s": float(self.elapsed_train_s),
            "notes": list(self.notes),
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.procedure.load_state_dict(state.get("procedure") or {})
        self.best = dict(state["best"])
        self.bad_rounds = int(state["bad_rounds"])
        self.history = list(state["history"])
        self.elapsed_train_s = float(state.get("elapsed_train_s", 0.0))
        for n in state.get("notes", []):
            if n not in self.notes:
                self.notes.append(n)
        self.start_epoch = int(state["epoch"])
        self.start_iteration = int(state["iteration"])
        self._partial = state.get("partial")
        self._rng_to_restore = state["rng"]
        where = f"epoch {self.start_epoch + 1}, step {self.start_iteration}" if self.start_iteration else \
            f"after epoch {self.start_epoch}"
        self.log(f"resuming {self.run.path} {where}")

    def save(self, path: Path, epoch: int, iteration: int = 0, partial: dict[str, Any] | None = None) -> None:
        save_training_state(path, self._state(epoch, iteration, partial))

    # -- one optimisation step -------------------------------------------------------------------------------------
    def backward_step(self, loss: torch.Tensor) -> None:
        """zero_grad, backward (scaled for float16), gradient clipping (``train.grad_clip``; nnU-Net: 12),
        optimiser step. Procedures with ``manual_optimization`` call this (or their own) themselves."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        clip = self.config["train"]["grad_clip"]
        params = [p for g in opt.param_groups for p in g["params"]]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if clip:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, float(clip))
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, float(clip))
            opt.step()

    def train_step(self, batches: Mapping[str, Any], info: StepInfo) -> tuple[StepOutput, bool]:
        """One optimisation step on host batches ``{key: batch}``: device transfer, the procedure's
        ``training_step`` under autocast, then backward and optimiser step (unless the procedure has
        ``manual_optimization``). Returns the step output with the loss and logs as Python floats, and
        False when the loss was not finite (the step is skipped: gradients cleared, weights unchanged)."""
        proc = self.procedure
        batches = {k: self.to_device(b) for k, b in batches.items()}
        with self.autocast():
            out = proc.training_step(self.model, batches, info)
        if not isinstance(out, StepOutput):
            raise TrainingError(f"{type(proc).__name__}.training_step must return a StepOutput, got "
                                f"{type(out).__name__}")
        loss_value = float(out.loss.detach().float())
        finite = math.isfinite(loss_value)
        if finite and not proc.manual_optimization:
            self.backward_step(out.loss)
        elif not finite:
            self.optimizer.zero_grad(set_to_none=True)
        logs = {k: float(v.detach().float()) if isinstance(v, torch.Tensor) else float(v) for k, v in out.logs.items()}
        n = out.n_samples if out.n_samples is not None else int(batches["main"]["image"].shape[0])
        return StepOutput(loss_value, logs, n), finite

    def train_batches(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The endless, seeded stream of ``{key: batch}`` of an epoch (``procedure.train_datasets()``)."""
        return self._batch_stream(self.train_sets, epoch)

    # -- the loop ------------------------------------------------------------------------------------------------------
    def _iterations_per_epoch(self) -> int:
        ipe = self.config["train"]["iterations_per_epoch"]
        if ipe:
            return int(ipe)
        main = self.train_sets["main"]
        bs = self.loader_batch_size("data")
        n = len(main) // bs if len(main) >= bs else 1
        return max(1, n)

    def request_stop(self) -> None:
        """Ask the loop to stop after the current step and save ``last.pt`` (what Ctrl-C does)."""
        self._stop_requested = True

    @contextlib.contextmanager
    def _sigint_handler(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            self.log("\nCtrl-C: stopping after this step and saving last.pt (press Ctrl-C again to abort "
                     "without saving)")

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def fit(self, stop_after_epoch: int | None = None) -> dict[str, Any]:
        """Train (from scratch or resumed), validate, select, test; returns the run summary.

        Args:
            stop_after_epoch: stop (as Ctrl-C would, saving ``last.pt``) once this many epochs are done; for
                tests and for splitting a long run into sessions. Raises :class:`TrainingInterrupted`.
        """
        self.setup()
        self._stop_after = stop_after_epoch
        with self._sigint_handler():
            status = self._train_loop(stop_after_epoch)
        return self._finish(status)

    def _train_loop(self, stop_after_epoch: int | None) -> str:
        from tqdm.auto import tqdm

        t = self.config["train"]
        max_epochs = int(t["epochs"])
        n_iter = self._iterations_per_epoch()
        bar = tqdm(total=max_epochs * n_iter, initial=self.start_epoch * n_iter + self.start_iteration,
                   disable=not self.show_progress, file=sys.stderr, dynamic_ncols=True, unit="step",
                   desc=self.config["name"], mininterval=0.5, leave=False)
        status = "completed"
        epoch = self.start_epoch
        try:
            while epoch < max_epochs:
                if self.bad_rounds and t["patience"] and self.bad_rounds >= int(t["patience"]):
                    status = "early_stopped"
                    break
                stop_now = self._run_epoch(epoch, n_iter, max_epochs, bar)
                if stop_now is not None:  # interrupted mid-epoch: state saved
                    raise stop_now
                epoch += 1
                if self._stop_requested or (stop_after_epoch is not None and epoch >= stop_after_epoch
                                            and epoch < max_epochs):
                    raise TrainingInterrupted(
                        f"stopped after epoch {epoch}/{max_epochs}; saved {self.run.last}", self.run.path, epoch, 0)
                if t["patience"] and self.bad_rounds >= int(t["patience"]):
                    status = "early_stopped"
                    self.log(f"early stopping: no improvement of {self.best['metric']} for {self.bad_rounds} "
                             f"validation round(s); best epoch {self.best['epoch']}")
                    break
        except TrainingInterrupted as exc:
            self._write_summary("interrupted", epoch=exc.epoch, extra={"iteration": exc.iteration})
            raise
        finally:
            bar.close()
        return status

    def _run_epoch(self, epoch: int, n_iter: int, max_epochs: int, bar) -> TrainingInterrupted | None:
        """One epoch, step by step as nnU-Net's ``run_training`` reads: start (or resume) the epoch, train its
        steps, then the epoch's row, validation and best-model selection, checkpoints and the log line.
        Returns the :class:`TrainingInterrupted` to raise when Ctrl-C stopped it mid-epoch (state saved)."""
        stream, start_it, acc = self._start_epoch(epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        interrupted = self._train_steps(epoch, n_iter, max_epochs, bar, stream, start_it, acc, lr)
        if interrupted is not None:
            return interrupted
        row = self._epoch_row(epoch, acc, lr)
        validated, improved = self._validate_and_select(epoch, max_epochs, row)
        row["best"] = improved
        self.history.append(row)
        self.procedure.on_epoch_end(epoch, row)
        self._save_epoch_checkpoints(epoch, max_epochs, improved)
        self.run.write_log(self.history)
        self._log_epoch(epoch, max_epochs, row, validated, improved, bar)
        return None

    def _start_epoch(self, epoch: int) -> tuple[Iterator[dict[str, Any]], int, dict[str, Any]]:
        """Seed the epoch, build its batch stream and, when resuming inside it, replay the batches already used
        and restore the accumulators and RNG states saved with ``last.pt`` (module docstring). Returns the
        stream, the first step to run and the epoch's accumulators."""
        seed_everything(_seed_of(self.config["seed"], "epoch", epoch))
        self.procedure.on_epoch_start(epoch)
        stream = self._batch_stream(self.train_sets, epoch)
        start_it = 0
        acc: dict[str, Any] = {"loss_sum": 0.0, "steps": 0, "samples": 0, "time": 0.0, "logs": {}}
        if epoch == self.start_epoch and self.start_iteration:
            start_it = self.start_iteration
            for _ in range(start_it):  # replay the data already used in this epoch
                next(stream)
            if self._partial:
                acc = dict(self._partial)
        if self._rng_to_restore is not None:
            if start_it:
                set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        self.start_iteration = 0
        return stream, start_it, acc

    def _train_steps(self, epoch: int, n_iter: int, max_epochs: int, bar, stream: Iterator[dict[str, Any]],
                     start_it: int, acc: dict[str, Any], lr: float) -> TrainingInterrupted | None:
        """The epoch's optimisation steps from ``start_it``; on Ctrl-C saves ``last.pt`` mid-epoch and returns
        the interruption."""
        self.model.train()
        nonfinite = 0
        for it in range(start_it, n_iter):
            t0 = time.perf_counter()
            info = StepInfo(epoch=epoch, iteration=it, iterations_per_epoch=n_iter, max_epochs=max_epochs,
                            global_step=epoch * n_iter + it)
            out, ok = self.train_step(next(stream), info)
            nonfinite = self._count_nonfinite(ok, nonfinite, epoch, it)
            if ok:
                acc["loss_sum"] += float(out.loss)
                acc["steps"] += 1
                for k, v in out.logs.items():
                    acc["logs"][k] = acc["logs"].get(k, 0.0) + float(v)
            acc["samples"] += out.n_samples
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            acc["time"] += time.perf_counter() - t0
            bar.update(1)
            if acc["steps"]:
                bar.set_postfix(epoch=f"{epoch + 1}/{max_epochs}", loss=f"{acc['loss_sum'] / acc['steps']:.4f}",
                                lr=f"{lr:.2e}", refresh=False)
            if self._stop_requested and it + 1 < n_iter:
                # the epoch's accumulators travel with the state; its time joins elapsed_train_s at its end
                self.save(self.run.last, epoch, it + 1, partial=dict(acc))
                return TrainingInterrupted(f"interrupted in epoch {epoch + 1} after step {it + 1}/{n_iter}; saved "
                                           f"{self.run.last}", self.run.path, epoch, it + 1)
        return None

    def _count_nonfinite(self, ok: bool, nonfinite: int, epoch: int, it: int) -> int:
        """Consecutive steps with a non-finite loss (those steps were skipped); ten in a row stop the run."""
        if ok:
            return 0
        nonfinite += 1
        self.note(f"non-finite loss at epoch {epoch + 1} step {it + 1}: step skipped")
        if nonfinite >= 10:
            raise TrainingError(f"the loss was not finite for {nonfinite} consecutive steps (epoch {epoch + 1}): "
                                "training diverged; lower optim.lr or check the data")
        return nonfinite

    def _epoch_row(self, epoch: int, acc: Mapping[str, Any], lr: float) -> dict[str, Any]:
        """Close the epoch's training part (time, learning-rate schedule) and start its log row."""
        self.elapsed_train_s += acc["time"]
        self.scheduler.step()
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr,
                               "train_loss": acc["loss_sum"] / acc["steps"] if acc["steps"] else float("nan")}
        for k, v in acc["logs"].items():
            row[f"train_{k}"] = v / max(acc["steps"], 1)
        row["epoch_time_s"] = acc["time"]
        row["samples_per_s"] = acc["samples"] / acc["time"] if acc["time"] > 0 else float("nan")
        return row

    def _validate_and_select(self, epoch: int, max_epochs: int, row: dict[str, Any]) -> tuple[bool, bool]:
        """Validate when it is due (adding the ``val_*`` columns to ``row``) and update the best model.
        Returns (validated, improved); without a validation set the latest model is the best."""
        validate = self.val_set is not None and ((epoch + 1) % int(self.config["train"]["val_every"]) == 0
                                                 or epoch + 1 == max_epochs)
        if validate:
            tv = time.perf_counter()
            rows, val_loss = self.evaluate("val", metrics=self.config["eval"]["val_metrics"], with_loss=True)
            agg = aggregate(rows)
            row["val_loss"] = val_loss
            for m in self.config["eval"]["val_metrics"]:
                row[f"val_{m}"] = agg.get(m, {}).get("mean", float("nan"))
            row["val_time_s"] = time.perf_counter() - tv
            improved = self._update_best(row, epoch + 1)
            self.model.train()
            return True, improved
        if self.val_set is None:
            self.best = {"metric": None, "value": None, "epoch": epoch + 1}
            return False, True
        return False, False

    def _save_epoch_checkpoints(self, epoch: int, max_epochs: int, improved: bool) -> None:
        """``best.pt`` when the model improved; ``last.pt`` every ``train.checkpoint_every`` epochs, after the
        last epoch and before a requested stop."""
        if improved:
            self.save(self.run.best, epoch + 1)
        every = int(self.config["train"]["checkpoint_every"])
        stopping = self._stop_requested or (self._stop_after is not None and epoch + 1 >= self._stop_after)
        if (epoch + 1) % every == 0 or epoch + 1 == max_epochs or stopping:
            self.save(self.run.last, epoch + 1)

    def _log_epoch(self, epoch: int, max_epochs: int, row: Mapping[str, Any], validated: bool, improved: bool,
                   bar) -> None:
        msg = f"epoch {epoch + 1}/{max_epochs}: loss {row['train_loss']:.4f}, {row['epoch_time_s']:.1f} s"
        if validated:
            sel = self._select_key()
            msg += f", {sel} {row.get(sel, float('nan')):.4f}" + (" (best)" if improved else "")
        if self.show_progress:
            bar.write(msg, file=sys.stderr)
        else:
            self.log(msg)

    def _select_key(self) -> str:
        m = self.config["train"]["select_metric"]
        return m if m.startswith("val_") else f"val_{m}"

    def _update_best(self, row: Mapping[str, Any], epoch: int) -> bool:
        key = self._select_key()
        value = row.get(key)
        if value is None:
            raise ConfigError(f"train.select_metric {self.config['train']['select_metric']!r} is not computed in "
                              f"validation (have: {', '.join(k for k in row if k.startswith('val_'))}); add it to "
                              "eval.val_metrics")
        mode = self.config["train"]["select_mode"]
        if mode == "auto":
            mode = "min" if any(s in key for s in LOWER_IS_BETTER) else "max"
        if not math.isfinite(value):
            self.bad_rounds += 1
            return False
        best = self.best.get("value")
        delta = float(self.config["train"]["min_delta"])
        better = best is None or (value > best + delta if mode == "max" else value < best - delta)
        if better:
            self.best = {"metric": key, "value": float(value), "epoch": epoch, "mode": mode}
            self.bad_rounds = 0
        else:
            self.bad_rounds += 1
        return better

    # -- evaluation ----------------------------------------------------------------------------------------------------
    def _activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Foreground probability ``(N, 1, ...)``: sigmoid of a 1-channel output, else softmax channel 1."""
        if logits.shape[1] == 1:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)[:, 1:2]

    def _predict_volume(self, image: torch.Tensor, spacing: Sequence[float] | None, key: str = "data") -> torch.Tensor:
        """Logits ``(1, C, *image spatial)`` of one 3D volume on its own grid (module docstring), by the engine's
        sliding-window inference (``network_predictor.sliding_window_3d``): one implementation of the windows,
        their Gaussian blending and the resampling for validation, tests and the shipped models."""
        from COVIDLesionSegLib.network_predictor import sliding_window_3d

        spec = self.spec(key)
        target = self.preprocessing.get(key, {}).get("target_spacing")

        def window(patch: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return self.procedure.predict_logits(self.model, patch).float()

        logits = sliding_window_3d(image.float(), window,
                                   patch_size=tuple(spec["transform_args"].get("patch_size", (56, 160, 192))),
                                   overlap=float(self.config["eval"]["overlap"]),
                                   batch_size=int(self.config["eval"]["batch_size"]), spacing=spacing,
                                   target_spacing=target, prepare=lambda x: self.to_device({"x": x[None]})["x"])
        return logits[None]

    @torch.no_grad()
    def evaluate(self, subset: str = "test", metrics: Sequence[str] | None = None, with_loss: bool = False,
                 unit: str | None = None, data: str = "data") -> tuple[list[dict[str, Any]], float]:
        """Predict ``subset`` of a data set with the current model; per-case (or per-group) metric rows and the
        mean loss (NaN unless ``with_loss``).

        ``data`` is the config key of the data set: ``"data"`` (the target data, split by the protocol) or
        ``"aux_data.<name>"`` with ``subset="all"`` (a second test set, e.g. 004's Radiopaedia volumes).
        """
        if self._spatial_dims() == 3 and self.engine_predictor(data):
            return self._evaluate_engine(subset, data, list(metrics or self.config["eval"]["metrics"]), with_loss)
        if subset == "val" and data == "data":
            dataset = self.val_set
        else:
            dataset = self.dataset(data, subset, train_transforms=False)
        if dataset is None:
            return [], float("nan")
        metrics = list(metrics or self.config["eval"]["metrics"])
        unit = unit or self.config["eval"]["unit"]
        ev = self.config["eval"]
        target = self.spec(data)["target"]
        model = self.model
        model.eval()
        dims = self._spatial_dims()
        if dims == 3 and unit == "group":
            unit = "case"  # volumes are scored one by one; "group" stacks 2D slices into volumes
        losses: list[float] = []
        results: list[tuple[str, str, np.ndarray, np.ndarray, tuple[float, ...] | None]] = []
        n = len(dataset)
        bs = int(ev["batch_size"]) if dims == 2 else 1
        for start in range(0, n, bs):
            items = [dataset[i] for i in range(start, min(start + bs, n))]
            if dims == 2:
                x = torch.stack([torch.as_tensor(it["image"]) for it in items])
                xb = self.to_device({"x": x})["x"]
                with self.autocast():
                    logits = self.procedure.predict_logits(model, xb)
                logits = logits.float()
            else:
                it0 = items[0]
                logits = self._predict_volume(torch.as_tensor(it0["image"]), it0.get("spacing"), key=data)
                spacings = [tuple(float(s) for s in it0["spacing"]) if it0.get("spacing") is not None else None]
            y = torch.stack([torch.as_tensor(it[target]) for it in items]).to(logits.device)
            if with_loss:
                losses.append(float(self.procedure.validation_loss(logits, y)) * len(items))
            prob = self._activation(logits)
            pred = (prob >= float(ev["threshold"])).cpu().numpy()[:, 0]
            ref = (y > 0.5).cpu().numpy()[:, 0]
            for k, it in enumerate(items):
                if dims == 2:
                    p_k, r_k, sp_k = self._score_2d(data, str(it.get("id")), prob[k, 0], pred[k], ref[k])
                else:
                    p_k, r_k, sp_k = pred[k], ref[k], spacings[k]
                results.append((str(it.get("id")), str(it.get("group")), p_k, r_k, sp_k))
        model.train()
        rows = self._metric_rows(results, metrics, float(ev["tau_mm"]), unit, ev["empty_rule"])
        loss = sum(losses) / n if with_loss and n else float("nan")
        return rows, loss

    # -- evaluation through the deployed predictor -------------------------------------------------------------
    def engine_predictor(self, key: str = "data") -> bool:
        """Whether 3D volumes of data set ``key`` are scored through the engine's infection model
        (``eval.predictor``). ``auto``: yes for a 3D infection run on HU volumes (no case of the data set is
        pre-windowed or 8-bit) whose nnU-Net preprocessing maps HU to the network (a fitted or given target
        spacing and intensity mapping: what the exported checkpoint's input spec needs) and whose model
        selection does not need a validation loss (the engine gives no logits); else the training network's
        own sliding window (:meth:`_predict_volume`). ``engine`` / ``network`` force one."""
        setting = self.config["eval"]["predictor"]
        if setting != "auto":
            return setting == "engine"
        if key in self._engine_choice:
            return self._engine_choice[key]
        spec = self.spec(key)
        data_spec = self.spec("data")
        ok = (self._spatial_dims() == 3 and self.config["task"] == "infection"
              and spec["transforms"] == "nnunet_3d" and data_spec["transforms"] == "nnunet_3d"
              and "loss" not in self._select_key()
              and not any(ds.WINDOWED_0_255 in c.notes or ds.NOT_HU in c.notes for c in self.cases_of(key)))
        if ok:
            prep = self._prepare_3d("data", data_spec)
            ok = prep.get("target_spacing") is not None and isinstance(prep.get("intensity"), Mapping)
        self._engine_choice[key] = ok
        return ok

    def engine_checkpoint(self):
        """The current weights as the engine checkpoint :func:`training.export.export_run` would write for
        them (``training.export.make_checkpoint``: the same fields and file format, read back in memory)."""
        from training.export import make_checkpoint

        if self._spatial_dims() == 3 and self.spec("data")["transforms"] == "nnunet_3d":
            self._prepare_3d("data", self.spec("data"))
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return make_checkpoint(self.config, state, self.preprocessing, epoch=len(self.history), best=self.best,
                               which="current", run_path=self.run.path)

    def _evaluate_engine(self, subset: str, data: str, metrics: Sequence[str], with_loss: bool
                         ) -> tuple[list[dict[str, Any]], float]:
        """:meth:`evaluate` through the deployed predictor: the current weights as an engine checkpoint
        (:meth:`engine_checkpoint`) run by ``NetworkInfectionModel`` on each whole HU volume (lung box +
        margin, resampling to the checkpoint's spacing, intensity mapping, sliding window with Gaussian
        blending, the checkpoint's post-processing) and thresholded inside the lungs
        (``pipeline.infection_mask``), scored on the volume's own grid. The lungs are the case's ``lung``
        label where it has one (a synthetic case: the mask its lesions were drawn in), else the engine's
        Hounsfield-unit lung model's. No loss (the engine gives probabilities, not logits): NaN."""
        from COVIDLesionSegLib.network_predictor import NetworkInfectionModel
        from COVIDLesionSegLib.pipeline import infection_mask

        cases = self.subset_cases(data, subset)
        if subset == "val" and self.config["eval"]["max_val_cases"]:
            cases = _evenly(cases, int(self.config["eval"]["max_val_cases"]))
        if not cases:
            return [], float("nan")
        if with_loss:
            self.note("validation through the engine has no loss (val_loss is NaN); select on a metric")
        ev = self.config["eval"]
        target = self.spec(data)["target"]
        self.model.eval()
        net = NetworkInfectionModel(self.engine_checkpoint(), device=self.device, batch_size=int(ev["batch_size"]),
                                    overlap=float(ev["overlap"]), output="mask")   # the pipeline's choice
        results = []
        for case in cases:
            keys = [target] + (["lung"] if "lung" in case.labels and target != "lung" else [])
            loaded = ds.load_case(case, keys)
            hu = np.asarray(loaded["image"], dtype=np.float32)[0]
            spacing = tuple(float(v) for v in loaded["spacing"])
            if "lung" in keys:
                lungs = np.asarray(loaded["lung"])[0] > 0
            else:
                lungs = self._engine_lungs(hu, spacing)
            pred = infection_mask(hu, lungs, net, spacing_zyx=spacing)
            results.append((case.id, case.group, pred, np.asarray(loaded[target])[0] > 0, spacing))
        self.model.train()
        rows = self._metric_rows(results, metrics, float(ev["tau_mm"]), "case", ev["empty_rule"])
        return rows, float("nan")

    def _engine_lungs(self, hu: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """The engine's Hounsfield-unit lung mask of a volume without a lung label."""
        import SimpleITK as sitk

        from COVIDLesionSegLib.predictor import HULungModel
        from COVIDLesionSegLib.volume import CTVolume

        self.note("cases without a lung label are scored inside the engine's Hounsfield-unit lung mask")
        image = sitk.GetImageFromArray(hu)
        image.SetSpacing(tuple(float(s) for s in reversed(spacing)))
        return HULungModel().segment(CTVolume.from_image(image)) > 0

    def _score_2d(self, key: str, item_id: str, prob: torch.Tensor, pred: np.ndarray, ref: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]:
        """``(prediction, reference, spacing)`` of one 2D evaluation item, on the grid ``eval.grid`` names.

        ``network``: the network's input grid; the spacing is the native pixel spacing scaled by the resize
        (so NSD's tolerance and HD95 are in mm whenever the slice's spacing is known - slices cut from HU
        volumes, MedSeg - and in pixels of that grid only for the 8-bit 2D sets, which carry none).
        ``native``: the probability is resized back to the item's native pixels (its lung-box crop, pasted
        into the whole slice, background outside the box) and scored against the uncropped reference, so the
        numbers are those of the slice the user gave, not of a 352-px crop."""
        geo = self._native_geometry(key, item_id)
        native = geo["spacing"]
        box = geo["box"]
        crop_hw = (box[0][1] - box[0][0], box[1][1] - box[1][0]) if box else tuple(geo["shape"])
        if self.config["eval"]["grid"] == "network":
            spacing = None if native is None else tuple(float(native[a]) * crop_hw[a] / pred.shape[a] for a in range(2))
            return pred, ref, spacing
        from COVIDLesionSegLib.preprocessing import resize_slices

        p_crop = resize_slices(prob.detach().float().cpu()[None, None], crop_hw, mode="bilinear")[0, 0]
        p_crop = np.asarray(p_crop) >= float(self.config["eval"]["threshold"])
        full = np.zeros(tuple(geo["shape"]), dtype=bool)
        if box:
            full[box[0][0]:box[0][1], box[1][0]:box[1][1]] = p_crop
        else:
            full[...] = p_crop
        return full, self._native_reference(key, geo), native

    @staticmethod
    def _metric_rows(results, metrics: Sequence[str], tau: float, unit: str,
                     empty_rule: str | None = None) -> list[dict[str, Any]]:
        if unit == "case":
            return [_empty_rule({"case": cid, "group": grp, **case_metrics(p, r, spacing=sp_, tau_mm=tau, which=metrics)},
                                p, r, empty_rule)
                    for cid, grp, p, r, sp_ in results]
        groups: dict[str, list] = {}
        for res in results:
            groups.setdefault(res[1], []).append(res)
        rows = []
        overlap = [m for m in metrics if m not in SURFACE_METRICS]
        surface = [m for m in metrics if m in SURFACE_METRICS]
        for grp, members in groups.items():
            p = np.stack([m[2] for m in members])
            r = np.stack([m[3] for m in members])
            row: dict[str, Any] = {"case": f"group_{grp}", "group": grp, "n_slices": len(members)}
            if overlap:
                row.update(case_metrics(p, r, which=overlap))
            for m in surface:
                vals = [case_metrics(mm[2], mm[3], spacing=mm[4], tau_mm=tau, which=[m])[m] for mm in members]
                vals = [v for v in vals if not math.isnan(v)]
                row[m] = float(np.mean(vals)) if vals else float("nan")
            row = _empty_rule(row, p, r, empty_rule)
            rows.append({k: row[k] for k in ["case", "group", "n_slices"] + [m for m in METRIC_NAMES if m in row]})
        return rows

    # -- the end ---------------------------------------------------------------------------------------------------
    def _finish(self, status: str) -> dict[str, Any]:
        test_agg: dict[str, Any] = {}
        if self.config["eval"]["test"] and self.split.test:
            state = load_training_state(self.run.best if self.run.best.exists() else self.run.last)
            self.model.load_state_dict(state["model"])
            self.log(f"testing the model of epoch {state['epoch']} on {self._describe_test_set()}")
            rows, _ = self.evaluate("test")
            test_agg = aggregate(rows)
            self.run.write_test_metrics(rows, test_agg)
        return self._write_summary(status, epoch=len(self.history), test=test_agg)

    def _describe_test_set(self) -> str:
        """What the test set is, for the log: a 2D data set's cases are slices, counted with their volume groups
        (the unit ``eval.unit: group`` scores); a 3D data set's cases are volumes."""
        cases = self.split.select(self.cases_of("data"), "test")
        if cases and all(c.dim == 2 for c in cases):
            return f"{len(cases)} slice(s) of {len({c.group for c in cases})} volume group(s)"
        return f"{len(cases)} volume(s)"

    def _write_summary(self, status: str, epoch: int, test: Mapping[str, Any] | None = None,
                       extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        times = [r["epoch_time_s"] for r in self.history if r.get("epoch_time_s") is not None]
        sps = [r["samples_per_s"] for r in self.history if r.get("samples_per_s") is not None]
        split = self.split
        summary = {
            "name": self.config["name"],
            "description": self.config["description"],
            "paper": self.config["paper"],
            "procedure": self.config["procedure"]["name"],
            "arch": self.config["model"]["arch"],
            "protocol": self.config["protocol"]["name"],
            "fold": int(self.config["protocol"]["fold"]),
            "status": status,
            "epochs_completed": int(epoch),
            "max_epochs": int(self.config["train"]["epochs"]),
            "iterations_per_epoch": self._iterations_per_epoch(),
            "best": dict(self.best),
            "mean_epoch_time_s": float(np.mean(times)) if times else None,
            "train_time_s": self.elapsed_train_s,
            "mean_samples_per_s": float(np.mean(sps)) if sps else None,
            "device": str(self.device),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "none",
            "n_train": len(split.train) if split else None,
            "n_val": len(split.val) if split else None,
            "n_test": len(split.test) if split else None,
            "train_groups": sorted({c.group for c in self.split.select(self.cases_of("data"), "train")}) if split else [],
            "test_mean": {k: v.get("mean") for k, v in (test or {}).items() if k in METRIC_NAMES},
            "test": dict(test or {}),
            "notes": list(self.notes),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        summary.update(extra or {})
        self.run.write_summary(summary)
        return summary


def _empty_rule(row: dict[str, Any], pred: np.ndarray, ref: np.ndarray, rule: str | None) -> dict[str, Any]:
    """004's rule for scoring units without a predicted lesion (``eval.empty_rule``), applied to a metric row.

    004 (after eqs. 2-4): "When TP + FP = 0 the model has correctly identified that the input does not have
    any positive pixel and in that case all metrics are set to 1". ``no_positive_prediction`` is that
    condition as written (nothing predicted, whatever the reference: a missed lesion then also scores 1);
    ``both_empty`` is the reading its justification gives (nothing predicted *and* nothing to find). 004
    reports only higher-is-better metrics; the error metrics (VOE, RVD, HD95) get their perfect value 0.
    ``None`` (the default) keeps the project's metrics (module docstring of ``COVIDLesionSegLib.metrics``).
    """
    if rule is None or np.any(pred) or (rule == "both_empty" and np.any(ref)):
        return row
    return {k: (v if k not in METRIC_NAMES else 0.0 if k in LOWER_IS_BETTER else 1.0) for k, v in row.items()}


def _evenly(items: Sequence[Any], n: int) -> list[Any]:
    if len(items) <= n:
        return list(items)
    idx = np.unique(np.round(np.linspace(0, len(items) - 1, n)).astype(int))
    return [items[i] for i in idx]


def run_dir_for(config: Mapping[str, Any], out: str | os.PathLike, fold_dir: bool = False) -> Path:
    """``OUT/<name>`` (``OUT/<name>/fold<k>`` with ``fold_dir``)."""
    base = Path(out) / str(config["name"])
    return base / f"fold{int(config['protocol']['fold'])}" if fold_dir else base


__all__ = ["PIPELINES", "READERS", "Trainer", "TrainingError", "TrainingInterrupted", "load_cases", "make_split",
           "protocol_folds", "run_dir_for", "seed_everything"]
