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
from typing import Any, Callable, Mapping, Sequence

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


def summary_markdown(out: str | Path, methods: Sequence[str] | None = None,
                     configs: Mapping[str, tuple[str, str | None]] | None = None,
                     paper: Mapping[str, Mapping[str, float | str]] | None = None) -> str:
    """The comparison as one Markdown table: per method the mean +- std over folds (population std, as
    ``training.tables``) of the per-volume-group test metrics and of the epoch time, with the papers' DSC/NSD.
    ``configs`` / ``paper``: the comparison's methods and papers' numbers (default: this module's)."""
    import math

    import numpy as np

    from training.runs import RunDir
    from training.tables import run_result

    out = Path(out)
    configs = METHODS if configs is None else configs
    paper = PAPER_NUMBERS if paper is None else paper
    head = ["Method", "Folds"] + [h for _, h in SUMMARY_METRICS] + ["Epoch time (s)", "Paper DSC", "Paper NSD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for method in methods or list(configs):
        base = out / configs[method][0]
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
        ref = paper.get(method, {})
        pd = ref.get("dsc", float("nan"))
        pn = ref.get("nsd", float("nan"))
        cells += [f"{pd:.3f}" if isinstance(pd, float) and math.isfinite(pd) else "-",
                  f"{pn:.3f}" if isinstance(pn, float) and math.isfinite(pn) else "-"]
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reviewer_markdown(out: str | Path, metrics: Sequence[str] = ("dsc", "nsd"),
                      configs: Mapping[str, tuple[str, str | None]] | None = None,
                      paper: Mapping[str, Mapping[str, float | str]] | None = None,
                      unit: str = "test volume group") -> str:
    """Per-case spread, 95 % bootstrap intervals and paired comparisons against scratch for every finished
    method in ``out``, with the papers' numbers (``training.tables.reviewer_table``), one table per metric.
    ``configs`` / ``paper``: the comparison's methods and papers' numbers (default: this module's)."""
    from training.runs import RunDir
    from training.tables import reviewer_table

    out = Path(out)
    configs = METHODS if configs is None else configs
    paper = PAPER_NUMBERS if paper is None else paper
    methods = {m: [RunDir(p.parent) for p in sorted((out / cfg).glob("fold*/summary.json")) if RunDir(p.parent).finished]
               for m, (cfg, _) in configs.items()}
    methods = {m: runs for m, runs in methods.items() if runs}
    parts = []
    for metric in metrics:
        ref = {m: v.get(metric) for m, v in paper.items()}
        parts.append(f"### {metric.upper()} per {unit}\n\n" + reviewer_table(methods, metric, "scratch", ref))
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


def comparison_main(argv: Sequence[str] | None, *, description: str, default_out: str, default_folds: str,
                    methods: Mapping[str, tuple[str, str | None]], pretraining: Mapping[str, str],
                    paper: Mapping[str, Mapping[str, float | str]], per_fold_pretraining: bool = False,
                    prepare: Callable[[argparse.Namespace], tuple[list[str], dict]] | None = None,
                    fold_overrides: Callable[[str, int, Sequence[str], dict], list[str]] | None = None,
                    default_data: str | None = None, unit: str = "test volume group") -> int:
    """The command line of a CPU comparison (this module's and ``training.protocol_3d``'s): the pre-training
    runs (once, or with ``per_fold_pretraining`` once per fold, folder ``OUT/<config>/fold<k>``), every
    method on every fold, then ``table.md`` / ``table.csv``, ``summary.md``, ``reviewer.md`` and
    ``timing.json`` over every finished method run in OUT (module docstring).

    ``prepare(args)`` (with ``--data``): makes the data, returns overrides for every run and a dict handed to
    ``fold_overrides(config name, fold, overrides, that dict)``, which gives a run's fold-specific overrides
    (e.g. the fold's training hosts for the non-COVID data)."""
    from training.runs import RunDir
    from training.tables import build_table, write_tables

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--folds", default=default_folds, help=f"comma-separated folds (default {default_folds})")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {', '.join(methods)}")
    if prepare is not None:
        ap.add_argument("--data", default=default_data, help="folder of the generated data (made when absent)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override applied to every run (e.g. train.epochs=2 for a smoke test)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    chosen = list(methods) if not args.methods else args.methods.split(",")
    unknown = [m for m in chosen if m not in methods]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(methods)}")
    folds = [int(f) for f in args.folds.split(",")]
    timing_path = out / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {"runs": {}}
    t_start = time.perf_counter()
    base_over: list[str] = []
    context: dict = {}
    if prepare is not None:
        base_over, context = prepare(args)
    base_over = list(base_over) + list(args.overrides)

    def extra(config_name: str, k: int) -> list[str]:
        return list(fold_overrides(config_name, k, base_over, context)) if fold_overrides else []

    def record(key: str, s: Mapping[str, Any]) -> None:
        if "wall_s" in s:
            timing["runs"][key] = {"wall_s": s["wall_s"], "train_time_s": s.get("train_time_s"),
                                   "mean_epoch_time_s": s.get("mean_epoch_time_s")}
        timing_path.write_text(json.dumps(timing, indent=2))

    pre_dirs: dict[tuple[str, int | None], Path] = {}

    def pretrained(key: str, k: int | None) -> Path:
        if (key, k) not in pre_dirs:
            name = pretraining[key]
            run_dir = out / name if k is None else out / name / f"fold{k}"
            _log(f"pre-training {key}" + ("" if k is None else f" for fold {k}") + f": {name}")
            s = run_config(name, run_dir, base_over + ([] if k is None else extra(name, k)), args.device)
            record(name if k is None else f"{name}/fold{k}", s)
            pre_dirs[(key, k)] = run_dir
        return pre_dirs[(key, k)]

    if not per_fold_pretraining:
        for key in sorted({methods[m][1] for m in chosen} - {None}, key=list(pretraining).index):
            pretrained(key, None)
    for method in chosen:
        config_name, pre = methods[method]
        for k in folds:
            over = base_over + [f"protocol.fold={k}"] + extra(config_name, k)
            if pre is not None:
                over.append(f"model.init={pretrained(pre, k if per_fold_pretraining else None)}")
            run_dir = out / config_name / f"fold{k}"
            _log(f"{method} fold {k}: {config_name}")
            s = run_config(config_name, run_dir, over, args.device)
            record(f"{config_name}/fold{k}", s)
            tm = s.get("test_mean") or {}
            _log(f"  -> {s.get('status')}: DSC {tm.get('dsc')}, NSD {tm.get('nsd')}")

    # the table covers every finished method run in OUT (also those of earlier invocations), in method order
    all_dirs = [RunDir(p.parent) for m in methods for p in sorted((out / methods[m][0]).glob("fold*/summary.json"))
                if RunDir(p.parent).finished]
    table = build_table(all_dirs)
    write_tables(table, out / "table.md", out / "table.csv")
    timing["last_invocation_wall_s"] = time.perf_counter() - t_start
    timing["total_run_wall_s"] = sum(v["wall_s"] for v in timing["runs"].values() if v.get("wall_s"))
    timing_path.write_text(json.dumps(timing, indent=2))
    print(table.markdown(), flush=True)
    summary = summary_markdown(out, configs=methods, paper=paper)
    (out / "summary.md").write_text(summary + "\n")
    print(summary, flush=True)
    (out / "reviewer.md").write_text(reviewer_markdown(out, configs=methods, paper=paper, unit=unit))
    _log(f"done in {timing['last_invocation_wall_s']:.0f} s; tables in {out}/table.md, {out}/table.csv")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return comparison_main(argv, description=__doc__.split("\n")[0], default_out="runs/protocol2d",
                           default_folds="0,1", methods=METHODS, pretraining=PRETRAINING, paper=PAPER_NUMBERS)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
