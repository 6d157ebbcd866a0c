"""Parameter counts of the comparison grid (paper 004) and of nCoVSegNet (paper 003).

Prints JSON (default) or the Markdown table of docs/grid_parameters.md (``--markdown``). Networks are
built on PyTorch's ``meta`` device: shapes only, no memory, no initialisation, so the whole grid takes a
few seconds.

    python benchmarks/grid_parameters.py              # JSON
    python benchmarks/grid_parameters.py --markdown   # table for docs/grid_parameters.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from COVIDLesionSegLib.models.encoders import ENCODER_NAMES
from COVIDLesionSegLib.models.grid import DECODERS, GridSegmenter, paper_table2_params_m
from COVIDLesionSegLib.models.ncovsegnet import PAPER_PARAMETER_COUNTS, NCoVSegNet, parameter_breakdown


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def grid_counts(in_channels: int = 1) -> dict[str, dict[str, dict[str, int]]]:
    out: dict[str, dict[str, dict[str, int]]] = {}
    for decoder in DECODERS:
        out[decoder] = {}
        for encoder in ENCODER_NAMES:
            with torch.device("meta"):
                model = GridSegmenter(decoder, encoder, in_channels=in_channels)
            out[decoder][encoder] = {"total": count(model), "encoder": count(model.encoder),
                                     "decoder": count(model.decoder)}
    return out


def markdown(counts: dict, paper: dict) -> str:
    lines = ["| encoder | " + " | ".join(f"{d} (M)" for d in DECODERS) + " | paper Unet (M) | paper Linknet (M) |",
             "|---|" + "---:|" * (len(DECODERS) + 2)]
    for encoder in ENCODER_NAMES:
        cells = [f"{counts[d][encoder]['total'] / 1e6:.2f}" for d in DECODERS]
        ref = [paper.get(d, {}).get(encoder) for d in ("unet", "linknet")]
        cells += [f"{r:.2f}" if r is not None else "-" for r in ref]
        lines.append(f"| {encoder} | " + " | ".join(cells) + " |")
    extra = sorted({e for d in ("unet", "linknet") for e in paper.get(d, {})} - set(ENCODER_NAMES))
    for encoder in extra:
        ref = [paper.get(d, {}).get(encoder) for d in ("unet", "linknet")]
        lines.append(f"| {encoder} (not available) | " + " | ".join("-" for _ in DECODERS) + " | "
                     + " | ".join(f"{r:.2f}" if r is not None else "-" for r in ref) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the Markdown table instead of JSON")
    parser.add_argument("--in-channels", type=int, default=1, help="input channels of the grid models (1)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts = grid_counts(args.in_channels)
    with torch.device("meta"):
        ncov = NCoVSegNet()
    breakdown = parameter_breakdown(ncov)
    paper = paper_table2_params_m()
    if args.markdown:
        print(markdown(counts, paper))
        return 0
    result = {
        "grid": counts,
        "grid_in_channels": args.in_channels,
        "paper_table2_params_m_realigned": paper,
        "ncovsegnet": {"ours": breakdown, "paper_code": PAPER_PARAMETER_COUNTS,
                       "matches": all(breakdown[k] == v for k, v in PAPER_PARAMETER_COUNTS.items())},
        "seconds": round(time.perf_counter() - start, 2),
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
