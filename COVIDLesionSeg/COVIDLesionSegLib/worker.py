"""Segmentation in a separate process, so that Slicer's GUI never freezes: the worker and its parent side.

Protocol (one run = one process, files in and out):

- The parent writes the input CT as an **uncompressed NRRD** (fast to write and read, exact LPS geometry)
  into a private temporary folder and starts::

      PythonSlicer Scripts/infer_worker.py --input in.nrrd --output-dir DIR [--model ID] [--lung-model ID]
                                           [--device auto|cpu|cuda] [--lungs-only]

  (``sys.executable`` outside Slicer). The process starts in its own process group / session, so that
  Cancel can kill the whole tree (the worker and anything it started) and nothing else.
- The worker prints **one JSON object per line** on stdout:

  - progress: ``{"stage": "lungs", "fraction": 0.4, "overall": 0.31, "message": "..."}`` (``fraction`` is
    the stage's own share, ``overall`` the whole run's, weighted by :data:`~.pipeline.STAGE_WEIGHTS`);
  - a note for the user's log: ``{"log": "The GPU ran out of memory; retrying on the CPU (slower)."}``;
  - last, the outcome: ``{"status": "ok", "message": ..., "masks": "masks.nrrd", "report": "report.json"}``
    or ``{"status": "error", "kind": KIND, "message": ...}`` with KIND one of :data:`ERROR_KINDS`.

  Anything else on stdout (a library's chatter) is passed on as a log line; stderr goes to a file in the
  output folder whose tail explains a crash.
- Results, written last: ``masks.nrrd`` (uncompressed uint8 on the input's exact grid; segment *i* of
  ``report["segments"]`` is bit ``report["segments"][i]["bit"]`` of each voxel, because the segments overlap:
  infection voxels also belong to a lung) and ``report.json`` (the engine's report plus the segment bits).
- A CUDA out-of-memory error moves the network to the CPU, where the case runs again (the network model does
  that, ``network_predictor.py``); the worker says so in a log line and in the report's notes. Other failures
  end with an error line whose message is :func:`~.errors.user_message`'s.

:class:`WorkerProcess` is the parent side: it starts the command, reads its stdout on a thread into a queue
(so a Qt timer can poll without blocking), estimates the remaining time, cancels by killing the process
group, and turns a worker that died without an outcome line into a clear error.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import CovidLesionSegError

MASKS_FILE = "masks.nrrd"
REPORT_FILE = "report.json"
INPUT_FILE = "input.nrrd"
STDERR_FILE = "worker-stderr.txt"

#: ``kind`` of an error outcome: :func:`~.errors.user_message`'s kinds, and "crashed" for a worker that died
#: without an outcome line.
ERROR_KINDS = ("bad_input", "model", "device", "output", "file", "missing_dependency", "out_of_memory",
               "cancelled", "crashed", "internal")

#: Emit a progress line at most this often (s) unless the stage changes or the overall fraction moved a lot.
PROGRESS_INTERVAL_S = 0.25


# ============================================================================================================
# Worker (child) side
# ============================================================================================================

class _Emitter:
    """Writes protocol lines on stdout, throttled so that per-slice progress does not flood the pipe."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stdout
        self._last_time = 0.0
        self._last_stage: Optional[str] = None
        self._last_overall = -1.0

    def line(self, obj: dict[str, Any]) -> None:
        self.stream.write(json.dumps(obj) + "\n")
        self.stream.flush()

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        from .pipeline import overall_fraction

        overall = overall_fraction(stage, fraction)
        now = time.monotonic()
        if (stage == self._last_stage and now - self._last_time < PROGRESS_INTERVAL_S
                and overall - self._last_overall < 0.02 and fraction < 1.0):
            return
        self._last_time, self._last_stage, self._last_overall = now, stage, overall
        self.line({"stage": stage, "fraction": round(float(fraction), 4), "overall": round(overall, 4),
                   "message": message})

    def log(self, message: str) -> None:
        self.line({"log": message})


def classify_error(exc: BaseException) -> tuple[str, str]:
    """(kind, message for the user) of an exception raised by a run: :func:`~.errors.user_message`, with the
    short title in front of the engine's own messages (the Slicer dialog shows them without other context)."""
    from .errors import user_message

    message = user_message(exc)
    if message.kind in ("cancelled", "out_of_memory", "missing_dependency", "internal") or not message.title:
        return message.kind, message.text
    return message.kind, f"{message.title}: {message.text}"


def _encode_masks(masks: dict[str, Any]):
    """Pack overlapping boolean masks into one uint8 array, segment i -> bit (1 << i)."""
    import numpy as np

    if len(masks) > 8:
        raise ValueError("at most 8 segments fit the uint8 bit encoding")
    names = list(masks)
    packed = np.zeros(next(iter(masks.values())).shape, dtype=np.uint8)
    for index, name in enumerate(names):
        packed[np.asarray(masks[name], dtype=bool)] |= np.uint8(1 << index)
    return packed, [{"name": name, "bit": 1 << index} for index, name in enumerate(names)]


def decode_masks(packed, segments: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Inverse of the worker's encoding: segment name -> boolean (z, y, x) mask."""
    import numpy as np

    return {seg["name"]: (packed & np.uint8(seg["bit"])) != 0 for seg in segments}


def _make_pipeline(args, device: str):
    """The engine pipeline for the worker's options on ``device`` (models are loaded here)."""
    from .pipeline import Pipeline, SegmentOptions

    return Pipeline(SegmentOptions(infection_model=args.model or None, lung_model=args.lung_model or None,
                                   device=device, lungs_only=args.lungs_only, fast=getattr(args, "fast", False)))


#: The log line of the CUDA out-of-memory fallback.
FALLBACK_LOG = "The GPU ran out of memory; retrying on the CPU (slower)."


def _models(pipeline) -> list[Any]:
    return [m for m in (getattr(pipeline, "lung_model", None), getattr(pipeline, "infection_model", None)) if m]


def _tell_on_fallback(pipeline, emit: _Emitter) -> None:
    """Log the CUDA out-of-memory fallback of a network model (network_predictor.py) when it happens: now for
    one that fell back while loading, else from the model's ``on_fallback`` hook."""
    for model in _models(pipeline):
        if getattr(model, "fell_back_to_cpu", False):
            emit.log(FALLBACK_LOG)
        elif hasattr(model, "on_fallback"):
            model.on_fallback = lambda _message: emit.log(FALLBACK_LOG)


def _fell_back_to_cpu(pipeline) -> bool:
    """Whether a model of ``pipeline`` ran out of GPU memory and went on on the CPU (network_predictor.py)."""
    return any(getattr(model, "fell_back_to_cpu", False) for model in _models(pipeline))


def run_worker(args, emit: _Emitter) -> dict[str, Any]:
    """Read, check, segment and write; returns the outcome line (raises nothing)."""
    try:
        import SimpleITK as sitk

        from .checks import load_volume
        from .outputs import atomic_write, write_json_report

        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        timings: dict[str, float] = {}
        volume = load_volume(args.input, name=args.name or None, on_progress=emit.progress, timings=timings)

        # A CUDA out-of-memory error is handled where the GPU memory is, in the network model, which moves
        # itself to the CPU and runs again (network_predictor.py); the worker only tells the user.
        pipeline = _make_pipeline(args, args.device)
        _tell_on_fallback(pipeline, emit)
        result = pipeline.run(volume, on_progress=emit.progress, timings=timings)
        retried = _fell_back_to_cpu(pipeline)

        start = time.perf_counter()
        emit.progress("write", 0.0, "writing the result")
        masks = result.masks_in_input_geometry()
        packed, segments = _encode_masks(masks)
        out = sitk.GetImageFromArray(packed)
        volume.input_geometry.apply_to(out)
        atomic_write(output_dir / MASKS_FILE,
                     lambda tmp: sitk.WriteImage(out, str(tmp), useCompression=False))
        timings["write"] = time.perf_counter() - start
        report = result.report()
        report["segments"] = segments
        report["device_requested"] = args.device
        if retried:
            report["retried_on_cpu"] = True
            report.setdefault("notes", []).append("The GPU ran out of memory; the segmentation was computed on the CPU.")
        write_json_report(output_dir / REPORT_FILE, report)
        emit.progress("write", 1.0, "done")
        message = "Segmentation finished" + (" on the CPU after the GPU ran out of memory." if retried else ".")
        return {"status": "ok", "message": message, "masks": MASKS_FILE, "report": REPORT_FILE,
                "retried_on_cpu": retried}
    except BaseException as exc:  # noqa: BLE001 - the outcome line must always be written
        kind, message = classify_error(exc)
        if kind == "internal":
            traceback.print_exc(file=sys.stderr)
        return {"status": "error", "kind": kind, "message": message}


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_model_options

    p = argparse.ArgumentParser(prog="infer_worker", description="COVIDLesionSeg segmentation worker "
                                "(started by the Slicer module; prints JSON lines on stdout)")
    p.add_argument("--input", required=True, help="input CT (uncompressed NRRD written by the module)")
    p.add_argument("--output-dir", required=True, help="folder for masks.nrrd and report.json")
    add_model_options(p)
    p.add_argument("--name", default="", help="case name for the report")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``Scripts/infer_worker.py``. Exit status 0 on success, 1 on a reported error."""
    args = build_parser().parse_args(argv)
    emit = _Emitter()
    outcome = run_worker(args, emit)
    emit.line(outcome)
    return 0 if outcome["status"] == "ok" else 1


# ============================================================================================================
# Parent side
# ============================================================================================================

def python_executable() -> str:
    """The Python that runs the worker: ``PythonSlicer`` inside Slicer (same packages, no GUI), else this one."""
    try:
        import slicer  # noqa: F401

        in_app = hasattr(slicer, "app")
    except ImportError:
        in_app = False
    if in_app:
        folder = Path(sys.executable).parent
        for name in ("PythonSlicer", "PythonSlicer.exe"):
            if (folder / name).is_file():
                return str(folder / name)
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def worker_script() -> Path:
    """``Scripts/infer_worker.py`` beside the engine package (source tree and installed extension alike)."""
    return Path(__file__).resolve().parent.parent / "Scripts" / "infer_worker.py"


def inference_command(input_path: str | os.PathLike, output_dir: str | os.PathLike, model: str = "",
                      lung_model: str = "", device: str = "auto", lungs_only: bool = False,
                      name: str = "", fast: bool = False) -> list[str]:
    cmd = [python_executable(), str(worker_script()), "--input", str(input_path), "--output-dir",
           str(output_dir), "--device", device or "auto"]
    if model:
        cmd += ["--model", model]
    if lung_model:
        cmd += ["--lung-model", lung_model]
    if lungs_only:
        cmd.append("--lungs-only")
    if fast:
        cmd.append("--fast")
    if name:
        cmd += ["--name", name]
    return cmd


def write_input_nrrd(image, path: str | os.PathLike) -> Path:
    """Write the worker's input: uncompressed NRRD (writing and reading it is I/O-bound, not CPU-bound)."""
    import SimpleITK as sitk

    path = Path(path)
    sitk.WriteImage(image, str(path), useCompression=False)
    return path


@dataclass
class WorkerResult:
    masks: dict[str, Any]           # segment name -> bool (z, y, x) on the input grid
    report: dict[str, Any]
    message: str = ""


def read_worker_result(output_dir: str | os.PathLike) -> WorkerResult:
    """Load ``masks.nrrd`` and ``report.json`` written by a successful worker."""
    import SimpleITK as sitk

    output_dir = Path(output_dir)
    report = json.loads((output_dir / REPORT_FILE).read_text(encoding="utf-8"))
    packed = sitk.GetArrayFromImage(sitk.ReadImage(str(output_dir / MASKS_FILE)))
    return WorkerResult(decode_masks(packed, report["segments"]), report)


@dataclass
class Progress:
    """One progress report as the widget shows it."""

    stage: str
    fraction: float                 # of the stage
    overall: float                  # of the run, 0..1
    message: str = ""
    remaining_s: Optional[float] = None


class ProgressEstimator:
    """Remaining time from the overall fraction: linear extrapolation of the elapsed time, smoothed.

    The overall fraction weights the stages by their typical share of run time, so the estimate is
    rough at the start; it is withheld until 3 % of the work and 2 s have passed, then smoothed
    (exponential average) so it does not jump with every line.
    """

    def __init__(self, start: Optional[float] = None, smoothing: float = 0.3):
        self.start = time.monotonic() if start is None else start
        self.smoothing = smoothing
        self._estimate: Optional[float] = None
        self._estimate_time: Optional[float] = None

    def update(self, overall: float, now: Optional[float] = None) -> Optional[float]:
        now = time.monotonic() if now is None else now
        elapsed = now - self.start
        if overall < 0.03 or elapsed < 2.0:
            return self.remaining(now)
        raw = elapsed * (1.0 - overall) / overall
        current = self.remaining(now)
        self._estimate = raw if current is None else (1 - self.smoothing) * current + self.smoothing * raw
        self._estimate_time = now
        return self._estimate

    def remaining(self, now: Optional[float] = None) -> Optional[float]:
        if self._estimate is None:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, self._estimate - (now - self._estimate_time))


def format_duration(seconds: Optional[float]) -> str:
    """"1 h 02 min", "3 min 05 s", "42 s" (empty string for None)."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


@dataclass
class WorkerEvent:
    kind: str                       # "progress", "log" or "final"
    data: dict[str, Any] = field(default_factory=dict)


class WorkerError(CovidLesionSegError, RuntimeError):
    """A worker ended with an error; ``kind`` is one of :data:`ERROR_KINDS`, the message the worker's (already
    written for the user by :func:`~.errors.user_message`)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class WorkerProcess:
    """A worker process whose JSON lines are read on a thread; poll() never blocks.

    Args:
        command: the argv to run (see :func:`inference_command`).
        stderr_path: file that receives the worker's stderr (its tail explains crashes).
        env: extra environment variables.
    """

    def __init__(self, command: Sequence[str], stderr_path: Optional[str | os.PathLike] = None,
                 env: Optional[dict[str, str]] = None, cwd: Optional[str | os.PathLike] = None):
        self.command = [str(c) for c in command]
        self.stderr_path = Path(stderr_path) if stderr_path else None
        self.env = env
        self.cwd = cwd
        self.process: Optional[subprocess.Popen] = None
        self.final: Optional[dict[str, Any]] = None
        self.cancelled = False
        self.estimator = ProgressEstimator()
        self.last_progress: Optional[Progress] = None
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader: Optional[threading.Thread] = None
        self._stderr_file = None
        self._eof = False

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> "WorkerProcess":
        env = dict(os.environ)
        env.update(self.env or {})
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONIOENCODING", "utf-8")
        if self.stderr_path is not None:
            self._stderr_file = open(self.stderr_path, "wb")
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            # Own process group: taskkill /T then reaches the whole tree and nothing else.
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            # Own session (and process group, id = pid): killpg reaches the worker and its children only.
            kwargs["start_new_session"] = True
        self.estimator = ProgressEstimator()
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self._stderr_file if self._stderr_file else subprocess.DEVNULL,
            cwd=self.cwd, env=env, **kwargs)
        self._reader = threading.Thread(target=self._read_stdout, name="COVIDLesionSeg-worker-reader", daemon=True)
        self._reader.start()
        return self

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def finished(self) -> bool:
        """True once the process has exited and all its output was read."""
        return self.process is not None and self.process.poll() is not None and self._eof and self._queue.empty()

    def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in iter(self.process.stdout.readline, b""):
            self._queue.put(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
        self.process.stdout.close()
        self._queue.put(None)

    # -- reading -----------------------------------------------------------------------------------------------
    def _parse(self, line: str) -> Optional[WorkerEvent]:
        if not line.strip():
            return None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return WorkerEvent("log", {"message": line})
        if not isinstance(obj, dict):
            return WorkerEvent("log", {"message": line})
        if "status" in obj:
            self.final = obj
            return WorkerEvent("final", obj)
        if "stage" in obj:
            overall = float(obj.get("overall", 0.0))
            remaining = self.estimator.update(overall)
            self.last_progress = Progress(str(obj["stage"]), float(obj.get("fraction", 0.0)), overall,
                                          str(obj.get("message", "")), remaining)
            return WorkerEvent("progress", {**obj, "remaining_s": remaining})
        if "log" in obj:
            return WorkerEvent("log", {"message": str(obj["log"])})
        return WorkerEvent("log", {"message": line})

    def poll(self) -> list[WorkerEvent]:
        """Events received since the last call (never blocks). Ends with a "final" event once the worker is
        done; a worker that died without an outcome line gets a synthesised error outcome."""
        events: list[WorkerEvent] = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._eof = True
                continue
            event = self._parse(line)
            if event is not None:
                events.append(event)
        if self._eof and self.process is not None and self.process.poll() is not None:
            self._close_stderr()
            if self.final is None:
                self.final = self._unexpected_exit()
                events.append(WorkerEvent("final", self.final))
        return events

    def wait(self, timeout: Optional[float] = None, on_event=None, interval: float = 0.05) -> dict[str, Any]:
        """Block until the worker ends (or ``timeout`` s), passing each event to ``on_event``; returns the outcome.

        ``on_event`` may raise :class:`~.progress.Cancelled` to stop: the worker tree is killed and the
        exception propagates.
        """
        from .progress import Cancelled

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for event in self.poll():
                if on_event is not None:
                    try:
                        on_event(event)
                    except Cancelled:
                        self.cancel()
                        raise
            if self.final is not None and self.finished:
                return self.final
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not finish within {timeout} s")
            time.sleep(interval)

    def _unexpected_exit(self) -> dict[str, Any]:
        code = self.process.returncode if self.process else None
        if self.cancelled:
            return {"status": "error", "kind": "cancelled", "message": "Segmentation was cancelled."}
        tail = self.stderr_tail()
        if code is not None and code < 0 and -code == getattr(signal, "SIGKILL", 9):
            return {"status": "error", "kind": "out_of_memory",
                    "message": "The segmentation process was killed by the system, most likely because the "
                               "computer ran out of memory. Close other programs or use a lighter model."
                               + (f"\nLast output:\n{tail}" if tail else "")}
        if tail and ("ModuleNotFoundError" in tail or "ImportError" in tail):
            return {"status": "error", "kind": "missing_dependency",
                    "message": "The segmentation process could not import a Python package it needs. Use "
                               f"'Install dependencies' in the Advanced section.\n{tail}"}
        return {"status": "error", "kind": "crashed",
                "message": f"The segmentation process stopped unexpectedly (exit code {code})."
                           + (f"\nLast output:\n{tail}" if tail else "")}

    def stderr_tail(self, max_chars: int = 2000) -> str:
        if self.stderr_path is None or not self.stderr_path.exists():
            return ""
        try:
            if self._stderr_file is not None:
                self._stderr_file.flush()
            text = self.stderr_path.read_bytes()[-max_chars:].decode("utf-8", errors="replace")
        except OSError:
            return ""
        return text.strip()

    def _close_stderr(self) -> None:
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None

    # -- cancelling --------------------------------------------------------------------------------------------
    def cancel(self, grace_s: float = 2.0) -> None:
        """Kill the worker and every process it started (its process group); returns once it is gone."""
        if self.process is None:
            return
        self.cancelled = True
        if self.process.poll() is None or os.name != "nt":
            kill_process_tree(self.process, grace_s)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass
        if self._reader is not None:
            self._reader.join(timeout=5)
        self.poll()
        self._close_stderr()
        self.final = {"status": "error", "kind": "cancelled", "message": "Segmentation was cancelled."}


def kill_process_tree(process: subprocess.Popen, grace_s: float = 2.0) -> None:
    """Terminate a process started by :class:`WorkerProcess` and its descendants.

    POSIX: SIGTERM to the process group (the worker's own session), then SIGKILL to whatever is left after
    ``grace_s``; the group is signalled even when the leader already exited, so orphans die too.
    Windows: ``taskkill /T /F`` (the whole tree).
    """
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
        return
    pgid = process.pid  # start_new_session=True makes the worker the leader of its own group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if process.poll() is not None and not _group_alive(pgid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True
