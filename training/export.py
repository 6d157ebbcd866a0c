"""Export a run's best model as an engine checkpoint (``COVIDLesionSegLib.models.checkpoint``).

The written file is what the Slicer module and ``covidlesionseg`` load (``NetworkModel(path)``). Its input
spec tells the engine how to feed the network exactly as training did:

- 2D: ``slice_size`` = the training pipeline's ``size``; ``in_channels`` from the model; ``intensity`` =
  ``export.input.intensity`` of the config - for the shared 2D slices ``ctseg2d_domain`` (HU scans mapped
  into the slices' domain: window, per-slice stretch, CLAHE, /255 - the ``uint8_01`` scale training used;
  its ``size`` is set to ``slice_size``, because the engine resizes before the intensity transform) - or the
  pipeline's own HU spec (004: ``mu_sigma``; nCoVSegNet: ``hu_window_01`` and ``crop: lung_bbox``);
- 3D: ``spacing_zyx`` = the training target spacing, ``patch_size`` = the training patch, ``intensity`` =
  the fitted CT z-score (``preprocessing.json`` of the run).

``export.input`` entries override the derived ones. Labels ``{"0": "background", "1": <task>}``, output
activation sigmoid for a 1-channel network (softmax with foreground channel 1 otherwise) and the threshold
``eval.threshold``. Provenance: data set, protocol and fold, training groups, epochs, best epoch and
validation metric, the held-out (test) metrics of the run, the config name and paper, the run folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from training.runs import RunDir, RunError, load_training_state


def _input_spec(config: Mapping[str, Any], preprocessing: Mapping[str, Any], state_dict) -> dict[str, Any]:
    from COVIDLesionSegLib.models import architectures
    from training import transforms as tf

    arch = config["model"]["arch"]
    args = config["model"]["args"]
    adims = architectures()[arch].dims
    dims = int(args.get("spatial_dims", adims[0] if len(adims) == 1 else 3))
    data = config["data"]
    targs = dict(data["transform_args"])
    pipeline = data["transforms"]
    spec: dict[str, Any] = {"dims": dims, "in_channels": int(args.get("in_channels", targs.get("channels", 1)))}
    if dims == 2:
        default_size = {"slice_2d": 256, "bizopoulos_004": 512, "ncovsegnet": 352}.get(pipeline, 256)
        size = targs.get("size", default_size)
        spec["slice_size"] = [int(size), int(size)]
        intensity = targs.get("intensity")
        if pipeline == "bizopoulos_004":
            intensity = tf.MU_SIGMA_004 if targs.get("normalisation", "hu") == "hu" else None
        elif pipeline == "ncovsegnet":
            intensity = targs.get("intensity", tf.NCOVSEGNET_WINDOW_01)
            if targs.get("crop_lungs", True):
                spec["crop"] = "lung_bbox"
        if isinstance(intensity, Mapping):
            spec["intensity"] = dict(intensity)
    else:
        prep = preprocessing.get("data", {})
        if not prep.get("target_spacing") or not isinstance(prep.get("intensity"), Mapping):
            raise RunError("the run has no fitted 3D preprocessing (preprocessing.json with target_spacing and "
                           "intensity); set export.input.spacing_zyx and export.input.intensity")
        spec["spacing_zyx"] = [float(s) for s in prep["target_spacing"]]
        spec["intensity"] = dict(prep["intensity"])
        spec["patch_size"] = [int(p) for p in targs.get("patch_size", (56, 160, 192))]
    spec.update(dict(config["export"]["input"]))
    intensity = spec.get("intensity")
    if dims == 2 and isinstance(intensity, Mapping) and intensity.get("name") == "ctseg2d_domain" \
            and "size" not in intensity:
        # The engine resizes a slice to slice_size and then applies the intensity transform, so the
        # transform must produce that size. The 2D data were CLAHE-enhanced at 256 px; a network trained
        # on slices resized to another size gets CLAHE at its own size (exact at 256, close otherwise).
        spec["intensity"] = {**intensity, "size": spec["slice_size"][0]}
    if "intensity" not in spec:
        raise RunError(f"cannot derive the engine's intensity transform for pipeline {pipeline!r} with "
                       f"intensity {targs.get('intensity')!r} (the engine sees HU CT); set export.input.intensity "
                       "in the config (e.g. {name: ctseg2d_domain} for the shared 2D slices)")
    return spec


def checkpoint_fields(config: Mapping[str, Any], model_state: Mapping[str, Any], preprocessing: Mapping[str, Any],
                      *, summary: Mapping[str, Any] | None = None, epoch: int | None = None,
                      best: Mapping[str, Any] | None = None, which: str = "best", run_path: str | os.PathLike = "",
                      model_id: str | None = None, postprocess: dict | None = None, threshold: float | None = None,
                      description: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state_dict, keyword arguments of save_checkpoint)`` of the engine checkpoint of a training model:
    the procedure's exported network (``Procedure.export_model``), the input spec (module docstring), the
    output spec and the provenance. The one derivation behind :func:`export_run` and :func:`make_checkpoint`."""
    from COVIDLesionSegLib.models.citations import with_keys
    from training.procedures import get_procedure

    proc_cls = get_procedure(config["procedure"]["name"])
    state_dict, model_config = proc_cls.export_model(config, model_state)
    out_channels = int(model_config["args"].get("out_channels", 1))
    input_spec = _input_spec(config, preprocessing, state_dict)
    summary = summary or {}
    test_mean = {k: v for k, v in (summary.get("test_mean") or {}).items() if v is not None}
    ex = config["export"]
    task = config["task"]
    labels = ex["labels"] or {"0": "background", "1": task}
    output_spec = {"activation": "sigmoid" if out_channels == 1 else "softmax",
                   "threshold": float(config["eval"]["threshold"])}
    if out_channels > 1:
        output_spec["foreground_channel"] = 1
    output_spec.update(dict(ex["output"]))
    if postprocess is not None:
        output_spec["postprocess"] = dict(postprocess)
    if threshold is not None:
        if not 0.0 < float(threshold) < 1.0:
            raise RunError(f"threshold must lie strictly between 0 and 1, got {threshold}")
        output_spec["threshold"] = float(threshold)
    fold = int(config["protocol"]["fold"])
    provenance = {
        "data": {"reader": config["data"]["reader"], "target": config["data"]["target"],
                 "root": Path(str(config["data"]["root"])).name},
        "protocol": {"name": config["protocol"]["name"], "fold": fold,
                     "train_groups": summary.get("train_groups", []), "n_train": summary.get("n_train"),
                     "n_test": summary.get("n_test")},
        "procedure": config["procedure"]["name"],
        "config": config["name"],
        "paper": with_keys(config["paper"]),
        "epochs": int(epoch if epoch is not None else 0),
        "max_epochs": int(config["train"]["epochs"]),
        "checkpoint": which,
        "best": dict(best or {}),
        "metrics": {"held_out": test_mean, "unit": config["eval"]["unit"]},
        "run": str(run_path),
        **dict(ex["provenance"]),
    }
    fields = {"model_config": model_config, "input_spec": input_spec, "labels": labels, "output": output_spec,
              "task": task, "model_id": model_id or ex["model_id"] or f"{config['name']}-fold{fold}",
              "version": str(ex["version"]), "description": description or ex["description"] or config["description"],
              "provenance": provenance}
    return state_dict, fields


def make_checkpoint(config: Mapping[str, Any], model_state: Mapping[str, Any], preprocessing: Mapping[str, Any],
                    **kwargs: Any):
    """The engine checkpoint of a training model, in memory (a ``models.checkpoint.Checkpoint``): written with
    :func:`checkpoint_fields` and ``save_checkpoint`` to a temporary file and read back with
    ``load_checkpoint``, so it is exactly what :func:`export_run` would ship (one format, one reader).
    ``kwargs``: those of :func:`checkpoint_fields`."""
    import dataclasses
    import tempfile

    from COVIDLesionSegLib.models.checkpoint import load_checkpoint, save_checkpoint

    state_dict, fields = checkpoint_fields(config, model_state, preprocessing, **kwargs)
    with tempfile.TemporaryDirectory(prefix="covidlesionseg_ckpt_") as tmp:
        path = Path(tmp) / "model.pt"
        save_checkpoint(path, state_dict, **fields)
        ckpt = load_checkpoint(path)
    return dataclasses.replace(ckpt, path=None, file_sha256=None)


def export_run(run: str | os.PathLike, output: str | os.PathLike | None = None, half: bool = False,
               which: str = "best", model_id: str | None = None,
               postprocess: dict | None = None, threshold: float | None = None,
               description: str | None = None) -> tuple[Path, str]:
    """Write an engine checkpoint of ``run``'s ``best.pt`` (or ``last.pt``); returns ``(path, sha256)``.

    ``postprocess``: the infection post-processing chosen after training (``python -m training.selection``)
    to store as ``output.postprocess``; it overrides the run config's ``export.output.postprocess``.
    ``threshold``: the probability threshold chosen there (``output.threshold``; default ``eval.threshold``).
    ``model_id`` / ``description``: override the config's ``export.model_id`` / ``export.description`` (one
    run exported with two post-processings ships as two models).

    Raises:
        RunError: the run folder lacks its config or checkpoint, or the input spec cannot be derived.
        COVIDLesionSegLib.models.checkpoint.CheckpointError: the weights do not fit the architecture.
    """
    from COVIDLesionSegLib.models.checkpoint import save_checkpoint

    rd = RunDir(run)
    if not rd.config.exists():
        raise RunError(f"{rd.path} is not a run folder (no config.json)")
    config = rd.read_config()
    ckpt_path = rd.best if which == "best" else rd.last
    if not ckpt_path.exists():
        raise RunError(f"{rd.path} has no {ckpt_path.name}; train the run first")
    state = load_training_state(ckpt_path)
    summary = rd.read_summary() if rd.summary.exists() else {}
    state_dict, fields = checkpoint_fields(config, state["model"], state.get("preprocessing") or {}, summary=summary,
                                           epoch=int(state["epoch"]), best=state.get("best") or {}, which=which,
                                           run_path=rd.path, model_id=model_id, postprocess=postprocess,
                                           threshold=threshold, description=description)
    out = Path(output) if output else rd.path / "model.pt"
    sha = save_checkpoint(out, state_dict, half=half, **fields)
    return out, sha


__all__ = ["checkpoint_fields", "export_run", "make_checkpoint"]
