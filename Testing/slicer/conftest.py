"""Fixtures for the Slicer module's tests on slicer-core (real MRML, no desktop application).

``shim/slicer/`` supplies the few pure-Python pieces of the desktop application that the module file
imports (see its README). It is merged into the ``slicer`` namespace here, also when another test module
imported ``slicer`` first.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from Testing.conftest import REPO_ROOT, SHARED_DATA

SHIM_DIR = Path(__file__).resolve().parent / "shim"
MODULE_FILE = REPO_ROOT / "COVIDLesionSeg" / "COVIDLesionSeg.py"
BATCH_SCRIPT = REPO_ROOT / "COVIDLesionSeg" / "Scripts" / "batch.py"
BATCH_CTS = ("ct/covidctmd_p001_ct.nii.gz", "ct/covidctmd_normal001_ct.nii.gz")

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package has no MRML classes (slicer-core missing)", allow_module_level=True)


def _install_shim() -> None:
    if str(SHIM_DIR) not in sys.path:
        sys.path.insert(0, str(SHIM_DIR))
    shim_slicer = str(SHIM_DIR / "slicer")
    if shim_slicer not in list(slicer.__path__):
        slicer.__path__.append(shim_slicer)
    app = importlib.import_module("slicer.slicer_testing_app")
    for name in ("modules", "register_module_logic"):
        if not hasattr(slicer, name):
            setattr(slicer, name, getattr(app, name))


_install_shim()


def _new_scene():
    from COVIDLesionSegLib import mrml

    holder = mrml.create_standalone_scene(with_terminologies=False)
    slicer.mrmlScene = holder.scene
    for name, logic in holder.logics.items():
        slicer.register_module_logic(name, logic)
    return holder


@pytest.fixture
def scene():
    """A fresh MRML scene with the module logics registered, also set as ``slicer.mrmlScene``."""
    holder = _new_scene()
    yield holder
    holder.scene.Clear(1)


@pytest.fixture(scope="module")
def module_scene():
    """A scene shared by one test module (for expensive shared runs)."""
    holder = _new_scene()
    yield holder
    holder.scene.Clear(1)


@pytest.fixture(scope="session")
def module_file():
    """The scripted module ``COVIDLesionSeg.py`` imported as a Python module (as Slicer does)."""
    spec = importlib.util.spec_from_file_location("COVIDLesionSeg", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["COVIDLesionSeg"] = module
    spec.loader.exec_module(module)
    return module


def processes_in_group(pgid: int) -> list[int]:
    """PIDs of live (non-zombie) processes whose process group is ``pgid`` (Linux /proc; no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


class BatchJob:
    """``Scripts/batch.py`` under plain Python on two real CTs and a broken file, started in the background.

    The two real CTs take ~40 s on 2 cores; starting the job when the first test of this folder runs lets
    it overlap with the other tests instead of adding to the suite's wall time.
    """

    def __init__(self, root: Path):
        self.inputs = root / "inputs"
        self.output = root / "output"
        self.inputs.mkdir()
        for relative in BATCH_CTS:
            (self.inputs / Path(relative).name).symlink_to(SHARED_DATA / relative)
        # A file that claims to be NIfTI but holds garbage: must fail alone, with a reason.
        (self.inputs / "broken_ct.nii.gz").write_bytes(b"not a NIfTI file" * 64)
        (self.inputs / "notes.txt").write_text("not an image, ignored")
        self.log = root / "batch-log.txt"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(BATCH_SCRIPT), "--input", str(self.inputs), "--output", str(self.output),
                 "--device", "cpu"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=(os.name != "nt"))

    def wait(self, timeout: float = 600) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            if os.name == "nt":
                self.process.kill()
            else:
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="session")
def batch_job(tmp_path_factory):
    missing = [r for r in BATCH_CTS if not (SHARED_DATA / r).exists()]
    if missing:
        pytest.skip(f"shared data {missing} not found under {SHARED_DATA} (only on development machines and CI)")
    job = BatchJob(tmp_path_factory.mktemp("batch"))
    yield job
    job.stop()


def pytest_collection_modifyitems(session, config, items):
    """Run the batch checks last, so that the background batch job overlaps every other test."""
    items.sort(key=lambda item: Path(str(item.fspath)).name == "test_batch.py")


@pytest.fixture(scope="session", autouse=True)
def _start_batch_early(request):
    """Start the batch job with the first test here when its test is selected (see BatchJob)."""
    wanted = any(Path(str(item.fspath)).name == "test_batch.py" for item in request.session.items)
    if wanted and all((SHARED_DATA / r).exists() for r in BATCH_CTS) and os.name != "nt":
        request.getfixturevalue("batch_job")
