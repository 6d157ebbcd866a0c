"""``Scripts/batch.py`` writes ``results.csv`` with the command line's writer: one row per case, updated in
place, failed cases included, empty infection fields with ``--lungs-only``; the output folder is checked
before any case (issue 11, items 9 and 10). Real subprocesses on small phantoms."""

from __future__ import annotations

import subprocess
import sys

from COVIDLesionSegLib import outputs

from ..engine.faults import readonly_folder, write_phantom
from .conftest import BATCH_SCRIPT

INFECTION_COLUMNS = [c for c in outputs.RESULTS_COLUMNS if "infect" in c]


def _batch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BATCH_SCRIPT), *args, "--device", "cpu"], capture_output=True,
                          text=True, timeout=600)


def test_batch_results_csv_is_one_row_per_case_updated_in_place(tmp_path):
    inputs = tmp_path / "in"
    write_phantom(inputs / "good.nii.gz")
    (inputs / "broken.nii.gz").write_bytes(b"not a NIfTI file" * 64)
    out = tmp_path / "out"
    first = _batch("--input", str(inputs), "--output", str(out))
    assert first.returncode == 1, first.stderr[-2000:]
    rows = {r["case"]: r for r in outputs.read_results_csv(out / "results.csv")}
    assert rows["good"]["status"] == "ok" and rows["broken"]["status"] == "failed"
    before = (out / "results.csv").read_bytes()

    # Run again without --overwrite: the done case is refused, and its "ok" row is not turned into "failed".
    second = _batch("--input", str(inputs / "good.nii.gz"), "--output", str(out))
    assert second.returncode == 1 and "--overwrite" in second.stderr
    assert (out / "results.csv").read_bytes() == before

    # --overwrite replaces the row in place (no duplicate, other rows kept); --lungs-only: infection empty.
    third = _batch("--input", str(inputs / "good.nii.gz"), "--output", str(out), "--overwrite", "--lungs-only")
    assert third.returncode == 0, third.stderr[-2000:]
    rows = outputs.read_results_csv(out / "results.csv")
    assert [r["case"] for r in rows] == ["broken", "good"]
    good = rows[1]
    assert good["status"] == "ok" and float(good["right_lung_ml"]) > 100
    assert {c: good[c] for c in INFECTION_COLUMNS} == {c: "" for c in INFECTION_COLUMNS}


def test_batch_checks_the_output_folder_before_any_case(tmp_path):
    inputs = tmp_path / "in"
    for i in range(2):
        write_phantom(inputs / f"c{i}.nii.gz", seed=i)
    with readonly_folder(tmp_path / "ro") as folder:
        done = _batch("--input", str(inputs), "--output", str(folder))
    assert done.returncode == 1
    assert "not writable" in done.stderr
    assert "[1/2]" not in done.stderr              # no case was started
