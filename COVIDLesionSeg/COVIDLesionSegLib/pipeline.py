"""The whole segmentation pipeline: read -> check -> lungs -> infection -> quantify -> write.

Two entry points share one implementation:

- :meth:`Pipeline.run` works on a :class:`~.volume.CTVolume` in memory (used by the Slicer module's logic and
  worker, which already hold the image) and returns a :class:`SegmentationResult`;
- :meth:`Pipeline.segment_file` reads a file or DICOM folder, runs, and writes the case's outputs
  (``.seg.nrrd``, ``_labels.nii.gz``, ``.json``, a row in ``results.csv``); :func:`segment_batch` loops over
  cases, continues past failures and reports them.

Progress is reported as ``on_progress(stage, fraction_of_stage, message)``; a callback that raises
:class:`~.progress.Cancelled` stops the run before anything is written.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import SimpleITK as sitk

from . import LABEL_INFECTION, LABEL_LEFT_LUNG, LABEL_RIGHT_LUNG, __version__
from . import catalogue, checks, io, outputs, quantify
from .errors import CovidLesionSegError, InputError
from .progress import Cancelled
from .segments import SEGMENTS
from .volume import CTVolume

STAGES = ("read", "check", "lungs", "infection", "quantify", "write")
# Rough share of run time per stage, for an overall progress fraction.
STAGE_WEIGHTS = {"read": 0.05, "check": 0.02, "lungs": 0.35, "infection": 0.45, "quantify": 0.03, "write": 0.10}

StageCallback = Callable[[str, float, str], None]


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

    def masks_in_input_geometry(self) -> dict[str, np.ndarray]:
        """Segment name -> bool array (z, y, x) on the input's grid (overlapping segments)."""
        masks = {
            SEGMENTS.right_lung.name: self.lungs == LABEL_RIGHT_LUNG,
            SEGMENTS.left_lung.name: self.lungs == LABEL_LEFT_LUNG,
        }
        if self.infection is not None:
            masks[SEGMENTS.infection.name] = self.infection
        return {name: sitk.GetArrayFromImage(self.volume.to_input_geometry(mask.astype(np.uint8))).astype(bool)
                for name, mask in masks.items()}

    def labelmap_in_input_geometry(self) -> sitk.Image:
        """Single labelmap (0 bg, 1 right, 2 left, 3 infection with precedence) on the input's grid."""
        labels = self.lungs.copy()
        if self.infection is not None:
            labels[self.infection] = LABEL_INFECTION
        return self.volume.to_input_geometry(labels)

    def report(self) -> dict[str, Any]:
        """JSON-serialisable report of the case (the ``<case>.json`` file)."""
        geometry = self.volume.input_geometry
        return {
            "case": self.volume.name,
            "input": {"source": self.volume.source, "size": list(geometry.size),
                      "spacing_mm": list(geometry.spacing), "origin_mm": list(geometry.origin),
                      "direction": list(geometry.direction), "orientation": geometry.orientation},
            "models": self.models,
            "quantification": self.quantities,
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
                                               opts.device)
        self.infection_model = None
        if not opts.lungs_only:
            self.infection_model = catalogue.load_model(
                opts.infection_model or catalogue.default_model_id("infection"), "infection", opts.device)

    # -- in memory ---------------------------------------------------------------------------------------------
    def run(self, volume: CTVolume, on_progress: Optional[StageCallback] = None,
            timings: Optional[dict[str, float]] = None) -> SegmentationResult:
        timings = {} if timings is None else timings
        notes = list(volume.notes)

        start = time.perf_counter()
        lungs = self.lung_model.segment(volume, progress=_stage(on_progress, "lungs"))
        timings["lungs"] = time.perf_counter() - start

        infection = None
        models = {"lungs": _model_record(self.lung_model)}
        if self.infection_model is not None:
            start = time.perf_counter()
            probabilities = self.infection_model.predict(volume, lungs, progress=_stage(on_progress, "infection"))
            infection = (probabilities >= self.infection_model.info.threshold) & (lungs > 0)
            del probabilities
            timings["infection"] = time.perf_counter() - start
            models["infection"] = _model_record(self.infection_model)
            notes.extend(getattr(self.infection_model, "notes", []))

        start = time.perf_counter()
        _emit(on_progress, "quantify", 0.0, "measuring volumes")
        quantities = quantify.quantify(lungs, infection if infection is not None else np.zeros_like(lungs, bool),
                                       volume.spacing_zyx)
        if infection is None:
            quantities["infection_segmented"] = False
        timings["quantify"] = time.perf_counter() - start
        return SegmentationResult(volume, lungs, infection, quantities, timings, models, notes)

    # -- files -------------------------------------------------------------------------------------------------
    def output_paths(self, outdir: Path, name: str) -> dict[str, Path]:
        return {"segmentation": outdir / f"{name}.seg.nrrd", "labels": outdir / f"{name}_labels.nii.gz",
                "report": outdir / f"{name}.json"}

    def segment_file(self, path: str | Path, outdir: str | Path, name: Optional[str] = None,
                     on_progress: Optional[StageCallback] = None) -> tuple[SegmentationResult, dict[str, Path]]:
        """Read, check, segment and write one case. Nothing is written unless every stage succeeded."""
        outdir = Path(outdir)
        name = name or io.case_name(path)
        paths = self.output_paths(outdir, name)
        outputs.check_outputs_free(list(paths.values()), overwrite=self.options.overwrite)
        timings: dict[str, float] = {}

        start = time.perf_counter()
        _emit(on_progress, "read", 0.0, f"reading {path}")
        image, read_notes = io.read_image(path, allow_slice_gaps=self.options.allow_slice_gaps)
        timings["read"] = time.perf_counter() - start

        start = time.perf_counter()
        _emit(on_progress, "check", 0.0, "checking the image")
        image, check_notes = checks.check_ct(image, self.options.input_window)
        volume = CTVolume.from_image(image, name=name, source=str(path), notes=read_notes + check_notes)
        del image
        timings["check"] = time.perf_counter() - start

        result = self.run(volume, on_progress, timings)

        start = time.perf_counter()
        _emit(on_progress, "write", 0.0, f"writing {outdir}")
        self.write(result, paths, outdir, started=start)
        return result, paths

    def write(self, result: SegmentationResult, paths: dict[str, Path], outdir: Path,
              started: Optional[float] = None) -> None:
        """Write the images, then the JSON report (with the write time) and the results.csv row, last."""
        started = time.perf_counter() if started is None else started
        outdir.mkdir(parents=True, exist_ok=True)
        outputs.write_segmentation_nrrd(paths["segmentation"], result.masks_in_input_geometry(),
                                        result.volume.input_geometry)
        outputs.write_labelmap(paths["labels"], result.labelmap_in_input_geometry())
        result.timings["write"] = time.perf_counter() - started
        outputs.write_json_report(paths["report"], result.report())
        row = {"case": result.volume.name, "status": "ok", "source": result.volume.source,
               "lung_model": result.models["lungs"]["id"],
               "infection_model": result.models.get("infection", {}).get("id", ""),
               "device": result.models.get("infection", result.models["lungs"]).get("device", ""),
               **quantify.flatten_for_csv(result.quantities),
               "seconds": round(sum(result.timings.values()), 3)}
        outputs.append_results_row(outdir / "results.csv", row)


@dataclass
class BatchReport:
    succeeded: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)   # (input, message)

    @property
    def exit_status(self) -> int:
        return 1 if self.failed else 0


def segment_batch(inputs: list[str | Path], outdir: str | Path, options: SegmentOptions,
                  on_progress: Optional[StageCallback] = None,
                  on_case: Optional[Callable[[int, int, str], None]] = None,
                  on_error: Optional[Callable[[str, str], None]] = None) -> BatchReport:
    """Segment every input; a failed case is reported and the batch goes on. Cancelled stops the batch."""
    report = BatchReport()
    pipeline = Pipeline(options)
    names = io.unique_case_names(inputs)
    for index, (path, name) in enumerate(zip(inputs, names)):
        if on_case is not None:
            on_case(index, len(inputs), str(path))
        try:
            pipeline.segment_file(path, outdir, name=name, on_progress=on_progress)
        except Cancelled:
            raise
        except CovidLesionSegError as exc:
            _record_failure(report, path, str(exc), on_error)
        except MemoryError:
            _record_failure(report, path, "out of memory; close other programs, or use a smaller model or the CPU "
                                          "with fewer parallel jobs", on_error)
        except Exception as exc:  # an unexpected bug must not stop a hospital's overnight batch
            _record_failure(report, path, f"unexpected error: {type(exc).__name__}: {exc}", on_error)
        else:
            report.succeeded.append(str(path))
    return report


def _record_failure(report: BatchReport, path, message: str, on_error) -> None:
    report.failed.append((str(path), message))
    if on_error is not None:
        on_error(str(path), message)


def _model_record(model) -> dict[str, str]:
    info = model.info
    # str(): a network model's device is a torch.device, the report is JSON.
    return {"id": info.model_id, "version": info.version, "device": str(getattr(model, "device", info.device))}


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


__all__ = ["Pipeline", "SegmentOptions", "SegmentationResult", "BatchReport", "segment_batch", "InputError",
           "STAGES", "overall_fraction"]
