"""``python -m training``: configs (extends, --set, clear errors), run, Ctrl-C and --resume in a real
subprocess, and export of a run as an engine checkpoint that segments a real CT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from Testing.conftest import REPO_ROOT, shared_file
from Testing.training.helpers import config_3d, tiny_config, write_covid19ctseg_layout
from training.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main
from training.config import CONFIG_DIR, ConfigError, load_config
from training.runs import RunDir, load_training_state, read_json

torch.set_num_threads(2)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------

def test_shipped_configs_load_and_follow_the_papers():
    names = sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("_"))
    assert {"ctseg2d_supervised.yaml", "ctseg2d_supervised_cpu.yaml", "covid19ctseg_nnunet3d_scratch.yaml",
            "covid19ctseg_nnunet3d_scratch_cpu.yaml"} <= set(names)
    for name in names:
        load_config(CONFIG_DIR / name)
    full = load_config("covid19ctseg_nnunet3d_scratch")
    assert full["optim"] == {**full["optim"], "name": "sgd", "lr": 0.01, "momentum": 0.99, "nesterov": True}
    assert full["schedule"]["name"] == "poly" and full["schedule"]["power"] == 0.9
    assert full["train"]["batch_size"] == 2 and full["train"]["epochs"] == 1000
    assert full["train"]["iterations_per_epoch"] == 250
    assert full["data"]["transform_args"]["patch_size"] == [56, 160, 192]
    assert full["loss"]["name"] == "dice_ce" and full["model"]["args"]["deep_supervision"] is True
    assert full["protocol"]["name"] == "covid19ctseg"
    cpu = load_config("ctseg2d_supervised_cpu")
    # _replace: the CPU sibling's network args replace the parent's; other sections merge key by key
    assert cpu["model"]["args"]["channels"] == [8, 16, 32, 64]
    assert cpu["data"]["reader"] == "covid19ctseg2d" and cpu["data"]["transform_args"]["size"] == 128
    assert cpu["data"]["transform_args"]["intensity"] == "uint8_01"
    assert cpu["export"]["input"]["intensity"] == {"name": "ctseg2d_domain"}


def test_config_errors_are_clear(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model: {arch: nnunet, args: {spatial_dims: 2}}\n"
                    "data: {reader: covid19ctseg2d, root: /nowhere}\ntrain: {epochs: 3}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ntrain: {batch_size: 4}\n")
    cfg = load_config(child, ["train.epochs=7", "optim.lr=1e-3", "eval.metrics=[dsc, voe]"])
    assert cfg["name"] == "child" and cfg["train"]["epochs"] == 7 and cfg["train"]["batch_size"] == 4
    assert cfg["optim"]["lr"] == 1e-3 and cfg["eval"]["metrics"] == ["dsc", "voe"]
    (tmp_path / "typo.yaml").write_text("extends: base.yaml\ntrain: {epoch: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch'; did you mean 'epochs'"):
        load_config(tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match="train.epochs must be a int"):
        load_config(child, ["train.epochs=ten"])
    with pytest.raises(ConfigError, match="optim.name must be one of"):
        load_config(child, ["optim.name=rmsprop"])
    with pytest.raises(ConfigError, match="not a registered architecture"):
        load_config(child, ["model.arch=resnet"])
    with pytest.raises(ConfigError, match="unknown metric"):
        load_config(child, ["eval.metrics=[dice]"])
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed config file"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "cycle.yaml").write_text("extends: cycle.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "cycle.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_missing_data_and_bad_config(tmp_path, capsys):
    cfg = tiny_config()
    cfg["data"]["root"] = str(tmp_path / "no_such_folder")
    path = write_config(tmp_path / "c.json", cfg)
    assert main(["run", str(path), "--out", str(tmp_path / "runs")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "covid19ctseg2d folder not found" in err and "Expected layout" in err
    (tmp_path / "empty").mkdir()
    cfg["data"]["root"] = str(tmp_path / "empty")
    write_config(path, cfg)
    assert main(["run", str(path), "--out", str(tmp_path / "runs")]) == EXIT_USAGE
    assert "covid19ctseg2d.npz not found" in capsys.readouterr().err
    assert main(["run", str(path), "--set", "train.bogus=1"]) == EXIT_USAGE
    assert "unknown key 'train.bogus'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Ctrl-C and --resume, through the real command line
# ----------------------------------------------------------------------------------------------------------

def test_sigint_saves_last_checkpoint_and_resume_finishes(tmp_path):
    cfg = tiny_config(**{"train.epochs": 100, "train.iterations_per_epoch": 2, "eval.test": False,
                         "data.max_cases_per_group": 1, "train.num_threads": 1})
    path = write_config(tmp_path / "sigint.json", cfg)
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "training", "run", str(path), "--out", str(out), "--no-progress"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = RunDir(out / "tiny")
    deadline = time.time() + 120
    while not run.log_json.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    assert "Ctrl-C" in stderr and "--resume" in stderr
    state = load_training_state(run.last)
    stopped_at = (state["epoch"], state["iteration"])
    assert 1 <= state["epoch"] < 100
    assert read_json(run.summary)["status"] == "interrupted"
    # resume through the CLI (in-process): the run finishes where the config says
    assert main(["run", str(path), "--out", str(out), "--resume", "--no-progress"]) == EXIT_OK
    summary = read_json(run.summary)
    assert summary["status"] == "completed" and summary["epochs_completed"] == 100
    assert len(read_json(run.log_json)) == 100
    assert load_training_state(run.last)["epoch"] == 100, stopped_at
    # a finished run cannot be resumed again, and a new run will not overwrite it
    assert main(["run", str(path), "--out", str(out), "--resume"]) == EXIT_USAGE
    assert main(["run", str(path), "--out", str(out)]) == EXIT_USAGE


# ----------------------------------------------------------------------------------------------------------
# Export: the engine loads the checkpoint and segments real CT
# ----------------------------------------------------------------------------------------------------------

def _real_ct(name: str):
    from COVIDLesionSegLib.io import read_image
    from COVIDLesionSegLib.volume import CTVolume

    image, _ = read_image(shared_file(f"ct/{name}"))
    return image, CTVolume.from_image(image, name=name)


def test_export_2d_run_loads_in_engine_and_segments_real_ct(tmp_path):
    from COVIDLesionSegLib.models.checkpoint import load_checkpoint
    from COVIDLesionSegLib.network_predictor import NetworkInfectionModel, NetworkModel

    cfg = tiny_config(**{"train.epochs": 2, "train.iterations_per_epoch": 3, "data.max_cases_per_group": 2})
    path = write_config(tmp_path / "c.json", cfg)
    out = tmp_path / "runs"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == EXIT_OK
    run = out / "tiny"
    assert main(["export", str(run), "-o", str(tmp_path / "model.pt"), "--half"]) == EXIT_OK
    ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt.input_spec["dims"] == 2 and ckpt.input_spec["slice_size"] == [64, 64]
    assert ckpt.input_spec["intensity"] == {"name": "ctseg2d_domain", "size": 64}
    assert ckpt.output["activation"] == "sigmoid" and ckpt.labels == {"0": "background", "1": "infection"}
    assert ckpt.storage["float_dtype"] == "float16" and ckpt.task == "infection"
    prov = ckpt.provenance
    summary = read_json(run / "summary.json")
    assert prov["metrics"]["held_out"]["dsc"] == pytest.approx(summary["test_mean"]["dsc"])
    assert prov["protocol"]["fold"] == 0 and prov["protocol"]["train_groups"] == summary["train_groups"]
    assert prov["epochs"] == 2 and prov["config"] == "tiny"
    best = load_training_state(run / "best.pt")["model"]
    for k, v in ckpt.state_dict.items():
        assert torch.allclose(v, best[k].float(), atol=1e-2, rtol=1e-2), k
    # The threshold and post-processing chosen by training.selection are stored as given ...
    assert main(["export", str(run), "-o", str(tmp_path / "chosen.pt"), "--threshold", "0.7",
                 "--postprocess", '{"min_component_ml": 1.0}', "--model-id", "chosen-model",
                 "--description", "the run with its chosen setting"]) == EXIT_OK
    chosen = load_checkpoint(tmp_path / "chosen.pt")
    assert chosen.output["threshold"] == 0.7 and chosen.output["postprocess"] == {"min_component_ml": 1.0}
    assert chosen.model_id == "chosen-model" and chosen.description == "the run with its chosen setting"
    assert ckpt.model_id != "chosen-model" and ckpt.description != chosen.description
    assert ckpt.output["threshold"] == 0.5                   # ... and only when given
    assert main(["export", str(run), "-o", str(tmp_path / "bad.pt"), "--threshold", "1.5"]) != EXIT_OK
    assert not (tmp_path / "bad.pt").exists()

    model = NetworkModel(tmp_path / "model.pt", device="cpu")
    assert isinstance(model, NetworkInfectionModel)
    image, volume = _real_ct("covidctmd_p001_ct.nii.gz")
    lungs = np.zeros(volume.shape, np.uint8)
    z0 = volume.shape[0] // 2
    lungs[z0:z0 + 4, 150:360, 90:420] = 1
    prob = model.predict(volume, lungs)
    assert prob.shape == volume.shape and prob.dtype == np.float32
    assert np.isfinite(prob).all() and prob.min() >= 0.0 and prob.max() <= 1.0
    assert prob[z0:z0 + 4].max() > 0.0                       # the network ran on the lung slices
    assert not prob[: z0 - 2].any() and not prob[z0 + 6:].any()  # nothing outside the lung box (+ margin)
    out_image = volume.to_input_geometry((prob >= 0.5).astype(np.uint8))
    assert out_image.GetSize() == image.GetSize() and out_image.GetSpacing() == image.GetSpacing()
    assert out_image.GetOrigin() == image.GetOrigin() and out_image.GetDirection() == image.GetDirection()


def test_export_3d_run_carries_fitted_preprocessing(tmp_path):
    import SimpleITK as sitk

    from COVIDLesionSegLib.network_predictor import NetworkModel
    from COVIDLesionSegLib.volume import CTVolume
    from training.export import export_run
    from training.trainer import Trainer

    ids = write_covid19ctseg_layout(tmp_path / "data")
    cfg = config_3d(tmp_path / "data", ids)
    Trainer(cfg, tmp_path / "run", device="cpu").fit()
    path, sha = export_run(tmp_path / "run")
    assert path == tmp_path / "run" / "model.pt" and len(sha) == 64
    model = NetworkModel(path, device="cpu")
    prep = read_json(tmp_path / "run" / "preprocessing.json")["data"]
    assert model.spacing_zyx == tuple(prep["target_spacing"]) and model.patch_size == (8, 16, 16)
    assert model.intensity == prep["intensity"]
    image = sitk.ReadImage(str(tmp_path / "data" / "COVID-19-CT-Seg_20cases" / "coronacases_org_002.nii.gz"))
    volume = CTVolume.from_image(image)
    lungs = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(
        str(tmp_path / "data" / "Lung_Mask" / "coronacases_002.nii.gz")), "LPS"))
    prob = model.predict(volume, lungs)
    assert prob.shape == volume.shape and 0.0 <= prob.min() <= prob.max() <= 1.0
