#!/usr/bin/env python
"""Headless batch segmentation with the module's logic and MRML nodes.

Runs inside Slicer::

    Slicer --no-splash --no-main-window --python-script batch.py --input DIR_OR_FILES... --output DIR
           [--model ID] [--lung-model ID] [--device auto|cpu|cuda] [--lungs-only] [--overwrite]
           [--allow-slice-gaps] [--dicom] [--no-report]

and under plain Python with ``pip install slicer-core`` (same options). Each input is a CT file (NIfTI,
NRRD, MHA) or a DICOM series folder; a folder of CT files is expanded to its files and its DICOM
subfolders. For each case the volume is loaded into the MRML scene (Slicer: ``slicer.util.loadVolume`` and
the DICOM database; plain Python: ``vtkSlicerVolumesLogic`` and, for DICOM, the engine's series reader),
segmented by the module logic in blocking mode, and written as

- ``OUTPUT/<case>.seg.nrrd`` through ``vtkMRMLSegmentationStorageNode`` (three named, coloured segments with
  terminology, on the input's grid),
- ``OUTPUT/<case>.json`` (the engine's report),
- ``OUTPUT/<case>_report.pdf`` and ``.html`` (the case report, unless ``--no-report``),
- with ``--dicom``, for a DICOM series: ``OUTPUT/<case>_seg.dcm`` and ``<case>_sr.dcm`` (DICOM SEG and TID 1500 SR
  referencing the series),
- the case's row in ``OUTPUT/results.csv`` (the same columns and writer as the ``covidlesionseg`` command line:
  one row per case, replaced in place by a rerun), and at the end ``OUTPUT/report.html`` over all cases.

A case's files appear together or not at all (``outputs.CaseWriter``); the output folder is checked before
any case runs. A failed case is reported (stderr and a ``failed`` row in results.csv, unless a complete earlier
result of the case is there) and the batch goes on; a full disk stops it. The exit status is 0 when every case
succeeded, 1 when any failed (or the output folder cannot be written), 2 for bad arguments or no input found;
the script always ends with ``sys.exit`` so that Slicer quits.
"""

import argparse
import sys
import time
from pathlib import Path

# The engine package sits beside this folder (source tree: COVIDLesionSeg/; installed extension:
# qt-scripted-modules/).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from COVIDLesionSegLib import io as engine_io  # noqa: E402
from COVIDLesionSegLib.cli import add_model_options, add_output_options, device_note  # noqa: E402
from COVIDLesionSegLib.errors import InputError, OutputError, about, user_message  # noqa: E402


def in_slicer_app() -> bool:
    try:
        import slicer
    except ImportError:
        return False
    return hasattr(slicer, "app")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="batch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, metavar="DIR_OR_FILE",
                   help="CT files, DICOM series folders, or folders holding them")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder")
    add_model_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (and their results.csv rows)")
    p.add_argument("--allow-slice-gaps", action="store_true",
                   help="segment a DICOM series with missing slices, interpolating them (default: refuse it)")
    add_output_options(p)
    return p


# ------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------------------
# Scene and loading
# ------------------------------------------------------------------------------------------------------------

class SceneContext:
    """The MRML scene to work in: Slicer's own, or a standalone one (plain Python with slicer-core)."""

    def __init__(self, allow_slice_gaps: bool = False):
        self.allow_slice_gaps = allow_slice_gaps
        self.dicom = None          # io.DicomSource of the last DICOM folder loaded (None for files)
        self.in_app = in_slicer_app()
        if self.in_app:
            import slicer

            self.scene = slicer.mrmlScene
            self.holder = None
        else:
            from COVIDLesionSegLib.mrml import create_standalone_scene

            self.holder = create_standalone_scene(with_terminologies=False)
            self.scene = self.holder.scene

    def load(self, path: Path, name: str):
        """Load one case as a scalar volume node; raises InputError with the reason when it cannot."""
        self.dicom = None
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if path.is_dir():
            return self._load_dicom(path, name)
        if not engine_io.is_image_file(path):
            raise InputError(f"{path}: unsupported file type; use NIfTI, NRRD, MHA or a DICOM series folder")
        if self.in_app:
            import slicer

            try:
                node = slicer.util.loadVolume(str(path), {"name": name, "show": False})
            except Exception as exc:  # loadVolume raises RuntimeError on any read failure
                raise InputError(f"{path}: Slicer cannot read this file as a volume ({exc})") from None
            return node
        from COVIDLesionSegLib.mrml import load_volume_file

        return load_volume_file(self.holder.volumes_logic, path, name)

    def _load_dicom(self, folder: Path, name: str):
        if self.in_app:
            node = self._load_dicom_with_database(folder)
            if node is not None:
                node.SetName(name)
                # The series Slicer loaded is the one the engine would pick; its files are what a DICOM SEG
                # references (dicom_export matches them to the volume's slices by position, and refuses otherwise).
                series = engine_io.find_dicom_series(folder)
                if series:
                    self.dicom = engine_io.DicomSource(folder=str(folder), series=series[0], files=series[0].files,
                                                       header=engine_io.read_header(series[0].files[0]))
                return node
        # Plain Python (or a folder Slicer's DICOM plugins cannot load): the engine's series reader, which
        # picks the CT series with the most slices, orders slices along the normal, refuses missing slices
        # (unless --allow-slice-gaps) and reports tilt / uneven spacing.
        from COVIDLesionSegLib.mrml import volume_node_from_image

        image, notes, self.dicom = engine_io.read_input(folder, allow_slice_gaps=self.allow_slice_gaps)
        for note in notes:
            print(f"  note: {note}", file=sys.stderr)
        return volume_node_from_image(image, self.scene, name)

    def _load_dicom_with_database(self, folder: Path):
        """Import the folder into a temporary DICOM database and load its largest scalar volume (Slicer only)."""
        from DICOMLib import DICOMUtils

        import slicer

        before = set(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))
        try:
            with DICOMUtils.TemporaryDICOMDatabase() as database:
                DICOMUtils.importDicom(str(folder), database)
                for patientUID in database.patients():
                    DICOMUtils.loadPatientByUID(patientUID)
        except Exception as exc:  # noqa: BLE001 - fall back to the engine's reader
            print(f"  DICOM database loading failed ({exc}); reading the series directly", file=sys.stderr)
            return None
        loaded = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if n not in before]
        if not loaded:
            return None
        loaded.sort(key=lambda n: -_voxel_count(n))
        for extra in loaded[1:]:
            self.scene.RemoveNode(extra)
        return loaded[0]

    def remove(self, *nodes) -> None:
        for node in nodes:
            if node is not None and node.GetScene() is not None:
                self.scene.RemoveNode(node)


def _voxel_count(node) -> int:
    image = node.GetImageData()
    if image is None:
        return 0
    x, y, z = image.GetDimensions()
    return x * y * z


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------

def _case_files(output: Path, name: str, case_report: bool, dicom: bool) -> dict:
    """CaseWriter key -> file name of a case: the segmentation and JSON, the report, the DICOM SEG/SR."""
    from COVIDLesionSegLib import outputs

    files = {"segmentation": f"{name}.seg.nrrd", "report": f"{name}.json"}
    if case_report:
        files.update({k: p.name for k, p in outputs.case_report_paths(output, name).items()})
    if dicom:
        files.update({k: p.name for k, p in outputs.dicom_paths(output, name).items()})
    return files


def _case_writer(output: Path, name: str, overwrite: bool, files=None):
    from COVIDLesionSegLib import outputs

    return outputs.CaseWriter(output, name, files or _case_files(output, name, False, False), overwrite=overwrite)


def _write_extras(writer, files, volume, result, report, dicom) -> None:
    """The case report and the DICOM SEG/SR, into the case's staging folder (written with the case or not at
    all). The segments are read back from the segmentation node, on the input volume's grid."""
    from COVIDLesionSegLib import mrml

    if "pdf_report" not in files and "dicom_seg" not in files:
        return
    masks = mrml.masks_from_segmentation(result.segmentation_node, volume)
    image = mrml.image_from_volume_node(volume)
    if "dicom_seg" in files:
        from COVIDLesionSegLib import dicom_export
        from COVIDLesionSegLib.volume import Geometry

        report["dicom_outputs"] = dicom_export.write_seg_and_sr(
            writer.staging_path("dicom_seg"), writer.staging_path("dicom_sr"), masks, Geometry.of(image), dicom.files,
            report)
    if "pdf_report" in files:
        from COVIDLesionSegLib import reports

        reports.write_case_report_from_masks(writer.staging_path("pdf_report"), writer.staging_path("html_report"),
                                             report, image, masks)


def _record_failure(writer, case, message: str, started: float) -> None:
    from COVIDLesionSegLib import outputs

    try:
        writer.record_failure(outputs.failed_row(writer.name, case, message, time.perf_counter() - started))
    except Exception as csv_exc:  # noqa: BLE001 - the console still has the failure
        print(f"  (results.csv not updated: {csv_exc})", file=sys.stderr)


def run_batch(args) -> int:  # noqa: C901 (the batch loop: per-case outcomes are listed in one place)
    from COVIDLesionSegLib import mrml, outputs
    from COVIDLesionSegLib.progress import Cancelled
    from COVIDLesionSegLib.slicer_logic import SegmentationLogic

    output = Path(args.output)
    try:
        outputs.prepare_output_folder(output)       # before any case: a read-only folder fails at once
    except OutputError as exc:
        print(f"error: {user_message(exc).text}", file=sys.stderr)
        return 1
    cases, skipped = outputs.skip_own_outputs(engine_io.expand_inputs(args.input), output)
    if skipped:
        print(f"skipped {len(skipped)} input(s) that are this tool's outputs in {output}", file=sys.stderr)
    if not cases:
        print("error: no CT files or DICOM series folders found in the inputs", file=sys.stderr)
        return 2
    note = device_note(args)
    if note:
        print(f"note: {note}", file=sys.stderr)
    import importlib.util

    # Inside Slicer these packages are not there until installed (the module asks before installing them).
    if args.dicom and importlib.util.find_spec("highdicom") is None:
        print("error: --dicom needs the highdicom package: PythonSlicer -m pip install highdicom", file=sys.stderr)
        return 2
    if args.case_report and importlib.util.find_spec("matplotlib") is None:
        print("note: no PDF/HTML reports: matplotlib is not installed (PythonSlicer -m pip install matplotlib)",
              file=sys.stderr)
        args.case_report = False
    results_csv = output / outputs.RESULTS_FILE

    context = SceneContext(allow_slice_gaps=args.allow_slice_gaps)
    logic = SegmentationLogic(context.scene)
    names = engine_io.unique_case_names(cases)
    failures = []
    for index, (case, name) in enumerate(zip(cases, names, strict=True)):
        print(f"[{index + 1}/{len(cases)}] {case}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        volume = run = None
        planned = _case_files(output, name, args.case_report, args.dicom and Path(case).is_dir())
        writer = _case_writer(output, name, args.overwrite, planned)
        last_stage = [None]

        def on_progress(progress, last_stage=last_stage):
            if progress.stage != last_stage[0]:
                last_stage[0] = progress.stage
                print(f"  {progress.stage}...", file=sys.stderr, flush=True)

        try:
            for message in writer.check_free():
                print(f"  note: {message}", file=sys.stderr)
            volume = context.load(case, name)
            run = logic.process(volume, None, model=args.model or None, lung_model=args.lung_model or None,
                                device=args.device, lungs_only=args.lungs_only, wait_for_completion=True,
                                progress_callback=on_progress, dicom_source=context.dicom, fast=args.fast)
            report = dict(run.result.report)
            report["case"] = name
            report.setdefault("input", {})["source"] = str(case)
            if context.dicom is not None:
                report["input"]["dicom"] = context.dicom.describe()
            files = dict(planned)
            if args.dicom:
                from COVIDLesionSegLib.pipeline import dicom_problem

                problem = dicom_problem(context.dicom)
                if problem:
                    files = {k: v for k, v in files.items() if k not in outputs.DICOM_KEYS}
                    report.setdefault("notes", []).append(f"DICOM SEG and SR not written: {problem}")
            writer = _case_writer(output, name, args.overwrite, files)
            with writer:
                mrml.save_segmentation(run.result.segmentation_node, writer.staging_path("segmentation"))
                _write_extras(writer, files, volume, run.result, report, context.dicom)
                seconds = time.perf_counter() - started
                writer.commit(report, outputs.results_row(report, seconds))
            warnings = outputs.report_warnings(report)
            for warning in warnings:
                print(f"  warning: {warning}", file=sys.stderr)
            for note in outputs.report_notes(report):
                if note not in warnings:
                    print(f"  note: {note}", file=sys.stderr)
            print(f"  done in {seconds:.1f} s -> {writer.final_path('segmentation')}", file=sys.stderr, flush=True)
        except (KeyboardInterrupt, Cancelled):
            print("cancelled", file=sys.stderr)
            return 130
        except outputs.OutputExistsError as exc:  # a complete result is there: its row stays as it is
            message = user_message(exc).text
            failures.append((str(case), message))
            print(f"  FAILED: {message}", file=sys.stderr, flush=True)
        except outputs.OutputWriteError as exc:   # a full disk: every later case would fail the same way
            message = user_message(exc).text
            _record_failure(writer, case, message, started)
            print(f"error: {message}", file=sys.stderr)
            return 1
        except Exception as exc:  # noqa: BLE001 - one bad case must not stop the batch
            message = user_message(exc).text
            failures.append((str(case), message))
            print(f"  FAILED: {message}", file=sys.stderr, flush=True)
            _record_failure(writer, case, message, started)
        finally:
            if run is not None and run.result is not None:
                context.remove(run.result.segmentation_node, run.result.table_node)
            context.remove(volume)

    succeeded = len(cases) - len(failures)
    if args.case_report:
        from COVIDLesionSegLib import reports

        if reports.write_batch_report(output) is None:
            print(f"note: no batch summary: a {reports.BATCH_REPORT} that this tool did not write is in {output}",
                  file=sys.stderr)
    print(f"{succeeded} of {len(cases)} case(s) segmented; results in {results_csv}", file=sys.stderr)
    for case, message in failures:
        print(f"failed: {about(case, message)}", file=sys.stderr)
    return 1 if failures else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":  # `Slicer --python-script batch.py -- --input ...`
        argv = argv[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0)
        return int(exc.code or 0)
    return run_batch(args)


if __name__ == "__main__" or in_slicer_app():  # Slicer's --python-script may run it under another name
    sys.exit(main())
