"""Whole-pipeline benchmark: seconds per stage and peak memory of `covidlesionseg segment` on a real CT.

Each repetition runs the CLI in a fresh process (so peak RSS is that run's own) on
``../shared/data/ct/covidctmd_p001_ct.nii.gz`` by default and reads the stage timings from the case's JSON
report. Prints one JSON object: per-stage medians, total, peak RSS in MB, and the raw runs.

    python benchmarks/bench_pipeline.py [--input CT] [--repeat 3] [--model ID] [--device cpu]

Targets on the project's 2-core CI machines (issue 2): lungs <= 10 s, whole pipeline <= 20 s, peak <= 2.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = REPO.parent / "shared" / "data" / "ct" / "covidctmd_p001_ct.nii.gz"

# Runs the CLI in a child and reports that child's own peak RSS (ru_maxrss is in kB on Linux).
_CHILD = """
import resource, sys
from COVIDLesionSegLib.cli import main
status = main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(status)
"""


def run_once(ct: Path, model: str | None, device: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", _CHILD, "segment", str(ct), "-o", tmp, "--device", device, "--quiet"]
        if model:
            cmd += ["--model", model]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"segment failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        peak_kb = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")))
        report = json.loads(next(Path(tmp).glob("*.json")).read_text())
    return {"wall_s": wall, "stages_s": report["timings_s"], "peak_rss_mb": peak_kb / 1024,
            "models": report["models"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if not args.input.exists():
        raise SystemExit(f"{args.input} not found (the benchmark needs ../shared/data or --input)")
    runs = [run_once(args.input, args.model, args.device) for _ in range(args.repeat)]
    stages = sorted({s for r in runs for s in r["stages_s"]})
    median = {s: round(statistics.median(r["stages_s"].get(s, 0.0) for r in runs), 3) for s in stages}
    result = {
        "benchmark": "pipeline",
        "input": str(args.input),
        "cpu_count": os.cpu_count(),
        "repeat": args.repeat,
        "median_stage_s": median,
        "median_pipeline_s": round(statistics.median(sum(r["stages_s"].values()) for r in runs), 3),
        "median_wall_s_including_startup": round(statistics.median(r["wall_s"] for r in runs), 3),
        "max_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        "models": runs[0]["models"],
        "targets": {"lungs_s": 10, "pipeline_s": 20, "peak_rss_mb": 2560},
        "runs": runs,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
