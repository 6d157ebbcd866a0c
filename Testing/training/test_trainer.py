"""The trainer and the supervised procedure: real steps on the shared data, overfitting four COVID-19-CT-Seg
slices, best-model selection, exact resume (at an epoch boundary and mid-epoch), the 3D path on volumes
written in the COVID-19-CT-Seg layout, and the procedure hook interface."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from Testing.conftest import shared_file
from Testing.training.helpers import CTSEG2D, config_3d, ctseg2d_root, tiny_config, write_covid19ctseg_layout
from training.config import ConfigError, config_from_dict
from training.procedures import Procedure, StepOutput, get_procedure, procedures, register_procedure
from training.runs import RunDir, RunError, load_training_state, read_json
from training.trainer import Trainer, TrainingInterrupted

torch.set_num_threads(2)


def largest_infection_ids(groups=(0, 1, 2, 3), per_group: int = 1) -> list[str]:
    """Ids of the slices with the most infection in each of ``groups`` (real, non-trivial targets)."""
    data = np.load(shared_file(f"{CTSEG2D}/covid19ctseg2d.npz"))
    inf, grp = data["infection"], data["group"]
    ids = []
    for g in groups:
        rows = np.flatnonzero(grp == g)
        order = rows[np.argsort(-inf[rows].sum(axis=(1, 2)), kind="stable")]
        ids += [f"ctseg2d_{i:04d}" for i in sorted(order[:per_group])]
    return ids


def weights(trainer_or_state) -> dict[str, torch.Tensor]:
    if isinstance(trainer_or_state, Trainer):
        return {k: v.detach().clone() for k, v in trainer_or_state.model.state_dict().items()}
    return trainer_or_state["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max |diff| {float((a[k].float() - b[k].float()).abs().max())})"


# ----------------------------------------------------------------------------------------------------------
# Real training on the shared slices
# ----------------------------------------------------------------------------------------------------------

def test_overfits_four_covid19ctseg_slices(tmp_path):
    """A 2D nnU-Net (8-16-32-64) learns four real COVID-19-CT-Seg slices at 128 px to test DSC > 0.9."""
    ids = largest_infection_ids()
    cfg = tiny_config(**{
        "model.args.channels": [8, 16, 32, 64], "model.args.strides": [1, 2, 2, 2],
        "model.args.kernel_sizes": [3, 3, 3, 3], "data.max_cases_per_group": None,
        "data.groups": ["0", "1", "2", "3"],
        "data.transform_args": {"size": 128, "intensity": "uint8_01", "flip": False, "rotate_deg": 0.0,
                                "scale": [1.0, 1.0]},
        "protocol": {"name": "fixed", "train": ids}, "optim.lr": 1e-2, "schedule.name": "constant",
        "train.epochs": 8, "train.iterations_per_epoch": 10, "train.batch_size": 4, "eval.unit": "case"})
    trainer = Trainer(cfg, tmp_path / "run", device="cpu")
    summary = trainer.fit()
    assert summary["status"] == "completed" and summary["n_train"] == 4 and summary["n_test"] == 0
    # overfitting: the training slices, predicted with the evaluation pipeline (no augmentation)
    rows, _ = trainer.evaluate("train", metrics=["dsc"], unit="case")
    assert [r["case"] for r in rows] == ids
    dsc = [r["dsc"] for r in rows]
    assert min(dsc) > 0.85 and np.mean(dsc) > 0.9, dsc
    log = read_json(tmp_path / "run" / "log.json")
    assert log[-1]["train_loss"] < 0.5 * log[0]["train_loss"]


def test_supervised_real_steps_validation_and_outputs(tmp_path):
    """Real steps on the shared data: finite, falling loss; validation each epoch selects best.pt; log,
    split, per-group test metrics and summary are written and consistent."""
    cfg = tiny_config(**{"protocol.val_fraction": 0.25, "train.epochs": 4, "train.iterations_per_epoch": 5,
                         "train.batch_size": 4, "data.max_cases_per_group": 4, "eval.val_metrics": ["dsc", "voe"]})
    run = RunDir(tmp_path / "run")
    summary = Trainer(cfg, run.path, device="cpu").fit()
    log = read_json(run.log_json)
    losses = [r["train_loss"] for r in log]
    assert len(log) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    assert all(k in log[0] for k in ("lr", "val_loss", "val_dsc", "val_voe", "epoch_time_s", "samples_per_s"))
    assert log[1]["lr"] < log[0]["lr"]  # poly decay
    # best.pt holds the epoch with the highest validation DSC
    best_epoch = max(range(4), key=lambda i: (log[i]["val_dsc"], -i)) + 1
    assert summary["best"]["epoch"] == best_epoch == load_training_state(run.best)["epoch"]
    assert summary["best"]["metric"] == "val_dsc"
    split = read_json(run.split)
    train_groups = {split["groups"][i] for i in split["train"]}
    val_groups = {split["groups"][i] for i in split["val"]}
    test_groups = {split["groups"][i] for i in split["test"]}
    assert len(train_groups) == 3 and len(val_groups) == 1 and len(test_groups) == 14
    assert not (train_groups & val_groups) and not (train_groups & test_groups)
    assert {str(g) for g in range(10, 20)} <= test_groups  # the Radiopaedia block stays on the test side
    rows = run.read_test_metrics()["cases"]
    assert {r["group"] for r in rows} == test_groups
    for r in rows:
        assert 0.0 <= r["dsc"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
    assert summary["test_mean"]["dsc"] == pytest.approx(np.mean([r["dsc"] for r in rows]))
    assert summary["status"] == "completed" and summary["epochs_completed"] == 4
    assert (run.path / "log.csv").read_text().count("\n") == 5


def test_early_stopping_by_patience(tmp_path):
    """With min_delta impossible to beat, training stops after `patience` validation rounds."""
    cfg = tiny_config(**{"protocol.val_fraction": 0.25, "train.epochs": 6, "train.iterations_per_epoch": 1,
                         "train.patience": 2, "train.min_delta": 10.0, "eval.test": False})
    summary = Trainer(cfg, tmp_path / "run", device="cpu").fit()
    assert summary["status"] == "early_stopped"
    assert summary["epochs_completed"] == 3 and summary["best"]["epoch"] == 1


# ----------------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------------

def _resume_config():
    # augmentation on (flips, affine) and a validation set: the resumed run must replay both exactly
    return tiny_config(**{"protocol.val_fraction": 0.25, "train.epochs": 3, "train.iterations_per_epoch": 3,
                          "eval.test": False})


def test_resume_after_epoch_matches_uninterrupted_run(tmp_path):
    cfg = _resume_config()
    full = Trainer(cfg, tmp_path / "full", device="cpu")
    full.fit()
    reference = weights(full)

    first = Trainer(cfg, tmp_path / "split", device="cpu")
    with pytest.raises(TrainingInterrupted):
        first.fit(stop_after_epoch=1)
    state = load_training_state(tmp_path / "split" / "last.pt")
    assert state["epoch"] == 1 and state["iteration"] == 0
    assert RunDir(tmp_path / "split").read_summary()["status"] == "interrupted"
    with pytest.raises(RunError, match="--resume"):
        Trainer(cfg, tmp_path / "split", device="cpu").fit()  # refuses to overwrite
    resumed = Trainer(cfg, tmp_path / "split", device="cpu", resume=True)
    summary = resumed.fit()
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3
    assert_same_weights(reference, weights(resumed))
    a, b = read_json(tmp_path / "full" / "log.json"), read_json(tmp_path / "split" / "log.json")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert [r["val_dsc"] for r in a] == [r["val_dsc"] for r in b]
    with pytest.raises(RunError, match="already finished"):
        Trainer(cfg, tmp_path / "split", device="cpu", resume=True).fit()


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path):
    """A stop in the middle of an epoch (what Ctrl-C does) saves the step; resuming replays the epoch's data
    and RNG so the final weights are bit-identical."""
    cfg = _resume_config()
    full = Trainer(cfg, tmp_path / "full", device="cpu")
    full.fit()

    first = Trainer(cfg, tmp_path / "split", device="cpu")
    original = first.procedure.training_step

    def step(model, batches, info):
        if info.global_step == 4:  # epoch 2, second step
            first.request_stop()
        return original(model, batches, info)

    first.procedure.training_step = step
    with pytest.raises(TrainingInterrupted):
        first.fit()
    state = load_training_state(tmp_path / "split" / "last.pt")
    assert (state["epoch"], state["iteration"]) == (1, 2)
    resumed = Trainer(cfg, tmp_path / "split", device="cpu", resume=True)
    resumed.fit()
    assert_same_weights(weights(full), weights(resumed))
    assert [r["train_loss"] for r in read_json(tmp_path / "full" / "log.json")] == \
        [r["train_loss"] for r in read_json(tmp_path / "split" / "log.json")]


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = _resume_config()
    with pytest.raises(TrainingInterrupted):
        Trainer(cfg, tmp_path / "r", device="cpu").fit(stop_after_epoch=1)
    changed = copy.deepcopy(cfg)
    changed["optim"]["lr"] = 0.5
    with pytest.raises(RunError, match="optim.lr"):
        Trainer(changed, tmp_path / "r", device="cpu", resume=True).fit()
    with pytest.raises(RunError, match="nothing to resume"):
        Trainer(cfg, tmp_path / "empty", device="cpu", resume=True).fit()


# ----------------------------------------------------------------------------------------------------------
# 3D: volumes in the COVID-19-CT-Seg layout, nnU-Net pipeline, sliding-window evaluation
# ----------------------------------------------------------------------------------------------------------

def test_3d_nnunet_pipeline_trains_and_evaluates_on_native_grid(tmp_path):
    ids = write_covid19ctseg_layout(tmp_path / "data")
    cfg = config_3d(tmp_path / "data", ids)
    trainer = Trainer(cfg, tmp_path / "run", device="cpu")
    summary = trainer.fit()
    prep = read_json(tmp_path / "run" / "preprocessing.json")["data"]
    assert prep["target_spacing"] == pytest.approx([2.0, 0.8, 0.8])  # (z, y, x) of the one training volume
    assert prep["intensity"]["name"] == "ct_zscore" and -400 < prep["intensity"]["mean"] < -100
    log = read_json(tmp_path / "run" / "log.json")
    assert len(log) == 2 and all(np.isfinite(r["train_loss"]) for r in log)
    rows = RunDir(tmp_path / "run").read_test_metrics()["cases"]
    assert [r["case"] for r in rows] == ids[1:]
    assert 0.0 <= rows[0]["dsc"] <= 1.0 and 0.0 <= rows[0]["nsd"] <= 1.0
    assert summary["test_mean"]["dsc"] == pytest.approx(rows[0]["dsc"])
    # evaluation runs on the native grid: prediction shape equals the label's
    item = trainer.dataset("data", "test", train_transforms=False)[0]
    logits = trainer._predict_volume(item["image"], item["spacing"])
    assert tuple(logits.shape[2:]) == tuple(item["infection"].shape[1:]) == (20, 40, 44)


# ----------------------------------------------------------------------------------------------------------
# The procedure hook interface
# ----------------------------------------------------------------------------------------------------------

def test_procedure_registry_and_options():
    assert "supervised" in procedures()
    assert get_procedure("supervised").name == "supervised"
    with pytest.raises(ConfigError, match="did you mean 'supervised'"):
        tiny_config(procedure={"name": "supervisd"})
    with pytest.raises(ConfigError, match="unknown option procedure.lambda_g"):
        tiny_config(procedure={"name": "supervised", "lambda_g": 1.0})


@register_procedure
class _TwoBatchProcedure(Procedure):
    """Test procedure: a second data set each step, an option, frozen parameters and its own state."""

    name = "test_two_batch"
    summary = "test only"
    options = {"aux_weight": 0.5}

    def __init__(self, trainer):
        super().__init__(trainer)
        self.steps_seen = 0

    def build_model(self):
        model = super().build_model()
        for p in list(model.encoder.parameters())[:2]:
            p.requires_grad_(False)
        return model

    def train_datasets(self):
        return {"main": self.trainer.dataset("data", "train"), "aux": self.trainer.dataset("aux_data.aux", "all")}

    def training_step(self, model, batches, step):
        assert set(batches) == {"main", "aux"}
        self.steps_seen += 1
        seg = self.loss_fn(model(batches["main"]["image"]), batches["main"][self.target])
        aux = self.loss_fn(model(batches["aux"]["image"]), batches["aux"]["lung"])
        return StepOutput(seg + self.opts["aux_weight"] * aux, {"seg": seg.detach(), "aux": aux.detach()})

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.steps_seen = int(state.get("steps_seen", 0))


def test_custom_procedure_two_batches_frozen_params_and_state(tmp_path):
    cfg = tiny_config(**{
        "procedure": {"name": "test_two_batch", "aux_weight": 0.25}, "eval.test": False,
        "aux_data": {"aux": {"reader": "covid19ctseg2d", "root": ctseg2d_root(), "target": "lung",
                             "groups": ["12"], "max_cases_per_group": 3, "transform_args": {"size": 64}}}})
    assert cfg["procedure"]["aux_weight"] == 0.25
    trainer = Trainer(cfg, tmp_path / "run", device="cpu")
    trainer.setup()
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert frozen
    trainer.fit()
    for n, p in trainer.model.named_parameters():
        if n in frozen:
            assert torch.equal(frozen[n], p), n
    log = read_json(tmp_path / "run" / "log.json")
    assert "train_seg" in log[0] and "train_aux" in log[0]
    state = load_training_state(tmp_path / "run" / "last.pt")
    assert state["procedure"] == {"steps_seen": 4}


def test_transfer_runs_reuse_the_pretraining_preprocessing(tmp_path):
    """A transfer run from a pre-training run resamples and normalises as that run did (its frozen encoder saw
    those inputs), instead of fitting its own spacing and z-score; ``init_preprocessing: false`` fits anew."""
    from COVIDLesionSegLib.models import build
    from training.runs import save_training_state

    ids = write_covid19ctseg_layout(tmp_path / "data")
    own = Trainer(config_3d(tmp_path / "data", ids), tmp_path / "own", device="cpu", progress=False, log=lambda m: None)
    own.setup()
    fitted = own.preprocessing["data"]
    pre_prep = {"target_spacing": [3.0, 1.25, 1.25],
                "intensity": {**fitted["intensity"], "mean": fitted["intensity"]["mean"] + 300.0}}
    pre_cfg = config_3d(tmp_path / "data", ids)
    model = build({"arch": "nnunet", "args": dict(pre_cfg["model"]["args"])})
    save_training_state(tmp_path / "pre" / "best.pt", {"config": pre_cfg, "epoch": 2, "model": model.state_dict(),
                                                       "preprocessing": {"data": pre_prep}})
    cfg = config_3d(tmp_path / "data", ids, procedure={"name": "lesion_representations"},
                    model={**pre_cfg["model"], "init": str(tmp_path / "pre")})
    transfer = Trainer(cfg, tmp_path / "transfer", device="cpu", progress=False, log=lambda m: None)
    transfer.setup()
    assert transfer.preprocessing["data"] == pre_prep
    assert read_json(tmp_path / "transfer" / "preprocessing.json")["data"] == pre_prep
    item = transfer.dataset("data", "test", train_transforms=False)[0]   # evaluation normalises the same way
    raw = transfer.subset_cases("data", "test")[0]
    from training.datasets import load_case
    hu = load_case(raw, ["infection"])["image"]
    expected = (np.clip(hu, pre_prep["intensity"]["lower"], pre_prep["intensity"]["upper"])
                - pre_prep["intensity"]["mean"]) / pre_prep["intensity"]["std"]
    np.testing.assert_allclose(np.asarray(item["image"]), expected, rtol=1e-4, atol=1e-4)
    cfg_off = config_3d(tmp_path / "data", ids, procedure={"name": "lesion_representations"},
                        model={**pre_cfg["model"], "init": str(tmp_path / "pre"), "init_preprocessing": False})
    fresh = Trainer(cfg_off, tmp_path / "fresh", device="cpu", progress=False, log=lambda m: None)
    fresh.setup()
    assert fresh.preprocessing["data"] == fitted


# ----------------------------------------------------------------------------------------------------------
# 2D evaluation: pixel spacing, native grid, 004's empty rule
# ----------------------------------------------------------------------------------------------------------

def _threshold_logits(shift: int = 0):
    """A stand-in network output: the synthetic infection's HU band (-400..-100), rolled ``shift`` pixels."""
    def predict(model, x):
        mask = ((x[:, :1] > -400) & (x[:, :1] < -100)).float()
        return torch.roll(mask, shift, dims=-1) * 20.0 - 10.0
    return predict


def sliced_config(root: Path, ids: list[str], **over) -> dict:
    cfg = {"name": "sliced", "seed": 1,
           "model": {"arch": "nnunet", "args": {"spatial_dims": 2, "channels": [4, 8], "strides": [1, 2],
                                                "kernel_sizes": [3, 3]}},
           "data": {"reader": "covid19ctseg", "root": str(root), "target": "infection", "slice": True,
                    "transforms": "slice_2d", "transform_args": {"size": 20, "intensity": None}, "cache": "none"},
           "protocol": {"name": "fixed", "train": ids[:1], "test": ids[1:]},
           "train": {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 2, "progress": False},
           "eval": {"metrics": ["dsc", "nsd", "hd95"], "unit": "case", "tau_mm": 1.0}}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return config_from_dict(cfg)


def test_2d_evaluation_measures_surface_metrics_in_mm(tmp_path):
    """Slices cut from a 0.8 mm volume and resized from 40 x 44 to 20 x 20 px: HD95 and NSD use the pixel size
    of the evaluation grid in mm (1.6 x 1.76 mm), not 1 px = 1 mm."""
    from COVIDLesionSegLib.metrics import case_metrics

    ids = write_covid19ctseg_layout(tmp_path / "data")
    trainer = Trainer(sliced_config(tmp_path / "data", ids), tmp_path / "run", device="cpu", progress=False,
                      log=lambda m: None)
    trainer.setup()
    trainer.procedure.predict_logits = _threshold_logits(shift=2)
    rows = {r["case"]: r for r in trainer.evaluate("test")[0]}
    test = trainer.dataset("data", "test", train_transforms=False)
    checked = 0
    for i in range(len(test)):
        item = test[i]
        pred = (_threshold_logits(2)(None, torch.as_tensor(item["image"])[None]) > 0).numpy()[0, 0]
        ref = np.asarray(item["infection"])[0] > 0.5
        if not ref.any():
            continue
        mm = case_metrics(pred, ref, spacing=(1.6, 1.76), tau_mm=1.0, which=["hd95", "nsd"])
        px = case_metrics(pred, ref, spacing=None, tau_mm=1.0, which=["hd95", "nsd"])
        row = rows[str(item["id"])]
        assert row["hd95"] == pytest.approx(mm["hd95"]) and row["nsd"] == pytest.approx(mm["nsd"])
        assert row["hd95"] != pytest.approx(px["hd95"])
        checked += 1
    assert checked >= 3


def test_004_empty_rule_is_an_option(tmp_path):
    """eval.empty_rule: 004 sets all metrics to 1 where nothing is predicted (as written: TP + FP = 0), or
    only where the slice has no lesion either (both_empty); default: the project's metrics."""
    ids = write_covid19ctseg_layout(tmp_path / "data")
    metrics = ["dsc", "sensitivity", "specificity", "precision", "voe"]
    out = {}
    for rule in (None, "both_empty", "no_positive_prediction"):
        trainer = Trainer(sliced_config(tmp_path / "data", ids, eval={"metrics": metrics, "empty_rule": rule}),
                          tmp_path / f"run_{rule}", device="cpu", progress=False, log=lambda m: None)
        trainer.setup()
        trainer.procedure.predict_logits = lambda model, x: torch.full_like(x[:, :1], -10.0)   # predicts nothing
        out[rule] = trainer.evaluate("test")[0]
    ref_pos = [np.asarray(it["infection"]).any() for it in
               (trainer.dataset("data", "test", train_transforms=False)[i] for i in range(len(out[None])))]
    assert any(ref_pos) and not all(ref_pos)
    for plain, both, literal, pos in zip(out[None], out["both_empty"], out["no_positive_prediction"], ref_pos, strict=True):
        assert literal["dsc"] == literal["sensitivity"] == literal["precision"] == 1.0 and literal["voe"] == 0.0
        if pos:
            assert both["dsc"] == plain["dsc"] == 0.0 and both["sensitivity"] == plain["sensitivity"] == 0.0
        else:
            assert both["precision"] == both["sensitivity"] == 1.0 and np.isnan(plain["precision"])


def test_ncovsegnet_stage2_tests_every_slice_on_the_native_grid(tmp_path, monkeypatch):
    """The full-scale nCoVSegNet stage-2 config (tiny sizes): training slices are the infected ones, cropped to
    the unsupervised 3D lung box; the test scores every slice of the test volume, on its native 60 x 64 grid,
    against the uncropped reference (not the infected slices only, not 64-px crops)."""
    from training.config import load_config
    from training.datasets import load_case

    ids = write_covid19ctseg_layout(tmp_path / "data", n=3, shape=(20, 60, 64), spacing=(2.0, 2.0, 3.0))   # lungs of > 20 mL
    monkeypatch.setenv("COVID19CTSEG", str(tmp_path / "data"))
    monkeypatch.setenv("NCOVSEGNET_STAGE1", str(tmp_path / "none"))
    cfg = load_config("ncovsegnet_stage2_covid", [
        "model.init=null", "model.args.width=0.125", "data.transform_args.size=64", "data.cache=none",
        "protocol.name=fixed", f"protocol.train=[{ids[0]}, {ids[1]}]", f"protocol.test=[{ids[2]}]",
        "train.epochs=1", "train.iterations_per_epoch=1", "train.progress=false"])
    assert cfg["data"]["crop_lungs"] and not cfg["data"]["transform_args"].get("crop_lungs", True)
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", progress=False, log=lambda m: None)
    trainer.setup()
    train = trainer.dataset("data", "train")
    train_cases = trainer.subset_cases("data", "train")
    infected = sum(int(np.asarray(load_case(c, ["infection"])["infection"])[0].any(axis=(1, 2)).sum())
                   for c in train_cases)
    assert len(train) == infected and all(np.asarray(train[i]["infection"]).any() for i in range(len(train)))
    seen = []
    real_rows = Trainer._metric_rows
    monkeypatch.setattr(Trainer, "_metric_rows", staticmethod(
        lambda results, *a, **k: (seen.extend(results), real_rows(results, *a, **k))[1]))
    rows, _ = trainer.evaluate("test")
    full = np.asarray(load_case(trainer.subset_cases("data", "test")[0], ["infection"])["infection"])[0] > 0
    assert rows[0]["n_slices"] == len(seen) == full.shape[0] == 20
    assert all(p.shape == r.shape == (60, 64) for _, _, p, r, _ in seen)
    assert all(sp == pytest.approx((2.0, 2.0)) for *_, sp in seen)
    np.testing.assert_array_equal(np.stack([r for _, _, _, r, _ in seen]), full)
    box = trainer._native_geometry("data", seen[0][0])["box"]
    assert box is not None and (box[0][1] - box[0][0], box[1][1] - box[1][0]) < (60, 64)   # lung box crop
