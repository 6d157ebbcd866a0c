"""Size, CPU forward time and peak memory of every registered architecture; prints JSON.

For each architecture in the registry (``COVIDLesionSegLib.models.architectures()``), a fresh Python
subprocess builds the network at its ``paper_args``, runs one warm-up forward pass and ``--repeats`` timed
passes of a batch of one at the paper's input size in ``eval()``/``inference_mode`` on the CPU, and reports:

- ``params``: number of parameters;
- ``forward_s_median`` (and every timing): wall-clock seconds per forward pass;
- ``peak_rss_mb``, ``baseline_rss_mb``, ``rss_delta_mb``: the process's peak resident memory
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after the passes, before building the network (after the
  imports), and their difference (weights + activations). A fresh subprocess per architecture keeps one
  network's peak from hiding another's.

Input sizes (batch 1), from the papers (000 ... 004: the numbers of docs/CITATIONS.md):

- 000 (Hybrid-encoder) and 001 (Multi-encoder): 000 states "the input patch size is set as 50x160x192",
  but these networks use 002's layer table (strides (1,2,2), (2,2,2) x3, (1,2,2)), which needs sizes that
  are multiples of (8, 32, 32): the benchmark runs ``1x1x56x160x192``, the padded patch nnU-Net would feed,
  and records the stated size as ``paper_input``;
- 002 (collaborative learning; also the plain nnU-Net baseline it describes): ``1x1x56x160x192``
  (its Table I and "the input patch size is set as 56x160x192");
- 003 (nCoVSegNet): ``1x3x352x352`` ("image size of 352 x 352", ResNet-50 3-channel input);
- 004 (comparison grid): ``1x1x512x512`` ("n_r = 512, n_c = 512"; the test images were resized to 512).
  The channel count follows the configuration's ``in_channels`` when it has one.

When a paper configuration cannot run here (the subprocess fails, runs out of memory, or exceeds
``--timeout``), the architecture is measured at its ``tiny_args`` instead and the entry says
``"config": "tiny", "fallback": true`` with the reason. ``--quick`` measures only ``tiny_args`` at small
inputs (a smoke test of this script, not a benchmark).

Usage::

    python benchmarks/bench_models.py [--quick] [--arch ID ...] [--repeats 5] [--threads 2]
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
import time
from typing import Any

# Paper (seed file prefix) -> spatial input size at batch 1, channels taken from the config.
# Keyed by the architectures' citation keys (COVIDLesionSegLib/models/citations.py; 000 ... 004 above).
PAPER_STATED = {"wang_hybrid_encoder": (50, 160, 192), "wang_multi_encoder": (50, 160, 192)}  # the text's (see above)
PAPER_INPUT = {
    "wang_hybrid_encoder": (56, 160, 192),
    "wang_multi_encoder": (56, 160, 192),
    "zhang_collaborative": (56, 160, 192),
    "liu_ncovsegnet": (352, 352),
    "bizopoulos_grid": (512, 512),
}
QUICK_INPUT = {2: (64, 64), 3: (16, 64, 64)}


def _maxrss_mb() -> float:
    # Linux reports kilobytes, macOS bytes.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def _spatial_dims(arch, args: dict[str, Any]) -> int:
    return int(args.get("spatial_dims", arch.dims[0]))


def _input_shape(arch, args: dict[str, Any], quick: bool) -> list[int]:
    dims = _spatial_dims(arch, args)
    spatial = QUICK_INPUT[dims] if quick else PAPER_INPUT.get(arch.paper)
    if spatial is None or len(spatial) != dims:
        spatial = QUICK_INPUT[dims]
    return [1, int(args.get("in_channels", 1)), *spatial]


def worker(arch_id: str, config: str, shape: list[int], repeats: int, warmup: int, threads: int) -> dict[str, Any]:
    """Runs in the subprocess: build, time, measure; returns the JSON entry."""
    import torch

    from COVIDLesionSegLib.models import architectures, build

    torch.set_num_threads(threads)
    arch = architectures()[arch_id]
    args = dict(arch.paper_args if config == "paper" else arch.tiny_args)
    baseline = _maxrss_mb()
    net = build({"arch": arch_id, "args": args}).eval()
    params = sum(p.numel() for p in net.parameters())
    x = torch.randn(*shape)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            out = net(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = net(x)
            times.append(time.perf_counter() - t0)
    out_shape = list((out[0] if isinstance(out, (list, tuple)) else out).shape)
    peak = _maxrss_mb()
    return {"arch": arch_id, "paper": arch.paper, "config": config, "args": args, "input_shape": shape,
            "output_shape": out_shape, "params": params, "forward_s_median": statistics.median(times),
            "forward_s": times, "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(peak, 1),
            "rss_delta_mb": round(peak - baseline, 1), "threads": threads}


def _run_subprocess(arch_id: str, config: str, shape: list[int], ns: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", arch_id, "--config", config,
           "--shape", ",".join(str(s) for s in shape), "--repeats", str(ns.repeats), "--warmup", str(ns.warmup),
           "--threads", str(ns.threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ns.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {ns.timeout} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return {"error": f"exit status {proc.returncode}: {tail[0][:300]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny_args at small inputs only (smoke test)")
    ap.add_argument("--arch", nargs="*", help="architecture ids (default: all registered)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per architecture and configuration")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--config", default="paper", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)

    if ns.worker:
        shape = [int(s) for s in ns.shape.split(",")]
        print(json.dumps(worker(ns.worker, ns.config, shape, ns.repeats, ns.warmup, ns.threads)))
        return 0

    import torch

    from COVIDLesionSegLib.models import architectures

    archs = architectures()
    ids = ns.arch or sorted(archs)
    unknown = [a for a in ids if a not in archs]
    if unknown:
        ap.error(f"unknown architecture(s) {unknown}; known: {sorted(archs)}")
    results = []
    for arch_id in ids:
        arch = archs[arch_id]
        if ns.quick:
            entry = _run_subprocess(arch_id, "tiny", _input_shape(arch, arch.tiny_args, True), ns)
            entry.setdefault("arch", arch_id)
            entry["fallback"] = False
        else:
            entry = _run_subprocess(arch_id, "paper", _input_shape(arch, arch.paper_args, False), ns)
            if "error" in entry:
                reason = entry["error"]
                # The paper configuration does not run here: measure the tiny one at the paper input size.
                entry = _run_subprocess(arch_id, "tiny", _input_shape(arch, arch.tiny_args, False), ns)
                entry.update({"arch": arch_id, "fallback": True, "fallback_reason": reason})
            else:
                entry["fallback"] = False
            stated = PAPER_STATED.get(arch.paper)
            if stated:
                entry["paper_input"] = list(stated)
        results.append(entry)
        print(f"{arch_id}: {entry.get('forward_s_median', entry.get('error'))}", file=sys.stderr)
    report = {"benchmark": "bench_models", "quick": ns.quick, "device": "cpu", "threads": ns.threads,
              "repeats": ns.repeats, "torch": torch.__version__, "python": platform.python_version(),
              "cpu_count": os.cpu_count(), "machine": platform.machine(), "results": results}
    print(json.dumps(report, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
