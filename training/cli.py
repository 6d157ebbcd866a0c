"""``python -m training``: train, cross-validate, tabulate and export.

Commands::

    python -m training run CONFIG [--resume] [--out RUNS] [--device auto|cpu|cuda] [--set key=value ...]
    python -m training cv CONFIG [--out RUNS] [--folds 0,1] [--resume] [--device ...] [--set ...]
    python -m training table RUNS... [--markdown OUT.md] [--csv OUT.csv] [--metrics dsc,nsd,...]
    python -m training export RUN [-o FILE] [--half] [--which best|last] [--model-id ID] [--description TEXT]
    python -m training dryrun CONFIG... | --all [--out DIR]   # every stage at tiny size (training/dryrun.py)
    python -m training procedures        # the registered procedures
    python -m training configs           # the configs in training/configs

``CONFIG`` is a path, or a file name in ``training/configs`` (with or without ``.yaml``). ``run`` writes
``RUNS/<name>`` (default ``runs/``); ``cv`` writes ``RUNS/<name>/fold<k>`` for every fold of the config's
protocol and then ``RUNS/<name>/table.md`` and ``table.csv``. Ctrl-C stops training after the current step,
saves ``last.pt`` and exits with status 130; ``--resume`` continues the run.

Exit status: 0 success, 1 a run failed, 2 bad usage / config / data, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description="COVIDLesionSeg training: the papers' "
                                "procedures, protocols and tables (see training/configs)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("config", help="config file (YAML/JSON), or a name in training/configs")
        sp.add_argument("--out", default="runs", help="folder of the runs (default: runs)")
        sp.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=5 (repeatable)")
        sp.add_argument("--resume", action="store_true", help="continue the run(s) from last.pt")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")

    r = sub.add_parser("run", help="train one config (one fold) into RUNS/<name>")
    common(r)
    r.add_argument("--run-dir", default=None, help="exact run folder (instead of RUNS/<name>)")

    c = sub.add_parser("cv", help="cross-validation: one run per fold of the config's protocol, then a table")
    common(c)
    c.add_argument("--folds", default=None, help="comma-separated fold numbers (default: every fold)")

    t = sub.add_parser("table", help="the papers' tables from finished runs (per fold and mean +- std)")
    t.add_argument("runs", nargs="+", help="run folders, or folders holding them")
    t.add_argument("--markdown", default=None, help="write the Markdown table here")
    t.add_argument("--csv", default=None, help="write the CSV table here")
    t.add_argument("--metrics", default=None, help="comma-separated metric keys (default: the papers' set)")

    e = sub.add_parser("export", help="write an engine checkpoint of a run's best model")
    e.add_argument("run", help="run folder")
    e.add_argument("-o", "--output", default=None, help="checkpoint file (default: RUN/model.pt)")
    e.add_argument("--half", action="store_true", help="store weights as float16")
    e.add_argument("--which", choices=("best", "last"), default="best")
    e.add_argument("--model-id", default=None, help="model id to store (default: the config's export.model_id)")
    e.add_argument("--description", default=None,
                   help="description to store (default: the config's export.description)")
    e.add_argument("--postprocess", default=None, metavar="JSON",
                   help='infection post-processing to store, e.g. \'{"min_component_ml": 1.0, "min_rise_hu": 150}\' '
                        "(chosen with python -m training.selection)")
    e.add_argument("--threshold", type=float, default=None,
                   help="probability threshold to store (default: the config's eval.threshold; chosen with "
                        "python -m training.selection)")

    # Listed for the help text; main() hands its arguments to training.synthesis.main.
    sub.add_parser("synthesize", add_help=False,
                   help="insert synthetic COVID-19-like lesions into a real HU scan (scan + exact mask)")

    d = sub.add_parser("dryrun", help="run full-scale configs through all their stages at tiny size on the CPU "
                       "(training/dryrun.py)")
    d.add_argument("configs", nargs="*", help="config files or names in training/configs")
    d.add_argument("--all", action="store_true", help="every paper config (not *_cpu, not _* bases)")
    d.add_argument("--out", default=None, help="keep the runs, stand-in data and dryrun.json here (default: a "
                   "temporary folder, removed)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--standins-only", action="store_true", help="generated stand-ins even where real data exist")

    sub.add_parser("procedures", help="list the registered training procedures")
    sub.add_parser("configs", help="list the configs in training/configs")
    return p


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def _run_one(config, run_dir: Path, args) -> dict:
    from training.trainer import Trainer

    trainer = Trainer(config, run_dir, device=args.device, resume=args.resume,
                      progress=False if args.no_progress else None)
    summary = trainer.fit()
    tm = summary.get("test_mean") or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in tm.items() if isinstance(v, (int, float))) or "no test set"
    print(f"{config['name']} fold {config['protocol']['fold']}: {summary['status']} after "
          f"{summary['epochs_completed']} epoch(s); test: {shown}; run folder {run_dir}", flush=True)
    return summary


def cmd_run(args) -> int:
    from training.config import load_config
    from training.trainer import run_dir_for

    config = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else run_dir_for(config, args.out)
    _run_one(config, run_dir, args)
    return EXIT_OK


def cmd_cv(args) -> int:
    from training.config import load_config
    from training.runs import RunDir
    from training.tables import build_table, write_tables
    from training.trainer import load_cases, protocol_folds, run_dir_for

    config = load_config(args.config, args.overrides)
    folds = protocol_folds(config, load_cases(config["data"]))
    wanted = range(len(folds)) if not args.folds else [int(f) for f in args.folds.split(",")]
    bad = [k for k in wanted if not 0 <= k < len(folds)]
    if bad:
        _err(f"--folds {bad} out of range: protocol {config['protocol']['name']!r} has {len(folds)} folds")
        return EXIT_USAGE
    dirs = []
    for k in wanted:
        cfg = load_config(args.config, list(args.overrides) + [f"protocol.fold={k}"])
        run_dir = run_dir_for(cfg, args.out, fold_dir=True)
        if RunDir(run_dir).finished:
            print(f"fold {k}: already finished in {run_dir}", flush=True)
        else:
            resume = args.resume and RunDir(run_dir).last.exists()
            sub_args = argparse.Namespace(**{**vars(args), "resume": resume})
            _run_one(cfg, run_dir, sub_args)
        dirs.append(run_dir)
    base = run_dir_for(config, args.out)
    table = build_table([RunDir(d) for d in dirs])
    md, csv_path = write_tables(table, base / "table.md", base / "table.csv")
    print(table.markdown(), flush=True)
    print(f"tables: {md}, {csv_path}", flush=True)
    return EXIT_OK


def cmd_table(args) -> int:
    from training.runs import find_runs
    from training.tables import build_table, write_tables

    metrics = args.metrics.split(",") if args.metrics else None
    table = build_table(find_runs(args.runs), metrics=metrics)
    print(table.markdown(), flush=True)
    if args.markdown or args.csv:
        write_tables(table, args.markdown, args.csv)
    return EXIT_OK


def cmd_export(args) -> int:
    import json

    from training.export import export_run

    postprocess = json.loads(args.postprocess) if args.postprocess else None
    path, sha = export_run(args.run, args.output, half=args.half, which=args.which, model_id=args.model_id,
                           postprocess=postprocess, threshold=args.threshold, description=args.description)
    print(f"wrote {path} (sha256 {sha})", flush=True)
    return EXIT_OK


def cmd_dryrun(args) -> int:
    from training import dryrun

    names = dryrun.paper_configs() if args.all else list(args.configs)
    if not names:
        _err("dryrun: name one or more configs, or --all")
        return EXIT_USAGE
    report = dryrun.run(names, out=args.out, device=args.device, use_real=not args.standins_only)
    for name, rec in report["configs"].items():
        print(f"{'ok    ' if rec['status'] == 'ok' else 'FAILED'} {name:44s} {rec['wall_s']:7.1f} s  "
              f"{len(rec['stages'])} stage(s)" + (f"  {rec['error']}" if rec.get("error") else ""), flush=True)
    print(f"dry run of {len(report['configs'])} config(s): {'ok' if report['ok'] else 'FAILED'} in "
          f"{report['wall_s']:.0f} s ({report['cpu_s']:.0f} s of CPU)", flush=True)
    return EXIT_OK if report["ok"] else EXIT_FAILED


def cmd_procedures(args) -> int:
    from COVIDLesionSegLib.models.citations import cite
    from training.procedures import procedures

    for name, cls in sorted(procedures().items()):
        opts = json.dumps(cls.options) if cls.options else "no options"
        print(f"{name:24s} {cls.summary} [{cite(cls.paper)}] ({opts})")
    print("papers: docs/CITATIONS.md (authors, titles, venues, arXiv identifiers)")
    return EXIT_OK


def cmd_configs(args) -> int:
    from training.config import CONFIG_DIR, load_config

    for p in sorted(CONFIG_DIR.glob("*.y*ml")) + sorted(CONFIG_DIR.glob("*.json")):
        if p.name.startswith("_"):
            continue
        try:
            desc = load_config(p)["description"]
        except Exception as exc:  # a broken config should not hide the others
            desc = f"(invalid: {exc})"
        print(f"{p.name:44s} {desc}")
    return EXIT_OK


def cmd_synthesize(rest: Sequence[str]) -> int:
    from training.synthesis import main as synthesize_main

    return synthesize_main(rest)


#: Kinds of error (``COVIDLesionSegLib.errors``) that mean the command was given something it cannot use: bad
#: usage (exit 2); every other error is a run that failed (exit 1).
USAGE_KINDS = ("config", "bad_input", "run", "device")


def main(argv: Sequence[str] | None = None) -> int:
    from COVIDLesionSegLib.errors import CovidLesionSegError, user_message
    from training.trainer import TrainingInterrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synthesize"]:   # argparse would keep "--help" for itself; the synthesiser parses its own
        return cmd_synthesize(argv[1:])
    args = _parser().parse_args(argv)
    handlers = {"run": cmd_run, "cv": cmd_cv, "table": cmd_table, "export": cmd_export,
                "procedures": cmd_procedures, "configs": cmd_configs, "dryrun": cmd_dryrun}
    try:
        return handlers[args.command](args)
    except TrainingInterrupted as exc:
        config = getattr(args, "config", "CONFIG")
        print(f"\n{exc}\ncontinue with: python -m training {args.command} {config} --resume"
              f"{' --out ' + args.out if getattr(args, 'out', 'runs') != 'runs' else ''}"
              + "".join(f" --set {o}" for o in getattr(args, "overrides", [])), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _err("aborted (second Ctrl-C); the last completed epoch's last.pt is kept")
        return EXIT_INTERRUPTED
    except CovidLesionSegError as exc:  # the engine's translator: one message for one condition everywhere
        message = user_message(exc)
        _err(message.text)
        return EXIT_USAGE if message.kind in USAGE_KINDS else EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
