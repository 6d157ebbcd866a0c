"""What the CPU shortcuts of a 2D infection network cost in accuracy, and what they save (issue 14).

For each scan (default: COVID-CT-MD P001 and normal001 from ``../shared/data/ct``) the lungs are masked once
with the default lung model; then the default infection model (or ``--model``) runs

- in float32 over every lung slice (the reference: what the engine did before issue 14's second round),
- in float32 over the slices its post-processing needs (``InfectionPostprocess.slices_that_matter``), and
- with ``cpu_amp="bfloat16"`` over those slices (what a CPU with native bfloat16 runs in PyTorch), and
- in ONNX Runtime (float32) over those slices, where it is installed (what the pipeline then runs),

and the JSON gives, per scan and run, the seconds of the infection step (Hounsfield-band mask, network and
post-processing), the network's slices, the kept voxels, the voxels and axial slices whose label differs from
the reference, and the largest probability difference from the reference on the lungs. The runs alternate,
``--repeat`` times, in one process (times are medians; the machine's load is printed).

    python benchmarks/bench_infection_precision.py [--model ID] [--repeat 2] [--threads 2] [CT ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUTS = [REPO.parent / "shared" / "data" / "ct" / name
                  for name in ("covidctmd_p001_ct.nii.gz", "covidctmd_normal001_ct.nii.gz")]


def run(model, volume, lungs, cpu_amp, restrict):   # cpu_amp: PyTorch only (ONNX Runtime is float32)
    """One infection step: (seconds, network slices, probabilities, kept mask)."""
    from COVIDLesionSegLib.infection_hu import segment_infection_hu

    rule, in_lungs = model.postprocess, lungs > 0
    model.cpu_amp = cpu_amp
    start = time.perf_counter()
    hu_mask = segment_infection_hu(volume.hu, lungs, volume.spacing_zyx) if rule.confirm_hu_threshold else None
    needed = rule.slices_that_matter(hu_mask, volume.spacing_zyx) if restrict and hu_mask is not None else None
    probs = model._predict(volume, in_lungs, None, needed)
    kept = (probs >= model.threshold) & in_lungs
    if not rule.is_identity:
        kept = rule.apply(kept, volume.hu, volume.spacing_zyx, lungs, hu_mask=hu_mask)
    seconds = time.perf_counter() - start
    lung_slices = in_lungs.any(axis=(1, 2))
    slices = int(lung_slices.sum() if needed is None else (needed & lung_slices).sum())
    return seconds, slices, probs, kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="*", type=Path, default=DEFAULT_INPUTS)
    p.add_argument("--model", default=None, help="infection model id (default: the manifest's default)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for key in ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[key] = str(args.threads)

    import numpy as np
    import SimpleITK as sitk
    import torch

    from COVIDLesionSegLib import catalogue, checks

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    model_id = args.model or catalogue.default_model_id("infection")
    lung_model = catalogue.load_model(catalogue.default_model_id("lungs"), "lungs", "cpu")
    model = catalogue.load_model(model_id, "infection", "cpu", runtime="torch")
    if not hasattr(model, "postprocess"):
        raise SystemExit(f"{model_id} is not a network model")
    from COVIDLesionSegLib import onnx_runtime

    onnx_model = (catalogue.load_model(model_id, "infection", "cpu", runtime="onnxruntime")
                  if onnx_runtime.installed() else None)
    load_before = os.getloadavg()
    scans = {}
    for path in args.inputs:
        volume = checks.load_volume(path, name=path.name)
        lungs = lung_model.segment(volume)
        in_lungs = lungs > 0

        variants = {"float32_all_slices": (model, None, False), "float32_needed_slices": (model, None, True),
                    "bfloat16_needed_slices": (model, "bfloat16", True)}
        if onnx_model is not None and onnx_model.runtime == "onnxruntime":
            variants["onnxruntime_needed_slices"] = (onnx_model, None, True)
        times: dict[str, list[float]] = {k: [] for k in variants}
        outputs = {}
        for _ in range(args.repeat):
            for name, (runner, cpu_amp, restrict) in variants.items():
                seconds, slices, probs, kept = run(runner, volume, lungs, cpu_amp, restrict)
                times[name].append(seconds)
                outputs[name] = (slices, probs, kept)
        _, ref_probs, ref_kept = outputs["float32_all_slices"]
        scans[path.name] = {}
        for name, (slices, probs, kept) in outputs.items():
            needed_here = probs != 0   # compare probabilities where both runs computed them
            diff = np.abs(probs - ref_probs)[in_lungs & (needed_here | (name == "float32_all_slices"))]
            scans[path.name][name] = {
                "median_s": round(statistics.median(times[name]), 2), "network_slices": slices,
                "kept_voxels": int(kept.sum()), "voxels_differing": int((kept ^ ref_kept).sum()),
                "slices_differing": int((kept.any(axis=(1, 2)) ^ ref_kept.any(axis=(1, 2))).sum()),
                "max_probability_difference": round(float(diff.max()) if diff.size else 0.0, 4)}
    model.cpu_amp = "auto"
    from COVIDLesionSegLib.network_predictor import cpu_has_native_bfloat16

    print(json.dumps({"model": model_id, "threads": args.threads, "repeat": args.repeat,
                      "cpu_has_native_bfloat16": cpu_has_native_bfloat16(),
                      "loadavg_before": [round(x, 2) for x in load_before],
                      "loadavg_after": [round(x, 2) for x in os.getloadavg()], "scans": scans}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
