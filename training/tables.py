"""The papers' result tables from finished runs: per fold, and mean +- std over folds, as Markdown and CSV.

Columns follow the papers' tables: DSC and NSD (000 Table 1, 002 Table II), Sensitivity, F1 and Accuracy
(000 Table 2), Specificity, PPV, VOE and RVD (003 Table 2) and the training time per epoch (000 Table 3).
Each fold's value of a metric is the mean over that fold's test cases (``test_metrics.json`` of the run,
as written by :mod:`training.trainer`; NaN cases - an undefined ratio - are skipped, as
``COVIDLesionSegLib.metrics.aggregate`` does). The summary row of an experiment is the mean and the
standard deviation over its folds; the standard deviation is the population one (ddof = 0), the same
convention as ``metrics.aggregate`` over cases. Experiments are the runs' config names, in the order
given; rows of one experiment are its folds in fold order.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from COVIDLesionSegLib.metrics import METRIC_NAMES
from training.runs import RunDir, RunError

#: Default columns: metric key -> header (PPV is the metrics module's ``precision``).
TABLE_METRICS: dict[str, str] = {
    "dsc": "DSC",
    "nsd": "NSD",
    "sensitivity": "Sensitivity",
    "f1": "F1",
    "accuracy": "Accuracy",
    "specificity": "Specificity",
    "precision": "PPV",
    "voe": "VOE",
    "rvd": "RVD",
}
EPOCH_TIME = "epoch_time_s"


@dataclass
class RunResult:
    """The numbers of one finished run that go into a table."""

    experiment: str
    fold: int
    path: Path
    status: str
    epochs: int
    epoch_time_s: float
    metrics: dict[str, float]          # mean over the test cases
    n_test: int
    procedure: str = ""
    arch: str = ""


@dataclass
class Table:
    """Rows of per-fold and summary values; render with :meth:`markdown` / :meth:`csv`."""

    metrics: list[str]
    runs: list[RunResult]
    summary: dict[str, dict[str, tuple[float, float, int]]] = field(default_factory=dict)  # exp -> col -> (mean, std, n)

    @property
    def columns(self) -> list[str]:
        return list(self.metrics) + [EPOCH_TIME]

    def header(self, col: str) -> str:
        if col == EPOCH_TIME:
            return "Epoch time (s)"
        return TABLE_METRICS.get(col, METRIC_NAMES.get(col, col))

    def experiments(self) -> list[str]:
        seen: list[str] = []
        for r in self.runs:
            if r.experiment not in seen:
                seen.append(r.experiment)
        return seen

    def _value(self, run: RunResult, col: str) -> float:
        return run.epoch_time_s if col == EPOCH_TIME else run.metrics.get(col, float("nan"))

    def rows(self) -> list[dict[str, Any]]:
        """Plain rows: per fold (``fold`` = k) then the experiment's summary (``fold`` = "mean", "std")."""
        out = []
        for exp in self.experiments():
            runs = sorted((r for r in self.runs if r.experiment == exp), key=lambda r: r.fold)
            for r in runs:
                out.append({"experiment": exp, "fold": r.fold, "n_test": r.n_test, "epochs": r.epochs,
                            **{c: self._value(r, c) for c in self.columns}})
            out.append({"experiment": exp, "fold": "mean", "n_test": sum(r.n_test for r in runs),
                        "epochs": "", **{c: self.summary[exp][c][0] for c in self.columns}})
            out.append({"experiment": exp, "fold": "std", "n_test": "", "epochs": "",
                        **{c: self.summary[exp][c][1] for c in self.columns}})
        return out

    def markdown(self, digits: int = 4) -> str:
        """Markdown: one row per fold, then ``mean +- std`` per experiment (bold)."""
        head = ["Experiment", "Fold", "Test cases"] + [self.header(c) for c in self.columns]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(self.columns)) + "|"]
        for exp in self.experiments():
            runs = sorted((r for r in self.runs if r.experiment == exp), key=lambda r: r.fold)
            for r in runs:
                cells = [exp, str(r.fold), str(r.n_test)] + [_fmt(self._value(r, c), 1 if c == EPOCH_TIME else digits)
                                                             for c in self.columns]
                lines.append("| " + " | ".join(cells) + " |")
            cells = [f"**{exp}**", f"**mean +- std ({len(runs)})**", str(sum(r.n_test for r in runs))]
            for c in self.columns:
                m, s, n = self.summary[exp][c]
                d = 1 if c == EPOCH_TIME else digits
                cells.append(f"**{_fmt(m, d)} +- {_fmt(s, d)}**" if n else "-")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        cols = ["experiment", "fold", "n_test", "epochs"] + self.columns
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for row in self.rows():
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else
                            f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        return buf.getvalue()


def _fmt(v: float, digits: int) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def run_result(run: RunDir) -> RunResult:
    """Read one finished run (summary.json and test_metrics.json)."""
    summary = run.read_summary()
    status = summary.get("status")
    if status not in ("completed", "early_stopped"):
        raise RunError(f"{run.path} is not finished (status {status!r}); resume it before tabulating")
    if not run.test_json.exists():
        raise RunError(f"{run.path} has no test_metrics.json (the run had no test set, or eval.test was off)")
    cases = run.read_test_metrics().get("cases", [])
    means: dict[str, float] = {}
    for key in METRIC_NAMES:
        vals = [float(c[key]) for c in cases if isinstance(c.get(key), (int, float)) and c.get(key) is not None]
        vals = [v for v in vals if not math.isnan(v)]
        means[key] = float(np.mean(vals)) if vals else float("nan")
    et = summary.get("mean_epoch_time_s")
    return RunResult(experiment=str(summary.get("name")), fold=int(summary.get("fold", 0)), path=run.path,
                     status=status, epochs=int(summary.get("epochs_completed", 0)),
                     epoch_time_s=float(et) if et is not None else float("nan"), metrics=means, n_test=len(cases),
                     procedure=str(summary.get("procedure", "")), arch=str(summary.get("arch", "")))


def build_table(runs: Sequence[RunDir], metrics: Sequence[str] | None = None) -> Table:
    """A :class:`Table` over finished runs (see the module docstring)."""
    metrics = list(metrics or TABLE_METRICS)
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise RunError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
    if not runs:
        raise RunError("no runs to tabulate")
    results = [run_result(r) for r in runs]
    seen: dict[tuple[str, int], Path] = {}
    for r in results:
        key = (r.experiment, r.fold)
        if key in seen:
            raise RunError(f"two runs of experiment {r.experiment!r} fold {r.fold}: {seen[key]} and {r.path}")
        seen[key] = r.path
    table = Table(metrics=metrics, runs=results)
    for exp in table.experiments():
        mine = [r for r in results if r.experiment == exp]
        table.summary[exp] = {}
        for col in table.columns:
            vals = np.array([table._value(r, col) for r in mine], dtype=np.float64)
            vals = vals[~np.isnan(vals)]
            table.summary[exp][col] = ((float(vals.mean()), float(vals.std()), int(vals.size)) if vals.size
                                       else (float("nan"), float("nan"), 0))
    return table


def write_tables(table: Table, markdown: str | os.PathLike | None, csv_path: str | os.PathLike | None
                 ) -> tuple[Path | None, Path | None]:
    """Write the Markdown and/or CSV renderings; returns the paths written."""
    md = Path(markdown) if markdown else None
    cp = Path(csv_path) if csv_path else None
    if md:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(table.markdown())
    if cp:
        cp.parent.mkdir(parents=True, exist_ok=True)
        cp.write_text(table.csv())
    return md, cp


# ----------------------------------------------------------------------------------------------------------
# Per-case statistics: what a reviewer asks for beyond fold means
# ----------------------------------------------------------------------------------------------------------

def case_values(runs: Sequence[RunDir], metric: str) -> dict[tuple[int, str], float]:
    """``{(fold, case): value}`` of ``metric`` over the test cases of finished runs (NaN cases left out)."""
    out: dict[tuple[int, str], float] = {}
    for run in runs:
        res = run_result(run)
        for row in run.read_test_metrics().get("cases", []):
            v = row.get(metric)
            if isinstance(v, (int, float)) and not math.isnan(float(v)):
                out[(res.fold, str(row.get("case")))] = float(v)
    return out


def cluster_bootstrap(values: dict[tuple[int, str], float], n_boot: int = 2000, alpha: float = 0.05,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (default 95 %), resampling *cases* with all
    their folds: in the papers' protocol one volume is tested in several folds, so its values are not
    independent, and resampling (fold, case) pairs one by one would make the interval too narrow."""
    if not values:
        return float("nan"), float("nan")
    by_case: dict[str, list[float]] = {}
    for (_, case), v in values.items():
        by_case.setdefault(case, []).append(v)
    sums = np.array([sum(v) for v in by_case.values()])
    counts = np.array([len(v) for v in by_case.values()])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def paired_comparison(method: dict[tuple[int, str], float], baseline: dict[tuple[int, str], float],
                      n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """``method - baseline`` on the (fold, case) pairs both scored: the mean difference, its case-bootstrap
    95 % interval (:func:`cluster_bootstrap`) and the two-sided Wilcoxon signed-rank p-value of the
    per-case differences (each case's differences averaged over its folds first, for independence)."""
    from scipy.stats import wilcoxon

    keys = sorted(set(method) & set(baseline))
    diff = {k: method[k] - baseline[k] for k in keys}
    if not diff:
        return {"n": 0, "mean_diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan")}
    lo, hi = cluster_bootstrap(diff, n_boot=n_boot, seed=seed)
    per_case: dict[str, list[float]] = {}
    for (_, case), d in diff.items():
        per_case.setdefault(case, []).append(d)
    d_case = np.array([np.mean(v) for v in per_case.values()])
    p = float(wilcoxon(d_case).pvalue) if len(d_case) >= 2 and np.any(d_case != 0) else float("nan")
    return {"n": len(keys), "mean_diff": float(np.mean(list(diff.values()))), "ci_low": lo, "ci_high": hi, "p": p}


def reviewer_table(methods: Mapping[str, Sequence[RunDir]], metric: str = "dsc", baseline: str | None = "scratch",
                   paper: Mapping[str, float | None] | None = None, n_boot: int = 2000, seed: int = 0) -> str:
    """Markdown: per method the mean and (population) std of ``metric`` over its test (fold, case) values,
    the 95 % case-bootstrap interval of the mean, the paired difference against ``baseline`` (mean, 95 %
    interval, Wilcoxon p; :func:`paired_comparison`) and the paper's reported number beside ours."""
    values = {m: case_values(runs, metric) for m, runs in methods.items()}
    head = ["Method", "Cases", f"{TABLE_METRICS.get(metric, metric)} mean +- std", "95 % CI"]
    if baseline:
        head += [f"vs {baseline}: diff (95 % CI)", "Wilcoxon p"]
    head.append("Paper")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m, vals in values.items():
        v = np.array(list(vals.values()), dtype=float)
        lo, hi = cluster_bootstrap(vals, n_boot=n_boot, seed=seed)
        cells = [m, str(v.size), f"{v.mean():.4f} +- {v.std():.4f}" if v.size else "-", f"[{_fmt(lo, 4)}, {_fmt(hi, 4)}]"]
        if baseline:
            if m == baseline or baseline not in values:
                cells += ["-", "-"]
            else:
                c = paired_comparison(vals, values[baseline], n_boot=n_boot, seed=seed)
                cells += [f"{c['mean_diff']:+.4f} [{_fmt(c['ci_low'], 4)}, {_fmt(c['ci_high'], 4)}]" if c["n"] else "-",
                          _fmt(c["p"], 3)]
        ref = (paper or {}).get(m)
        cells.append(_fmt(float(ref), 3) if isinstance(ref, (int, float)) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["TABLE_METRICS", "RunResult", "Table", "build_table", "case_values", "cluster_bootstrap",
           "paired_comparison", "reviewer_table", "run_result", "write_tables"]
