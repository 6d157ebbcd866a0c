"""The Slicer module's logic without Qt: MRML nodes in, segmentation + table nodes out.

``COVIDLesionSegLogic.process`` (in ``COVIDLesionSeg.py``) delegates here, so the same code runs in the
desktop application, in ``Slicer --python-script`` batch jobs and in plain Python with ``slicer-core`` (the
tests). It imports only the MRML classes (``slicer``), vtk and the engine; never Qt, never dialogs.

Two ways to run (``process(..., wait_for_completion, use_worker)``; ``waitForCompletion`` / ``useWorker``
in ``COVIDLesionSegLogic.process``):

- **blocking** (``wait_for_completion=True``): by default the engine runs *in this process* (scripts, batch,
  self-tests: no subprocess start-up, models stay loaded between cases); ``use_worker=True`` runs the
  worker process and waits for it (what a script wants when it must survive a crash of the inference).
- **background** (``wait_for_completion=False``): always the worker process (``worker.py``), never the GUI
  thread. ``process`` returns a :class:`SegmentationRun` at once; the caller (the widget's QTimer) calls
  :meth:`SegmentationRun.poll` until it is done and may :meth:`~SegmentationRun.cancel` at any time.

Nothing in the scene changes until a run has succeeded: a new output segmentation and table are created
only when the result is imported, so a cancelled or failed run leaves the scene as it was. Results are then
written by :mod:`.mrml`: segments with names, colours and terminology, reference geometry from the input,
Subject Hierarchy placement under the input's study, this module's earlier segments replaced according to
the ``replace_existing`` policy (the user's own segments are never touched), and the quantification table.
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
from .segments import SEGMENTS
from .worker import (
    Progress,
    ProgressEstimator,
    WorkerError,
    WorkerProcess,
    classify_error,
    inference_command,
    read_worker_result,
    write_input_nrrd,
)

ProgressCallback = Callable[[Progress], None]

#: The module's segment names, by role.
SEGMENT_NAMES = {"right": SEGMENTS.right_lung.name, "left": SEGMENTS.left_lung.name,
                 "infection": SEGMENTS.infection.name}

DEVICES = ("auto", "cpu", "cuda")


#: Table-node attribute holding the run's JSON report, so that Report and DICOM export work after the run
#: (and after the scene is saved and loaded again).
REPORT_ATTRIBUTE = "COVIDLesionSeg.Report"


@dataclass
class ProcessResult:
    """What a successful run produced."""

    segmentation_node: Any
    table_node: Any
    segment_ids: dict[str, str]             # segment name -> segment ID
    report: dict[str, Any]                  # the engine's JSON report
    notes: list[str] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)   # the quality warnings (quality.py)

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
    dicom_source: Any = None   # io.DicomSource of the input, when the caller read it (batch.py)
    fast: bool = False         # the fast mode (coarser grids; pipeline.SegmentOptions.fast)


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

    def _log_warnings(self) -> None:
        """Every quality warning of the result goes to the run's log and to Python's logging as a warning (the
        Slicer log and Python console show it)."""
        import logging

        for warning in (self.result.warnings if self.result is not None else []):
            logging.getLogger("COVIDLesionSeg").warning(f"COVIDLesionSeg: {warning['message']}")
            self._log(f"Warning: {warning['message']}")

    def _finish(self, state: str, error: Optional[str] = None, kind: Optional[str] = None) -> None:
        if state == "succeeded":
            self._log_warnings()
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


#: Application setting holding the model cache folder the user chose (the module's Advanced section).
MODEL_FOLDER_SETTING = "COVIDLesionSeg/ModelCacheFolder"
#: What the catalogue reads (``catalogue.cache_dir``); worker processes inherit it.
MODEL_FOLDER_ENV = "COVIDLESIONSEG_MODEL_DIR"


def _application_settings():
    """The Slicer application's settings (a QSettings reached through ``slicer.app``), or None outside it."""
    try:
        import slicer
    except ImportError:
        return None
    app = getattr(slicer, "app", None)
    return app.userSettings() if app is not None and hasattr(app, "userSettings") else None


def saved_model_folder() -> Optional[str]:
    """The model cache folder saved in Slicer's settings, or None (not in Slicer, or never chosen)."""
    settings = _application_settings()
    value = settings.value(MODEL_FOLDER_SETTING) if settings is not None else None
    return str(value) if value else None


class SegmentationLogic:
    """Qt-free implementation of ``COVIDLesionSegLogic`` (see the module docstring); snake_case like the rest of
    the engine, with ``COVIDLesionSeg.py`` giving Slicer's camelCase names to the same calls.

    The logic owns the model cache folder: a folder the user chose in the module is read from Slicer's
    settings here, so every user of the logic (the widget, scripts in the Python console,
    ``Slicer --python-script batch.py``) and the worker processes it starts use it; an explicit
    ``COVIDLESIONSEG_MODEL_DIR`` in the environment still wins (a script's own choice).
    """

    def __init__(self, scene=None):
        self.scene = scene
        self._pipelines: dict[tuple, Any] = {}
        saved = saved_model_folder()
        if saved and not os.environ.get(MODEL_FOLDER_ENV):
            os.environ[MODEL_FOLDER_ENV] = saved

    # -- settings ------------------------------------------------------------------------------------------------
    @property
    def model_folder(self) -> Path:
        """Where imported and downloaded models are kept (``catalogue.cache_dir``)."""
        from . import catalogue

        return catalogue.cache_dir()

    @model_folder.setter
    def model_folder(self, path: str | os.PathLike) -> None:
        path = str(path)
        settings = _application_settings()
        if settings is not None:
            settings.setValue(MODEL_FOLDER_SETTING, path)
        os.environ[MODEL_FOLDER_ENV] = path   # the catalogue here and the worker processes read it

    # -- queries -------------------------------------------------------------------------------------------------
    @staticmethod
    def input_problem(volume_node) -> Optional[str]:
        """None when ``volume_node`` can be segmented, else the reason (for disabling the Segment button)."""
        return mrml.volume_node_problem(volume_node)

    @staticmethod
    def existing_generated_segments(segmentation_node) -> list[mrml.ExistingSegment]:
        return mrml.existing_generated_segments(segmentation_node)

    # -- running -------------------------------------------------------------------------------------------------
    def process(self, input_volume, output_segmentation=None, *, model: Optional[str] = None,
                lung_model: Optional[str] = None, device: str = "auto", lungs_only: bool = False,
                wait_for_completion: bool = True, use_worker: Optional[bool] = None,
                progress_callback: Optional[ProgressCallback] = None,
                log_callback: Optional[Callable[[str], None]] = None, replace_existing=None,
                results_table=None, show_surfaces: bool = False, dicom_source=None,
                fast: bool = False) -> SegmentationRun:
        """Segment the lungs and COVID-19 infection of ``input_volume``.

        Args:
            input_volume: ``vtkMRMLScalarVolumeNode`` with a chest CT in Hounsfield units.
            output_segmentation: ``vtkMRMLSegmentationNode`` to write into; None creates one when the result
                arrives (named after the input).
            model: infection model id (None: the catalogue's default). ``lung_model`` likewise for the lungs.
            device: "auto", "cpu" or "cuda".
            lungs_only: segment the lungs only (no infection segment).
            wait_for_completion: block until done (True) or return a running :class:`SegmentationRun` (False).
            use_worker: blocking runs only: run in a worker process (True) or in this process (None/False).
            progress_callback: called with a :class:`~.worker.Progress`; in blocking in-process runs it may
                raise :class:`~.progress.Cancelled` to stop.
            log_callback: called with each line for the user's log (notes, the worker's messages).
            replace_existing: this module's earlier segments in ``output_segmentation``: True replaces them,
                False keeps them (renamed "(previous)"), None (default) replaces the unedited ones and keeps
                the ones the user edited (renamed "(edited)"). The user's own segments are never touched.
            results_table: ``vtkMRMLTableNode`` for the quantification (None: a new one).
            show_surfaces: also build the closed-surface (3D) representation.
            dicom_source: the :class:`~.io.DicomSource` the input was read from (in-process runs): adds the
                header-based quality checks (slice thickness, gantry tilt, spacing, contrast agent).
            fast: the fast mode (coarser grids, about twice as fast; ``covidlesionseg segment --fast``).

        Returns:
            the :class:`SegmentationRun` (finished when blocking; ``run.result`` holds the nodes and report).

        Raises (blocking runs): InputError (bad input), ModelError, Cancelled, WorkerError (worker failures).
        Background runs raise only for invalid input found before the worker starts.
        """
        from . import checks

        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        policy = mrml.ReplacePolicy.from_argument(replace_existing)
        image = mrml.image_from_volume_node(input_volume)         # InputError if the node is unusable
        request = _Request(input_volume, output_segmentation, results_table, model or "", lung_model or "",
                           device, bool(lungs_only), policy, bool(show_surfaces), input_volume.GetName() or "CT",
                           dicom_source=dicom_source, fast=bool(fast))
        run = SegmentationRun(request, progress_callback, log_callback)

        if not wait_for_completion or use_worker:
            # Checked here too, so that a bad input is refused before a process starts; the worker then takes
            # the input through checks.load_volume like every other entry point.
            image, notes = checks.check_ct(image)                  # InputError with the reason and a way out
            for note in notes:
                run._log(note)
            run.start_worker(image)
            if wait_for_completion:
                try:
                    run.wait()
                except BaseException:
                    run.cancel()
                    raise
                run.raise_if_failed()
            return run

        try:
            masks, report = self._run_in_process(image, request, run)
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

    def _run_in_process(self, image, request: _Request, run: SegmentationRun):
        from .checks import load_volume
        from .pipeline import overall_fraction

        estimator = ProgressEstimator(start=run.started)

        def on_progress(stage: str, fraction: float, message: str) -> None:
            overall = overall_fraction(stage, fraction)
            run._progress(Progress(stage, fraction, overall, message, estimator.update(overall)))

        volume = load_volume(image, name=request.case_name, source_label=request.input_volume.GetID() or "",
                             on_progress=on_progress)
        for note in volume.notes:
            run._log(note)
        on_progress("check", 1.0, "input checked")
        result = self._pipeline(request).run(volume, on_progress=on_progress, dicom=request.dicom_source)
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
    import json

    from .outputs import to_jsonable

    table.SetAttribute(REPORT_ATTRIBUTE, json.dumps(to_jsonable(report)))
    notes = list(report.get("notes", []))
    return ProcessResult(segmentation, table, segment_ids, report, notes, list(report.get("warnings", [])))


def stored_report(table_node) -> Optional[dict[str, Any]]:
    """The JSON report a run left on its results table (None when there is none)."""
    import json

    text = table_node.GetAttribute(REPORT_ATTRIBUTE) if table_node is not None else None
    return json.loads(text) if text else None


#: The note a re-measured report carries (its numbers are of the edited segments, not of the model's output).
EDITED_NOTE = "The segments were edited after the segmentation; the numbers are of the edited segments."


def requantify(volume_node, segmentation_node, table_node) -> dict[str, Any]:
    """Measure the segments as they are now (after edits in the segment editor) and put the numbers into the
    results table and its stored report (the rest of the report, models and notes, is kept). Returns the
    updated report."""
    import json

    from .outputs import to_jsonable
    from .quantify import quantify_masks

    report = stored_report(table_node) or {}
    masks = mrml.masks_from_segmentation(segmentation_node, volume_node)
    if report.get("quantification", {}).get("infection_segmented") is False:
        masks.pop(SEGMENT_NAMES["infection"], None)
    quantities = quantify_masks(mrml.image_from_volume_node(volume_node), masks)
    report["quantification"] = quantities
    notes = report.setdefault("notes", [])
    if EDITED_NOTE not in notes:
        notes.append(EDITED_NOTE)
    mrml.fill_table(table_node, quantities, volume_node)
    table_node.SetAttribute(REPORT_ATTRIBUTE, json.dumps(to_jsonable(report)))
    return report


def write_case_report(volume_node, segmentation_node, report: dict[str, Any], pdf_path, html_path):
    """The case report (``reports.py``) of a result in the scene: the CT from its volume node, the segments from
    the segmentation node (on the CT's grid), the numbers from the run's ``report``. Returns both paths."""
    from . import reports

    masks = mrml.masks_from_segmentation(segmentation_node, volume_node)
    return reports.write_case_report_from_masks(pdf_path, html_path, report, mrml.image_from_volume_node(volume_node),
                                                masks)


def dicom_source_files(volume_node) -> list[str]:
    """The DICOM files a volume was loaded from: its ``DICOM.instanceUIDs`` (set by Slicer's DICOM loader)
    looked up in Slicer's DICOM database. Empty when it did not come from DICOM or no database is open."""
    import slicer

    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split() if volume_node is not None else []
    database = getattr(slicer, "dicomDatabase", None)
    if not uids or database is None:
        return []
    files = [database.fileForInstance(uid) for uid in uids]
    return [f for f in files if f] if all(files) else []


def export_dicom(volume_node, segmentation_node, report: dict[str, Any], folder, source_files=None,
                 name: Optional[str] = None) -> dict[str, Any]:
    """Write ``<name>_seg.dcm`` and ``<name>_sr.dcm`` (``dicom_export.py``) into ``folder`` for a result whose
    input came from DICOM; ``source_files`` defaults to :func:`dicom_source_files`. Returns the description
    of what was written (UIDs), with the two paths under ``"paths"``."""
    from . import dicom_export
    from .outputs import dicom_paths
    from .volume import Geometry

    files = list(source_files) if source_files is not None else dicom_source_files(volume_node)
    if not files:
        raise dicom_export.DicomExportError("the input volume was not loaded from DICOM (or its files are not in "
                                            "the DICOM database), so there is no series to reference")
    image = mrml.image_from_volume_node(volume_node)
    masks = mrml.masks_from_segmentation(segmentation_node, volume_node)
    paths = dicom_paths(Path(folder), name or str(report.get("case") or volume_node.GetName() or "case"))
    described = dicom_export.write_seg_and_sr(paths["dicom_seg"], paths["dicom_sr"], masks, Geometry.of(image),
                                              files, report)
    return {**described, "paths": paths}


def temporary_root() -> Path:
    """Where worker folders go (the system temp folder; ``COVIDLESIONSEG_TMP`` overrides it)."""
    return Path(os.environ.get("COVIDLESIONSEG_TMP", tempfile.gettempdir()))
