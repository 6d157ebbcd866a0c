"""The ``covidlesionseg`` command (README, "Command line").

    covidlesionseg segment INPUT [INPUT ...] -o OUTDIR [--model ID] [--lung-model ID]
                   [--device auto|cpu|cuda] [--lungs-only] [--fast] [--overwrite] [--input-window LEVEL,WIDTH]
                   [--allow-slice-gaps] [--dicom] [--no-report]
    covidlesionseg demo [-o OUTDIR]
    covidlesionseg evaluate --pred P --ref R [--tau MM]
    covidlesionseg evaluate --pred P --slice-labels CSV [--case FILE]
    covidlesionseg models list | verify | download ID | import PATH

Results go to files and a short summary to stdout; progress and errors go to stderr. Exit status: 0 when
every case succeeded, 1 when any case failed, 2 for a usage error (including inputs with nothing to
segment), 130 when cancelled (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .errors import about, user_message
from .progress import Cancelled


class _StderrProgress:
    """One tqdm bar per case on stderr, advanced by the pipeline's stage callbacks."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None

    def start_case(self, index: int, total: int, path: str) -> None:
        self.close()
        if not self.enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=100, desc=f"[{index + 1}/{total}] {Path(path).name}", file=sys.stderr,
                        bar_format="{desc}: {percentage:3.0f}%|{bar:30}| {elapsed}<{remaining} {postfix}",
                        leave=True, dynamic_ncols=True)

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        if self.bar is None:
            return
        from .pipeline import overall_fraction

        target = 100 * overall_fraction(stage, fraction)
        self.bar.update(max(0.0, target - self.bar.n))
        self.bar.set_postfix_str(stage)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(max(0.0, 100 - self.bar.n))
            self.bar.close()
            self.bar = None


def _parse_window(text: str) -> tuple[float, float]:
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected LEVEL,WIDTH in HU, e.g. -600,1500") from None
    return level, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covidlesionseg",
                                     description="Lung and COVID-19 infection segmentation of chest CT.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment CT files or DICOM series folders")
    seg.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="NIfTI/NRRD/MHA file, DICOM series folder, or a folder of such files and series")
    seg.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR",
                     help="folder for each case's .seg.nrrd, _labels.nii.gz and .json and for results.csv "
                          "(created if missing; may be the input folder)")
    add_model_options(seg)
    seg.add_argument("--overwrite", action="store_true", help="replace existing outputs of the same case")
    seg.add_argument("--input-window", type=_parse_window, metavar="LEVEL,WIDTH",
                     help="the window an 8-bit (0-255) image was made with, to map it back to HU")
    seg.add_argument("--allow-slice-gaps", action="store_true",
                     help="segment a DICOM series with missing slices, interpolating them (default: refuse it)")
    add_output_options(seg)
    seg.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = sub.add_parser("demo", help="run the whole pipeline on a generated synthetic chest CT")
    demo.add_argument("-o", "--output", type=Path, default=None, metavar="OUTDIR",
                      help="default: a new folder demo-output/run-<time> in the current folder")
    add_model_options(demo)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = sub.add_parser("evaluate", help="compare a predicted segmentation with a reference or per-slice labels")
    ev.add_argument("--pred", required=True, type=Path, help="labelmap (0-3) or .seg.nrrd")
    ref = ev.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref", type=Path, help="labelmap (0-3), binary mask or .seg.nrrd")
    ref.add_argument("--slice-labels", type=Path, metavar="CSV",
                     help="per-slice labels (columns file, z_index, infected[, LLL LUL RLL RML RUL])")
    ev.add_argument("--case", default=None, metavar="FILE",
                    help="with --slice-labels: the CSV's file name of the scan (default: from --pred's name)")
    ev.add_argument("--tau", type=float, default=3.0, help="NSD tolerance in mm (default 3)")

    models = sub.add_parser("models", help="list, verify, download or import models")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="known models and where their files are")
    msub.add_parser("verify", help="check every local model file against its sha256")
    dl = msub.add_parser("download", help="fetch a model listed with a download URL into the model cache")
    dl.add_argument("model_id", metavar="ID", help="a model listed with a download URL (see `models list`)")
    dl.add_argument("--overwrite", action="store_true", help="fetch again even if a verified copy is cached")
    imp = msub.add_parser("import", help="add a checkpoint file to the model cache")
    imp.add_argument("path", type=Path, metavar="PATH",
                     help="a COVIDLesionSeg checkpoint (.pt), e.g. from `python -m training export` or a "
                          "download of a listed model")
    imp.add_argument("--overwrite", action="store_true", help="replace a model already in the cache")

    web = sub.add_parser("serve", help="the browser app: slice and 3D views, Segment, the segment editor, "
                                       "downloads (needs pip install -e \".[web]\")")
    web.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    web.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0 for every network)")
    web.add_argument("--data", default=None, metavar="DIR",
                     help="a folder of CT files and DICOM series the page offers besides uploads (only read)")
    web.add_argument("--max-upload-mb", type=float, default=2048, metavar="MB",
                     help="largest upload accepted, also for what a zipped DICOM series expands to (default 2048)")
    web.add_argument("--open", action="store_true", help="open the page in the default browser")
    return parser


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --lung-model, --device, --lungs-only, --fast: shared by this CLI, the Slicer worker and
    batch.py."""
    p.add_argument("--model", default=None, metavar="ID", help="infection model id (see `models list`)")
    p.add_argument("--lung-model", default=None, metavar="ID", help="lung model id (default: the catalogue's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where network models run: auto (the GPU when CUDA is available, else the CPU), cpu or "
                        "cuda; the built-in HU models always run on the CPU (default: auto)")
    p.add_argument("--lungs-only", action="store_true", help="segment the lungs only, no infection")
    p.add_argument("--fast", action="store_true",
                   help="fast mode: coarser grids (lungs 3 mm, infection decisions 2 mm, a 2D network on every "
                        "second slice), about twice as fast; the accuracy cost is in docs/default_models.md")


def add_output_options(p: argparse.ArgumentParser) -> None:
    """--dicom, --no-report: shared by this CLI and batch.py."""
    p.add_argument("--dicom", action="store_true",
                   help="for DICOM inputs also write <case>_seg.dcm (DICOM SEG) and <case>_sr.dcm (DICOM SR, TID 1500 "
                        "measurement report), referencing the source series")
    p.add_argument("--no-report", dest="case_report", action="store_false",
                   help="do not write <case>_report.pdf/.html and the batch's report.html (faster)")


def _options(args):
    from .pipeline import SegmentOptions

    return SegmentOptions(infection_model=args.model, lung_model=args.lung_model, device=args.device,
                          lungs_only=args.lungs_only, overwrite=getattr(args, "overwrite", False),
                          input_window=getattr(args, "input_window", None),
                          allow_slice_gaps=getattr(args, "allow_slice_gaps", False),
                          dicom=getattr(args, "dicom", False), case_report=getattr(args, "case_report", True),
                          fast=getattr(args, "fast", False))


def device_note(args) -> Optional[str]:
    """The catalogue's note when ``args.device`` is one the chosen models (``add_model_options``) do not use;
    this CLI and batch.py print it once, before the first case."""
    from . import catalogue

    ids = [args.lung_model or catalogue.default_model_id("lungs")]
    if not args.lungs_only:
        ids.append(args.model or catalogue.default_model_id("infection"))
    return catalogue.device_note(args.device, ids)


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_segment(args, inputs=None) -> int:
    from .io import expand_inputs
    from .pipeline import segment_batch

    progress = _StderrProgress(enabled=not args.quiet)
    given = inputs or args.inputs
    inputs = [str(p) for p in expand_inputs(given)]
    if not inputs:  # as batch.py: nothing to segment is a usage error, not "0 of 0 segmented"
        _err(f"error: no CT files or DICOM series folders found in {', '.join(str(p) for p in given)}")
        return 2
    started = time.perf_counter()

    def on_error(path: str, message: str) -> None:
        progress.close()
        _err(f"FAILED {about(path, message)}")

    note = device_note(args)
    if note:
        _err(f"note: {note}")

    def on_notes(path: str, notes: list[str]) -> None:
        # The notes that change how a case's numbers read are printed, not only kept in its JSON and CSV row.
        progress.close()
        for note in notes:
            _err(f"note: {Path(path).name}: {note}")

    def on_warnings(path: str, warnings: list[str]) -> None:
        progress.close()
        for warning in warnings:
            _err(f"warning: {Path(path).name}: {warning}")

    report = segment_batch(inputs, args.output, _options(args), on_progress=progress,
                           on_case=progress.start_case, on_error=on_error, on_notes=on_notes,
                           on_warnings=on_warnings)
    progress.close()
    elapsed = time.perf_counter() - started
    total = len(report.succeeded) + len(report.failed)
    if report.skipped:
        _err(f"skipped {len(report.skipped)} input(s) that are this tool's outputs in {args.output}")
    print(f"{len(report.succeeded)} of {total} case(s) segmented in {elapsed:.1f} s; outputs in {args.output}")
    if report.failed:
        _err(f"{len(report.failed)} case(s) failed:")
        for path, message in report.failed:
            _err(f"  {about(path, message)}")
    return report.exit_status


def cmd_demo(args) -> int:
    import SimpleITK as sitk

    from .phantom import make_chest_phantom

    outdir = args.output or Path("demo-output") / time.strftime("run-%Y%m%d-%H%M%S")
    outdir.mkdir(parents=True, exist_ok=True)
    image, truth = make_chest_phantom()
    ct_path = outdir / "synthetic_chest_ct.nii.gz"
    if ct_path.exists():
        _err(f"{ct_path} exists; choose another --output folder")
        return 1
    sitk.WriteImage(image, str(ct_path))
    print(f"synthetic chest CT written to {ct_path}")
    args.output, args.overwrite, args.input_window = outdir, False, None
    status = cmd_segment(args, inputs=[str(ct_path)])
    if status == 0:
        report = json.loads((outdir / "synthetic_chest_ct.json").read_text())
        for line in _summary_lines(report["quantification"]):
            print(line)
        _print_phantom_agreement(outdir / "synthetic_chest_ct.seg.nrrd", truth)
    return status


def _summary_lines(q: dict) -> list[str]:
    lines = []
    for key, title in (("right_lung", "Right lung"), ("left_lung", "Left lung"), ("both_lungs", "Both lungs")):
        part = q[key]
        pct = part.get("infected_percent")
        pct_text = "n/a" if pct is None else f"{pct:.2f} %"
        lines.append(f"{title:11s} {part['volume_ml']:9.1f} mL, infection {part['infection_ml']:8.1f} mL ({pct_text})")
    return lines


def _print_phantom_agreement(segmentation_path: Path, truth) -> None:
    """Dice of the demo's result against the phantom's known truth, so the demo checks itself."""
    from .evaluation import read_masks
    from .metrics import case_metrics
    from .segments import SEGMENTS

    predicted, _spacing = read_masks(segmentation_path)
    pairs = [(SEGMENTS.right_lung.name, "right_lung"), (SEGMENTS.left_lung.name, "left_lung"),
             (SEGMENTS.infection.name, "infection")]
    lines = []
    for segment_name, truth_key in pairs:
        if segment_name in predicted and truth_key in truth:
            # The truth arrays are canonical (LPS); the file is in the phantom's own (LPS) geometry too.
            dsc = case_metrics(predicted[segment_name], truth[truth_key] > 0, which=["dsc"])["dsc"]
            lines.append(f"{segment_name} DSC {dsc:.3f}")
    print("agreement with the phantom's known truth: " + ", ".join(lines))


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate_files, evaluate_slice_labels

    if args.slice_labels is not None:
        result = evaluate_slice_labels(args.pred, args.slice_labels, args.case)
    else:
        result = evaluate_files(args.pred, args.ref, tau_mm=args.tau)
    print(json.dumps(result, indent=2, allow_nan=False, default=str))
    return 0


def cmd_models(args) -> int:
    from . import catalogue

    if args.models_command == "list":
        defaults = {task: catalogue.default_model_id(task) for task in ("lungs", "infection")}
        for e in catalogue.list_models():
            flag = " (default)" if defaults.get(e.task) == e.model_id else ""
            where = "built-in" if e.source == "built-in" else (str(e.path) if e.available else f"not downloaded: {e.url}")
            print(f"{e.model_id:28s} v{e.version:6s} {e.task:10s} {e.description}{flag}\n{'':28s} {where}"
                  + (f"; licence: {e.licence}" if e.licence else ""))
        return 0
    if args.models_command == "verify":
        bad = 0
        for entry, status in catalogue.verify_models():
            print(f"{entry.model_id:28s} {status}")
            bad += status.startswith(("MISMATCH", "missing"))
        return 1 if bad else 0
    if args.models_command == "download":
        entry = catalogue.download_model(args.model_id, overwrite=args.overwrite)
        print(f"{entry.model_id} (v{entry.version}, {entry.task}) is in {entry.path}")
        return 0
    if args.models_command == "import":
        entry = catalogue.import_model(args.path, overwrite=args.overwrite)
        print(f"imported {entry.model_id} (v{entry.version}, {entry.task}) to {entry.path}")
        return 0
    raise AssertionError(args.models_command)


def cmd_serve(args) -> int:
    from .web import missing_dependency

    missing = missing_dependency()
    if missing:
        _err(f"error: {missing}")
        return 1
    if args.data and not Path(args.data).is_dir():
        _err(f"error: --data {args.data}: no such folder")
        return 1
    from .web.app import serve

    return serve(port=args.port, host=args.host, data_dir=args.data, max_upload_mb=args.max_upload_mb,
                 open_browser=args.open)


def _join_negative_values(argv: Sequence[str], options: Sequence[str] = ("--input-window",)) -> list[str]:
    """``--input-window -600,1500`` -> ``--input-window=-600,1500``: argparse takes a value that starts with
    '-' for an option, yet a negative window level is the usual case (the refusal message suggests it)."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in options:
            value = next(it, None)
            out.append(f"{arg}={value}" if value is not None else arg)
        else:
            out.append(arg)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = _join_negative_values(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    commands = {"segment": cmd_segment, "demo": cmd_demo, "evaluate": cmd_evaluate, "models": cmd_models,
                "serve": cmd_serve}
    try:
        return commands[args.command](args)
    except Cancelled:
        _err("cancelled")
        return 130
    except KeyboardInterrupt:
        _err("interrupted; outputs of the case in progress were not written")
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure ends in one "error:" line (errors.user_message)
        message = user_message(exc)
        if not message.expected:  # a bug: its traceback is what a bug report needs
            traceback.print_exc(file=sys.stderr)
        _err(f"error: {message.text}")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
