"""The background worker (COVIDLesionSegLib/worker.py, Scripts/infer_worker.py): protocol, errors, cancel.

Real subprocesses; the child processes started here are always waited for or killed by the tests.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib import phantom, worker
from COVIDLesionSegLib.pipeline import STAGES, Pipeline
from COVIDLesionSegLib.volume import CTVolume

from .conftest import processes_in_group


@pytest.fixture(scope="module")
def phantom_input(tmp_path_factory):
    image, truth = phantom.make_chest_phantom()
    path = tmp_path_factory.mktemp("worker") / "input.nrrd"
    worker.write_input_nrrd(image, path)
    return path, image


def _collect(process: worker.WorkerProcess, timeout=120):
    events = []
    outcome = process.wait(timeout=timeout, on_event=events.append)
    return outcome, events


def test_worker_reports_progress_and_writes_the_masks(phantom_input, tmp_path):
    path, image = phantom_input
    out = tmp_path / "out"
    command = worker.inference_command(path, out, device="cpu", name="phantom")
    assert command[0] == sys.executable and command[1].endswith("infer_worker.py")
    process = worker.WorkerProcess(command, stderr_path=tmp_path / "stderr.txt").start()
    outcome, events = _collect(process)
    assert outcome["status"] == "ok", (outcome, process.stderr_tail())
    assert process.process.returncode == 0

    progress = [e.data for e in events if e.kind == "progress"]
    stages = [p["stage"] for p in progress]
    # Stages arrive in pipeline order, each fraction in [0, 1], overall progress never goes back.
    assert [s for s in STAGES if s in stages] == sorted(set(stages), key=STAGES.index)
    assert {"read", "lungs", "infection", "write"} <= set(stages)
    overall = [p["overall"] for p in progress]
    assert overall == sorted(overall) and overall[-1] == pytest.approx(1.0)
    assert all(0.0 <= p["fraction"] <= 1.0 for p in progress)
    assert events[-1].kind == "final"

    # The masks are the engine's own result for the same image, on the input grid.
    result = worker.read_worker_result(out)
    expected = Pipeline().run(CTVolume.from_image(image)).masks_in_input_geometry()
    assert list(result.masks) == list(expected)
    for name in expected:
        assert np.array_equal(result.masks[name], expected[name]), name
    written = sitk.ReadImage(str(out / worker.MASKS_FILE))
    assert written.GetOrigin() == image.GetOrigin() and written.GetDirection() == image.GetDirection()
    assert result.report["case"] == "phantom"
    assert [s["name"] for s in result.report["segments"]] == list(expected)


def test_bad_input_gives_a_clear_error(tmp_path):
    windowed = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 256, (16, 96, 96)).astype(np.uint8))
    path = worker.write_input_nrrd(windowed, tmp_path / "windowed.nrrd")
    process = worker.WorkerProcess(worker.inference_command(path, tmp_path / "out"),
                                   stderr_path=tmp_path / "stderr.txt").start()
    outcome, _ = _collect(process, timeout=60)
    assert outcome["status"] == "error" and outcome["kind"] == "bad_input"
    assert "0-255" in outcome["message"] and "Hounsfield" in outcome["message"]
    assert process.process.returncode == 1
    assert not (tmp_path / "out" / worker.MASKS_FILE).exists()


def test_unknown_model_is_reported(phantom_input, tmp_path):
    path, _ = phantom_input
    process = worker.WorkerProcess(worker.inference_command(path, tmp_path / "out", model="no-such-model"),
                                   stderr_path=tmp_path / "stderr.txt").start()
    outcome, _ = _collect(process, timeout=60)
    assert outcome["kind"] == "model" and "no-such-model" in outcome["message"]


def _script(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "fake_worker.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_crash_without_outcome_line_is_explained(tmp_path):
    command = _script(tmp_path, """
        import json, sys
        print(json.dumps({"stage": "lungs", "fraction": 0.5, "overall": 0.3, "message": "working"}), flush=True)
        print("numpy chatter that is not JSON", flush=True)
        sys.stderr.write("Segmentation fault in libfoo\\n")
        sys.exit(139)
    """)
    process = worker.WorkerProcess(command, stderr_path=tmp_path / "stderr.txt").start()
    outcome, events = _collect(process, timeout=30)
    assert outcome["kind"] == "crashed"
    assert "exit code 139" in outcome["message"] and "libfoo" in outcome["message"]
    assert [e.kind for e in events] == ["progress", "log", "final"]
    assert events[1].data["message"] == "numpy chatter that is not JSON"


def test_killed_by_the_system_reads_as_out_of_memory(tmp_path):
    command = _script(tmp_path, """
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    process = worker.WorkerProcess(command, stderr_path=tmp_path / "stderr.txt").start()
    outcome, _ = _collect(process, timeout=30)
    assert outcome["kind"] == "out_of_memory" and "memory" in outcome["message"]


def test_missing_package_in_the_worker_is_a_dependency_error(tmp_path):
    command = _script(tmp_path, """
        import a_package_that_is_not_installed
    """)
    process = worker.WorkerProcess(command, stderr_path=tmp_path / "stderr.txt").start()
    outcome, _ = _collect(process, timeout=30)
    assert outcome["kind"] == "missing_dependency"
    assert "a_package_that_is_not_installed" in outcome["message"]


@pytest.mark.skipif(os.name == "nt", reason="process groups and /proc are POSIX")
def test_cancel_kills_the_whole_process_tree(tmp_path):
    # A worker that starts a grandchild (as a DataLoader or a shell tool would) and then works forever.
    command = _script(tmp_path, """
        import json, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(json.dumps({"log": f"child {child.pid}"}), flush=True)
        while True:
            print(json.dumps({"stage": "lungs", "fraction": 0.1, "overall": 0.1, "message": "busy"}), flush=True)
            time.sleep(0.2)
    """)
    process = worker.WorkerProcess(command, stderr_path=tmp_path / "stderr.txt").start()
    child_pid = None
    deadline = time.monotonic() + 30
    while child_pid is None and time.monotonic() < deadline:
        for event in process.poll():
            if event.kind == "log" and event.data["message"].startswith("child "):
                child_pid = int(event.data["message"].split()[1])
        time.sleep(0.05)
    assert child_pid is not None, process.stderr_tail()
    assert sorted(processes_in_group(process.pid)) == sorted([process.pid, child_pid])

    process.cancel(grace_s=1.0)
    assert process.final["kind"] == "cancelled"
    assert process.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(process.pid, 0)
    deadline = time.monotonic() + 5   # the grandchild was re-parented to init, which reaps it
    while processes_in_group(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_in_group(process.pid) == []


def test_cuda_out_of_memory_is_retried_on_the_cpu(phantom_input, tmp_path, monkeypatch, capsys, test_archs):
    """The one fallback (network_predictor.py): a network whose GPU runs out of memory moves to the CPU and
    runs the case again there; the worker reports it (log line, outcome, report)."""
    from COVIDLesionSegLib.network_predictor import NetworkModel
    from Testing.engine.helpers import _checkpoint, _linear, pretend_full_gpu

    path, _ = phantom_input
    checkpoint = _checkpoint(tmp_path, "test-pred-linear2d", _linear(2), 2, name="oom-net")
    devices: list[str] = []
    attempts: list[list[str]] = []
    real_make = worker._make_pipeline

    def make(args, device):
        devices.append(device)
        pipeline = real_make(args, "cpu")            # this machine may have no GPU: build on the CPU ...
        pipeline.infection_model = NetworkModel(checkpoint, device="cpu")
        attempts.append(pretend_full_gpu(pipeline.infection_model, monkeypatch))   # ... and fake a full GPU
        return pipeline

    monkeypatch.setattr(worker, "_make_pipeline", make)
    args = worker.build_parser().parse_args(["--input", str(path), "--output-dir", str(tmp_path / "out"),
                                             "--device", "cuda"])
    with pytest.warns(RuntimeWarning, match="out of memory"):
        outcome = worker.run_worker(args, worker._Emitter())
    assert devices == ["cuda"] and attempts == [["cuda", "cpu"]]
    assert outcome["status"] == "ok" and outcome["retried_on_cpu"] is True
    assert "CPU" in outcome["message"]
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert any("retrying on the CPU" in line.get("log", "") for line in lines)
    report = json.loads((tmp_path / "out" / worker.REPORT_FILE).read_text())
    assert report["retried_on_cpu"] is True
    assert report["models"]["infection"]["device"] == "cpu"


def test_gpu_out_of_memory_on_the_cpu_too_is_reported(phantom_input, tmp_path, monkeypatch, capsys):
    path, _ = phantom_input

    class AlwaysFailing:
        def run(self, volume, on_progress=None, timings=None):
            raise MemoryError()

    monkeypatch.setattr(worker, "_make_pipeline", lambda args, device: AlwaysFailing())
    args = worker.build_parser().parse_args(["--input", str(path), "--output-dir", str(tmp_path / "out")])
    outcome = worker.run_worker(args, worker._Emitter())
    assert outcome["kind"] == "out_of_memory" and "memory" in outcome["message"]


def test_remaining_time_estimate():
    estimator = worker.ProgressEstimator(start=100.0)
    assert estimator.update(0.5, now=101.0) is None          # too early to say
    assert estimator.update(0.25, now=110.0) == pytest.approx(30.0)   # 10 s for a quarter -> 30 s left
    later = estimator.update(0.5, now=120.0)
    assert 10.0 <= later <= 30.0                               # smoothed towards the new 20 s estimate
    assert estimator.remaining(now=125.0) == pytest.approx(later - 5.0)
    assert worker.format_duration(None) == ""
    assert worker.format_duration(42.4) == "42 s"
    assert worker.format_duration(185) == "3 min 05 s"
    assert worker.format_duration(3720) == "1 h 02 min"


def test_mask_encoding_round_trip():
    rng = np.random.default_rng(1)
    masks = {f"s{i}": rng.random((4, 5, 6)) > 0.5 for i in range(3)}
    packed, segments = worker._encode_masks(masks)
    decoded = worker.decode_masks(packed, segments)
    assert all(np.array_equal(decoded[k], masks[k]) for k in masks)
    with pytest.raises(ValueError):
        worker._encode_masks({f"s{i}": masks["s0"] for i in range(9)})


def test_no_stray_processes_after_sigterm_ignoring_worker(tmp_path):
    """A worker that ignores SIGTERM is killed with SIGKILL after the grace period."""
    command = _script(tmp_path, """
        import json, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(json.dumps({"log": "ready"}), flush=True)
        time.sleep(600)
    """)
    process = worker.WorkerProcess(command, stderr_path=tmp_path / "stderr.txt").start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(e.kind == "log" for e in process.poll()):
        time.sleep(0.05)
    process.cancel(grace_s=0.5)
    assert process.process.returncode == -signal.SIGKILL
    assert processes_in_group(process.pid) == []
