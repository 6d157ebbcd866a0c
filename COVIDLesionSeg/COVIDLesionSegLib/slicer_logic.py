"""The Slicer module's logic without Qt: MRML nodes in, segmentation + table nodes out.

``COVIDLesionSegLogic.process`` (in ``COVIDLesionSeg.py``) delegates here, so the same code runs in the
desktop application, in ``Slicer --python-script`` batch jobs and in plain Python with ``slicer-core`` (the
tests). It imports only the MRML classes (``slicer``), vtk and the engine; never Qt, never dialogs.

Two ways to run (``process(..., waitForCompletion, useWorker)``):

- **blocking** (``waitForCompletion=True``): by default the engine runs *in this process* (scripts, batch,
  self-tests: no subprocess start-up, models stay loaded between cases); ``useWorker=True`` runs the
  worker process and waits for it (what a script wants when it must survive a crash of the inference).
- **background** (``waitForCompletion=False``): always the worker process (``worker.py``), never the GUI
  thread. ``process`` returns a :class:`SegmentationRun` at once; the caller (the widget's QTimer) calls
  :meth:`SegmentationRun.poll` until it is done and may :meth:`~SegmentationRun.cancel` at any time.

Nothing in the scene changes until a run has succeeded: a new output segmentation and table are created
only when the result is imported, so a cancelled or failed run leaves the scene as it was. Results are then
written by :mod:`.mrml`: segments with names, colours and terminology, reference geometry from the input,
Subject Hierarchy placement under the input's study, this module's earlier segments replaced according to
the ``replaceExisting`` policy (the user's own segments are never touched), and the quantification table.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from . import mrml
from .progress import Cancelled
from .worker import (Progress, ProgressEstimator, WorkerError, WorkerProcess, classify_error, inference_command,
                     read_worker_result, write_input_nrrd)

ProgressCallback = Callable[[Progress], None]

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ProcessResult:
    """What a successful run produced."""

    segmentation_node: Any
    table_node: Any
    segment_ids: dict[str, str]             # segment name -> segment ID
    report: dict[str, Any]                  # the engine's JSON report
    notes: list[str] = field(default_factory=list)

    @property
    def quantities(self) -> dict[str, Any]:
        return self.report["quantification"]


@dataclass
class _Request:
    input_volume: Any
    output_segmentation: Any
    results_table: Any
    model: str
    lung_model: str
    device: str
    lungs_only: bool
    policy: str
    show_surfaces: bool
    case_name: str
    fast: bool = False


class SegmentationRun:
    """A started segmentation. ``state`` is "running", "succeeded", "failed" or "cancelled".

    Background runs advance only when :meth:`poll` is called (from the thread that owns the scene); the
    result is imported into the scene inside :meth:`poll`, so MRML is only touched from that thread.
    """

    def __init__(self, request: _Request, progress_callback: Optional[ProgressCallback] = None,
                 log_callback: Optional[Callable[[str], None]] = None):
        self.request = request
        self.progress_callback = progress_callback
        self.log_callback = log_callback
        self.state = "running"
        self.result: Optional[ProcessResult] = None
        self.error: Optional[str] = None
        self.error_kind: Optional[str] = None
        self.log: list[str] = []
        self.started = time.monotonic()
        self.finished_at: Optional[float] = None
        self.worker: Optional[WorkerProcess] = None
        self._workdir: Optional[Path] = None

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state != "running"

    @property
    def elapsed_s(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started

    def _log(self, message: str) -> None:
        self.log.append(message)
        if self.log_callback is not None:
            self.log_callback(message)

    def _progress(self, progress: Progress) -> None:
        if self.progress_callback is not None:
            self.progress_callback(progress)

    def _finish(self, state: str, error: Optional[str] = None, kind: Optional[str] = None) -> None:
        self.state = state
        self.error = error
        self.error_kind = kind
        self.finished_at = time.monotonic()
        if error:
            self._log(error)
        self._cleanup()

    def _cleanup(self) -> None:
        if self.worker is not None and self.worker.process is not None:
            # The worker exits right after its outcome line; reap it (no zombie) and release its stderr file
            # before its folder goes. A worker that lingers is killed with its process group.
            try:
                self.worker.process.wait(timeout=10)
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
                self.worker.cancel()
            self.worker._close_stderr()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # -- worker mode ---------------------------------------------------------------------------------------------
    def start_worker(self, image) -> None:
        root = temporary_root()
        root.mkdir(parents=True, exist_ok=True)
        self._workdir = Path(tempfile.mkdtemp(prefix="COVIDLesionSeg-", dir=root))
        input_path = self._workdir / "input.nrrd"
        output_dir = self._workdir / "out"
        self._progress(Progress("read", 0.0, 0.0, "writing the input for the worker"))
        write_input_nrrd(image, input_path)
        request = self.request
        command = inference_command(input_path, output_dir, request.model, request.lung_model, request.device,
                                    request.lungs_only, name=request.case_name, fast=request.fast)
        self.worker = WorkerProcess(command, stderr_path=self._workdir / "worker-stderr.txt")
        self.worker.start()
        self._log(f"Started the segmentation process (pid {self.worker.pid}).")

    def poll(self) -> bool:
        """Advance a background run: read the worker's lines, import the result when it is done.

        Returns True while the run is still going. Never raises for a failed run: see ``state``/``error``.
        """
        if self.done or self.worker is None:
            return not self.done
        for event in self.worker.poll():
            if event.kind == "progress":
                data = event.data
                self._progress(Progress(str(data["stage"]), float(data.get("fraction", 0.0)),
                                        float(data.get("overall", 0.0)), str(data.get("message", "")),
                                        data.get("remaining_s")))
            elif event.kind == "log":
                self._log(event.data["message"])
            elif event.kind == "final":
                self._on_final(event.data)
        return not self.done

    def _on_final(self, outcome: dict[str, Any]) -> None:
        if outcome.get("status") != "ok":
            state = "cancelled" if outcome.get("kind") == "cancelled" else "failed"
            self._finish(state, outcome.get("message", "The segmentation failed."), outcome.get("kind", "internal"))
            return
        try:
            assert self._workdir is not None
            result = read_worker_result(self._workdir / "out")
            if outcome.get("message"):
                self._log(outcome["message"])
            self.result = import_result(self.request, result.masks, result.report)
        except Exception as exc:  # noqa: BLE001 - reported to the user as the run's error
            self._finish("failed", f"Importing the result failed: {type(exc).__name__}: {exc}", "internal")
            return
        self._finish("succeeded")

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> "SegmentationRun":
        """Block until a background run is done (used by blocking worker runs and tests)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"segmentation did not finish within {timeout} s")
            time.sleep(interval)
        return self

    def cancel(self) -> None:
        """Stop the run: kills the worker process tree; the scene is left as it was."""
        if self.done:
            return
        if self.worker is not None:
            self.worker.cancel()
        self._finish("cancelled", "Segmentation was cancelled.", "cancelled")

    def raise_if_failed(self) -> None:
        if self.state == "failed":
            raise WorkerError(self.error_kind or "internal", self.error or "the segmentation failed")
        if self.state == "cancelled":
            raise Cancelled(self.error or "cancelled")


class SegmentationLogic:
    """Qt-free implementation of ``COVIDLesionSegLogic`` (see the module docstring)."""

    def __init__(self, scene=None):
        self.scene = scene
        self._pipelines: dict[tuple, Any] = {}

    # -- queries -------------------------------------------------------------------------------------------------
    @staticmethod
    def inputProblem(volume_node) -> Optional[str]:
        """None when ``volume_node`` can be segmented, else the reason (for disabling the Segment button)."""
        return mrml.volume_node_problem(volume_node)

    @staticmethod
    def existingGeneratedSegments(segmentation_node) -> list[mrml.ExistingSegment]:
        return mrml.existing_generated_segments(segmentation_node)

    # -- running -------------------------------------------------------------------------------------------------
    def process(self, inputVolume, outputSegmentation=None, model: Optional[str] = None, device: str = "auto",
                lungsOnly: bool = False, waitForCompletion: bool = True,
                progressCallback: Optional[ProgressCallback] = None, replaceExisting=None,
                lungModel: Optional[str] = None, resultsTable=None, useWorker: Optional[bool] = None,
                showSurfaces: bool = False, logCallback: Optional[Callable[[str], None]] = None,
                fast: bool = False) -> SegmentationRun:
        """Segment the lungs and COVID-19 infection of ``inputVolume``.

        Args:
            inputVolume: ``vtkMRMLScalarVolumeNode`` with a chest CT in Hounsfield units.
            outputSegmentation: ``vtkMRMLSegmentationNode`` to write into; None creates one when the result
                arrives (named after the input).
            model: infection model id (None: the catalogue's default). ``lungModel`` likewise for the lungs.
            device: "auto", "cpu" or "cuda".
            lungsOnly: segment the lungs only (no infection segment).
            waitForCompletion: block until done (True) or return a running :class:`SegmentationRun` (False).
            progressCallback: called with a :class:`~.worker.Progress`; in blocking in-process runs it may
                raise :class:`~.progress.Cancelled` to stop.
            replaceExisting: this module's earlier segments in ``outputSegmentation``: True replaces them,
                False keeps them (renamed "(previous)"), None (default) replaces the unedited ones and keeps
                the ones the user edited (renamed "(edited)"). The user's own segments are never touched.
            resultsTable: ``vtkMRMLTableNode`` for the quantification (None: a new one).
            useWorker: blocking runs only: run in a worker process (True) or in this process (None/False).
            showSurfaces: also build the closed-surface (3D) representation.
            fast: the fast mode (coarser grids, about twice as fast; ``covidlesionseg segment --fast``).

        Returns:
            the :class:`SegmentationRun` (finished when blocking; ``run.result`` holds the nodes and report).

        Raises (blocking runs): InputError (bad input), ModelError, Cancelled, WorkerError (worker failures).
        Background runs raise only for invalid input found before the worker starts.
        """
        from . import checks

        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        policy = mrml.ReplacePolicy.from_argument(replaceExisting)
        image = mrml.image_from_volume_node(inputVolume)          # InputError if the node is unusable
        image, notes = checks.check_ct(image)                      # InputError with the reason and a way out
        request = _Request(inputVolume, outputSegmentation, resultsTable, model or "", lungModel or "", device,
                           bool(lungsOnly), policy, bool(showSurfaces), inputVolume.GetName() or "CT", bool(fast))
        run = SegmentationRun(request, progressCallback, logCallback)
        for note in notes:
            run._log(note)

        if not waitForCompletion or useWorker:
            run.start_worker(image)
            if waitForCompletion:
                try:
                    run.wait()
                except BaseException:
                    run.cancel()
                    raise
                run.raise_if_failed()
            return run

        try:
            masks, report = self._run_in_process(image, request, notes, run)
            run.result = import_result(request, masks, report)
        except BaseException as exc:
            kind, message = classify_error(exc) if isinstance(exc, Exception) else ("cancelled", "Interrupted.")
            run._finish("cancelled" if kind == "cancelled" else "failed", message, kind)
            raise
        run._finish("succeeded")
        return run

    def _pipeline(self, request: _Request):
        from .pipeline import Pipeline, SegmentOptions

        key = (request.model, request.lung_model, request.device, request.lungs_only, request.fast)
        if key not in self._pipelines:
            # Models are loaded once per choice and reused for the next case (batch runs, re-runs).
            self._pipelines = {key: Pipeline(SegmentOptions(infection_model=request.model or None,
                                                            lung_model=request.lung_model or None,
                                                            device=request.device, lungs_only=request.lungs_only,
                                                            fast=request.fast))}
        return self._pipelines[key]

    def _run_in_process(self, image, request: _Request, notes: list[str], run: SegmentationRun):
        from .pipeline import overall_fraction
        from .volume import CTVolume

        estimator = ProgressEstimator(start=run.started)

        def on_progress(stage: str, fraction: float, message: str) -> None:
            overall = overall_fraction(stage, fraction)
            run._progress(Progress(stage, fraction, overall, message, estimator.update(overall)))

        on_progress("check", 1.0, "input checked")
        volume = CTVolume.from_image(image, name=request.case_name, source=request.input_volume.GetID() or "",
                                     notes=notes)
        result = self._pipeline(request).run(volume, on_progress=on_progress)
        on_progress("write", 0.0, "creating segments")
        report = result.report()
        return result.masks_in_input_geometry(), report


def _model_label(report: dict[str, Any]) -> str:
    models = report.get("models", {})
    parts = [f"{m.get('id', '?')} {m.get('version', '')}".strip() for m in models.values()]
    return " + ".join(parts) or "COVIDLesionSeg"


def import_result(request: _Request, masks: dict[str, Any], report: dict[str, Any]) -> ProcessResult:
    """Write a run's masks and quantification into the scene (creating output nodes when needed)."""
    volume = request.input_volume
    scene = volume.GetScene()
    if scene is None:
        raise RuntimeError("the input volume was removed from the scene while it was being segmented")
    segmentation = request.output_segmentation
    if segmentation is not None and segmentation.GetScene() is None:
        segmentation = None  # deleted by the user during the run: make a new one rather than fail
    if segmentation is None:
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                               scene.GenerateUniqueName(f"{request.case_name} segmentation"))
    segment_ids = mrml.write_segments(segmentation, masks, volume, policy=request.policy,
                                      model_label=_model_label(report))
    mrml.show_segmentation(segmentation, surfaces=request.show_surfaces)
    mrml.place_beside(segmentation, volume)

    table = request.results_table
    if table is not None and table.GetScene() is None:
        table = None
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode",
                                        scene.GenerateUniqueName(f"{request.case_name} lung infection"))
    mrml.fill_table(table, report["quantification"], volume)
    mrml.place_beside(table, volume)
    notes = list(report.get("notes", []))
    return ProcessResult(segmentation, table, segment_ids, report, notes)


def temporary_root() -> Path:
    """Where worker folders go (the system temp folder; ``COVIDLESIONSEG_TMP`` overrides it)."""
    return Path(os.environ.get("COVIDLESIONSEG_TMP", tempfile.gettempdir()))
