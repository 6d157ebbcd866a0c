"""Experiment configs: YAML or JSON files (``training/configs/``) with ``extends``, validated against a schema.

A config is a nested mapping. :func:`load_config` reads a file, follows its ``extends`` chain (a path or a
list of paths, relative to the file that names them; later entries win, the file itself wins over all),
applies ``--set key.path=value`` overrides, fills in defaults and validates the result: an unknown key is an
error that names the key, the file and the closest known key ("did you mean ..."). A value whose type does
not match its default (``train.epochs: "ten"``) is an error too. The result is a plain ``dict`` (JSON-able;
it is copied into every run folder as ``config.json``).

Merging: dicts merge key by key (deep); any other value (lists included) replaces. A dict holding
``_replace: true`` replaces the inherited dict instead of merging (e.g. ``model.args`` of a different
architecture).

Paths in ``data.root``/``aux_data.*.root``/``model.init``/``protocol.split_file`` may use ``${SHARED_DATA}``
(``COVIDLESIONSEG_SHARED_DATA`` or ``../shared/data`` beside the checkout, as ``Testing/conftest.py``),
``${REPO}`` (the checkout) and ``${CONFIG_DIR}`` (the folder of the file that sets the value), and any
environment variable; relative paths are relative to the current directory.

Schema (section -> key: default). Free-form sections (``model.args``, ``*.reader_args``, ``*.transform_args``,
``*.val_transform_args``, ``loss.args``, ``protocol.args``, ``export.*``) are checked where they are used
(builder signatures); ``procedure`` keys other than ``name`` are the procedure's own options, validated by
the procedure class (:attr:`training.procedures.Procedure.options`)::

    name: <file stem>        description: ""      paper: ""       seed: 0       task: infection | lungs
    procedure: {name: supervised, ...procedure options}
    model:     {arch, args: {}, init: null (engine or training checkpoint to start from), init_strict: true,
                init_preprocessing: true (3D: reuse model.init's spacing and z-score, see Trainer._prepare_3d)}
    data:      DATASET (the target / COVID-19 data)
    aux_data:  {name: DATASET, ...}  (extra data sets a procedure uses, e.g. non-COVID lesions)
    protocol:  {name: all | fixed | ctseg2d | ctseg2d_kfold | covid19ctseg | kfold | holdout, fold: 0, n_folds: 5, seed: 0,
                val_fraction: 0.0, train/val/test: null (id lists for "fixed"), split_file: null, args: {}}
    optim:     {name: sgd | adam | adamw, lr: 0.01, momentum: 0.99, nesterov: true, weight_decay: 3e-5,
                betas: [0.9, 0.999], eps: 1e-8}
    schedule:  {name: poly | step | constant | cosine, power: 0.9, step_size: 50, gamma: 0.1, min_lr: 0.0}
    loss:      {name: dice_ce | soft_dice | structure, args: {}}
    train:     {epochs, iterations_per_epoch: null (= one pass over the training data), batch_size: 2,
                grad_clip: 12.0, amp: auto | fp16 | bf16 | none, channels_last: auto | true | false,
                deterministic: true, num_threads: null, val_every: 1, select_metric: dsc | val_loss | ...,
                select_mode: auto | max | min (auto: min for losses and errors), patience: null (early
                stopping off; counted in validation rounds), min_delta: 0.0,
                checkpoint_every: 1, progress: true}
    eval:      {metrics: [dsc, nsd, sensitivity, specificity, precision, f1, accuracy, voe, rvd],
                val_metrics: [dsc], tau_mm: 3.0, threshold: 0.5, unit: case | group, test: true,
                batch_size: 4, overlap: 0.5, max_val_cases: null, grid: network | native (2D: score at the
                network's input size, or on each slice's native grid - see Trainer.evaluate),
                empty_rule: null | both_empty | no_positive_prediction (004's "all metrics 1" rule),
                predictor: auto | engine | network (3D: score through the engine's infection model, or the
                training network's own sliding window; auto = engine for 3D infection runs on HU volumes,
                see Trainer.evaluate)}
    export:    {model_id: null, version: "1", description: "", input: {}, labels: null, output: {},
                provenance: {}}

    DATASET:   {reader, root, reader_args: {}, target: infection, extra_targets: [],
                max_cases_per_group: null, groups: null, slice: false, slice_positive: null,
                transforms: slice_2d | nnunet_3d | bizopoulos_004 | ncovsegnet, transform_args: {},
                val_transform_args: {}, cache: memory | disk | none, num_workers: 0}
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

# Defined in the leaf module training.paths (the procedures import it there, not from here, so that this module
# may validate the procedures' options without an import circle); re-exported because callers know them here.
from training.paths import CONFIG_DIR, REPO_ROOT, ConfigError, expand_path, shared_data_dir

__all__ = ["CONFIG_DIR", "REPO_ROOT", "ConfigError", "expand_path", "shared_data_dir", "load_config",
           "config_from_dict", "validate", "dump_config", "config_diff", "get", "deep_merge", "apply_overrides",
           "resolve_config_path"]


# ----------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------

#: Marker for keys whose value is a free-form mapping (checked where it is used).
FREE = {"__free__": True}

DATASET_DEFAULTS: dict[str, Any] = {
    "reader": None,             # key of training.trainer.READERS (covid19ctseg2d, covid19ctseg, msd, lidc, ...)
    "root": None,               # folder of the data set
    "reader_args": FREE,        # extra keywords of the reader
    "target": "infection",      # label the network learns
    "extra_targets": [],        # further labels to load (e.g. "lung" for 004's lesion B input masking)
    "max_cases_per_group": None,  # CPU sizes: keep this many evenly spaced cases (slices) per group
    "groups": None,             # keep only these groups (list of group ids as strings)
    "slice": False,             # cut 3D volumes into 2D slice items (2D models on 3D data)
    "slice_positive": None,     # with slice: keep only slices where this label has foreground
    "crop_lungs": False,        # with slice: crop each 3D HU volume to its lungs' box before slicing (003)
    "transforms": "slice_2d",   # key of training.trainer.PIPELINES
    "transform_args": FREE,     # keywords of the pipeline factory (training part)
    "val_transform_args": FREE,  # overrides for the evaluation pipeline
    "cache": "memory",          # memory | disk | none
    "num_workers": 0,
}

DEFAULTS: dict[str, Any] = {
    "name": None,
    "description": "",
    "paper": "",
    "seed": 0,
    "task": "infection",
    "procedure": {"name": "supervised", "__procedure__": True},
    "model": {"arch": None, "args": FREE, "init": None, "init_strict": True, "init_preprocessing": True},
    "data": DATASET_DEFAULTS,
    "aux_data": {"__mapping_of__": DATASET_DEFAULTS},
    "protocol": {"name": "all", "fold": 0, "n_folds": 5, "seed": 0, "val_fraction": 0.0, "train": None,
                 "val": None, "test": None, "split_file": None, "args": FREE},
    "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5,
              "betas": [0.9, 0.999], "eps": 1e-8},
    "schedule": {"name": "poly", "power": 0.9, "step_size": 50, "gamma": 0.1, "min_lr": 0.0},
    "loss": {"name": "dice_ce", "args": FREE},
    "train": {"epochs": 1000, "iterations_per_epoch": None, "batch_size": 2, "grad_clip": 12.0, "amp": "auto",
              "channels_last": "auto", "deterministic": True, "num_threads": None, "val_every": 1,
              "select_metric": "dsc", "select_mode": "auto", "patience": None, "min_delta": 0.0,
              "checkpoint_every": 1, "progress": True},
    "eval": {"metrics": ["dsc", "nsd", "sensitivity", "specificity", "precision", "f1", "accuracy", "voe", "rvd"],
             "val_metrics": ["dsc"], "tau_mm": 3.0, "threshold": 0.5, "unit": "case", "test": True,
             "batch_size": 4, "overlap": 0.5, "max_val_cases": None, "grid": "network", "empty_rule": None,
             "predictor": "auto"},
    "export": {"model_id": None, "version": "1", "description": "", "input": FREE, "labels": None,
               "output": FREE, "provenance": FREE},
}

CHOICES: dict[str, tuple[str, ...]] = {
    "task": ("infection", "lungs"),
    "protocol.name": ("all", "fixed", "ctseg2d", "ctseg2d_kfold", "covid19ctseg", "kfold", "holdout"),
    "optim.name": ("sgd", "adam", "adamw"),
    "schedule.name": ("poly", "step", "constant", "cosine"),
    "loss.name": ("dice_ce", "soft_dice", "structure"),
    "train.amp": ("auto", "fp16", "bf16", "none"),
    "train.select_mode": ("auto", "max", "min"),
    "eval.unit": ("case", "group"),
    "eval.grid": ("network", "native"),
    "eval.predictor": ("auto", "engine", "network"),
    "eval.empty_rule": ("both_empty", "no_positive_prediction"),
    "data.cache": ("memory", "disk", "none"),
}

#: Keys holding paths that get ``${...}`` expansion.
PATH_KEYS = ("data.root", "model.init", "protocol.split_file")


# ----------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------

def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        hint = ""
        if not path.is_absolute() and (CONFIG_DIR / path).is_file():
            hint = f" (did you mean {CONFIG_DIR / path}?)"
        raise ConfigError(f"config file not found: {path}{hint}")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:  # pragma: no cover - pyyaml is a dependency of training
                raise ConfigError(f"{path}: reading YAML configs needs PyYAML (pip install pyyaml), or use JSON") from None
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"{path}: unsupported config type {path.suffix!r}; use .yaml, .yml or .json")
    except ConfigError:
        raise
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise ConfigError(f"{path}: malformed config file: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping at the top level, got {type(data).__name__}")
    return data


def resolve_config_path(path: str | os.PathLike) -> Path:
    """``path`` as given, else relative to ``training/configs`` (so ``ctseg2d_supervised_cpu.yaml`` works)."""
    p = Path(path)
    if p.is_file():
        return p.resolve()
    for candidate in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml", CONFIG_DIR / f"{p}.json"):
        if candidate.is_file():
            return candidate.resolve()
    return p


def _expand_dirs(data: Any, config_dir: Path) -> Any:
    """Replace ``${CONFIG_DIR}`` now (it depends on the file the value comes from)."""
    if isinstance(data, str):
        return data.replace("${CONFIG_DIR}", str(config_dir))
    if isinstance(data, list):
        return [_expand_dirs(v, config_dir) for v in data]
    if isinstance(data, dict):
        return {k: _expand_dirs(v, config_dir) for k, v in data.items()}
    return data


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base`` (module docstring: dicts deep, the rest replaces)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and value.get("_replace"):
            out[key] = {k: copy.deepcopy(v) for k, v in value.items() if k != "_replace"}
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_chain(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p.name) for p in seen + (path,))
        raise ConfigError(f"config 'extends' cycle: {chain}")
    data = _expand_dirs(_read_file(path), path.parent)
    parents = data.pop("extends", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: 'extends' must be a path or a list of paths, got {parents!r}")
    merged: dict[str, Any] = {}
    for parent in parents:
        ppath = Path(parent)
        if not ppath.is_absolute():
            ppath = path.parent / ppath
        if not ppath.is_file():
            raise ConfigError(f"{path}: 'extends' names {parent!r}, which does not exist ({ppath})")
        merged = deep_merge(merged, _load_chain(ppath, seen + (path,)))
    return deep_merge(merged, data)


# ----------------------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------------------

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML/JSON scalars and lists (``3``, ``1e-3``, ``true``, ``null``, ``[1, 2]``), else
    the string itself."""
    if _FLOAT.match(text.strip()) and not text.strip().lstrip("+-").isdigit():
        return float(text)
    try:
        import yaml

        return yaml.safe_load(text)
    except Exception:
        try:
            return json.loads(text)
        except Exception:
            return text


def apply_overrides(config: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (``--set``) to a copy of ``config``."""
    out = copy.deepcopy(config)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. train.epochs=5), got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set: empty key in {item!r}")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = parse_value(raw)
    return out


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------

def _unknown(key: str, where: str, known: Sequence[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{source}: unknown key {where + key!r}{hint} (known keys: {', '.join(sorted(known))})")


def _type_ok(value: Any, default: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, (str, bool)) if default in ("auto",) else isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list)
    return True


def _fill(schema: Mapping[str, Any], data: Mapping[str, Any], where: str, source: str) -> dict[str, Any]:
    """Defaults of ``schema`` updated with ``data``, checked recursively."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {where.rstrip('.') or 'the config'} must be a mapping, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key in data:
        if key not in schema:
            raise _unknown(key, where, [k for k in schema if not k.startswith("__")], source)
    for key, default in schema.items():
        present = key in data
        value = data[key] if present else ({} if isinstance(default, Mapping) else copy.deepcopy(default))
        out[key] = _fill_value(default, value, present, where + key, source)
    return out


def _fill_value(default: Any, value: Any, present: bool, full: str, source: str) -> Any:
    """One schema entry: a free-form mapping, a mapping of data set specs, the procedure, a nested section, or
    a plain value checked against its default's type."""
    if default is FREE:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {full} must be a mapping, got {value!r}")
        return copy.deepcopy(dict(value))
    if isinstance(default, Mapping) and "__mapping_of__" in default:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {full} must map names to data set specs, got {value!r}")
        return {name: _fill(default["__mapping_of__"], spec, f"{full}.{name}.", source) for name, spec in value.items()}
    if isinstance(default, Mapping) and default.get("__procedure__"):
        if not present:
            value = {"name": "supervised"}
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, Mapping) or not isinstance(value.get("name", "supervised"), str):
            raise ConfigError(f"{source}: {full} must be a procedure name or {{name: ..., options}}, got {value!r}")
        return {"name": "supervised", **copy.deepcopy(dict(value))}
    if isinstance(default, Mapping):
        return _fill(default, value if value is not None else {}, full + ".", source)
    if isinstance(default, float) and isinstance(value, str) and _FLOAT.match(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    if not _type_ok(value, default):
        raise ConfigError(f"{source}: {full} must be a {type(default).__name__} (default {default!r}), got {value!r}")
    return copy.deepcopy(value)


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for p in dotted.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node


def get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``; ``default`` when a level is missing."""
    value = _get(config, dotted)
    return default if value is None else value


def validate(config: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Fill defaults and check keys, types and choices; returns the complete config.

    Procedure options are checked by :func:`training.procedures.validate_procedure_options` (the procedure
    registry lives there), called from here so that every loaded config is fully checked.
    """
    out = _fill(DEFAULTS, config, "", source)
    for dotted, choices in CHOICES.items():
        value = _get(out, dotted)
        if value is not None and value not in choices:
            raise ConfigError(f"{source}: {dotted} must be one of {', '.join(choices)}, got {value!r}")
    for name, spec in out["aux_data"].items():
        if spec["cache"] not in CHOICES["data.cache"]:
            raise ConfigError(f"{source}: aux_data.{name}.cache must be one of {CHOICES['data.cache']}")
    _check_train(out["train"], source)
    if out["optim"]["lr"] <= 0:
        raise ConfigError(f"{source}: optim.lr must be > 0, got {out['optim']['lr']}")
    _check_metrics_and_model(out, source)
    for spec_where, spec in [("data", out["data"])] + [(f"aux_data.{n}", s) for n, s in out["aux_data"].items()]:
        if spec["reader"] is None or spec["root"] is None:
            raise ConfigError(f"{source}: {spec_where}.reader and {spec_where}.root are required")
    from .procedures import validate_procedure_options

    out["procedure"] = validate_procedure_options(out["procedure"], source)
    return out


def _check_train(train: Mapping[str, Any], source: str) -> None:
    """The ``train`` section's values that the schema's types cannot check."""
    if train["channels_last"] not in ("auto", True, False):
        raise ConfigError(f"{source}: train.channels_last must be auto, true or false, got {train['channels_last']!r}")
    for key in ("epochs", "batch_size", "val_every", "checkpoint_every"):
        if train[key] is None or train[key] < 1:
            raise ConfigError(f"{source}: train.{key} must be a positive integer, got {train[key]!r}")
    ipe = train["iterations_per_epoch"]
    if ipe is not None and (not isinstance(ipe, int) or ipe < 1):
        raise ConfigError(f"{source}: train.iterations_per_epoch must be a positive integer or null, got {ipe!r}")
    if train["patience"] is not None and (not isinstance(train["patience"], int) or train["patience"] < 1):
        raise ConfigError(f"{source}: train.patience must be a positive integer or null, got {train['patience']!r}")


def _check_metrics_and_model(out: Mapping[str, Any], source: str) -> None:
    """Metric names and the architecture exist (the engine's metrics and model registry)."""
    from COVIDLesionSegLib.metrics import METRIC_NAMES

    for key in ("metrics", "val_metrics"):
        bad = [m for m in out["eval"][key] if m not in METRIC_NAMES]
        if bad:
            raise ConfigError(f"{source}: eval.{key} has unknown metric(s) {bad}; choose from {list(METRIC_NAMES)}")
    if out["model"]["arch"] is None:
        raise ConfigError(f"{source}: model.arch is required (a registered architecture id)")
    from COVIDLesionSegLib.models import architectures

    archs = architectures()
    if out["model"]["arch"] not in archs:
        raise ConfigError(f"{source}: model.arch {out['model']['arch']!r} is not a registered architecture; known: "
                          f"{', '.join(sorted(archs))}")


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), validate_it: bool = True) -> dict[str, Any]:
    """Read ``path`` (YAML or JSON, following ``extends``), apply ``--set`` overrides, validate.

    Raises:
        ConfigError: missing or malformed file, ``extends`` cycle, unknown key, wrong type or choice.
    """
    p = resolve_config_path(path)
    raw = _load_chain(p, ())
    raw = apply_overrides(raw, overrides)
    if raw.get("name") is None:
        raw["name"] = p.stem
    if not validate_it:
        return raw
    return validate(raw, source=str(p))


def config_from_dict(data: Mapping[str, Any], overrides: Iterable[str] = (), source: str = "config") -> dict[str, Any]:
    """Validate an in-memory config (tests, ``cv``); ``extends`` is resolved relative to ``training/configs``."""
    data = dict(copy.deepcopy(data))
    parents = data.pop("extends", None)
    if parents:
        merged: dict[str, Any] = {}
        for parent in [parents] if isinstance(parents, str) else parents:
            merged = deep_merge(merged, _load_chain(resolve_config_path(parent), ()))
        data = deep_merge(merged, data)
    data = apply_overrides(data, overrides)
    data.setdefault("name", "run")
    return validate(data, source=source)


def dump_config(config: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``config`` as JSON (every config is JSON-able)."""
    Path(path).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out
