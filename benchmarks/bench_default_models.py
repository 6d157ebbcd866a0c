"""Speed and memory of the whole pipeline on a real CT, and the peer's lung masking side by side (issues 6, 14).

Every configuration runs ``--repeat`` times (default 3), each run a fresh child process (so peak RSS is that
run's own), the configurations taking turns (round robin) so that a change in the machine's load touches
them all alike, on the same input (default ``../shared/data/ct/covidctmd_p001_ct.nii.gz``) and the same
thread budget (``--threads``, default 2: OMP/MKL/OpenBLAS threads, PyTorch's intra-op threads through
``OMP_NUM_THREADS`` and ITK's through ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``). The child imports only what
the command imports (the built-in models never import torch):

- ``ours_default``: ``covidlesionseg segment`` with no ``--model`` (the manifest's defaults), read to write;
- ``ours_hu_threshold``: the same with ``--model hu-threshold``, when that is not the default infection model
  (issue 10 compares a learned default with it side by side);
- ``ours_lungs_only``: the same with ``--lungs-only`` (the part comparable with lungmask);
- ``ours_learned``: the same with ``--model hu-synth-nnunet2d-w8`` (the shipped optional 2D nnU-Net of width
  8, the architecture of a future learned default);
- ``ours_fast``, ``ours_lungs_only_fast``, ``ours_learned_fast``: the same with ``--fast``;
- ``ours_large``: the defaults on a 512 x 512 x 1000 scan made from the input by linear interpolation along z
  (thin slices; written uncompressed to a temporary folder before the runs, not timed);
- ``baseline_*`` (with ``--baseline CHECKOUT``): the ``ours_*`` configurations (the large scan too) run by
  another checkout's engine and shipped models, in the same rounds (the speed-up of a change, side by side);
- ``lungmask_r231``: the ``lungmask`` package (PyPI 0.2.22, Hofmanninger et al.) running its own R231 pipeline
  through ``LMInferer(...).apply(image)`` on the image read with SimpleITK (its preprocessing, batched 2D
  U-Net inference and its volume post-processing). Its weights cannot be downloaded here, so the child saves
  a randomly initialised network of the same architecture (lungmask's ``UNet(n_classes=3, depth=5,
  up_mode="upsample", batch_norm=True, padding=True)``, exactly what its ``get_model`` builds for R231) and
  passes that file as ``modelpath``. Inference time does not depend on the weights' values; with random
  weights its post-processing keeps no voxels, so its real run spends a little more time there: the
  ratios against it are lower bounds.

Prints one JSON object: per configuration the median wall time (process start to exit), the largest peak RSS
and the median of each stage's time (from the case's JSON), the ratios lungmask / ours, the targets of
issue 14 with whether each is met, and the machine's load average before and after (the development machines
are shared: timings there are upper bounds, the ratios measured side by side are what compare).

    python benchmarks/bench_default_models.py [--input CT] [--repeat 3] [--threads 2] [--skip-lungmask]
                                              [--skip-large] [--only NAME ...] [--baseline CHECKOUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = REPO.parent / "shared" / "data" / "ct" / "covidctmd_p001_ct.nii.gz"
LEARNED_ID = "hu-synth-nnunet2d-w8"
LARGE_SLICES = 1000

# Our CLI in a child; prints the child's own peak RSS (ru_maxrss is in kB on Linux).
_OURS = """
import resource, sys
from COVIDLesionSegLib.cli import main
status = main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(status)
"""

# lungmask's own R231 pipeline in a child, with a randomly initialised R231-architecture network.
_LUNGMASK = """
import resource, sys, tempfile, time, os
import torch, SimpleITK as sitk
from lungmask import LMInferer
from lungmask.resunet import UNet
torch.manual_seed(0)
net = UNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True, residual=False)
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "unet_r231_random.pth")
    torch.save(net.state_dict(), path)
    t0 = time.perf_counter()
    inferer = LMInferer(modelpath=path, force_cpu=True, tqdm_disable=True)
    t1 = time.perf_counter()
    image = sitk.ReadImage(sys.argv[1])
    t2 = time.perf_counter()
    mask = inferer.apply(image)
    t3 = time.perf_counter()
print("STAGES", t1 - t0, t2 - t1, t3 - t2, int((mask > 0).sum()), file=sys.stderr)
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""

#: Issue 14's targets (P001, 2 CPU cores): seconds and MB. ``ours_default`` is held to the HU models' target
#: while the default is ``hu-threshold`` and to the learned default's otherwise (``targets_for``).
TARGETS = {"ours_lungs_only": {"wall_s": 2.5, "peak_rss_mb": 1024.0},
           "ours_default": {"wall_s": 6.0, "peak_rss_mb": 1024.0},
           "ours_hu_threshold": {"wall_s": 6.0, "peak_rss_mb": 1024.0},
           "ours_learned": {"wall_s": 12.0, "peak_rss_mb": 1024.0},
           "ours_large": {"wall_s": 30.0, "peak_rss_mb": 2048.0}}
#: Issue 10's target for a learned default: the whole default pipeline on P001, 2 CPU cores.
LEARNED_DEFAULT_TARGET = {"wall_s": 20.0, "peak_rss_mb": 1536.0}


def targets_for(default_infection: str) -> list[tuple[str, str, dict[str, float]]]:
    """``(label, configuration, limits)`` for each target, given the manifest's default infection model."""
    targets = [(name, name, limit) for name, limit in TARGETS.items()]
    if default_infection != "hu-threshold":
        targets = [(label, config, TARGETS["ours_learned"] if config == "ours_default" else limit)
                   for label, config, limit in targets]
        targets.append(("ours_default_issue10", "ours_default", LEARNED_DEFAULT_TARGET))
    return targets


MIN_RATIO_LUNGS = 30.0


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[key] = str(threads)
    return env


def _peak_mb(stderr: str) -> float:
    return int(next(ln.split()[1] for ln in stderr.splitlines() if ln.startswith("PEAK_RSS_KB"))) / 1024


def run_ours(ct: Path, threads: int, extra: list[str], code: Path | None = None) -> dict:
    """Our CLI in a fresh process; ``code``: another checkout whose ``COVIDLesionSeg`` folder (engine and
    shipped models) is imported instead of this one's (``--baseline``)."""
    env = _env(threads)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code / "COVIDLesionSeg"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", _OURS, "segment", str(ct), "-o", tmp, "--device", "cpu", "--quiet", *extra]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"segment {' '.join(extra)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        report = json.loads(next(Path(tmp).glob("*.json")).read_text())
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(_peak_mb(proc.stderr), 1), "stages_s": report["timings_s"],
            "notes": [n for n in report["notes"] if n.startswith("fast mode")]}


def run_lungmask(ct: Path, threads: int) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LUNGMASK, str(ct)], capture_output=True, text=True,
                          env=_env(threads))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"lungmask failed ({proc.returncode}) - is it installed (pip install lungmask)?\n"
                         f"{proc.stderr[-2000:]}")
    load, read, apply, voxels = next(ln.split()[1:] for ln in proc.stderr.splitlines() if ln.startswith("STAGES"))
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(_peak_mb(proc.stderr), 1),
            "stages_s": {"load_model": float(load), "read": float(read), "apply": float(apply)},
            "mask_voxels": int(voxels)}


def make_large(ct: Path, folder: Path, slices: int = LARGE_SLICES) -> Path:
    """The input resampled (linear) to ``slices`` slices over the same z extent, written uncompressed."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(ct))
    size = list(image.GetSize())
    spacing = list(image.GetSpacing())
    spacing[2] = spacing[2] * (size[2] - 1) / (slices - 1)
    size[2] = slices
    large = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                          image.GetDirection(), -1024, sitk.sitkInt16)
    path = folder / f"large_{size[0]}x{size[1]}x{slices}.nii"
    sitk.WriteImage(large, str(path), useCompression=False)
    return path


def _summary(runs: list[dict]) -> dict:
    stages = sorted({s for r in runs for s in r["stages_s"]})
    return {"median_wall_s": round(statistics.median(r["wall_s"] for r in runs), 2),
            "max_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
            "median_stages_s": {s: round(statistics.median(r["stages_s"].get(s, 0.0) for r in runs), 3)
                                for s in stages},
            "runs": runs}


def run_config(name: str, extra: list[str], args, large: Path | None) -> dict:
    """One run of the configuration ``name`` (its CLI arguments ``extra``)."""
    if name == "lungmask_r231":
        return run_lungmask(args.input, args.threads)
    ct = large if name in ("ours_large", "baseline_large") else args.input
    if name.startswith("baseline_"):
        return run_ours(ct, args.threads, extra, code=args.baseline)
    return run_ours(ct, args.threads, extra)


def _check_baseline(baseline: Path | None) -> None:
    if baseline is not None and not (baseline / "COVIDLesionSeg" / "COVIDLesionSegLib").is_dir():
        raise SystemExit(f"--baseline {baseline} is not a checkout of this repository")


def baseline_configs(configs: dict[str, list[str]]) -> dict[str, list[str]]:
    """``baseline_<name>`` for every ``ours_<name>``, the large scan too (the baseline checkout runs them)."""
    return {"baseline_" + k[len("ours_"):]: v for k, v in configs.items() if k.startswith("ours_")}


def baseline_ratios(results: dict) -> dict[str, float]:
    """Median wall time of each ``baseline_*`` configuration over its ``ours_*`` counterpart."""
    return {k: round(results["baseline_" + k[len("ours_"):]]["median_wall_s"] / results[k]["median_wall_s"], 2)
            for k in results if k.startswith("ours_") and "baseline_" + k[len("ours_"):] in results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-lungmask", action="store_true")
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these configurations")
    p.add_argument("--baseline", type=Path, default=None, metavar="CHECKOUT",
                   help="another checkout of this repository (e.g. `git worktree add /tmp/base main`): its engine "
                        "runs the ours_* configurations too, as baseline_*, in the same rounds, and the JSON gives "
                        "the ratios baseline / ours")
    args = p.parse_args(argv)
    if not args.input.exists():
        raise SystemExit(f"input {args.input} not found (the shared data live in ../shared/data)")
    _check_baseline(args.baseline)

    from COVIDLesionSegLib import catalogue

    default_infection = catalogue.default_model_id("infection")
    configs: dict[str, list[str]] = {"ours_default": [], "ours_lungs_only": ["--lungs-only"]}
    if default_infection != "hu-threshold":
        configs["ours_hu_threshold"] = ["--model", "hu-threshold"]
    if any(e.model_id == LEARNED_ID and e.available for e in catalogue.list_models()):
        configs["ours_learned"] = ["--model", LEARNED_ID]
    configs.update({f"{name}_fast" if name != "ours_default" else "ours_fast": extra + ["--fast"]
                    for name, extra in list(configs.items())})
    if not args.skip_large:
        configs["ours_large"] = []
    if not args.skip_lungmask:
        configs["lungmask_r231"] = []
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only}
    if args.baseline is not None:
        configs.update(baseline_configs(configs))

    runs: dict[str, list[dict]] = {name: [] for name in configs}
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        large = make_large(args.input, Path(tmp)) if "ours_large" in configs else None
        for _ in range(args.repeat):
            for name, extra in configs.items():
                runs[name].append(run_config(name, extra, args, large))
                print(f"{name}: {runs[name][-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    results = {name: _summary(r) for name, r in runs.items()}
    out = {
        "input": str(args.input), "threads": args.threads, "repeat": args.repeat,
        "large_input": f"{args.input.name} resampled to {LARGE_SLICES} slices" if large else None,
        "defaults": {t: catalogue.default_model_id(t) for t in ("lungs", "infection")},
        "learned": LEARNED_ID,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "benchmark_minutes": round((time.perf_counter() - started) / 60, 1)},
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "runs"} for k, v in results.items()},
    }
    targets = {}
    for name, config, limit in targets_for(default_infection):
        got = results.get(config)
        if got is not None:
            targets[name] = {"wall_s": [got["median_wall_s"], limit["wall_s"], got["median_wall_s"] <= limit["wall_s"]],
                             "peak_rss_mb": [got["max_peak_rss_mb"], limit["peak_rss_mb"],
                                             got["max_peak_rss_mb"] <= limit["peak_rss_mb"]]}
    if "lungmask_r231" in results:
        lm = results["lungmask_r231"]["median_wall_s"]
        out["ratios"] = {f"lungmask_r231_over_{k}": round(lm / results[k]["median_wall_s"], 1)
                         for k in results if k.startswith("ours") and k != "ours_large"}
        if "ours_lungs_only" in results:
            ratio = out["ratios"]["lungmask_r231_over_ours_lungs_only"]
            targets["lungmask_over_lungs_only"] = [ratio, MIN_RATIO_LUNGS, ratio >= MIN_RATIO_LUNGS]
        out["notes"] = ["lungmask ran a randomly initialised R231 network (its weights cannot be downloaded "
                        "here): its inference time is that of the real model, its post-processing kept no voxels"]
    if args.baseline is not None:
        out["baseline"] = str(args.baseline)
        out["ratios_baseline_over_ours"] = baseline_ratios(results)
    out["targets_value_limit_met"] = targets
    out["runs"] = {k: v["runs"] for k, v in results.items()}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
