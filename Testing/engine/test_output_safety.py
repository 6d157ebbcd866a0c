"""Issue 11, output side: a case's files appear together or not at all, full disks and read-only folders are
clear errors, concurrent runs neither lose rows nor replace each other, ``results.csv`` is a true record and
the notes that change how a result reads reach the console and the table.

Every test here makes the fault for real (a SIGINT, a full tmpfs, a read-only mount, parallel processes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib import io as engine_io
from COVIDLesionSegLib import outputs
from COVIDLesionSegLib.cli import main
from COVIDLesionSegLib.errors import CovidLesionSegError
from COVIDLesionSegLib.pipeline import Pipeline, SegmentOptions

from .faults import case_files, cli_command, file_size_limit, fill, readonly_folder, tmpfs, write_phantom

INFECTION_COLUMNS = [c for c in outputs.RESULTS_COLUMNS if "infect" in c]


def _rows(folder: Path) -> list[dict[str, str]]:
    return outputs.read_results_csv(folder / "results.csv")


# ------------------------------------------------------------------------------ 6: disk full mid-write

def _reference_sizes(ct: Path, folder: Path) -> dict[str, int]:
    assert main(["segment", str(ct), "-o", str(folder), "--quiet"]) == 0
    return {s: (folder / f"{engine_io.case_name(ct)}{s}").stat().st_size for s in (".seg.nrrd", "_labels.nii.gz")}


def test_disk_full_while_writing_the_labelmap_is_an_error_and_keeps_nothing(tmp_path, capfd):
    ct = write_phantom(tmp_path / "in" / "chest.nii.gz", small=False)
    sizes = _reference_sizes(ct, tmp_path / "ref")
    pipeline = Pipeline(SegmentOptions())
    with tmpfs(tmp_path / "mnt", 4 << 20) as mounted:
        if mounted is not None:
            # Room for everything but half of the labelmap, whichever order the files are written in.
            fill(mounted, sizes["_labels.nii.gz"] // 2)
            out = mounted / "out"
            with pytest.raises(CovidLesionSegError, match="(?i)disk|space|size limit"):
                pipeline.segment_file(ct, out)
        else:  # no tmpfs here: every write past half the labelmap's size fails (EFBIG)
            out = tmp_path / "out"
            out.mkdir()
            with file_size_limit(sizes["_labels.nii.gz"] // 2), pytest.raises(CovidLesionSegError,
                                                                               match="(?i)disk|space|size limit"):
                pipeline.segment_file(ct, out)
        assert case_files(out, "chest") == []          # no truncated labelmap (or anything else) in place
        assert not [p for p in out.iterdir() if p.name != "results.csv"]
    capfd.readouterr()


# ----------------------------------------------------------------------- 7: all of a case or nothing

def test_ctrl_c_between_two_files_leaves_nothing_and_the_rerun_completes(tmp_path, monkeypatch):
    ct = write_phantom(tmp_path / "chest.nii.gz")
    out = tmp_path / "out"
    real_write = sitk.WriteImage

    def write_then_ctrl_c(image, name, *args, **kwargs):
        real_write(image, name, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)          # a real Ctrl-C right after one file is on disk

    monkeypatch.setattr(sitk, "WriteImage", write_then_ctrl_c)
    # An interactive CLI has Python's Ctrl-C handler; earlier tests in the same pytest process can leave
    # SIGINT ignored (seen in the full engine run), which would make this Ctrl-C a no-op.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["segment", str(ct), "-o", str(out), "--quiet"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(sitk, "WriteImage", real_write)
    assert case_files(out, "chest") == []
    assert not [p for p in out.iterdir() if p.name.startswith(".covidlesionseg-")]
    assert main(["segment", str(ct), "-o", str(out), "--quiet"]) == 0   # no --overwrite needed
    assert len(case_files(out, "chest")) == 3


def test_rerun_completes_a_case_left_incomplete(tmp_path, capsys):
    """A segmentation without its report (e.g. from a run killed by an older version) is not a result."""
    ct = write_phantom(tmp_path / "chest.nii.gz")
    out = tmp_path / "out"
    assert main(["segment", str(ct), "-o", str(out), "--quiet"]) == 0
    (out / "chest.json").unlink()
    (out / "chest_labels.nii.gz").unlink()
    capsys.readouterr()
    assert main(["segment", str(ct), "-o", str(out), "--quiet"]) == 0
    assert "incomplete" in capsys.readouterr().err
    assert len(case_files(out, "chest")) == 3
    assert [r["status"] for r in _rows(out)] == ["ok"]


# ------------------------------------------------------------------------------ 8: concurrent runs

def test_two_runs_of_one_case_name_never_replace_each_other(tmp_path):
    a = write_phantom(tmp_path / "a" / "chest.nii.gz", seed=1, small=False)
    b = write_phantom(tmp_path / "b" / "chest.nii.gz", seed=2, small=False)
    out = tmp_path / "out"
    runs = [subprocess.Popen(cli_command("segment", str(p), "-o", str(out), "--quiet"), stderr=subprocess.PIPE,
                             text=True) for p in (a, b)]
    done = [(r.wait(timeout=300), r.stderr.read()) for r in runs]
    assert sorted(status for status, _ in done) == [0, 1], done
    loser = next(err for status, err in done if status == 1)
    assert "--overwrite" in loser
    winner = a if done[0][0] == 0 else b
    report = json.loads((out / "chest.json").read_text())
    assert report["input"]["source"] == str(winner)
    # The labelmap is the winner's too: re-segmenting the winner gives the same voxels.
    again = tmp_path / "again"
    assert main(["segment", str(winner), "-o", str(again), "--quiet"]) == 0
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "chest_labels.nii.gz"))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(again / "chest_labels.nii.gz"))))
    assert [r["source"] for r in _rows(out)] == [str(winner)]


_WRITER = """
import sys
from pathlib import Path
import SimpleITK as sitk
from COVIDLesionSegLib.pipeline import Pipeline, SegmentOptions
from COVIDLesionSegLib.volume import CTVolume
ct, out, prefix, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
pipeline = Pipeline(SegmentOptions())
result = pipeline.run(CTVolume.from_image(sitk.ReadImage(ct), name=prefix, source=ct))
for i in range(n):  # the CLI's write step for n cases, as fast as the disk allows
    result.volume.name = f"{prefix}_{i}"
    pipeline.write(result, pipeline.output_paths(out, result.volume.name), out)
"""


def test_parallel_runs_into_one_folder_lose_no_row(tmp_path):
    """Six processes write cases into one folder at once: every case keeps its row."""
    n_runs, per_run = 6, 15
    ct = write_phantom(tmp_path / "chest.nii.gz")
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(ct), str(out), f"run{r}", str(per_run)],
                              stderr=subprocess.PIPE, text=True) for r in range(n_runs)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    rows = _rows(out)
    assert sorted(r["case"] for r in rows) == sorted(f"run{r}_{i}" for r in range(n_runs) for i in range(per_run))
    assert all(r["status"] == "ok" for r in rows)


# ------------------------------------------------------------------------------- 9: results.csv record

def test_results_csv_one_row_per_case_updated_in_place(tmp_path, capsys):
    good = write_phantom(tmp_path / "in" / "good.nii.gz")
    broken = tmp_path / "in" / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    out = tmp_path / "out"
    assert main(["segment", str(good), str(broken), "-o", str(out), "--quiet"]) == 1
    rows = {r["case"]: r for r in _rows(out)}
    assert rows["good"]["status"] == "ok" and rows["good"]["error"] == ""
    assert rows["broken"]["status"] == "failed" and "cannot be read" in rows["broken"]["error"]

    # A second run without --overwrite refuses the done case but leaves its row as it was.
    before = (out / "results.csv").read_bytes()
    assert main(["segment", str(good), "-o", str(out), "--quiet"]) == 1
    assert (out / "results.csv").read_bytes() == before

    # --overwrite replaces the row in place; --lungs-only leaves the infection fields empty.
    assert main(["segment", str(good), "-o", str(out), "--quiet", "--overwrite", "--lungs-only"]) == 0
    rows = _rows(out)
    assert [r["case"] for r in rows] == ["good", "broken"]
    assert rows[0]["status"] == "ok" and rows[0]["infection_model"] == ""
    assert float(rows[0]["right_lung_ml"]) > 100
    assert {c: rows[0][c] for c in INFECTION_COLUMNS} == {c: "" for c in INFECTION_COLUMNS}
    capsys.readouterr()


# ------------------------------------------------------------------ 10: output folder checked first

class _ReadSpy:
    def __init__(self, monkeypatch):
        self.calls = []
        real = engine_io.read_image

        def spy(path):
            self.calls.append(path)
            return real(path)
        monkeypatch.setattr(engine_io, "read_image", spy)


def test_unwritable_output_folder_fails_before_any_case(tmp_path, monkeypatch, capsys):
    cts = [write_phantom(tmp_path / "in" / f"c{i}.nii.gz", seed=i) for i in range(3)]
    spy = _ReadSpy(monkeypatch)
    with readonly_folder(tmp_path / "ro") as folder:
        status = main(["segment", *map(str, cts), "-o", str(folder), "--quiet"])
        err = capsys.readouterr().err
    assert status == 1
    assert spy.calls == []                              # no case was read, let alone segmented
    assert "not writable" in err and str(folder) in err
    assert err.count("not writable") == 1               # one message, not one per case


def test_output_folder_equal_to_input_folder_skips_own_outputs(tmp_path, capsys):
    folder = tmp_path / "scans"
    write_phantom(folder / "chest.nii.gz")
    assert main(["segment", str(folder), "-o", str(folder), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["segment", str(folder), "-o", str(folder), "--quiet", "--overwrite"]) == 0
    assert "1 of 1 case(s)" in capsys.readouterr().out
    assert not (folder / "chest_labels.json").exists()
    assert [r["case"] for r in _rows(folder)] == ["chest"]


# ------------------------------------------------------------------- 4 (output side): notes are shown

def test_notes_that_change_the_reading_reach_console_and_csv(tmp_path, capsys):
    ct = write_phantom(tmp_path / "chest.nii.gz")
    hu = sitk.ReadImage(str(ct))
    # The same chest windowed to 8 bit (approximate HU once mapped back) ...
    grey = np.clip((sitk.GetArrayFromImage(hu) + 1350.0) / 1500.0 * 255.0, 0, 255).round().astype(np.uint8)
    windowed = sitk.GetImageFromArray(grey)
    windowed.CopyInformation(hu)
    sitk.WriteImage(windowed, str(tmp_path / "grey.nii.gz"))
    # ... and cut through both lungs at the top and the bottom of the scan.
    sitk.WriteImage(hu[:, :, 9:19], str(tmp_path / "cut.nii.gz"))

    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "grey.nii.gz"), "-o", str(out), "--quiet",
                 "--input-window=-600,1500"]) == 0
    assert main(["segment", str(tmp_path / "cut.nii.gz"), "-o", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    rows = {r["case"]: r for r in _rows(out)}
    assert "approximate" in rows["grey"]["notes"] and "approximate" in err
    # Lungs cut at the top and the bottom: the coverage warning, in the table, on the console and in the JSON.
    assert "does not cover the whole lungs" in rows["cut"]["notes"]
    assert "lungs_cut_by_scan_range" in rows["cut"]["warnings"].split()
    assert "warning: cut.nii.gz: the lungs reach the lowest slice" in err
    report = json.loads((out / "cut.json").read_text())
    assert "lungs_cut_by_scan_range" in [w["code"] for w in report["warnings"]]
    assert any("does not cover the whole lungs" in n for n in report["notes"])
