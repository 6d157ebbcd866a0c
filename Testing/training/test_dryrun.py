"""``python -m training dryrun --all``: every full-scale paper config through every stage it names (pre-training,
transfer, every fold, test, table, export) at tiny size on the CPU, with generated stand-ins in the published
layouts wherever a data set is absent. The CI guard that no protocol can crash after hours on a GPU."""

from __future__ import annotations

import json

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


def test_dryrun_all_paper_configs(tmp_path):
    """``dryrun --all`` (what CI runs): every paper config through all of its stages, with the checks of issue 13 -
    the published 5-fold split runs folds 0-4 (folds 2 and 4 share patients between train and test, as
    published), Continual Learning continues the pre-training's poly curve from its last epoch with a learning
    rate above 0, nCoVSegNet stage 2 tests every slice of every test volume."""
    threads = torch.get_num_threads()
    code = main(["dryrun", "--all", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads           # the dry run's single thread does not leak out
    report = json.loads((tmp_path / "dryrun.json").read_text())
    failed = {n: r.get("error") for n, r in report["configs"].items() if r["status"] != "ok"}
    assert code == EXIT_OK and not failed, failed
    assert set(report["configs"]) >= set(dryrun.paper_configs())
    for name, rec in report["configs"].items():
        assert rec["stages"][-1] == "export", name
        tested = any("(test " in s for s in rec["stages"])
        assert any(s.startswith("table") for s in rec["stages"]) == tested, name   # a table wherever a test ran
    runs = tmp_path / "runs"
    # the 5-fold protocol runs all of its folds, transfers run after their pre-training
    for name in ("covid19ctseg_nnunet3d_scratch", "transfer_continual_nnunet3d", "collaborative_nnunet3d",
                 "ncovsegnet_stage2_covid", "transfer_hybrid_encoder_nnunet3d", "transfer_multi_encoder_nnunet3d",
                 "transfer_lesion_representations_nnunet3d", "transfer_body_finetune_nnunet3d"):
        folds = [s for s in report["configs"][name]["stages"] if " fold " in s]
        assert folds == [f"train fold {k} (test 16)" for k in range(5)], (name, report["configs"][name]["stages"])
    leaky = [k for k in range(5) if json.loads((runs / "covid19ctseg_nnunet3d_scratch" / f"fold{k}" / "split.json")
                                               .read_text())["notes"]]
    assert leaky == [2, 4]                                    # trained although not patient-disjoint
    # Continual Learning: epoch 1 of the COVID phase sits at the pre-training's last epoch on one poly curve
    pre = json.loads((runs / "multilesion_nnunet3d_pretrain" / "config.json").read_text())
    lr0, horizon = pre["optim"]["lr"], pre["procedure"]["schedule_epochs"]
    last = json.loads((runs / "multilesion_nnunet3d_pretrain" / "log.json").read_text())[-1]["epoch"]
    for k in range(5):
        lrs = [r["lr"] for r in json.loads((runs / "transfer_continual_nnunet3d" / f"fold{k}" / "log.json").read_text())]
        assert lrs == pytest.approx([lr0 * (1 - (last + e) / horizon) ** 0.9 for e in range(len(lrs))])
        assert min(lrs) > 0
    # nCoVSegNet stage 2: every slice of the 16 test volumes is scored (not the infected ones only); rows are
    # patients (eval.unit group), so Radiopaedia patients 10 and 29 add up two volumes where both are tested
    depth = dryrun.PHANTOM_SHAPE[0]
    for k in range(5):
        fold = runs / "ncovsegnet_stage2_covid" / f"fold{k}"
        split = json.loads((fold / "split.json").read_text())
        per_patient: dict[str, int] = {}
        for cid in split["test"]:
            per_patient[f"group_{split['groups'][cid]}"] = per_patient.get(f"group_{split['groups'][cid]}", 0) + depth
        cases = json.loads((fold / "test_metrics.json").read_text())["cases"]
        assert {c["case"]: c["n_slices"] for c in cases} == per_patient and sum(per_patient.values()) == 16 * depth
    print(f"dry run of {len(report['configs'])} configs: {report['wall_s']:.0f} s ({report['cpu_s']:.0f} s of CPU)")
