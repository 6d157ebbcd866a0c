"""Tables of finished runs: two real tiny runs (``python -m training cv`` over the 2 folds of the 2D
protocol), per-fold values equal to the mean over each run's test cases, mean +- std over folds, Markdown
and CSV, and the errors for unfinished or duplicate runs."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil

import numpy as np
import pytest

from Testing.training.helpers import tiny_config
from training.cli import EXIT_OK, EXIT_USAGE, main
from training.runs import RunDir, RunError, find_runs, read_json, write_json
from training.tables import TABLE_METRICS, build_table, run_result


@pytest.fixture(scope="module")
def cv_runs(tmp_path_factory):
    """Two finished runs (folds 0 and 1) made by the ``cv`` command, plus the table it wrote."""
    tmp = tmp_path_factory.mktemp("cv")
    cfg = tiny_config(**{"name": "tinycv", "train.epochs": 1, "train.iterations_per_epoch": 2,
                         "data.max_cases_per_group": 2})
    path = tmp / "cv.json"
    path.write_text(json.dumps(cfg))
    assert main(["cv", str(path), "--out", str(tmp / "runs"), "--no-progress"]) == EXIT_OK
    return tmp / "runs" / "tinycv"


def test_cv_writes_one_run_per_fold_and_a_table(cv_runs):
    runs = find_runs([cv_runs])
    assert [r.path.name for r in runs] == ["fold0", "fold1"]
    train0 = set(read_json(runs[0].summary)["train_groups"])
    train1 = set(read_json(runs[1].summary)["train_groups"])
    assert len(train0) == len(train1) == 4 and not train0 & train1  # two disjoint sets of coronacases groups
    md = (cv_runs / "table.md").read_text()
    assert "mean +- std (2)" in md and "tinycv" in md
    rows = list(csv.DictReader(io.StringIO((cv_runs / "table.csv").read_text())))
    assert [r["fold"] for r in rows] == ["0", "1", "mean", "std"]


def test_table_values_are_means_over_cases_and_folds(cv_runs):
    runs = find_runs([cv_runs])
    table = build_table(runs)
    per_fold = []
    for run in runs:
        cases = run.read_test_metrics()["cases"]
        assert len(cases) == 14  # 14 test groups, scored per group (eval.unit: group)
        res = run_result(run)
        for key in TABLE_METRICS:
            vals = [c[key] for c in cases if c.get(key) is not None and not math.isnan(c[key])]
            expected = float(np.mean(vals)) if vals else float("nan")
            assert res.metrics[key] == pytest.approx(expected, nan_ok=True), key
        assert res.epoch_time_s == pytest.approx(read_json(run.summary)["mean_epoch_time_s"])
        per_fold.append(res)
    rows = table.rows()
    assert [r["fold"] for r in rows] == [0, 1, "mean", "std"]
    for key in list(TABLE_METRICS) + ["epoch_time_s"]:
        vals = np.array([r[key] for r in rows[:2]], dtype=float)
        assert rows[2][key] == pytest.approx(np.nanmean(vals), nan_ok=True)
        assert rows[3][key] == pytest.approx(np.nanstd(vals), nan_ok=True)
    md = table.markdown()
    header = md.splitlines()[0]
    for name in ("DSC", "NSD", "Sensitivity", "F1", "Accuracy", "Specificity", "PPV", "VOE", "RVD",
                 "Epoch time (s)"):
        assert name in header
    dsc_mean, dsc_std = rows[2]["dsc"], rows[3]["dsc"]
    assert f"**{dsc_mean:.4f} +- {dsc_std:.4f}**" in md
    parsed = list(csv.DictReader(io.StringIO(table.csv())))
    assert float(parsed[0]["dsc"]) == pytest.approx(per_fold[0].metrics["dsc"], rel=1e-5)


def test_table_command_writes_markdown_and_csv(cv_runs, tmp_path, capsys):
    md, cp = tmp_path / "t.md", tmp_path / "t.csv"
    assert main(["table", str(cv_runs / "fold0"), str(cv_runs / "fold1"), "--markdown", str(md), "--csv", str(cp),
                 "--metrics", "dsc,nsd,voe"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "| tinycv | 0 |" in out and md.read_text() == out.strip("\n") + "\n"
    assert cp.read_text().splitlines()[0] == "experiment,fold,n_test,epochs,dsc,nsd,voe,epoch_time_s"


def test_table_refuses_unfinished_and_duplicate_runs(cv_runs, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(cv_runs / "fold0", copy)
    with pytest.raises(RunError, match="two runs of experiment 'tinycv' fold 0"):
        build_table([RunDir(cv_runs / "fold0"), RunDir(copy)])
    summary = read_json(copy / "summary.json")
    write_json(copy / "summary.json", {**summary, "status": "interrupted"})
    with pytest.raises(RunError, match="not finished"):
        build_table([RunDir(copy)])
    assert main(["table", str(tmp_path / "nothing_here")]) == EXIT_USAGE
    assert "run folder not found" in capsys.readouterr().err


def _fake_runs(root, name: str, dsc_of, folds: int = 3, cases: int = 8) -> list[RunDir]:
    """Finished run folders of one method whose test DSC per (fold, case) is ``dsc_of(fold, case)``."""
    dirs = []
    for k in range(folds):
        rd = RunDir(root / name / f"fold{k}").create()
        rows = [{"case": f"vol{c}", "group": f"vol{c}", "dsc": dsc_of(k, c)} for c in range(cases) if c % folds != k]
        rd.write_test_metrics(rows, {})
        rd.write_summary({"name": name, "fold": k, "status": "completed", "epochs_completed": 1,
                          "mean_epoch_time_s": 1.0})
        dirs.append(rd)
    return dirs


def test_reviewer_table_gives_spread_intervals_paired_tests_and_the_papers_numbers(tmp_path):
    from training.tables import case_values, cluster_bootstrap, paired_comparison, reviewer_table

    rng = np.random.default_rng(0)
    base = {(k, c): 0.5 + 0.2 * rng.random() for k in range(3) for c in range(8)}
    scratch = _fake_runs(tmp_path, "scratch", lambda k, c: base[(k, c)])
    better = _fake_runs(tmp_path, "hybrid", lambda k, c: base[(k, c)] + 0.05 + 0.01 * rng.standard_normal())
    same = _fake_runs(tmp_path, "noise", lambda k, c: base[(k, c)] + 0.02 * rng.standard_normal())
    vals = case_values(scratch, "dsc")
    assert len(vals) == 16                                     # every (fold, case) that was tested
    lo, hi = cluster_bootstrap(vals, seed=1)
    mean = np.mean(list(vals.values()))
    assert lo < mean < hi and hi - lo < 0.2
    up = paired_comparison(case_values(better, "dsc"), vals)
    assert up["n"] == 16 and 0.04 < up["mean_diff"] < 0.06 and up["ci_low"] > 0 and up["p"] < 0.05
    flat = paired_comparison(case_values(same, "dsc"), vals)
    assert flat["ci_low"] < 0 < flat["ci_high"]
    md = reviewer_table({"scratch": scratch, "hybrid": better, "noise": same}, paper={"scratch": 0.673, "hybrid": 0.704})
    lines = md.strip().splitlines()
    assert "95 % CI" in lines[0] and "vs scratch" in lines[0] and "Paper" in lines[0]
    hybrid = next(line for line in lines if line.startswith("| hybrid"))
    assert "0.704" in hybrid and "+0.0" in hybrid and "| 16 |" in hybrid
    assert next(line for line in lines if line.startswith("| noise")).rstrip().endswith("| - |")


def test_protocol_2d_reviewer_markdown(tmp_path):
    from training.protocol_2d import reviewer_markdown

    _fake_runs(tmp_path, "protocol2d_scratch_cpu", lambda k, c: 0.5 + 0.01 * c)
    _fake_runs(tmp_path, "protocol2d_hybrid_encoder_cpu", lambda k, c: 0.55 + 0.01 * c)
    md = reviewer_markdown(tmp_path, metrics=("dsc",))
    row = next(line for line in md.splitlines() if line.startswith("| hybrid_encoder"))
    assert "+0.0500" in row and "0.704" in row       # the paired difference and 000's reported DSC
