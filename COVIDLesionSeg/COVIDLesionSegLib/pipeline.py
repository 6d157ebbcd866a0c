"""The whole segmentation pipeline: read -> check -> lungs -> infection -> quantify -> write.

Two entry points share one implementation:

- :meth:`Pipeline.run` works on a :class:`~.volume.CTVolume` in memory (used by the Slicer module's logic and
  worker, which already hold the image) and returns a :class:`SegmentationResult`;
- :meth:`Pipeline.segment_file` reads a file or DICOM folder, runs, and writes the case's outputs
  (``.seg.nrrd``, ``_labels.nii.gz``, ``.json``, its row in ``results.csv``) together or not at all
  (:class:`~.outputs.CaseWriter`); :func:`segment_batch` checks the output folder first, loops over cases,
  continues past failed cases (each gets a "failed" row) and reports them, and stops when the output
  folder cannot take more files (a full disk).

Progress is reported as ``on_progress(stage, fraction_of_stage, message)``; a callback that raises
:class:`~.progress.Cancelled` stops the run before anything is written.
"""

from __future__ import annotations

import platform
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import SimpleITK as sitk

from . import (
    LABEL_INFECTION,
    LABEL_LEFT_LUNG,
    LABEL_RIGHT_LUNG,
    __version__,
    catalogue,
    checks,
    io,
    outputs,
    quality,
    quantify,
    thin_slices,
)
from .errors import CovidLesionSegError, InputError, user_message
from .progress import Cancelled
from .segments import SEGMENTS
from .volume import CTVolume

STAGES = ("read", "check", "lungs", "infection", "quantify", "write")
#: In the notes of every case run in the fast mode (docs/default_models.md, section 8, measures its cost).
FAST_MODE_NOTE = ("fast mode: lungs on a 3 mm grid instead of 2 mm, the built-in infection model's decisions on "
                  "2 mm instead of 1.25 mm, a 2D infection network on every second lung slice (the others "
                  "interpolated); lung volumes within about 0.5 % of a normal run, the infection less exact "
                  "(docs/default_models.md, section 8)")
# Rough share of run time per stage, for an overall progress fraction.
STAGE_WEIGHTS = {"read": 0.05, "check": 0.02, "lungs": 0.35, "infection": 0.45, "quantify": 0.03, "write": 0.10}

StageCallback = Callable[[str, float, str], None]
#: Above this many voxels (a 512 x 512 x 380 scan) the two output images are written one after the other.
PARALLEL_WRITE_VOXELS = 100_000_000


@dataclass
class SegmentOptions:
    """What the user chose. ``None`` model ids mean the catalogue's defaults."""

    infection_model: Optional[str] = None
    lung_model: Optional[str] = None
    device: str = "auto"
    lungs_only: bool = False
    overwrite: bool = False
    input_window: Optional[tuple[float, float]] = None
    allow_slice_gaps: bool = False       # DICOM series with missing slices: interpolate them instead of refusing
    dicom: bool = False                  # also write DICOM SEG + SR for DICOM inputs (dicom_export.py)
    case_report: bool = True             # write <case>_report.pdf and .html (reports.py)
    fast: bool = False                   # the fast mode: coarser grids, a note in the report (FAST_MODE_NOTE)


@dataclass
class SegmentationResult:
    """Masks on the volume's canonical grid, the quantification and the run's metadata."""

    volume: CTVolume
    lungs: np.ndarray                     # uint8 (z, y, x): 0, LABEL_RIGHT_LUNG, LABEL_LEFT_LUNG
    infection: Optional[np.ndarray]       # bool (z, y, x) inside the lungs, None with lungs_only
    quantities: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    models: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[quality.QualityWarning] = field(default_factory=list)   # also in notes (their messages)
    dicom: Optional[io.DicomSource] = None   # the DICOM series the volume was read from, if it was

    def _input_grid(self) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The lung labels and the infection mask as arrays on the input's grid, each reoriented once (and
        not at all for an input stored in the canonical orientation)."""
        lungs = self.volume.to_input_array(self.lungs)
        infection = (None if self.infection is None
                     else self.volume.to_input_array(self.infection.view(np.uint8)).view(bool))
        return lungs, infection

    def masks_in_input_geometry(self) -> dict[str, np.ndarray]:
        """Segment name -> bool array (z, y, x) on the input's grid (overlapping segments)."""
        return _segment_masks(*self._input_grid())

    def labelmap_in_input_geometry(self) -> sitk.Image:
        """Single labelmap (0 bg, 1 right, 2 left, 3 infection with precedence) on the input's grid."""
        out = sitk.GetImageFromArray(_labelmap(*self._input_grid()))
        self.volume.input_geometry.apply_to(out)
        return out

    def report(self) -> dict[str, Any]:
        """JSON-serialisable report of the case (the ``<case>.json`` file)."""
        geometry = self.volume.input_geometry
        source = {"source": self.volume.source, "size": list(geometry.size),
                  "spacing_mm": list(geometry.spacing), "origin_mm": list(geometry.origin),
                  "direction": list(geometry.direction), "orientation": geometry.orientation}
        if self.dicom is not None:
            source["dicom"] = self.dicom.describe()
        return {
            "case": self.volume.name,
            "input": source,
            "models": self.models,
            "quantification": self.quantities,
            "warnings": [w.as_dict() for w in self.warnings],
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "notes": self.notes,
            "software": {"covidlesionseg": __version__, "python": platform.python_version(),
                         "simpleitk": sitk.Version_VersionString()},
        }


class Pipeline:
    """Loads the models once and runs them on any number of cases."""

    def __init__(self, options: SegmentOptions | None = None):
        self.options = options or SegmentOptions()
        opts = self.options
        self.lung_model = catalogue.load_model(opts.lung_model or catalogue.default_model_id("lungs"), "lungs",
                                               opts.device, fast=opts.fast)
        self.infection_model = None
        #: Notes for every case (a default model that fell back to the built-in one).
        self.model_notes: list[str] = []
        if not opts.lungs_only:
            self.infection_model = catalogue.load_model(
                opts.infection_model or catalogue.default_model_id("infection"), "infection", opts.device,
                fast=opts.fast, masks=True)
        for task, chosen in (("lungs", opts.lung_model), ("infection", opts.infection_model)):
            note = None if chosen or (task == "infection" and opts.lungs_only) else catalogue.default_fallback_note(task)
            if note:
                self.model_notes.append(note)

    # -- in memory ---------------------------------------------------------------------------------------------
    def run(self, volume: CTVolume, on_progress: Optional[StageCallback] = None,
            timings: Optional[dict[str, float]] = None, dicom: Optional[io.DicomSource] = None,
            report_follows: bool = False) -> SegmentationResult:
        """Segment and measure ``volume``; ``dicom`` (its source series, when it was read from one) adds the
        header-based quality checks (slice thickness, tilt, spacing, contrast agent) and the DICOM outputs.
        ``report_follows``: the caller draws the case's PDF/HTML report next (:meth:`segment_file`), so the
        report's imports start in the background once the models are done (beside the measuring and the
        image writes: 0.15-0.3 s of a P001 run, and not in the infection step's peak memory)."""
        timings = {} if timings is None else timings
        notes = list(volume.notes) + self.model_notes
        if self.options.fast:
            notes.append(FAST_MODE_NOTE)

        start = time.perf_counter()
        lungs = self.lung_model.segment(volume, progress=_stage(on_progress, "lungs"))
        timings["lungs"] = time.perf_counter() - start

        infection = None
        models = {"lungs": _model_record(self.lung_model, self.options.fast)}
        if self.infection_model is not None:
            start = time.perf_counter()
            infection = infection_mask(volume, lungs, self.infection_model, progress=_stage(on_progress, "infection"),
                                       notes=notes)
            timings["infection"] = time.perf_counter() - start
            models["infection"] = _model_record(self.infection_model, self.options.fast)
            notes.extend(getattr(self.infection_model, "notes", []))

        if report_follows:
            from . import reports

            reports.import_in_background()
        start = time.perf_counter()
        _emit(on_progress, "quantify", 0.0, "measuring volumes")
        quantities = quantify.quantify(lungs, infection if infection is not None else np.zeros_like(lungs, bool),
                                       volume.spacing_zyx, hu=volume.hu)
        if infection is None:
            quantities["infection_segmented"] = False
        warnings = quality.assess(volume, lungs, infection, quantities, dicom)
        timings["quantify"] = time.perf_counter() - start
        notes.extend(w.message for w in warnings if w.message not in notes)
        return SegmentationResult(volume, lungs, infection, quantities, timings, models, notes, warnings, dicom)

    # -- files -------------------------------------------------------------------------------------------------
    def output_paths(self, outdir: Path, name: str) -> dict[str, Path]:
        """The files a case may get (:func:`case_output_paths` for this pipeline's options)."""
        return case_output_paths(self.options, outdir, name)

    def case_writer(self, outdir: str | Path, name: str) -> outputs.CaseWriter:
        """The :class:`~.outputs.CaseWriter` of a case's files in ``outdir``."""
        return _case_writer(self.options, outdir, name)

    def segment_file(self, path: str | Path, outdir: str | Path, name: Optional[str] = None,
                     on_progress: Optional[StageCallback] = None,
                     on_note: Optional[Callable[[str], None]] = None,
                     read: Optional[Future] = None) -> tuple[SegmentationResult, dict[str, Path]]:
        """Read, check, segment and write one case. Nothing is written unless every stage succeeded.

        Raises :class:`~.outputs.OutputExistsError` before any work when a complete result of the case exists
        (without ``overwrite``); an incomplete one is written again, and ``on_note`` is told so. ``read``: the
        case already being read (a future of :func:`read_case`: :func:`segment_batch` starts the first case's
        while the models load); its errors are raised here, as the case's own.
        """
        outdir = Path(outdir)
        name = name or io.case_name(path)
        paths = self.output_paths(outdir, name)
        for message in self.case_writer(outdir, name).check_free():
            if on_note is not None:
                on_note(message)
        if read is None:
            read = _done(read_case(path, name, self.options, on_progress))
        else:
            _emit(on_progress, "read", 0.0, f"reading {Path(path).name}")
        volume, timings = read.result()
        result = self.run(volume, on_progress, timings, volume.dicom,
                          report_follows=self.options.case_report)

        start = time.perf_counter()
        _emit(on_progress, "write", 0.0, f"writing {outdir}")
        self.write(result, paths, outdir, started=start, free_volume=True)
        return result, paths

    def write(self, result: SegmentationResult, paths: dict[str, Path], outdir: Path,
              started: Optional[float] = None, free_volume: bool = False) -> dict[str, Any]:
        """Write the case's files and its results.csv row together (:class:`~.outputs.CaseWriter`).

        ``paths`` are :meth:`output_paths`. Returns the JSON report as written (with the write time).
        ``free_volume``: the caller needs the CT's pixels no more (``segment_file``, which read them), so on
        a scan too large to write in parallel they are freed once the report has been drawn.
        """
        started = time.perf_counter() if started is None else started
        files = {key: Path(p).name for key, p in paths.items()}
        dicom_keys = [k for k in outputs.DICOM_KEYS if k in files]
        problem = dicom_problem(result.dicom) if dicom_keys else None
        if problem:
            for key in dicom_keys:
                del files[key]
            result.notes.append(f"DICOM SEG and SR not written: {problem}")
        lungs, infection = result._input_grid()
        geometry = result.volume.input_geometry
        with outputs.CaseWriter(outdir, result.volume.name, files, overwrite=self.options.overwrite) as case:
            report_now = "pdf_report" in files and "dicom_seg" not in files
            if lungs.size <= PARALLEL_WRITE_VOXELS:
                masks = self._write_images_together(case, result, lungs, infection, geometry, report_now)
            else:
                # The pixels can go once no report is still to be drawn from them.
                report_later = "pdf_report" in files and not report_now
                masks = self._write_images_in_turn(case, result, lungs, infection, geometry, report_now,
                                                   free_volume and not report_later)
            extra: dict[str, Any] = {}
            if "dicom_seg" in files:
                from . import dicom_export

                extra["dicom_outputs"] = dicom_export.write_seg_and_sr(
                    case.staging_path("dicom_seg"), case.staging_path("dicom_sr"), masks, geometry,
                    result.dicom.files, result.report())
            del masks, lungs, infection
            if "pdf_report" in files and not report_now:
                self._write_report(case, result, extra)
            result.timings["write"] = time.perf_counter() - started
            report = {**result.report(), **extra}
            case.commit(report, outputs.results_row(report))
        return report

    def _write_images_together(self, case: outputs.CaseWriter, result: SegmentationResult, lungs: np.ndarray,
                               infection: Optional[np.ndarray], geometry, report_now: bool) -> dict[str, np.ndarray]:
        """The labelmap, the ``.seg.nrrd`` and (``report_now``) the PDF/HTML report at the same time; returns
        the segments' masks (the DICOM SEG is written from them).

        zlib and ITK's writer release the GIL: on two cores the slower image is the write time; the report
        (matplotlib: Python, holding the GIL) is drawn meanwhile. The report starts first: it is the longest
        (0.5 s on P001), and it needs none of the masks made here (0.1 s)."""
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending = [pool.submit(self._write_report, case, result, {})] if report_now else []
            try:
                labels_image = _labels_image(lungs, infection, geometry)
                pending.append(pool.submit(outputs.write_labelmap, case.staging_path("labels"), labels_image))
                del labels_image
                masks = _segment_masks(lungs, infection)
                outputs.write_segmentation_nrrd(case.staging_path("segmentation"), masks, geometry)
            finally:
                for task in pending:   # every task ends before the staging folder can be cleaned up
                    task.exception()
            for task in pending:
                task.result()
        return masks

    def _write_images_in_turn(self, case: outputs.CaseWriter, result: SegmentationResult, lungs: np.ndarray,
                              infection: Optional[np.ndarray], geometry, report_now: bool,
                              free_volume: bool) -> dict[str, np.ndarray]:
        """:meth:`_write_images_together` one after the other, for scans above PARALLEL_WRITE_VOXELS: no two
        volume-sized buffers are held together. The report comes first, since it is the last thing that reads
        the CT's pixels; with ``free_volume`` they are then freed (0.5 GB on a 512 x 512 x 1000 scan)."""
        if report_now:
            self._write_report(case, result, {})
        if free_volume:
            result.volume.release_pixels()
        labels_image = _labels_image(lungs, infection, geometry)
        outputs.write_labelmap(case.staging_path("labels"), labels_image)
        del labels_image
        masks = _segment_masks(lungs, infection)
        outputs.write_segmentation_nrrd(case.staging_path("segmentation"), masks, geometry)
        return masks

    @staticmethod
    def _write_report(case: outputs.CaseWriter, result: SegmentationResult, extra: dict[str, Any]) -> None:
        from . import reports

        reports.write_case_report(case.staging_path("pdf_report"), case.staging_path("html_report"),
                                  {**result.report(), **extra}, result.volume, result.lungs, result.infection)


def dicom_problem(dicom: Optional[io.DicomSource]) -> Optional[str]:
    """Why a result read from ``dicom`` (None: not from DICOM) cannot be written as DICOM SEG/SR in its source's
    geometry, or None when it can."""
    if dicom is None:
        return "the input is not a DICOM series (the SEG and SR reference their source images)"
    if dicom.resampled:
        return ("the series was resampled onto its true slice positions (--allow-slice-gaps), so the result no "
                "longer lies on the source's slices")
    return None


def _segment_masks(lungs: np.ndarray, infection: Optional[np.ndarray]) -> dict[str, np.ndarray]:
    """Segment name -> bool mask (the overlapping segments of the ``.seg.nrrd`` and of Slicer)."""
    masks = {SEGMENTS.right_lung.name: lungs == LABEL_RIGHT_LUNG, SEGMENTS.left_lung.name: lungs == LABEL_LEFT_LUNG}
    if infection is not None:
        masks[SEGMENTS.infection.name] = infection
    return masks


def _labels_image(lungs: np.ndarray, infection: Optional[np.ndarray], geometry) -> sitk.Image:
    """The ``_labels`` image on the input's grid (its array is freed at once: the image holds the pixels)."""
    image = sitk.GetImageFromArray(_labelmap(lungs, infection))
    geometry.apply_to(image)
    return image


def _labelmap(lungs: np.ndarray, infection: Optional[np.ndarray]) -> np.ndarray:
    """One uint8 labelmap: the lung labels with infection (LABEL_INFECTION) taking precedence."""
    labels = lungs.astype(np.uint8, copy=True)
    if infection is not None:
        labels[infection] = LABEL_INFECTION
    return labels


@dataclass
class BatchReport:
    succeeded: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)   # (input, message)
    skipped: list[str] = field(default_factory=list)              # inputs that are this tool's own outputs
    summary: Optional[str] = None                                 # the batch's report.html, when written

    @property
    def exit_status(self) -> int:
        return 1 if self.failed else 0


def segment_batch(inputs: list[str | Path], outdir: str | Path, options: SegmentOptions,
                  on_progress: Optional[StageCallback] = None,
                  on_case: Optional[Callable[[int, int, str], None]] = None,
                  on_error: Optional[Callable[[str, str], None]] = None,
                  on_notes: Optional[Callable[[str, list[str]], None]] = None,
                  on_warnings: Optional[Callable[[str, list[str]], None]] = None) -> BatchReport:
    """Segment every input; a failed case is reported and the batch goes on. Cancelled stops the batch.

    The output folder is checked before any case (:func:`~.outputs.prepare_output_folder`, raising
    :class:`~.outputs.OutputWriteError`); inputs that are this tool's own outputs in that folder are
    skipped. A failed case gets a "failed" row in results.csv, unless a complete earlier result of it is
    there. A full disk (:class:`~.outputs.OutputWriteError`) stops the batch. ``on_notes(input, notes)``
    gets, for each case, the notes to show the user (those of the run and of its output folder), and
    ``on_warnings(input, messages)`` its quality warnings (which ``on_notes`` then leaves out).
    """
    outdir = Path(outdir)
    outputs.prepare_output_folder(outdir)
    inputs, _skipped = outputs.skip_own_outputs(inputs, outdir)
    report = BatchReport(skipped=[str(p) for p in _skipped])
    names = io.unique_case_names(inputs)
    # The first case is read while the models load (ITK's reader and torch's import share two cores well: the
    # reader releases the GIL; 0.3-0.8 s of a single case's run, docs/default_models.md section 8.7); the later
    # ones are read in turn, so no two scans are ever held at once. A first case whose complete result is there
    # (and would not be overwritten) is not read at all.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="covidlesionseg-read") as reader:
        first = None
        if inputs and not _complete_and_kept(options, outdir, names[0]):
            first = reader.submit(read_case, inputs[0], names[0], options)
        try:
            pipeline = Pipeline(options)
        except BaseException:
            if first is not None and not first.cancel():
                first.exception()          # the read ends before the error goes up
            raise
    for index, (path, name) in enumerate(zip(inputs, names, strict=True)):
        if on_case is not None:
            on_case(index, len(inputs), str(path))
        started = time.perf_counter()
        folder_notes: list[str] = []
        read, first = first, None           # the first case's read, once; the others read in segment_file
        try:
            result, _paths = pipeline.segment_file(path, outdir, name=name, on_progress=on_progress,
                                                   on_note=folder_notes.append, read=read)
        except Cancelled:
            raise
        except outputs.OutputExistsError as exc:  # a complete result is there: its row stays as it is
            _record_failure(report, path, user_message(exc).text, on_error)
            continue
        except outputs.OutputWriteError as exc:  # a full disk: every later case would fail the same way
            _record_failure(report, path, user_message(exc).text, on_error, pipeline.case_writer(outdir, name),
                            started)
            raise
        except Exception as exc:  # noqa: BLE001 - one case (even a bug) must not stop a hospital's overnight batch
            _record_failure(report, path, user_message(exc).text, on_error, pipeline.case_writer(outdir, name),
                            started)
            continue
        report.succeeded.append(str(path))
        case_report = result.report()
        del result, read                    # the case's volume and masks go before the next case is read
        warnings = outputs.report_warnings(case_report)
        notes = folder_notes + outputs.report_notes(case_report)
        if on_warnings is not None:
            notes = [n for n in notes if n not in warnings]
            if warnings:
                on_warnings(str(path), warnings)
        if on_notes is not None and notes:
            on_notes(str(path), notes)
    if options.case_report and (report.succeeded or report.failed):
        _write_batch_summary(report, outdir, on_notes)
    return report


def _write_batch_summary(report: BatchReport, outdir: Path, on_notes) -> None:
    """``report.html`` over every case of the folder (from its results.csv, so earlier runs' cases too)."""
    from . import reports

    try:
        written = reports.write_batch_report(outdir)
    except outputs.OutputWriteError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:  # the cases are written; say what is missing
        written, problem = None, f"it could not be written ({exc})"
    else:
        problem = f"a {reports.BATCH_REPORT} that this tool did not write is there; it was left as it is"
    report.summary = str(written) if written else None
    if written is None and on_notes is not None:
        on_notes(str(outdir), [f"no batch summary {reports.BATCH_REPORT}: {problem}"])


def _record_failure(report: BatchReport, path, message: str, on_error,
                    writer: Optional[outputs.CaseWriter] = None, started: Optional[float] = None) -> None:
    report.failed.append((str(path), message))
    if on_error is not None:
        on_error(str(path), message)
    if writer is None:
        return
    seconds = None if started is None else time.perf_counter() - started
    try:
        writer.record_failure(outputs.failed_row(writer.name, path, message, seconds))
    except (OSError, ValueError) as exc:  # a full disk or a foreign table: the console still has the failure
        if on_error is not None:
            on_error(str(path), f"(results.csv not updated: {exc})")


def _model_record(model, fast: bool = False) -> dict[str, Any]:
    info = model.info
    # str(): a network model's device is a torch.device, the report is JSON.
    record: dict[str, Any] = {"id": info.model_id, "version": info.version,
                              "device": str(getattr(model, "device", info.device))}
    precision = getattr(model, "precision", None)   # network models: float32, or bfloat16 / float16 autocast
    if precision is not None:
        record["precision"] = precision
    runtime = getattr(model, "runtime", None)       # network models: "torch" or "onnxruntime"
    if runtime is not None:
        record["runtime"] = runtime
    if fast:
        record["fast"] = True
    try:  # the licence travels with the result (the report prints it; weights may be non-commercial)
        record["licence"] = catalogue.get_entry(info.model_id).licence
    except CovidLesionSegError:   # a model loaded from a file the catalogue does not list
        pass
    return record


def case_output_paths(options: SegmentOptions, outdir: Path, name: str) -> dict[str, Path]:
    """The files a case may get: the segmentation, labelmap and JSON, with the options' PDF/HTML report and
    DICOM SEG/SR (written only when the input is a DICOM series: see :meth:`Pipeline.write`)."""
    paths = {"segmentation": outdir / f"{name}.seg.nrrd", "labels": outdir / f"{name}_labels.nii.gz",
             "report": outdir / f"{name}.json"}
    if options.case_report:
        paths.update(outputs.case_report_paths(outdir, name))
    if options.dicom:
        paths.update(outputs.dicom_paths(outdir, name))
    return paths


def _case_writer(options: SegmentOptions, outdir: str | Path, name: str) -> outputs.CaseWriter:
    files = {key: path.name for key, path in case_output_paths(options, Path(outdir), name).items()}
    return outputs.CaseWriter(outdir, name, files, overwrite=options.overwrite)


def _complete_and_kept(options: SegmentOptions, outdir: Path, name: str) -> bool:
    """Whether the case's complete result is in ``outdir`` and would be kept (no ``overwrite``): the case will be
    refused (:meth:`~.outputs.CaseWriter.check_free`), so reading it would be wasted."""
    return not options.overwrite and _case_writer(options, outdir, name).state() == "complete"


def read_case(path: str | Path, name: str, options: SegmentOptions,
              on_progress: Optional[StageCallback] = None) -> tuple[CTVolume, dict[str, float]]:
    """Read and check one case (:func:`~.checks.load_volume` with the options' input window and slice-gap
    rule); returns the volume and the seconds of its "read" and "check" stages."""
    timings: dict[str, float] = {}
    volume = checks.load_volume(path, name=name, input_window=options.input_window,
                                allow_slice_gaps=options.allow_slice_gaps, on_progress=on_progress, timings=timings)
    return volume, timings


def _done(value: Any) -> Future:
    """A future that already holds ``value``."""
    future: Future = Future()
    future.set_result(value)
    return future


def _emit(callback: Optional[StageCallback], stage: str, fraction: float, message: str) -> None:
    if callback is not None:
        callback(stage, fraction, message)


def _stage(callback: Optional[StageCallback], stage: str):
    if callback is None:
        return None
    return lambda fraction, message="": callback(stage, fraction, message)


def overall_fraction(stage: str, fraction: float) -> float:
    """Map a stage's own progress to the run's overall progress (for one progress bar)."""
    done = sum(STAGE_WEIGHTS[s] for s in STAGES[: STAGES.index(stage)])
    return min(1.0, done + STAGE_WEIGHTS[stage] * fraction)


def infection_mask(volume: CTVolume | np.ndarray, lungs: np.ndarray, model,
                   spacing_zyx: Optional[tuple[float, float, float]] = None, progress=None,
                   notes: Optional[list[str]] = None) -> np.ndarray:
    """The infection mask :meth:`Pipeline.run` gives for a scan with lung mask ``lungs`` (any non-zero value
    is lung) and infection model ``model``: thin scans as slabs of about 1.25 mm (``thin_slices``), the
    model's ``predict`` (for a network: lung box, resampling, intensity mapping, windows, blending,
    post-processing), its threshold, then inside the lungs. ``volume`` is a :class:`CTVolume` or a canonical
    (LPS, z-y-x) HU array with ``spacing_zyx`` (the trainer's evaluation of 3D networks scores with this).
    ``notes``: the case's notes, told when the scan ran as slabs."""
    if not isinstance(volume, CTVolume):
        if spacing_zyx is None:
            raise ValueError("infection_mask of an array needs spacing_zyx")
        image = sitk.GetImageFromArray(np.asarray(volume, dtype=np.float32))
        image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
        volume = CTVolume.from_image(image)
    lungs = np.asarray(lungs)
    if lungs.dtype != bool and not np.issubdtype(lungs.dtype, np.integer):
        lungs = lungs > 0     # labels are used as they are (no copy of a 1000-slice scan's labels)
    # Thin slices: the infection model runs on slabs of about 1.25 mm (thin_slices.py), its mask comes back to
    # every slice.
    k = thin_slices.slab_factor(volume.spacing_zyx[0])
    grid, grid_lungs = thin_slices.thick_slabs(volume, lungs, k) if k > 1 else (volume, lungs)
    probabilities = model.predict(grid, grid_lungs, progress=progress)
    # A bool mask (the built-in model, a network with output="mask") is used as it is.
    infection = probabilities if probabilities.dtype == bool else probabilities >= model.info.threshold
    del probabilities, grid, grid_lungs
    if k > 1:
        infection = thin_slices.to_thin_slices(infection, k, lungs)
        if notes is not None:
            notes.append(thin_slices.note(volume.spacing_zyx[0], k))
    return np.logical_and(infection, lungs, out=infection)


__all__ = ["Pipeline", "SegmentOptions", "SegmentationResult", "BatchReport", "segment_batch", "InputError",
           "STAGES", "overall_fraction", "infection_mask"]

