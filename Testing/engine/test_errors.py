"""One error hierarchy and one translator (errors.py): every user-facing error is a CovidLesionSegError that
says what to do next, every front end shows ``user_message``, and the command line ends a failure in one
``error:`` line, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

from COVIDLesionSegLib import catalogue
from COVIDLesionSegLib.errors import (
    CheckpointError,
    CovidLesionSegError,
    DeviceError,
    InputError,
    ModelError,
    OutputError,
    about,
    user_message,
)
from COVIDLesionSegLib.outputs import OutputExistsError, OutputWriteError
from COVIDLesionSegLib.progress import Cancelled
from COVIDLesionSegLib.worker import ERROR_KINDS, WorkerError, classify_error
from Testing.engine.faults import cli_command, readonly_folder, write_phantom

SHIPPED = "ctseg2d-nnunet2d-w16"


def _run(args, env=None, timeout=300):
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _assert_one_error_line(run, *expected: str) -> str:
    """Non-zero exit, no traceback, and the last stderr line is the one ``error:`` line naming ``expected``."""
    assert run.returncode != 0, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and run.stderr.strip().splitlines()[-1] == errors[0], run.stderr
    for text in expected:
        assert text in errors[0], (text, errors[0])
    return errors[0]


# ------------------------------------------------------------------------------------------------------------
# The two reproduced tracebacks of issue 12
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_on_a_cpu_only_machine_is_one_error_line(tmp_path):
    ct = write_phantom(tmp_path / "ct.nii.gz")
    run = _run(["segment", str(ct), "-o", str(tmp_path / "out"), "--device", "cuda", "--model", SHIPPED,
                "--quiet"])
    assert run.returncode == 1
    line = _assert_one_error_line(run, "CUDA is not available", "'auto' or 'cpu'")
    assert "unexpected" not in line
    assert not (tmp_path / "out" / "ct.json").exists()


def test_cli_manifest_sha256_mismatch_is_one_error_line(tmp_path):
    shipped = catalogue.get_entry(SHIPPED)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(shipped.path, models / shipped.path.name)
    manifest = json.loads(catalogue.MANIFEST_PATH.read_text())
    for record in manifest["models"]:
        if record["id"] == SHIPPED:
            record["sha256"] = "0" * 64            # the manifest no longer matches its file
    (models / "manifest.json").write_text(json.dumps(manifest))
    ct = write_phantom(tmp_path / "ct.nii.gz")
    run = _run(["segment", str(ct), "-o", str(tmp_path / "out"), "--model", SHIPPED, "--device", "cpu", "--quiet"],
               env={"COVIDLESIONSEG_MANIFEST": str(models / "manifest.json")})
    assert run.returncode == 1
    line = _assert_one_error_line(run, "sha256", "0" * 64, "reinstall the extension")
    assert "unexpected" not in line


# ------------------------------------------------------------------------------------------------------------
# Expected conditions are never "unexpected"
# ------------------------------------------------------------------------------------------------------------

def test_cli_existing_output_is_reported_as_such(tmp_path):
    ct = write_phantom(tmp_path / "ct.nii.gz")
    assert _run(["segment", str(ct), "-o", str(tmp_path / "out"), "--lungs-only", "--quiet"]).returncode == 0
    again = _run(["segment", str(ct), "-o", str(tmp_path / "out"), "--lungs-only", "--quiet"])
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert "already exist" in again.stderr and "--overwrite" in again.stderr
    assert "unexpected error" not in again.stderr.lower()


def test_cli_readonly_output_folder_is_one_error_line(tmp_path):
    ct = write_phantom(tmp_path / "ct.nii.gz")
    with readonly_folder(tmp_path / "ro") as folder:
        run = _run(["segment", str(ct), "-o", str(folder), "--lungs-only", "--quiet"])
    line = _assert_one_error_line(run)
    assert "unexpected error" not in line.lower()


# ------------------------------------------------------------------------------------------------------------
# The hierarchy and the translator
# ------------------------------------------------------------------------------------------------------------

def test_every_user_facing_error_is_a_covidlesionseg_error():
    from training.config import ConfigError
    from training.datasets.base import DatasetError
    from training.procedures import ProcedureError
    from training.runs import RunError
    from training.trainer import TrainingError

    for cls in (InputError, ModelError, CheckpointError, DeviceError, OutputError, OutputExistsError,
                OutputWriteError, WorkerError, ConfigError, ProcedureError, RunError, TrainingError, DatasetError):
        assert issubclass(cls, CovidLesionSegError), cls
    # The old bases still hold, so code that caught them keeps working.
    assert issubclass(DeviceError, RuntimeError) and issubclass(InputError, ValueError)
    assert issubclass(CheckpointError, ModelError) and issubclass(OutputWriteError, OSError)


def test_user_message_kinds_and_next_step():
    assert user_message(InputError("no lungs found")).kind == "bad_input"
    msg = user_message(CheckpointError("file x has sha256 a", next_step="fetch it again"))
    assert msg.kind == "model" and msg.text == "file x has sha256 a; fetch it again" and msg.expected
    assert user_message(ModelError("bad; fetch it again", next_step="fetch it again")).text == "bad; fetch it again"
    assert user_message(DeviceError("no CUDA")).kind == "device"
    assert user_message(OutputExistsError([])).kind == "output"
    assert user_message(Cancelled()).kind == "cancelled"
    assert user_message(KeyboardInterrupt()).kind == "cancelled"
    assert user_message(MemoryError()).kind == "out_of_memory"
    assert user_message(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")).kind == "out_of_memory"
    assert user_message(ModuleNotFoundError("x", name="monai")).kind == "missing_dependency"
    assert "monai" in user_message(ModuleNotFoundError("x", name="monai")).text
    perm = user_message(PermissionError(13, "Permission denied", "/data/out/case.json"))
    assert perm.kind == "file" and "/data/out/case.json: Permission denied" in perm.text and perm.expected
    bug = user_message(ZeroDivisionError("division by zero"))
    assert bug.kind == "internal" and not bug.expected
    assert bug.text == "unexpected error: ZeroDivisionError: division by zero"


def test_the_worker_classifies_with_the_translator():
    assert classify_error(InputError("no lungs found")) == ("bad_input", "The input cannot be segmented: no lungs found")
    assert classify_error(OutputWriteError("disk full"))[0] == "output"
    kind, text = classify_error(ZeroDivisionError("x"))
    assert kind == "internal" and text.startswith("unexpected error")
    for exc in (InputError("a"), ModelError("b"), DeviceError("c"), OutputError("d"), PermissionError(13, "e", "f"),
                MemoryError(), ImportError("g"), Cancelled(), ValueError("h")):
        assert classify_error(exc)[0] in ERROR_KINDS, exc


def test_segment_batch_reports_a_failed_case_with_the_translators_text(tmp_path, monkeypatch):
    from COVIDLesionSegLib import pipeline

    def broken(self, volume, on_progress=None, timings=None, dicom=None, report_follows=False):
        raise PermissionError(13, "Permission denied", "/somewhere/scratch")

    monkeypatch.setattr(pipeline.Pipeline, "run", broken)
    ct = write_phantom(tmp_path / "ct.nii.gz")
    report = pipeline.segment_batch([ct], tmp_path / "out", pipeline.SegmentOptions(lungs_only=True))
    assert report.failed == [(str(ct), user_message(PermissionError(13, "Permission denied",
                                                                     "/somewhere/scratch")).text)]
    assert "unexpected" not in report.failed[0][1]


def test_training_cli_uses_the_translator(tmp_path, capsys):
    from training.cli import main

    assert main(["export", str(tmp_path)]) == 2           # not a run folder: RunError, a usage error
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "not a run folder" in err[-1]


def test_a_checkpoint_error_says_how_to_get_a_good_copy(tmp_path):
    entry = catalogue.ModelEntry("m", "1", "infection", "", "cache", path=tmp_path / "m.pt")
    assert "models import FILE --overwrite" in catalogue._repair_hint(entry)
    entry = catalogue.ModelEntry("m", "1", "infection", "", "shipped", path=tmp_path / "m.pt", url="file:///x")
    assert "models download m --overwrite" in catalogue._repair_hint(entry)


def test_a_failure_list_names_its_subject_once():
    assert about("a.nii", "a.nii: the image is empty") == "a.nii: the image is empty"
    assert about("a.nii", "no lungs found") == "a.nii: no lungs found"
    assert about("a.nii", "a.nii.gz: other file") == "a.nii: a.nii.gz: other file"   # a longer path is another one
