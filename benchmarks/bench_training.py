"""Training throughput (samples per second) and peak memory of every training procedure on the CPU; prints JSON.

For each benchmark case (a procedure with a small config, see :data:`CASES`), a fresh Python subprocess
builds the run exactly as ``python -m training run`` does (``training.trainer.Trainer.setup``: data,
split, model, optimiser, loss), runs ``--warmup`` optimisation steps, then ``--steps`` timed steps through
``Trainer.train_step`` (data loading included, as in training), and reports:

- ``samples_per_s``: training samples (2D slices or 3D patches of the main batch) per second over the
  timed steps; ``step_s_median``, ``step_s`` (every step);
- ``peak_rss_mb``: the subprocess's peak resident memory (``ru_maxrss``) after the steps,
  ``baseline_rss_mb`` before ``setup()`` (after the imports), ``rss_delta_mb`` their difference (cached
  data + model + optimiser + activations);
- the case's settings (procedure, architecture, input size, batch size, parameters).

Cases:

- ``supervised_2d``: the supervised procedure on the shared 2D COVID-19-CT-Seg slices
  (``../shared/data/covid19ctseg2d``) with the network of ``configs/ctseg2d_supervised_cpu.yaml``
  (4-stage nnU-Net 8-16-32-64) at 128 px, batch 4 (``--quick``: 3-stage 4-8-16 at 64 px, batch 2);
- ``supervised_3d``: the supervised procedure with the nnU-Net 3D pipeline on small synthetic HU volumes
  written in the COVID-19-CT-Seg layout (a 3-stage 3D nnU-Net, patches 32 x 64 x 64, batch 2 patches;
  ``--quick``: 16 x 32 x 32).

Procedures added later register a case in :data:`CASES` (name -> function returning a config dict);
procedures without one are listed under ``"skipped"``.

Usage::

    python benchmarks/bench_training.py [--quick] [--case NAME ...] [--steps 10] [--warmup 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _maxrss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / (1024.0 * 1024.0)


def _rss_now_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)
    except OSError:  # pragma: no cover - not Linux
        return _maxrss_mb()


# ----------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------

def case_supervised_2d(quick: bool, workdir: Path) -> dict[str, Any]:
    from training.config import shared_data_dir

    root = shared_data_dir() / "covid19ctseg2d"
    if not (root / "covid19ctseg2d.npz").exists():
        raise FileNotFoundError(f"shared data {root} not found")
    size, chans, bs = (64, [4, 8, 16], 2) if quick else (128, [8, 16, 32, 64], 4)
    return {
        "name": "bench_supervised_2d", "procedure": "supervised",
        "model": {"arch": "nnunet", "args": {"spatial_dims": 2, "channels": chans, "strides": [1] + [2] * (len(chans) - 1),
                                             "kernel_sizes": [3] * len(chans)}},
        "data": {"reader": "covid19ctseg2d", "root": str(root), "target": "infection", "transforms": "slice_2d",
                 "transform_args": {"size": size, "intensity": "uint8_01"}, "max_cases_per_group": 8},
        "protocol": {"name": "ctseg2d", "n_folds": 2, "fold": 0},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.99, "nesterov": True},
        "train": {"epochs": 1, "batch_size": bs, "progress": False},
    }


def case_supervised_3d(quick: bool, workdir: Path) -> dict[str, Any]:
    import numpy as np
    import SimpleITK as sitk

    root = workdir / "covid19ctseg"
    shape = (24, 64, 64) if quick else (48, 128, 128)
    patch = [16, 32, 32] if quick else [32, 64, 64]
    rng = np.random.default_rng(0)
    for folder in ("COVID-19-CT-Seg_20cases", "Infection_Mask", "Lung_Mask"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    for k in (1, 2):
        img = (40 + rng.normal(0, 10, shape)).astype(np.float32)
        lung = ((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2 < (0.4 * shape[1]) ** 2)
        img[lung] = -850
        inf = ((z - shape[0] / 2) ** 2 + (y - shape[1] / 2 - 4 * k) ** 2 + (x - shape[2] / 2) ** 2 < (shape[0] / 4) ** 2)
        img[inf] = -250
        for folder, arr, name in (("COVID-19-CT-Seg_20cases", img, f"coronacases_org_{k:03d}.nii.gz"),
                                  ("Infection_Mask", inf.astype(np.uint8), f"coronacases_{k:03d}.nii.gz"),
                                  ("Lung_Mask", lung.astype(np.uint8), f"coronacases_{k:03d}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((0.8, 0.8, 2.5))
            sitk.WriteImage(im, str(root / folder / name))
    return {
        "name": "bench_supervised_3d", "procedure": "supervised",
        "model": {"arch": "nnunet", "args": {"spatial_dims": 3, "channels": [8, 16, 32], "strides": [1, 2, 2],
                                             "kernel_sizes": [3, 3, 3]}},
        "data": {"reader": "covid19ctseg", "root": str(root), "target": "infection", "transforms": "nnunet_3d",
                 "transform_args": {"patch_size": patch, "num_samples": 2}},
        "protocol": {"name": "all"},
        "train": {"epochs": 1, "batch_size": 2, "progress": False},
    }


#: Benchmark cases: name -> (procedure, config factory(quick, workdir)).
CASES: dict[str, tuple[str, Callable[[bool, Path], dict[str, Any]]]] = {
    "supervised_2d": ("supervised", case_supervised_2d),
    "supervised_3d": ("supervised", case_supervised_3d),
    # The papers' procedures at the sizes of the CPU comparison run (training/protocol_2d.py: bench_config,
    # configs/protocol2d_*_cpu.yaml, grid004_medseg_cpu.yaml); transfer cases start from a stand-in checkpoint.
    **{case: (procedure, lambda quick, workdir, _case=case: __import__(
        "training.protocol_2d", fromlist=["bench_config"]).bench_config(_case, quick, workdir))
       for case, procedure in [("multilesion", "multilesion"), ("continual", "continual"),
                               ("body_finetune", "body_finetune"), ("lesion_representations", "lesion_representations"),
                               ("hybrid_encoder", "hybrid_encoder"), ("multi_encoder", "multi_encoder"),
                               ("collaborative", "collaborative"), ("ncovsegnet", "ncovsegnet"),
                               ("grid004", "grid004")]},
}


# ----------------------------------------------------------------------------------------------------------
# Worker (one case per subprocess)
# ----------------------------------------------------------------------------------------------------------

def worker(case: str, quick: bool, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    from training.config import config_from_dict
    from training.procedures import StepInfo
    from training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        procedure, factory = CASES[case]
        raw = factory(quick, Path(tmp))
        raw.setdefault("train", {})["num_threads"] = threads
        config = config_from_dict(raw)
        baseline = _rss_now_mb()
        trainer = Trainer(config, Path(tmp) / "run", device="cpu", progress=False, log=lambda m: None)
        t0 = time.perf_counter()
        trainer.setup()
        setup_s = time.perf_counter() - t0
        stream = trainer.train_batches(0)
        times, samples, losses = [], 0, []
        for i in range(warmup + steps):
            info = StepInfo(epoch=0, iteration=i, iterations_per_epoch=warmup + steps, max_epochs=1, global_step=i)
            t = time.perf_counter()
            out, ok = trainer.train_step(next(stream), info)
            dt = time.perf_counter() - t
            if i >= warmup:
                times.append(dt)
                samples += out.n_samples
                losses.append(out.loss)
        model = trainer.model
        example = next(iter(trainer.train_sets["main"]))
        example = example[0] if isinstance(example, list) else example
        return {
            "case": case, "procedure": procedure, "quick": quick,
            "arch": config["model"]["arch"], "model_args": config["model"]["args"],
            "input_shape": list(example["image"].shape), "batch_size": config["train"]["batch_size"],
            "params": int(sum(p.numel() for p in model.parameters())),
            "trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
            "steps": steps, "warmup": warmup, "setup_s": setup_s,
            "samples_per_s": samples / sum(times) if times else None,
            "step_s_median": statistics.median(times) if times else None, "step_s": times,
            "loss_first_last": [losses[0], losses[-1]] if losses else None,
            "baseline_rss_mb": baseline, "peak_rss_mb": _maxrss_mb(), "rss_delta_mb": _maxrss_mb() - baseline,
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 timed steps (a smoke test, not a benchmark)")
    ap.add_argument("--case", action="append", default=None, help=f"case(s) to run (default all: {', '.join(CASES)})")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10, quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2, quick 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    steps = args.steps if args.steps is not None else (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.worker:
        print(json.dumps(worker(args.worker, args.quick, steps, warmup, args.threads)))
        return 0
    from training.procedures import procedures

    cases = args.case or list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    results, failed = [], []
    for case in cases:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--steps", str(steps),
               "--warmup", str(warmup), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            failed.append({"case": case, "error": f"timed out after {args.timeout} s"})
            continue
        if proc.returncode != 0:
            failed.append({"case": case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                           f"exit {proc.returncode}"})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    covered = {CASES[c][0] for c in CASES}
    import torch

    report = {
        "benchmark": "training throughput and peak memory per procedure (CPU)",
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "threads": args.threads, "platform": platform.platform()},
        "quick": args.quick, "results": results, "failed": failed,
        "skipped": sorted(set(procedures()) - covered),
    }
    print(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
