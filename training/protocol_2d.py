"""The CPU comparison run of issue 5: the papers' protocol on the shared 2D COVID-19-CT-Seg slices.

Compares training from scratch, the four transfer strategies of 000 (Continual Learning, Body
Fine-tuning, Pre-trained Lesion Representations, Hybrid-encoder), Multi-encoder (001), relation-driven
collaborative learning (002) and nCoVSegNet's two-stage transfer (003) on ``../shared/data/covid19ctseg2d``:
18 volume groups, folds of 4 training and 14 test groups (``splits.ctseg2d_protocol_folds``; the
Radiopaedia groups always together on the test side), per-volume-group metrics. Non-COVID lesions for
pre-training come from the shared data: the LIDC-IDRI-0001 nodule slices and the MedSeg slices with
pleural effusion (``configs/_protocol2d_noncovid_cpu.yaml``). Sizes are in ``configs/_protocol2d_cpu.yaml``.

Order: the pre-training runs first (once; they do not depend on the COVID-19 fold), then every method on
every fold, then the table. Finished runs are skipped, so an interrupted comparison resumes where it
stopped (a run cut in the middle restarts from its ``last.pt``)::

    python -m training.protocol_2d [--out runs/protocol2d] [--folds 0,1] [--methods scratch,continual,...]
                                   [--set key=value ...]   # overrides applied to every run

writes ``OUT/<config name>/fold<k>`` (pre-training: ``OUT/<config name>``), ``OUT/table.md``,
``OUT/table.csv`` (``training.tables``: per fold and mean +- std over folds, every finished method run in
OUT), ``OUT/summary.md`` (one row per method beside the papers' numbers: :func:`summary_markdown`),
``OUT/reviewer.md`` (per-case spread, bootstrap intervals, paired tests against scratch:
:func:`reviewer_markdown`) and
``OUT/timing.json`` (wall time of every run and of the whole comparison).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

#: Pre-training configs: name -> config (run once, folder OUT/<config name>).
PRETRAINING: dict[str, str] = {
    "multilesion": "protocol2d_pretrain_multilesion_cpu",
    "ncovsegnet_stage1": "protocol2d_ncovsegnet_stage1_cpu",
}

#: Compared methods: name -> (config, pre-training it starts from or None). Table order.
METHODS: dict[str, tuple[str, str | None]] = {
    "scratch": ("protocol2d_scratch_cpu", None),
    "continual": ("protocol2d_continual_cpu", "multilesion"),
    "body_finetune": ("protocol2d_body_finetune_cpu", "multilesion"),
    "lesion_representations": ("protocol2d_lesion_representations_cpu", "multilesion"),
    "hybrid_encoder": ("protocol2d_hybrid_encoder_cpu", "multilesion"),
    "multi_encoder": ("protocol2d_multi_encoder_cpu", "multilesion"),
    "collaborative": ("protocol2d_collaborative_cpu", "multilesion"),
    "collaborative_mean": ("protocol2d_collaborative_mean_cpu", "multilesion"),
    "ncovsegnet": ("protocol2d_ncovsegnet_cpu", "ncovsegnet_stage1"),
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_config(config_name: str, run_dir: Path, overrides: Sequence[str], device: str = "cpu") -> dict:
    """Train one config into ``run_dir`` (resuming an unfinished run, skipping a finished one); returns
    its summary and adds ``wall_s``."""
    from training.config import load_config
    from training.runs import RunDir
    from training.trainer import Trainer

    rd = RunDir(run_dir)
    if rd.finished:
        _log(f"{run_dir}: already finished")
        return rd.read_summary()
    config = load_config(config_name, overrides)
    resume = rd.last.exists()
    t0 = time.perf_counter()
    trainer = Trainer(config, run_dir, device=device, resume=resume, progress=False, log=lambda m: _log(f"  {m}"))
    summary = trainer.fit()
    summary["wall_s"] = time.perf_counter() - t0
    return summary


#: The papers' mean DSC / NSD on COVID-19-CT-Seg (3D, 5 folds of 4 train / 16 test; multi-lesion pre-training):
#: 001 Table I (scratch, Continual, Body FT, Lesion Repr., Multi-encoder), 000 (Hybrid-encoder), 002 Table II
#: (collaborative). nCoVSegNet (003) was not evaluated on this protocol: its DSC is on MosMedData.
PAPER_NUMBERS: dict[str, dict[str, float | str]] = {
    "scratch": {"dsc": 0.673, "nsd": 0.700, "source": "001 Table I / 000"},
    "continual": {"dsc": 0.696, "nsd": 0.718, "source": "001 Table I"},
    "body_finetune": {"dsc": 0.696, "nsd": 0.717, "source": "001 Table I"},
    "lesion_representations": {"dsc": 0.693, "nsd": 0.716, "source": "001 Table I"},
    "hybrid_encoder": {"dsc": 0.704, "nsd": 0.735, "source": "000"},
    "multi_encoder": {"dsc": 0.703, "nsd": 0.732, "source": "001 Table I"},
    "collaborative": {"dsc": 0.703, "nsd": 0.742, "source": "002 Table II"},
    "collaborative_mean": {"dsc": 0.703, "nsd": 0.742, "source": "002 Table II"},
    "ncovsegnet": {"dsc": 0.6843, "nsd": float("nan"), "source": "003 (MosMedData, not this protocol)"},
}

SUMMARY_METRICS = (("dsc", "DSC"), ("nsd", "NSD"), ("sensitivity", "Sensitivity"), ("precision", "PPV"),
                   ("specificity", "Specificity"))


def summary_markdown(out: str | Path, methods: Sequence[str] | None = None) -> str:
    """The comparison as one Markdown table: per method the mean +- std over folds (population std, as
    ``training.tables``) of the per-volume-group test metrics and of the epoch time, with the papers' DSC/NSD."""
    import math

    import numpy as np

    from training.runs import RunDir
    from training.tables import run_result

    out = Path(out)
    head = ["Method", "Folds"] + [h for _, h in SUMMARY_METRICS] + ["Epoch time (s)", "Paper DSC", "Paper NSD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for method in methods or list(METHODS):
        base = out / METHODS[method][0]
        runs = [run_result(RunDir(p.parent)) for p in sorted(base.glob("fold*/summary.json"))]
        runs = [r for r in runs if r.status in ("completed", "early_stopped")]
        if not runs:
            lines.append(f"| {method} | 0 | " + " | ".join(["not run"] * (len(head) - 2)) + " |")
            continue

        def cell(values: list[float], digits: int = 3) -> str:
            v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
            return f"{v.mean():.{digits}f} +- {v.std():.{digits}f}" if v.size else "n/a"

        cells = [cell([r.metrics.get(k) for r in runs]) for k, _ in SUMMARY_METRICS]
        cells.append(cell([r.epoch_time_s for r in runs], 1))
        paper = PAPER_NUMBERS.get(method, {})
        pd = paper.get("dsc", float("nan"))
        pn = paper.get("nsd", float("nan"))
        cells += [f"{pd:.3f}" if isinstance(pd, float) and math.isfinite(pd) else "-",
                  f"{pn:.3f}" if isinstance(pn, float) and math.isfinite(pn) else "-"]
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reviewer_markdown(out: str | Path, metrics: Sequence[str] = ("dsc", "nsd")) -> str:
    """Per-case spread, 95 % bootstrap intervals and paired comparisons against scratch for every finished
    method in ``out``, with the papers' numbers (``training.tables.reviewer_table``), one table per metric."""
    from training.runs import RunDir
    from training.tables import reviewer_table

    out = Path(out)
    methods = {m: [RunDir(p.parent) for p in sorted((out / cfg).glob("fold*/summary.json")) if RunDir(p.parent).finished]
               for m, (cfg, _) in METHODS.items()}
    methods = {m: runs for m, runs in methods.items() if runs}
    parts = []
    for metric in metrics:
        paper = {m: v.get(metric) for m, v in PAPER_NUMBERS.items()}
        parts.append(f"### {metric.upper()} per test volume group\n\n" + reviewer_table(methods, metric, "scratch", paper))
    return "\n".join(parts)


#: Benchmark cases (``benchmarks/bench_training.py``): case -> the config it times.
BENCH_CASES: dict[str, str] = {
    "multilesion": PRETRAINING["multilesion"],
    **{m: METHODS[m][0] for m in ("continual", "body_finetune", "lesion_representations", "hybrid_encoder",
                                  "multi_encoder", "collaborative", "ncovsegnet")},
    "grid004": "grid004_medseg_cpu",
}


def bench_config(case: str, quick: bool, workdir: str | Path) -> dict:
    """The config of one comparison method at the comparison's sizes, for ``benchmarks/bench_training.py``.

    Methods that start from a pre-training run get a stand-in: the pre-training config's network with its
    initial weights, saved as a training checkpoint of ``epochs`` completed epochs in ``workdir`` (the
    throughput does not depend on the weights). ``quick`` keeps 2 slices per volume group (faster caching).
    ``grid004`` is the first combination of ``grid004_medseg_cpu.yaml``'s grid.
    """
    from COVIDLesionSegLib.models import build
    from training.config import load_config
    from training.runs import save_training_state

    if case not in BENCH_CASES:
        raise KeyError(f"unknown benchmark case {case!r}; known: {', '.join(BENCH_CASES)}")
    over = ["train.epochs=1", "train.progress=false"] + (["data.max_cases_per_group=2"] if quick else [])
    if case == "grid004":
        from training.procedures.grid004 import expand_grid

        return expand_grid(load_config(BENCH_CASES[case], over))[0]
    pre = dict(METHODS).get(case, (None, None))[1]
    if pre is not None:
        pre_cfg = load_config(PRETRAINING[pre])
        model = build({"arch": pre_cfg["model"]["arch"], "args": dict(pre_cfg["model"]["args"])})
        path = Path(workdir) / f"pretrained_{pre}" / "best.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_training_state(path, {"config": pre_cfg, "epoch": int(pre_cfg["train"]["epochs"]),
                                   "model": {k: v.detach().clone() for k, v in model.state_dict().items()}})
        over.append(f"model.init={path.parent}")
    return load_config(BENCH_CASES[case], over)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/protocol2d")
    ap.add_argument("--folds", default="0,1", help="comma-separated folds (default 0,1: both folds)")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {', '.join(METHODS)}")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override applied to every run (e.g. train.epochs=2 for a smoke test)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from training.runs import RunDir
    from training.tables import build_table, write_tables

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    methods = list(METHODS) if not args.methods else args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    folds = [int(f) for f in args.folds.split(",")]
    timing_path = out / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {"runs": {}}
    t_start = time.perf_counter()

    needed = {METHODS[m][1] for m in methods} - {None}
    pre_dirs: dict[str, Path] = {}
    for key in PRETRAINING:
        if key not in needed:
            continue
        name = PRETRAINING[key]
        pre_dirs[key] = out / name
        _log(f"pre-training {key}: {name}")
        s = run_config(name, pre_dirs[key], args.overrides, args.device)
        if "wall_s" in s:
            timing["runs"][name] = {"wall_s": s["wall_s"], "train_time_s": s.get("train_time_s"),
                                    "mean_epoch_time_s": s.get("mean_epoch_time_s")}
        timing_path.write_text(json.dumps(timing, indent=2))

    run_dirs: list[RunDir] = []
    for method in methods:
        config_name, pre = METHODS[method]
        for k in folds:
            over = list(args.overrides) + [f"protocol.fold={k}"]
            if pre is not None:
                over.append(f"model.init={pre_dirs[pre]}")
            run_dir = out / config_name / f"fold{k}"
            _log(f"{method} fold {k}: {config_name}")
            s = run_config(config_name, run_dir, over, args.device)
            if "wall_s" in s:
                timing["runs"][f"{config_name}/fold{k}"] = {
                    "wall_s": s["wall_s"], "train_time_s": s.get("train_time_s"),
                    "mean_epoch_time_s": s.get("mean_epoch_time_s")}
            tm = s.get("test_mean") or {}
            _log(f"  -> {s.get('status')}: DSC {tm.get('dsc')}, NSD {tm.get('nsd')}")
            run_dirs.append(RunDir(run_dir))
            timing_path.write_text(json.dumps(timing, indent=2))

    # the table covers every finished method run in OUT (also those of earlier invocations), in METHODS order
    all_dirs = [RunDir(p.parent) for m in METHODS for p in sorted((out / METHODS[m][0]).glob("fold*/summary.json"))
                if RunDir(p.parent).finished]
    table = build_table(all_dirs or run_dirs)
    write_tables(table, out / "table.md", out / "table.csv")
    timing["last_invocation_wall_s"] = time.perf_counter() - t_start
    timing["total_run_wall_s"] = sum(v["wall_s"] for v in timing["runs"].values() if v.get("wall_s"))
    timing_path.write_text(json.dumps(timing, indent=2))
    print(table.markdown(), flush=True)
    (out / "summary.md").write_text(summary_markdown(out) + "\n")
    print(summary_markdown(out), flush=True)
    (out / "reviewer.md").write_text(reviewer_markdown(out))
    _log(f"done in {timing['last_invocation_wall_s']:.0f} s; tables in {out}/table.md, {out}/table.csv")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
