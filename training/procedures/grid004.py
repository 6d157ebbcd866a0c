"""The comparison grid of 004 (Bizopoulos et al.): lung / lesion A / lesion B over decoders x encoders x init.

One run trains one grid model (``grid_unet``/``grid_linknet``/``grid_fpn``/``grid_pspnet`` with
``model.args.encoder``) the 004 way: Soft Dice loss (eq. 1), Adam lr 1e-3, batch 2, 200 epochs, the
augmentation of ``transforms.bizopoulos_004_transforms`` (flips, rotation +-180 deg, scale 0.5-1.5 with
zero padding; normalisation mu = -500, sigma = 500), 80/20 train/validation split of the MedSeg slices
with the model of the lowest validation loss kept, and a test on a separate data set (004: the 829 slices
of the 9 MedSeg Radiopaedia volumes). These are config values (``configs/grid004_medseg.yaml``); the
procedure adds:

- ``experiment``: ``lung`` (lung segmentation), ``lesion_a`` (lesion from the CT slice) or ``lesion_b``
  (lesion from the CT slice multiplied by the lung mask: ``transform_args.mask_input_with: lung``); the
  procedure checks that the data pipeline matches the experiment;
- ``init``: ``random`` or ``imagenet``. ImageNet weights are read from a local torchvision file
  (``imagenet_weights``; ResNet encoders, ``models/pretrained.py``) - nothing is downloaded, and
  ``imagenet`` without a file is an error (the sweep leaves ImageNet rows out when no file is given);
- ``test_data``: the ``aux_data`` entry to test on after training (the trainer tests only on the target
  data's split; 004's test set is another data set). :func:`run_grid` tests the best model on it and
  writes ``test_metrics.*`` and ``summary.json``'s test fields, so ``python -m training table`` reads
  them like any run's;
- ``grid``: the sweep, ``{decoders: [...], encoders: [...], experiments: [...], inits: [...]}``.
  ``python -m training.procedures.grid004 CONFIG [--out runs] [--set k=v] [--dry-run]`` trains every
  combination into ``OUT/<name>_<experiment>_<decoder>_<encoder>_<init>`` (finished runs are skipped, an
  unfinished one resumes) and writes ``OUT/<name>_grid.md/.csv`` with all rows.

Experiment -> labels: ``lung`` sets every data set's target to ``lung_target`` (default ``lung``) and no
input masking; ``lesion_a``/``lesion_b`` set the target to ``lesion_target`` (default: the config's
``data.target``) with masking off / on.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from training.paths import ConfigError, expand_path

from . import Procedure, ProcedureError, register_procedure

if __name__ == "__main__":  # pragma: no cover - ``python -m``: run the registered module's CLI, define nothing twice
    from training.procedures.grid004 import main as _main

    sys.exit(_main())

EXPERIMENTS = ("lung", "lesion_a", "lesion_b")
INITS = ("random", "imagenet")
DECODER_ARCHS = {"unet": "grid_unet", "linknet": "grid_linknet", "fpn": "grid_fpn", "pspnet": "grid_pspnet"}


@register_procedure
class Grid004Procedure(Procedure):
    """One model of 004's grid (module docstring). Options: ``experiment``, ``init``, ``imagenet_weights``,
    ``test_data``, ``lung_target``, ``lesion_target``, ``grid``."""

    name = "grid004"
    paper = "bizopoulos_grid"
    summary = "004 grid model: lung / lesion A / lesion B, random or ImageNet encoder, Soft Dice, test on another set"
    options = {"experiment": "lesion_a", "init": "random", "imagenet_weights": None, "test_data": None,
               "lung_target": "lung", "lesion_target": None, "grid": None}

    @classmethod
    def check_options(cls, options: dict[str, Any], source: str) -> None:
        if options["experiment"] not in EXPERIMENTS:
            raise ConfigError(f"{source}: procedure.experiment must be one of {', '.join(EXPERIMENTS)}, got "
                              f"{options['experiment']!r}")
        if options["init"] not in INITS:
            raise ConfigError(f"{source}: procedure.init must be random or imagenet, got {options['init']!r}")
        grid = options["grid"]
        if grid is not None:
            if not isinstance(grid, Mapping):
                raise ConfigError(f"{source}: procedure.grid must be a mapping of lists")
            allowed = {"decoders": tuple(DECODER_ARCHS), "encoders": None, "experiments": EXPERIMENTS, "inits": INITS}
            for key, value in grid.items():
                if key not in allowed:
                    raise ConfigError(f"{source}: unknown key procedure.grid.{key} (known: {', '.join(allowed)})")
                if not isinstance(value, list) or not value:
                    raise ConfigError(f"{source}: procedure.grid.{key} must be a non-empty list")
                bad = [v for v in value if allowed[key] is not None and v not in allowed[key]]
                if bad:
                    raise ConfigError(f"{source}: procedure.grid.{key} has unknown value(s) {bad}; choose from "
                                      f"{', '.join(allowed[key])}")

    def build_model(self) -> nn.Module:
        from COVIDLesionSegLib.models import build
        arch = self.config["model"]["arch"]
        if arch not in DECODER_ARCHS.values():
            raise ProcedureError(f"procedure 'grid004' trains the grid architectures ({', '.join(DECODER_ARCHS.values())}), "
                                 f"not {arch!r}")
        check_experiment(self.config)
        args = dict(self.config["model"]["args"])
        if self.opts["init"] == "imagenet":
            path = self.opts["imagenet_weights"]
            if not path:
                raise ProcedureError("procedure.init is imagenet but procedure.imagenet_weights names no file: give "
                                     "the local torchvision ResNet state dict (nothing is downloaded)")
            args["imagenet_weights"] = expand_path(path)
        try:
            model = build({"arch": arch, "args": args})
        except (FileNotFoundError, ValueError) as exc:
            raise ProcedureError(f"grid004: {exc}") from None
        if self.config["model"].get("init"):
            from . import load_weights

            model.load_state_dict(load_weights(self.config["model"]["init"]))
        return model


def check_experiment(config: Mapping[str, Any]) -> None:
    """Raise :class:`ProcedureError` when the data pipelines do not match ``procedure.experiment``."""
    exp = config["procedure"]["experiment"]
    specs = [("data", config["data"])]
    test = config["procedure"].get("test_data")
    if test:
        if test not in config["aux_data"]:
            raise ProcedureError(f"procedure.test_data {test!r} is not in aux_data ({', '.join(config['aux_data']) or 'none'})")
        specs.append((f"aux_data.{test}", config["aux_data"][test]))
    for where, spec in specs:
        mask = spec["transform_args"].get("mask_input_with")
        if exp == "lesion_b" and not mask:
            raise ProcedureError(f"experiment lesion_b multiplies the input by the lung mask: set "
                                 f"{where}.transform_args.mask_input_with: lung (pipeline bizopoulos_004)")
        if exp != "lesion_b" and mask:
            raise ProcedureError(f"experiment {exp} takes the unmasked slice, but {where}.transform_args."
                                 f"mask_input_with is {mask!r}")
        if exp == "lung" and spec["target"] != config["procedure"].get("lung_target", "lung"):
            raise ProcedureError(f"experiment lung segments the lungs, but {where}.target is {spec['target']!r}")


# ----------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------

def expand_grid(config: Mapping[str, Any], imagenet_available: bool | None = None) -> list[dict[str, Any]]:
    """One validated config per grid combination (module docstring). ``imagenet`` combinations are
    dropped when no ``imagenet_weights`` file is configured (``imagenet_available`` overrides)."""
    from training.config import validate

    opts = config["procedure"]
    grid = dict(opts.get("grid") or {})
    arch_to_dec = {v: k for k, v in DECODER_ARCHS.items()}
    decoders = grid.get("decoders", [arch_to_dec.get(config["model"]["arch"], "unet")])
    encoders = grid.get("encoders", [config["model"]["args"].get("encoder", "resnet34")])
    experiments = grid.get("experiments", [opts["experiment"]])
    inits = grid.get("inits", [opts["init"]])
    if imagenet_available is None:
        imagenet_available = bool(opts.get("imagenet_weights"))
    if not imagenet_available:
        inits = [i for i in inits if i != "imagenet"]
    lesion_target = opts.get("lesion_target") or config["data"]["target"]
    if lesion_target == opts.get("lung_target", "lung") and any(e != "lung" for e in experiments):
        raise ProcedureError("procedure.lesion_target must name the lesion label (data.target is the lung label)")
    out = []
    for exp, dec, enc, init in itertools.product(experiments, decoders, encoders, inits):
        cfg = copy.deepcopy(dict(config))
        cfg["name"] = f"{config['name']}_{exp}_{dec}_{enc}_{init}"
        cfg["model"]["arch"] = DECODER_ARCHS[dec]
        args = {k: v for k, v in cfg["model"]["args"].items() if k in ("in_channels", "out_channels")}
        args["encoder"] = enc
        cfg["model"]["args"] = args
        cfg["procedure"] = {**cfg["procedure"], "experiment": exp, "init": init, "grid": None}
        target = opts.get("lung_target", "lung") if exp == "lung" else lesion_target
        specs = [cfg["data"]] + ([cfg["aux_data"][opts["test_data"]]] if opts.get("test_data") else [])
        for spec in specs:
            spec["target"] = target
            spec["transform_args"] = dict(spec["transform_args"])
            if exp == "lesion_b":
                spec["transform_args"]["mask_input_with"] = opts.get("lung_target", "lung")
            else:
                spec["transform_args"].pop("mask_input_with", None)
        out.append(validate(cfg, source=cfg["name"]))
    return out


def evaluate_test_data(trainer, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Test ``trainer.model`` on every case of ``aux_data.<name>`` with the trainer's evaluation; per-case (or
    per-group, ``eval.unit``) metric rows and their aggregate (``COVIDLesionSegLib.metrics.aggregate``)."""
    from COVIDLesionSegLib.metrics import aggregate

    rows, _ = trainer.evaluate("all", data=f"aux_data.{name}")
    return rows, aggregate(rows)


def run_one(config: Mapping[str, Any], run_dir: Path, device: str = "cpu", log=print) -> dict[str, Any]:
    """Train one grid config (resuming / skipping as ``cv`` does) and test it on ``procedure.test_data``."""
    from COVIDLesionSegLib.metrics import METRIC_NAMES
    from training.runs import RunDir, load_training_state
    from training.trainer import Trainer

    rd = RunDir(run_dir)
    if rd.finished:
        log(f"{run_dir}: already finished")
        return rd.read_summary()
    trainer = Trainer(config, run_dir, device=device, resume=rd.last.exists(), progress=False, log=log)
    summary = trainer.fit()
    test = config["procedure"].get("test_data")
    if test:
        state = load_training_state(rd.best if rd.best.exists() else rd.last)
        trainer.model.load_state_dict(state["model"])
        rows, agg = evaluate_test_data(trainer, test)
        rd.write_test_metrics(rows, agg)
        summary["test"] = agg
        summary["test_mean"] = {k: v.get("mean") for k, v in agg.items() if k in METRIC_NAMES}
        summary["n_test"] = len(rows)
        summary["test_data"] = test
        rd.write_summary(summary)
    return summary


def run_grid(config_path: str, out: str | Path = "runs", overrides: Sequence[str] = (), device: str = "cpu",
             dry_run: bool = False, log=print) -> list[Path]:
    """Train every combination of the config's ``procedure.grid``; returns the run folders."""
    from training.config import load_config
    from training.runs import RunDir
    from training.tables import build_table, write_tables

    base = load_config(config_path, overrides)
    if base["procedure"]["name"] != "grid004":
        raise ProcedureError(f"{config_path}: the grid sweep needs procedure grid004, not {base['procedure']['name']!r}")
    configs = expand_grid(base)
    out = Path(out)
    dirs = []
    for cfg in configs:
        run_dir = out / cfg["name"]
        dirs.append(run_dir)
        if dry_run:
            log(f"{cfg['name']}: {cfg['model']['arch']} {cfg['model']['args']} target {cfg['data']['target']}")
            continue
        t0 = time.perf_counter()
        s = run_one(cfg, run_dir, device, log)
        tm = s.get("test_mean") or {}
        log(f"{cfg['name']}: {s.get('status')} in {time.perf_counter() - t0:.0f} s; test DSC {tm.get('dsc')}")
    if not dry_run:
        table = build_table([RunDir(d) for d in dirs], metrics=["dsc", "sensitivity", "specificity"])
        write_tables(table, out / f"{base['name']}_grid.md", out / f"{base['name']}_grid.csv")
        log(table.markdown())
    return dirs


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.procedures.grid004",
                                 description="train 004's grid (procedure.grid of a grid004 config)")
    ap.add_argument("config")
    ap.add_argument("--out", default="runs")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dry-run", action="store_true", help="list the runs without training")
    args = ap.parse_args(argv)
    run_grid(args.config, args.out, args.overrides, args.device, args.dry_run)
    return 0


__all__ = ["DECODER_ARCHS", "EXPERIMENTS", "Grid004Procedure", "check_experiment", "evaluate_test_data",
           "expand_grid", "run_grid", "run_one"]
