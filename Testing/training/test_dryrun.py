"""``python -m training dryrun --all``: every full-scale paper config through every stage it names (pre-training,
transfer, every fold, test, table, export) at tiny size on the CPU, with generated stand-ins in the published
layouts wherever a data set is absent. The CI guard that no protocol can crash after hours on a GPU."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from training import dryrun
from training.cli import EXIT_OK, main

torch.set_num_threads(2)


def test_standins_are_read_by_the_real_readers(tmp_path):
    """Each generated stand-in is read by its data set's reader, with the targets the paper configs train on."""
    from training.trainer import READERS

    targets = {"covid19ctseg": "infection", "msd": "lesion", "structseg": "lesion", "nsclc_effusion": "effusion",
               "lidc": "nodule", "medseg": "lesion", "covid19ctseg2d": "infection"}
    assert set(targets) == set(dryrun.STANDINS)
    from training.datasets import load_case

    for reader, build in dryrun.STANDINS.items():
        build(tmp_path / reader)
        cases = READERS[reader](tmp_path / reader)
        assert cases, reader
        loaded = load_case(cases[0], [targets[reader]])
        assert loaded[targets[reader]].any() or reader == "medseg", reader
    ids = {c.id for c in READERS["covid19ctseg"](tmp_path / "covid19ctseg")}
    from training.datasets import BENCHMARK_TASK1_TRAIN
    assert ids == {i for fold in BENCHMARK_TASK1_TRAIN for i in fold}      # the published folds' 20 names


def test_dryrun_of_one_paper_config_runs_every_stage(tmp_path):
    """A 2D paper config through the dry run (what CI runs every time; --all is the test below)."""
    code = main(["dryrun", "ctseg2d_supervised", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "dryrun.json").read_text())
    rec = report["configs"]["ctseg2d_supervised"]
    assert code == EXIT_OK and rec["status"] == "ok", rec
    assert rec["stages"][-1] == "export" and any(s.startswith("table") for s in rec["stages"]), rec["stages"]


@pytest.mark.skipif(not os.environ.get("COVIDLESIONSEG_DRYRUN_ALL"),
                    reason="the dry run of every paper config takes 8-9 CPU minutes; set COVIDLESIONSEG_DRYRUN_ALL=1")
def test_dryrun_all_paper_configs(tmp_path, capsys):
    t0 = time.perf_counter()
    code = main(["dryrun", "--all", "--out", str(tmp_path)])
    wall = time.perf_counter() - t0
    report = json.loads((tmp_path / "dryrun.json").read_text())
    failed = {n: r.get("error") for n, r in report["configs"].items() if r["status"] != "ok"}
    assert code == EXIT_OK and not failed, failed
    assert set(report["configs"]) >= set(dryrun.paper_configs())
    for name, rec in report["configs"].items():
        assert rec["stages"][-1] == "export", name
        tested = any("(test " in s for s in rec["stages"])
        assert any(s.startswith("table") for s in rec["stages"]) == tested, name   # a table wherever a test ran
    # the 5-fold protocol runs all of its folds, transfers run after their pre-training
    for name in ("covid19ctseg_nnunet3d_scratch", "transfer_continual_nnunet3d", "collaborative_nnunet3d",
                 "ncovsegnet_stage2_covid"):
        folds = [s for s in report["configs"][name]["stages"] if " fold " in s]
        assert len(folds) == 5, (name, report["configs"][name]["stages"])
    print(f"dry run of {len(report['configs'])} configs: {wall:.0f} s")
