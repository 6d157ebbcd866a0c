"""The papers' training procedures on the shared data at tiny size: multi-lesion pre-training (000), the
transfer strategies (000/001), relation-driven collaborative training (002), nCoVSegNet's transfer stages
(003) and 004's grid. Each runs real steps on ``../shared/data`` with a finite, falling loss; frozen parts
stay bit-identical; G of the collaborative network learns from the relation loss only; Continual
Learning's learning rate continues the pre-training's poly curve."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from Testing.conftest import shared_file
from training.config import CONFIG_DIR, ConfigError, config_from_dict, load_config
from training.procedures import ProcedureError, StepInfo
from training.runs import RunDir, load_training_state
from training.trainer import Trainer

torch.set_num_threads(2)

PLAN = {"spatial_dims": 2, "channels": [4, 8, 16], "strides": [1, 2, 2], "kernel_sizes": [3, 3, 3],
        "deep_supervision": True}
EFFUSION_IDS = ["medseg_001", "medseg_006", "medseg_008", "medseg_010"]


def _root(rel: str) -> str:
    return str(shared_file(rel).parent)


def covid_data(**over) -> dict:
    d = {"reader": "covid19ctseg2d", "root": _root("covid19ctseg2d/covid19ctseg2d.npz"), "target": "infection",
         "groups": ["0", "1"], "max_cases_per_group": 3, "transforms": "slice_2d",
         "transform_args": {"size": 64, "intensity": "uint8_01"}}
    d.update(over)
    return d


def lidc_data() -> dict:
    return {"reader": "shared_ct", "root": _root("ct/lidc_0001_ct.nii.gz"), "target": "nodule", "slice": True,
            "slice_positive": "nodule", "transforms": "slice_2d",
            "transform_args": {"size": 64, "intensity": {"name": "ctseg2d_domain", "size": 64}}}


def effusion_data() -> dict:
    return {"reader": "medseg100", "root": _root("medseg100/medseg100.npz"), "target": "effusion",
            "groups": EFFUSION_IDS, "transforms": "slice_2d", "transform_args": {"size": 64, "intensity": "uint8_01"}}


def base_config(**over) -> dict:
    cfg = {"name": "t", "seed": 1,
           "model": {"arch": "nnunet", "args": dict(PLAN)},
           "data": covid_data(),
           "protocol": {"name": "all"},
           "optim": {"name": "adam", "lr": 1e-2, "weight_decay": 0.0},
           "schedule": {"name": "poly"},
           "loss": {"name": "dice_ce", "args": {"batch_dice": True}},
           "train": {"epochs": 2, "iterations_per_epoch": 2, "batch_size": 2, "progress": False},
           "eval": {"test": False, "unit": "case"}}
    cfg.update(over)
    return cfg


def make_trainer(raw: dict, run_dir: Path) -> Trainer:
    trainer = Trainer(config_from_dict(raw), run_dir, device="cpu", progress=False, log=lambda m: None)
    trainer.setup()
    return trainer


def fixed_batch_losses(trainer: Trainer, steps: int = 4) -> list[float]:
    """Real optimisation steps through ``Trainer.train_step`` on one fixed set of real batches: the loss of
    each step (falls when the procedure's gradients are right)."""
    batches = next(trainer.train_batches(0))
    losses = []
    for i in range(steps):
        info = StepInfo(epoch=0, iteration=i, iterations_per_epoch=steps, max_epochs=trainer.procedure.max_epochs,
                        global_step=i)
        out, ok = trainer.train_step(batches, info)
        assert ok
        losses.append(out.loss)
    return losses


def assert_falls(losses: list[float]) -> None:
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


# ----------------------------------------------------------------------------------------------------------
# Multi-lesion pre-training
# ----------------------------------------------------------------------------------------------------------

PRE_EPOCHS, PRE_HORIZON, LR0 = 2, 5, 1e-2


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory) -> Path:
    """A real multi-lesion run: LIDC-IDRI-0001 nodule slices (task 0) + MedSeg effusion slices (task 1)."""
    raw = base_config(procedure={"name": "multilesion", "tasks": ["main", "effusion"], "schedule_epochs": PRE_HORIZON},
                      model={"arch": "nnunet", "args": {**PLAN, "out_channels": 2}},
                      data=lidc_data(), aux_data={"effusion": effusion_data()})
    raw["train"] = {**raw["train"], "epochs": PRE_EPOCHS}
    run = tmp_path_factory.mktemp("pre") / "multilesion"
    trainer = Trainer(config_from_dict(raw), run, device="cpu", progress=False, log=lambda m: None)
    summary = trainer.fit()
    assert summary["status"] == "completed"
    return run


def test_multilesion_run_logs_each_task_and_continues_poly(pretrain_run):
    log = RunDir(pretrain_run).read_log()
    assert len(log) == PRE_EPOCHS
    for row in log:
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["train_loss_main"])
        assert math.isfinite(row["train_loss_effusion"])
    # the poly curve has the horizon schedule_epochs, not train.epochs
    for e, row in enumerate(log):
        assert row["lr"] == pytest.approx(LR0 * (1 - e / PRE_HORIZON) ** 0.9, rel=1e-6)


def test_multilesion_loss_falls_and_heads_per_task(tmp_path):
    raw = base_config(procedure={"name": "multilesion"}, model={"arch": "nnunet", "args": {**PLAN, "out_channels": 2}},
                      data=lidc_data(), aux_data={"effusion": effusion_data()})
    trainer = make_trainer(raw, tmp_path / "r")
    assert trainer.procedure.tasks == ["main", "effusion"]
    assert_falls(fixed_batch_losses(trainer, 4))
    # the task loss of one task touches only its own head channel
    model, proc = trainer.model, trainer.procedure
    batches = {k: trainer.to_device(b) for k, b in next(trainer.train_batches(0)).items()}
    model.zero_grad()
    out = model(batches["effusion"]["image"])
    proc.loss_fn([o[:, 1:2] for o in out], batches["effusion"]["effusion"]).backward()
    head_w = model.decoder.heads[-1].conv.conv.weight.grad
    assert head_w[0].abs().sum() == 0 and head_w[1].abs().sum() > 0


def test_multilesion_checks_out_channels_and_exports_one_channel(tmp_path, pretrain_run):
    raw = base_config(procedure={"name": "multilesion"}, data=lidc_data(), aux_data={"effusion": effusion_data()})
    with pytest.raises(ProcedureError, match="out_channels = 2"):
        make_trainer(raw, tmp_path / "r")
    from training.procedures.multilesion import MultiLesionProcedure

    cfg = RunDir(pretrain_run).read_config()
    sd = load_training_state(pretrain_run / "best.pt")["model"]
    out_sd, model_cfg = MultiLesionProcedure.export_model(cfg, sd)
    assert model_cfg["args"]["out_channels"] == 1
    key = "decoder.heads.0.conv.conv.weight"
    assert out_sd[key].shape[0] == 1 and torch.equal(out_sd[key][0], sd[key][0])
    from COVIDLesionSegLib.models import build

    build(model_cfg).load_state_dict(out_sd)   # the exported network loads strictly


# ----------------------------------------------------------------------------------------------------------
# Transfer strategies (000, 001)
# ----------------------------------------------------------------------------------------------------------

def transfer_config(pretrain_run: Path, name: str, arch: str = "nnunet", **proc) -> dict:
    return base_config(procedure={"name": name, **proc}, model={"arch": arch, "args": dict(PLAN), "init": str(pretrain_run)})


def pretrained_sd(pretrain_run: Path) -> dict:
    return load_training_state(pretrain_run / "best.pt")["model"]


def test_continual_learning_starts_from_all_pretrained_weights(tmp_path, pretrain_run):
    trainer = make_trainer(transfer_config(pretrain_run, "continual"), tmp_path / "c")
    pre = pretrained_sd(pretrain_run)
    own = trainer.model.state_dict()
    assert torch.equal(own["encoder.stages.0.conv1.conv.weight"], pre["encoder.stages.0.conv1.conv.weight"])
    # the schedule: test_continual_lr_starts_at_the_last_pretraining_epoch_and_stays_positive, on a
    # pre-training whose best epoch differs from its last (here they are equal, which cannot tell them apart)


def _pretraining_folder(folder: Path, pretrain_run: Path, best_epoch: int, last_epoch: int,
                        schedule_epochs: int | None, epochs: int) -> Path:
    """A pre-training run folder whose best validation epoch is ``best_epoch`` and whose last is
    ``last_epoch`` (the real run's weights and config, with those epochs)."""
    from training.runs import save_training_state

    state = load_training_state(pretrain_run / "best.pt")
    cfg = dict(state["config"])
    cfg["procedure"] = {**cfg["procedure"], "schedule_epochs": schedule_epochs}
    cfg["train"] = {**cfg["train"], "epochs": epochs}
    folder.mkdir(parents=True)
    for name, epoch in (("best.pt", best_epoch), ("last.pt", last_epoch)):
        save_training_state(folder / name, {"config": cfg, "epoch": epoch, "model": state["model"]})
    return folder


def test_continual_lr_starts_at_the_last_pretraining_epoch_and_stays_positive(tmp_path, pretrain_run):
    """Best epoch 1 of a 3-epoch pre-training on a 6-epoch curve, 3 COVID-19 epochs: the COVID phase starts at
    epoch 3 of the curve (where pre-training stopped, not at the best epoch) and its lr is > 0 to the end."""
    pre = _pretraining_folder(tmp_path / "pre", pretrain_run, best_epoch=1, last_epoch=3, schedule_epochs=6, epochs=3)
    raw = transfer_config(pre, "continual")
    raw["train"] = {**raw["train"], "epochs": 3}
    trainer = make_trainer(raw, tmp_path / "c")
    trainer.fit()
    lrs = [r["lr"] for r in RunDir(tmp_path / "c").read_log()]
    assert lrs == pytest.approx([LR0 * (1 - (3 + e) / 6) ** 0.9 for e in range(3)])
    assert all(lr > 0 for lr in lrs)


def test_continual_refuses_a_curve_too_short_instead_of_stretching_it(tmp_path, pretrain_run):
    """Best = last = the pre-training's whole 2-epoch curve: no room left on it. Continual Learning must say so
    (not silently make the curve 2 + train.epochs long); an explicit horizon_epochs is honoured."""
    pre = _pretraining_folder(tmp_path / "pre", pretrain_run, best_epoch=2, last_epoch=2, schedule_epochs=None, epochs=2)
    with pytest.raises(ProcedureError, match="schedule_epochs = 4"):
        make_trainer(transfer_config(pre, "continual"), tmp_path / "c")
    trainer = make_trainer(transfer_config(pre, "continual", horizon_epochs=4), tmp_path / "c2")
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(LR0 * (1 - 2 / 4) ** 0.9)


def test_body_finetune_loads_everything_and_restarts_schedule(tmp_path, pretrain_run):
    trainer = make_trainer(transfer_config(pretrain_run, "body_finetune", head_task=1), tmp_path / "b")
    pre, own = pretrained_sd(pretrain_run), trainer.model.state_dict()
    for k, v in own.items():
        if k.startswith("decoder.heads."):
            assert torch.equal(v, pre[k][1:2])          # head_task 1: the effusion head
        else:
            assert torch.equal(v, pre[k])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(LR0)
    assert_falls(fixed_batch_losses(trainer, 4))


def test_lesion_representations_keeps_the_encoder_frozen(tmp_path, pretrain_run):
    trainer = make_trainer(transfer_config(pretrain_run, "lesion_representations"), tmp_path / "l")
    enc0, dec0 = snapshot(trainer.model.encoder), snapshot(trainer.model.decoder)
    pre = pretrained_sd(pretrain_run)
    assert all(torch.equal(v, pre[f"encoder.{k}"]) for k, v in enc0.items())
    assert_falls(fixed_batch_losses(trainer, 4))
    assert same(enc0, snapshot(trainer.model.encoder))     # bit-identical through training
    assert changed(dec0, snapshot(trainer.model.decoder))
    assert not any(p.requires_grad for p in trainer.model.encoder.parameters())


def test_hybrid_encoder_freezes_the_adapted_encoder(tmp_path, pretrain_run):
    trainer = make_trainer(transfer_config(pretrain_run, "hybrid_encoder", "hybrid_encoder_unet"), tmp_path / "h")
    m = trainer.model
    pre = pretrained_sd(pretrain_run)
    ad0, de0 = snapshot(m.adapted_encoder), snapshot(m.dedicated_encoder)
    assert all(torch.equal(v, pre[f"encoder.{k}"]) for k, v in ad0.items())
    assert not all(torch.equal(v, pre[f"encoder.{k}"]) for k, v in de0.items())   # Dedicated: from scratch
    assert_falls(fixed_batch_losses(trainer, 4))
    assert same(ad0, snapshot(m.adapted_encoder))
    assert changed(de0, snapshot(m.dedicated_encoder))


def test_multi_encoder_initialises_self_encoder_and_freezes_adapted(tmp_path, pretrain_run):
    trainer = make_trainer(transfer_config(pretrain_run, "multi_encoder", "multi_encoder_unet"), tmp_path / "m")
    m = trainer.model
    ad0, se0 = snapshot(m.adapted_encoder), snapshot(m.self_encoder)
    assert same(ad0, se0)                                   # 001: Self-encoder starts from the pre-training
    assert_falls(fixed_batch_losses(trainer, 4))
    assert same(ad0, snapshot(m.adapted_encoder))
    assert changed(se0, snapshot(m.self_encoder))


def test_transfer_needs_init_and_matching_arch(tmp_path, pretrain_run):
    raw = transfer_config(pretrain_run, "body_finetune")
    raw["model"].pop("init")
    with pytest.raises(ProcedureError, match="model.init"):
        make_trainer(raw, tmp_path / "x")
    with pytest.raises(ProcedureError, match="hybrid_encoder_unet"):
        make_trainer(transfer_config(pretrain_run, "hybrid_encoder"), tmp_path / "y")


# ----------------------------------------------------------------------------------------------------------
# Relation-driven collaborative training (002)
# ----------------------------------------------------------------------------------------------------------

def collab_config(pretrain_run: Path, **proc) -> dict:
    return base_config(procedure={"name": "collaborative", "noncovid": ["lidc", "effusion"], **proc},
                       model={"arch": "collaborative_unet", "args": dict(PLAN), "init": str(pretrain_run)},
                       aux_data={"lidc": lidc_data(), "effusion": effusion_data()})


def test_collaborative_general_encoder_learns_only_from_the_relation_loss(tmp_path, pretrain_run):
    # lambda_G = 0: L_seg and L_T update T and D, G stays bit-identical
    trainer = make_trainer(collab_config(pretrain_run, lambda_g=0.0, lambda_t=0.1, rampup_epochs=0.0), tmp_path / "a")
    m = trainer.model
    pre = pretrained_sd(pretrain_run)
    g0, t0, d0 = snapshot(m.general_encoder), snapshot(m.target_encoder), snapshot(m.decoder)
    assert all(torch.equal(v, pre[f"encoder.{k}"]) for k, v in g0.items())   # G from the pre-trained encoder
    losses = fixed_batch_losses(trainer, 4)
    assert_falls(losses)
    assert same(g0, snapshot(m.general_encoder))
    assert changed(t0, snapshot(m.target_encoder)) and changed(d0, snapshot(m.decoder))
    # lambda_G > 0: G changes (its only gradient is L_G's)
    trainer = make_trainer(collab_config(pretrain_run, lambda_g=1.0, lambda_t=0.1, rampup_epochs=0.0), tmp_path / "b")
    g0 = snapshot(trainer.model.general_encoder)
    batches = {k: trainer.to_device(b) for k, b in next(trainer.train_batches(0)).items()}
    info = StepInfo(epoch=0, iteration=0, iterations_per_epoch=1, max_epochs=2, global_step=0)
    out = trainer.procedure.training_step(trainer.model, batches, info)
    assert out.logs["rel_g"] > 0 and out.logs["rel_t"] <= 0 and out.logs["lambda_g"] == 1.0
    # the segmentation loss alone gives G no gradient
    trainer.model.zero_grad(set_to_none=True)
    seg_only = trainer.procedure.loss_fn(trainer.model(batches["main"]["image"]), batches["main"]["infection"])
    seg_only.backward()
    assert all(p.grad is None for p in trainer.model.general_encoder.parameters())
    trainer.model.zero_grad(set_to_none=True)
    trainer.backward_step(out.loss)
    assert changed(g0, snapshot(trainer.model.general_encoder))


def test_collaborative_full_scale_relation_loss_is_bounded_against_the_segmentation_loss(monkeypatch):
    """The full-scale config scales eqs. 4-5 per channel: at 002's C = 320, L_T stays within -4 lambda_T (the
    summed norm reaches far beyond the segmentation loss, where the project's run collapsed)."""
    from COVIDLesionSegLib.models.relation import relation_matrix, target_relation_loss

    for var in ("COVID19CTSEG", "MSD_LUNG", "STRUCTSEG", "NSCLC_EFFUSION", "PRETRAINED"):
        monkeypatch.setenv(var, "/nonexistent")
    cfg = load_config("collaborative_nnunet3d")
    opts = cfg["procedure"]
    assert opts["reduction"] == "channel"
    from training.procedures.collaborative import relation_scale

    torch.manual_seed(0)
    c = 320
    r_g = relation_matrix(torch.randn(2, c, 4, 5, 6))
    r_t = relation_matrix(-torch.randn(2, c, 4, 5, 6) ** 2)      # far apart: what maximising L_T drives to
    reduction, per = relation_scale(opts["reduction"], c)
    l_t = float(target_relation_loss(r_g, r_t, opts["lambda_t"] * per, reduction))
    summed = float(target_relation_loss(r_g, r_t, opts["lambda_t"], "sum"))
    assert -4 * opts["lambda_t"] <= l_t < 0
    assert summed < -4 * c * opts["lambda_t"] * 0.05 and summed == pytest.approx(l_t * c, rel=1e-5)


def test_collaborative_ramp_up(tmp_path, pretrain_run):
    trainer = make_trainer(collab_config(pretrain_run, lambda_g=1.0, lambda_t=0.1, rampup_epochs=4.0), tmp_path / "r")
    lg0, lt0 = trainer.procedure.weights_at(0.0)
    lg2, _ = trainer.procedure.weights_at(2.0)
    lg4, lt4 = trainer.procedure.weights_at(4.0)
    assert lg0 == pytest.approx(math.exp(-5)) and lg0 < lg2 < lg4 == pytest.approx(1.0)
    assert lt4 == pytest.approx(0.1) and lt0 == pytest.approx(0.1 * math.exp(-5))


# ----------------------------------------------------------------------------------------------------------
# nCoVSegNet (003)
# ----------------------------------------------------------------------------------------------------------

def ncov_config(**over) -> dict:
    cfg = base_config(procedure={"name": "ncovsegnet"},
                      model={"arch": "ncovsegnet", "args": {"in_channels": 3, "out_channels": 1, "width": 0.0625}},
                      data={**lidc_data(), "transforms": "ncovsegnet",
                            "transform_args": {"size": 64, "intensity": {"name": "ctseg2d_domain", "size": 64},
                                               "crop_lungs": False, "channels": 3}},
                      optim={"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
                      schedule={"name": "step", "step_size": 1, "gamma": 0.1},
                      loss={"name": "structure", "args": {}})
    cfg.update(over)
    return cfg


def test_ncovsegnet_stage1_multiscale_steps_and_stage2(tmp_path):
    raw = ncov_config(procedure={"name": "ncovsegnet", "rates": [0.5, 1.0, 1.5]})
    raw["train"] = {**raw["train"], "batch_size": 2, "epochs": 1}
    trainer = make_trainer(raw, tmp_path / "s1")
    assert any("WARNING" in n and "random" in n for n in trainer.notes)   # no ImageNet file: documented warning
    batches = next(trainer.train_batches(0))
    outs = [trainer.train_step(batches, StepInfo(0, i, 2, 1, i))[0] for i in range(2)]
    assert_falls([o.loss for o in outs])
    assert set(outs[0].logs) == {"loss_0.5", "loss_1", "loss_1.5"}
    state = trainer.optimizer.state_dict()["state"]
    assert max(int(s["step"]) for s in state.values()) == 2 * 3     # one update per rate and batch
    trainer.save(trainer.run.best, 1)
    # stage 2 on COVID-19 slices starts from the stage-1 weights
    raw2 = ncov_config(model={"arch": "ncovsegnet", "args": {"in_channels": 3, "out_channels": 1, "width": 0.0625},
                              "init": str(tmp_path / "s1")},
                       data=covid_data(transforms="ncovsegnet",
                                       transform_args={"size": 64, "intensity": "uint8_01", "lung_key": "lung",
                                                       "crop_lungs": True, "channels": 3}))
    raw2["train"] = {**raw2["train"], "batch_size": 2}
    t2 = make_trainer(raw2, tmp_path / "s2")
    s1 = load_training_state(tmp_path / "s1" / "best.pt")["model"]
    assert all(torch.equal(v, s1[k]) for k, v in t2.model.state_dict().items())
    assert all(math.isfinite(v) for v in fixed_batch_losses(t2, 1))


def test_ncovsegnet_missing_imagenet_file_is_a_clear_error(tmp_path):
    raw = ncov_config(procedure={"name": "ncovsegnet", "imagenet_weights": str(tmp_path / "resnet50-none.pth")})
    with pytest.raises(ProcedureError, match="not found"):
        make_trainer(raw, tmp_path / "x")


# ----------------------------------------------------------------------------------------------------------
# 004 grid
# ----------------------------------------------------------------------------------------------------------

def grid_config(**proc) -> dict:
    data = covid_data(transforms="bizopoulos_004", groups=["0", "1", "2"], max_cases_per_group=2,
                      transform_args={"size": 64, "normalisation": "slice"})
    test = covid_data(transforms="bizopoulos_004", groups=["10", "11"], max_cases_per_group=2,
                      transform_args={"size": 64, "normalisation": "slice"})
    return base_config(name="g", procedure={"name": "grid004", "test_data": "test", "lesion_target": "infection", **proc},
                       model={"arch": "grid_unet", "args": {"encoder": "resnet18"}},
                       data=data, aux_data={"test": test}, protocol={"name": "all", "val_fraction": 0.4},
                       optim={"name": "adam", "lr": 1e-3, "weight_decay": 0.0}, schedule={"name": "constant"},
                       loss={"name": "soft_dice", "args": {}},
                       train={"epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "progress": False,
                              "select_metric": "val_loss", "grad_clip": None},
                       eval={"test": True, "unit": "group", "metrics": ["dsc", "sensitivity", "specificity"]})


def test_grid004_expands_the_grid_and_tests_on_the_other_data_set(tmp_path):
    from training.procedures.grid004 import expand_grid, run_one

    raw = grid_config(grid={"decoders": ["unet", "fpn"], "encoders": ["resnet18"],
                            "experiments": ["lung", "lesion_b"], "inits": ["random", "imagenet"]})
    configs = expand_grid(config_from_dict(raw))
    assert [c["name"] for c in configs] == ["g_lung_unet_resnet18_random", "g_lung_fpn_resnet18_random",
                                            "g_lesion_b_unet_resnet18_random", "g_lesion_b_fpn_resnet18_random"]
    lung, lesion_b = configs[0], configs[2]
    assert lung["data"]["target"] == "lung" and "mask_input_with" not in lung["data"]["transform_args"]
    assert lesion_b["data"]["target"] == "infection"
    assert lesion_b["aux_data"]["test"]["transform_args"]["mask_input_with"] == "lung"
    assert configs[1]["model"]["arch"] == "grid_fpn"
    # lesion B really multiplies the input by the lung mask
    t = make_trainer(lesion_b, tmp_path / "lb")
    item = t.dataset("data", "train", train_transforms=False)[0]
    assert_falls(fixed_batch_losses(t, 4))
    from training.datasets import load_case

    case = next(c for c in t.cases_of("data") if c.id == item["id"])
    assert float(load_case(case, ["lung"])["lung"].mean()) < 1.0
    assert float((torch.as_tensor(item["image"]) == 0).float().mean()) > 0.2   # zeros outside the lungs
    summary = run_one(lung, tmp_path / "lung")
    assert summary["test_data"] == "test" and summary["n_test"] == 2        # the two Radiopaedia test groups
    assert 0.0 <= summary["test_mean"]["dsc"] <= 1.0
    assert RunDir(tmp_path / "lung").test_json.exists()


def test_grid004_checks_experiment_and_imagenet(tmp_path):
    raw = grid_config(experiment="lesion_b")
    with pytest.raises(ProcedureError, match="mask_input_with"):
        make_trainer(raw, tmp_path / "a")
    with pytest.raises(ProcedureError, match="imagenet_weights"):
        make_trainer(grid_config(init="imagenet"), tmp_path / "b")
    with pytest.raises(ConfigError, match="experiment"):
        config_from_dict(grid_config(experiment="lesion_c"))


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------

NEW_CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml")
                     if p.name.startswith(("protocol2d_", "multilesion_", "transfer_", "collaborative_",
                                           "ncovsegnet_", "grid004_")))


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_paper_configs_validate(name, monkeypatch):
    for var in ("COVID19CTSEG", "MSD_LUNG", "STRUCTSEG", "NSCLC_EFFUSION", "LIDC", "MOSMED", "MEDSEG", "RUNS"):
        monkeypatch.setenv(var, "/nonexistent")
    cfg = load_config(name)
    assert cfg["procedure"]["name"] in {"supervised", "multilesion", "continual", "body_finetune",
                                        "lesion_representations", "hybrid_encoder", "multi_encoder",
                                        "collaborative", "ncovsegnet", "grid004"}
    if not name.endswith("_cpu.yaml"):
        assert cfg["train"]["epochs"] >= 50      # full scale: the papers' epochs


def test_volume_lung_crop_before_slicing(tmp_path):
    """data.crop_lungs crops each HU volume to its lung box (engine's unsupervised lung mask) before slicing,
    as 003 crops LIDC before training nCoVSegNet; the nodule slices stay and shrink in-plane."""
    plain = make_trainer(base_config(data=lidc_data()), tmp_path / "plain")
    cropped = make_trainer(base_config(data={**lidc_data(), "crop_lungs": True}), tmp_path / "cropped")
    cases = plain.subset_cases("data", "all")
    full = plain._items("data", cases)
    crop = cropped._items("data", cases)
    assert len(crop) == len(full) > 0                       # every nodule slice survives the crop
    full_hw = np.asarray(full[0]["image"]).shape[-2:]
    crop_hw = np.asarray(crop[0]["image"]).shape[-2:]
    assert full_hw == (512, 512) and crop_hw[0] < 512 and crop_hw[1] < 512
    assert sum(int(np.asarray(i["nodule"]).sum()) for i in crop) == sum(int(np.asarray(i["nodule"]).sum())
                                                                        for i in full)
