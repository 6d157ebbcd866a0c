"""Run folders: where a training run keeps its config, checkpoints, logs, test metrics and summary.

Layout of one run (one config, one fold)::

    RUN/
      config.json            the complete, validated config the run used (``--resume`` checks it)
      split.json             case ids of train / val / test (and the groups they belong to)
      preprocessing.json     fitted preprocessing (3D: target spacing, CT z-score parameters), if any
      last.pt                training state after the last finished epoch - or of the step where Ctrl-C
                             stopped it: model, optimiser, scheduler, grad scaler, procedure state,
                             epoch/iteration, RNG states, best metric, early-stopping counter, history
      best.pt                the same at the epoch with the best validation metric (without a
                             validation set: the final epoch)
      log.csv, log.json      one row per epoch: lr, train loss (+ procedure scalars), validation loss and
                             metrics, epoch time (training) and validation time, samples/s, best flag
      test_metrics.csv/json  one row per test case (or group): every metric of ``eval.metrics``
      summary.json           status (running / completed / interrupted / early_stopped), epochs, best
                             epoch and metric, mean epoch time, test metrics (mean, std, ... per metric),
                             device, durations

Runs written by ``python -m training run CONFIG --out RUNS`` live in ``RUNS/<name>`` (``RUNS/<name>/fold<k>``
for ``cv``). Training checkpoints hold only tensors and plain data and load with ``weights_only=True``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from COVIDLesionSegLib.errors import CovidLesionSegError
from COVIDLesionSegLib.outputs import atomic_write, atomic_write_text

TRAINING_FORMAT = "covidlesionseg-training-state"
TRAINING_FORMAT_VERSION = 1


class RunError(CovidLesionSegError, RuntimeError):
    """A run folder is missing, incomplete or does not match the config."""

    kind = "run"


def _json_safe(value: Any) -> Any:
    """JSON-able copy (NaN/inf become null; tensors and numpy scalars become numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
        return _json_safe(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomic JSON write (temp file + rename): a reader never sees half a file."""
    atomic_write_text(Path(path), json.dumps(_json_safe(data), indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    if not p.is_file():
        raise RunError(f"{p} not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{p} is not valid JSON: {exc}") from None


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Atomic CSV write; columns default to the keys in order of first appearance; NaN/None -> empty."""
    cols: list[str] = list(columns) if columns else []
    if not columns:
        for row in rows:
            for k in row:
                if k not in cols:
                    cols.append(k)
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: _csv_value(row.get(k)) for k in cols})
    atomic_write_text(Path(path), buf.getvalue())


def _csv_value(v: Any) -> Any:
    v = _json_safe(v)
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


def save_training_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Atomic ``torch.save`` of a training state (see the module docstring)."""
    path = Path(path)
    payload = {"format": TRAINING_FORMAT, "format_version": TRAINING_FORMAT_VERSION, **state}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_training_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training state written by :func:`save_training_state` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"training checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise RunError(f"{path} is not a readable training checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != TRAINING_FORMAT:
        raise RunError(f"{path} is not a training checkpoint of this project (format "
                       f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    if state.get("format_version", 0) > TRAINING_FORMAT_VERSION:
        raise RunError(f"{path} was written by a newer version (format_version {state['format_version']})")
    return state


class RunDir:
    """Paths and I/O of one run folder (module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # paths
    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def split(self) -> Path:
        return self.path / "split.json"

    @property
    def preprocessing(self) -> Path:
        return self.path / "preprocessing.json"

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def log_csv(self) -> Path:
        return self.path / "log.csv"

    @property
    def log_json(self) -> Path:
        return self.path / "log.json"

    @property
    def test_csv(self) -> Path:
        return self.path / "test_metrics.csv"

    @property
    def test_json(self) -> Path:
        return self.path / "test_metrics.json"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    # I/O
    def create(self) -> "RunDir":
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def write_log(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Rewrite ``log.csv`` and ``log.json`` from the whole history (consistent after a resume)."""
        write_csv(self.log_csv, history)
        write_json(self.log_json, list(history))

    def read_log(self) -> list[dict[str, Any]]:
        return read_json(self.log_json) if self.log_json.exists() else []

    def write_test_metrics(self, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
        write_csv(self.test_csv, rows)
        write_json(self.test_json, {"cases": list(rows), "aggregate": summary})

    def read_test_metrics(self) -> dict[str, Any]:
        return read_json(self.test_json)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json(self.summary, summary)

    def read_summary(self) -> dict[str, Any]:
        return read_json(self.summary)

    def read_config(self) -> dict[str, Any]:
        return read_json(self.config)

    @property
    def finished(self) -> bool:
        """True when the run completed (or stopped early) and wrote its summary."""
        if not self.summary.exists():
            return False
        try:
            return self.read_summary().get("status") in ("completed", "early_stopped")
        except RunError:
            return False


def find_runs(paths: Iterable[str | os.PathLike]) -> list[RunDir]:
    """Run folders among ``paths``: each path is a run folder (has ``summary.json``) or a folder searched
    recursively for them. Sorted by path; raises :class:`RunError` when a path has none."""
    found: list[RunDir] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise RunError(f"run folder not found: {p}")
        if (p / "summary.json").is_file():
            found.append(RunDir(p))
            continue
        hits = sorted(s.parent for s in p.rglob("summary.json"))
        if not hits:
            raise RunError(f"{p} holds no finished run (no summary.json below it)")
        found.extend(RunDir(h) for h in hits)
    unique = {str(r.path.resolve()): r for r in found}
    return [unique[k] for k in sorted(unique)]
