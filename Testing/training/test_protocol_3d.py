"""The 3D CPU comparison (training/protocol_3d.py) and evaluation through the deployed predictor: tiny phantom
stand-ins in the synthetic-lesion layout, one training step per run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training import protocol_3d
from training.config import load_config

#: Shrinks every run of the comparison: 1 step, a tiny network, the stand-ins' own grid, one window.
TINY = ["train.epochs=1", "train.iterations_per_epoch=1", "model.args.channels=[2,4,4,8]",
        "data.transform_args.target_spacing=[16.0,11.25,11.25]", "data.transform_args.patch_size=[8,16,16]",
        "train.checkpoint_every=1"]


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return protocol_3d.write_standin_data(tmp_path_factory.mktemp("protocol3d_data"))


def test_synthetic_reader_groups_copies_by_host(standins):
    from training.datasets import read_synthetic

    cases = read_synthetic(standins["covid"])
    assert len(cases) == 6 and {c.group for c in cases} == {"host0", "host1", "host2"}
    assert all(set(c.labels) == {"infection", "lung"} for c in cases)
    nodules = read_synthetic(standins["noncovid"], target="nodule")
    assert all("nodule" in c.labels for c in nodules)
    # host-grouped folds: no host on both sides, each host tested once
    tests = []
    for k in range(3):
        train, test = protocol_3d.fold_hosts("protocol3d_scratch_cpu", k, [f"data.root={standins['covid']}"])
        assert not set(train) & set(test) and len(test) == 1
        tests += test
    assert sorted(tests) == ["host0", "host1", "host2"]


def test_configs_of_the_comparison_load():
    names = [cfg for cfg, _ in protocol_3d.METHODS.values()] + list(protocol_3d.PRETRAINING.values())
    for name in names:
        cfg = load_config(name)
        assert cfg["model"]["args"]["spatial_dims"] == 3 and cfg["data"]["transforms"] == "nnunet_3d"
        assert cfg["eval"]["predictor"] == "engine"
    assert set(protocol_3d.METHODS) <= set(protocol_3d.PAPER_NUMBERS)


def test_test_scores_are_the_exported_checkpoint_through_the_engine(standins, tmp_path):
    """A run's test metrics equal those of its exported model.pt run by the engine (NetworkInfectionModel +
    pipeline.infection_mask) on the same HU volumes: the trainer scores what users get."""
    from COVIDLesionSegLib.metrics import case_metrics
    from COVIDLesionSegLib.network_predictor import NetworkInfectionModel
    from COVIDLesionSegLib.pipeline import infection_mask
    from training.datasets import load_case, read_synthetic
    from training.export import export_run
    from training.runs import RunDir
    from training.trainer import Trainer

    cfg = load_config("protocol3d_scratch_cpu", TINY + [f"data.root={standins['covid']}", "eval.predictor=auto",
                                                        "train.iterations_per_epoch=2"])
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", progress=False, log=lambda m: None)
    summary = trainer.fit()
    assert trainer.engine_predictor("data")        # auto: a 3D infection run on HU volumes
    rows = RunDir(tmp_path / "run").read_test_metrics()["cases"]
    assert len(rows) == summary["n_test"] == 2
    path, _ = export_run(tmp_path / "run")
    model = NetworkInfectionModel(path, device="cpu", batch_size=int(cfg["eval"]["batch_size"]))
    by_id = {c.id: c for c in read_synthetic(standins["covid"])}
    for row in rows:
        loaded = load_case(by_id[row["case"]], ["infection", "lung"])
        spacing = tuple(loaded["spacing"])
        pred = infection_mask(loaded["image"][0], loaded["lung"][0], model, spacing_zyx=spacing)
        ref = loaded["infection"][0] > 0
        expected = case_metrics(pred, ref, spacing=spacing, tau_mm=cfg["eval"]["tau_mm"], which=["dsc", "sensitivity"])
        assert row["dsc"] == pytest.approx(expected["dsc"], nan_ok=True)
        assert row["sensitivity"] == pytest.approx(expected["sensitivity"], nan_ok=True)
    # the network path still exists and is chosen for what the engine cannot run (a loss as selection metric)
    net_cfg = load_config("protocol3d_scratch_cpu", TINY + [f"data.root={standins['covid']}", "eval.predictor=network"])
    net = Trainer(net_cfg, tmp_path / "net", device="cpu", progress=False, log=lambda m: None)
    net.setup()
    assert not net.engine_predictor("data")
    net_rows, _ = net.evaluate("test", metrics=["dsc"])
    assert len(net_rows) == 2 and all(0.0 <= r["dsc"] <= 1.0 for r in net_rows)
    ckpt = trainer.engine_checkpoint()              # the in-memory checkpoint has the exported file's spec
    assert ckpt.input_spec["spacing_zyx"] == [16.0, 11.25, 11.25] and ckpt.input_spec["patch_size"] == [8, 16, 16]


def test_runner_trains_every_stage_and_writes_the_reviewer_tables(standins, tmp_path, monkeypatch):
    """protocol_3d.main: per-fold pre-training on the fold's training hosts only, scratch + a transfer + the
    collaborative run, then table.md, summary.md (papers' numbers beside) and reviewer.md (paired vs scratch)."""
    data = standins["covid"].parent
    out = tmp_path / "out"
    argv = ["--out", str(out), "--data", str(data), "--folds", "0,1",
            "--methods", "scratch,hybrid_encoder,collaborative"]
    for o in TINY:
        argv += ["--set", o]
    assert protocol_3d.main(argv) == 0
    pre = json.loads((out / "protocol3d_pretrain_noncovid_cpu" / "fold0" / "split.json").read_text())
    test_hosts = set(json.loads((out / "protocol3d_scratch_cpu" / "fold0" / "split.json").read_text())["groups"][c]
                     for c in json.loads((out / "protocol3d_scratch_cpu" / "fold0" / "split.json").read_text())["test"])
    assert test_hosts and not test_hosts & set(pre["groups"].values())   # pre-training never saw the test host
    collab = json.loads((out / "protocol3d_collaborative_cpu" / "fold0" / "config.json").read_text())
    assert collab["aux_data"]["noncovid"]["groups"] and not test_hosts & set(collab["aux_data"]["noncovid"]["groups"])
    for name in ("table.md", "table.csv", "summary.md", "reviewer.md", "timing.json"):
        assert (out / name).is_file()
    summary = (out / "summary.md").read_text()
    assert "| hybrid_encoder | 2 |" in summary and "0.704" in summary        # paper's number beside ours
    reviewer = (out / "reviewer.md").read_text()
    assert "vs scratch" in reviewer and "per test volume" in reviewer
    row = next(line for line in reviewer.splitlines() if line.startswith("| collaborative |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "4" and "[" in cells[4] and cells[-1] == "0.703"          # 4 (fold, case) pairs
    scores = np.array([json.loads((out / "protocol3d_scratch_cpu" / f"fold{k}" / "summary.json").read_text())
                       ["test_mean"]["dsc"] for k in (0, 1)], dtype=float)
    assert np.all((scores >= 0) & (scores <= 1))
