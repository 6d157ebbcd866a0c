"""Default models on the CPU (issue 6): the whole pipeline on a real CT, and the peer's lung masking side by side.

Each configuration runs in a fresh child process (so peak RSS is that run's own), one after the other, on the
same input (default ``../shared/data/ct/covidctmd_p001_ct.nii.gz``) and the same thread budget
(``--threads``, default 2, set for OpenMP and PyTorch):

- ``ours_default``: ``covidlesionseg segment`` with no ``--model`` (the manifest's defaults), read to write;
- ``ours_lungs_only``: the same with ``--lungs-only`` (the part comparable with lungmask);
- ``ours_hu_threshold``: the same with ``--model hu-threshold`` when the default infection model is a network;
- ``ours_learned``: the same with ``--model ctseg2d-nnunet2d-w16`` (the older optional network), if shipped;
- ``lungmask_r231``: the ``lungmask`` package (PyPI, Hofmanninger et al.) running its own R231 pipeline through
  ``LMInferer(...).apply(image)`` on the image read with SimpleITK (its preprocessing, batched 2D U-Net
  inference and its volume post-processing). Its weights cannot be downloaded here, so the child saves a
  randomly initialised network of the same architecture (lungmask's ``UNet(n_classes=3, depth=5,
  up_mode="upsample", batch_norm=True, padding=True)``, exactly what its ``get_model`` builds for R231) and
  passes that file as ``modelpath``. Inference time does not depend on weight values; its post-processing
  (connected components of the predicted labels) may run somewhat differently on random labels than on real
  lungs, which the JSON notes.

Prints one JSON object: per configuration the median wall time, peak RSS and stage timings, the ratios
lungmask / ours, and the machine's load average (the development machines are shared: timings there are
upper bounds). Targets: whole default pipeline on P001 <= 20 s and <= 1.5 GB on 2 CPU cores (issue 10; issue 6 asked 30 s, 3 GB).

    python benchmarks/bench_default_models.py [--input CT] [--repeat 1] [--threads 2] [--skip-lungmask]
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
LEARNED_ID = "ctseg2d-nnunet2d-w16"

# Our CLI in a child; prints the child's own peak RSS (ru_maxrss is in kB on Linux).
_OURS = """
import resource, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from COVIDLesionSegLib.cli import main
status = main(sys.argv[2:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(status)
"""

# lungmask's own R231 pipeline in a child, with a randomly initialised R231-architecture network.
_LUNGMASK = """
import resource, sys, tempfile, time, os
import torch, SimpleITK as sitk
torch.set_num_threads(int(sys.argv[1]))
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
    image = sitk.ReadImage(sys.argv[2])
    t2 = time.perf_counter()
    mask = inferer.apply(image)
    t3 = time.perf_counter()
print("STAGES", t1 - t0, t2 - t1, t3 - t2, int((mask > 0).sum()), file=sys.stderr)
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    return env


def _peak_mb(stderr: str) -> float:
    return int(next(ln.split()[1] for ln in stderr.splitlines() if ln.startswith("PEAK_RSS_KB"))) / 1024


def run_ours(ct: Path, threads: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", _OURS, str(threads), "segment", str(ct), "-o", tmp, "--device", "cpu",
               "--quiet", *extra]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads))
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"segment {' '.join(extra)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        report = json.loads(next(Path(tmp).glob("*.json")).read_text())
    return {"wall_s": wall, "peak_rss_mb": _peak_mb(proc.stderr), "stages_s": report["timings_s"],
            "models": report["models"]}


def run_lungmask(ct: Path, threads: int) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LUNGMASK, str(threads), str(ct)], capture_output=True, text=True,
                          env=_env(threads))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"lungmask failed ({proc.returncode}) - is it installed (pip install lungmask)?\n"
                         f"{proc.stderr[-2000:]}")
    load, read, apply, voxels = next(ln.split()[1:] for ln in proc.stderr.splitlines() if ln.startswith("STAGES"))
    return {"wall_s": wall, "peak_rss_mb": _peak_mb(proc.stderr),
            "stages_s": {"load_model": float(load), "read": float(read), "apply": float(apply)},
            "mask_voxels": int(voxels)}


def _summary(runs: list[dict]) -> dict:
    return {"wall_s": statistics.median(r["wall_s"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-lungmask", action="store_true")
    args = p.parse_args(argv)
    if not args.input.exists():
        raise SystemExit(f"input {args.input} not found (the shared data live in ../shared/data)")

    from COVIDLesionSegLib import catalogue

    configs: dict[str, list[str]] = {"ours_default": [], "ours_lungs_only": ["--lungs-only"]}
    if catalogue.default_model_id("infection") != "hu-threshold":
        configs["ours_hu_threshold"] = ["--model", "hu-threshold"]   # the built-in baseline, side by side
    if LEARNED_ID != catalogue.default_model_id("infection") and any(
            e.model_id == LEARNED_ID and e.available for e in catalogue.list_models()):
        configs["ours_learned"] = ["--model", LEARNED_ID]
    results: dict[str, dict] = {}
    load_before = os.getloadavg()
    for name, extra in configs.items():
        results[name] = _summary([run_ours(args.input, args.threads, extra) for _ in range(args.repeat)])
    if not args.skip_lungmask:
        results["lungmask_r231"] = _summary([run_lungmask(args.input, args.threads) for _ in range(args.repeat)])
    out = {
        "input": str(args.input), "threads": args.threads, "repeat": args.repeat,
        "defaults": {t: catalogue.default_model_id(t) for t in ("lungs", "infection")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "targets": {"whole_pipeline_s": 30.0, "peak_rss_mb": 3072.0},
        "results": results,
    }
    if "lungmask_r231" in results:
        lm = results["lungmask_r231"]["wall_s"]
        out["ratios"] = {f"lungmask_r231_over_{k}": lm / results[k]["wall_s"] for k in configs}
        out["notes"] = ["lungmask ran a randomly initialised R231 network (its weights cannot be downloaded "
                        "here): inference time is that of the real model; its post-processing may differ"]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
