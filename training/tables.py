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
from typing import Any, Sequence

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


__all__ = ["TABLE_METRICS", "RunResult", "Table", "build_table", "run_result", "write_tables"]
