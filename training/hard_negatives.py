"""Training data that teaches specificity: the COVID-19-CT-Seg slices, healthy lung slices of real HU scans,
and synthetic-lesion slices of the same scans (``training.synthesis``).

Why: the shared 2D set holds **only infected slices**, so a model trained on it alone never sees healthy lung
and marks infection on clean slices of real scans (docs/default_models.md, section 2). This adds the lung
slices of a non-COVID HU scan (default: LIDC-IDRI-0001, CC BY 3.0) with an empty infection mask, mapped into
the slices' domain exactly as the engine maps a scan at inference: the whole axial slice resized to 256 x 256,
then the ``ctseg2d_domain`` intensity transform (window, per-slice stretch, CLAHE), stored as 8-bit like the
other slices. Lung slices are those where the engine's HU lung mask covers at least 1 % of the slice.

The output folder has the reader's layout (``covid19ctseg2d.npz`` + ``slices.csv``); the negatives form one
new volume group (default 20, source group ``coronacases`` so the ctseg2d protocols treat it as a reliable
volume). Nothing is overwritten unless ``--overwrite``; both files are written atomically.

Several hosts (``--scan`` repeated) each form one volume group; ``--synthetic N`` adds, per host, the
slices that hold lesions in N synthetic-lesion copies of it (exact masks), and ``--negative-repeat K``
repeats its healthy slices. The two COVID-CT-MD scans kept for evaluation (P001, normal001) are refused.

    python -m training.hard_negatives OUT [--slices DIR] [--scan CT ...] [--group 20] [--synthetic N]
                                      [--negative-repeat K] [--seed S] [--overwrite]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from COVIDLesionSegLib import checks, io
from COVIDLesionSegLib.outputs import atomic_write
from COVIDLesionSegLib.predictor import HULungModel
from COVIDLesionSegLib.preprocessing import apply_intensity, pad_to_square, resize_slices
from COVIDLesionSegLib.volume import CTVolume
from training import synthesis
from training.config import shared_data_dir

SHARED = shared_data_dir()
SIZE = 256
MIN_LUNG_FRACTION = 0.01
#: The fixed HU window of the ``hu`` domain (stored as 8 bits; the engine reads it as ``hu_window_01``).
HU_WINDOW = {"name": "hu_window_01", "lo": -1024.0, "hi": 400.0}
#: Scans kept for the external check: never training data (case-name substrings).
EVALUATION_ONLY = ("p001", "normal001")


def host_slices(hu: np.ndarray, lung: np.ndarray, size: int = SIZE,
                infection: np.ndarray | None = None, intensity: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(images uint8, lung {0,1}, infection {0,1}, z indices)`` of an HU volume's lung slices, mapped into
    the COVID-19-CT-Seg slices' domain as the engine maps a scan at inference (whole slice padded to a square
    with air, resized to ``size``, ``ctseg2d_domain``); masks are resized alike (bilinear, half-way
    threshold: area-preserving edges)."""
    zs = np.flatnonzero(lung.sum(axis=(1, 2)) >= MIN_LUNG_FRACTION * lung[0].size)
    x = resize_slices(pad_to_square(np.asarray(hu[zs], dtype=np.float32))[0], (size, size))
    x = apply_intensity(x, intensity or {"name": "ctseg2d_domain", "size": size})
    images = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)

    def small(mask: np.ndarray) -> np.ndarray:
        square = pad_to_square(mask[zs].astype(np.float32), value=0.0)[0]
        return (resize_slices(square, (size, size)) > 0.5).astype(np.uint8)

    inf = small(infection) if infection is not None else np.zeros((len(zs), size, size), np.uint8)
    return images, small(lung), inf, zs


def read_host(scan: str | Path) -> tuple[CTVolume, np.ndarray]:
    """A host scan in canonical orientation and the engine's ``hu-lungs`` mask of it (bool)."""
    volume = checks.load_volume(scan)
    lung = HULungModel().segment(volume) > 0
    if not lung.any():
        raise ValueError(f"{scan}: no lung found; give a chest CT in Hounsfield units")
    return volume, lung


def synthetic_slices(scan: str | Path, seeds: Sequence[int], size: int = SIZE,
                     shape_bank: "synthesis.ShapeBank | None" = None,
                     config: "synthesis.LesionConfig | None" = None,
                     intensity: dict | None = None) -> dict[str, np.ndarray]:
    """The host's lung slices (negatives) and, per seed, the slices holding synthetic lesions (positives).

    Returns arrays ``images``, ``lung``, ``infection`` and ``kind`` (0 = real negative, 1 = synthetic)."""
    volume, lung = read_host(scan)
    parts = [host_slices(volume.hu, lung, size, intensity=intensity)[:3]]
    kinds = [np.zeros(len(parts[0][0]), np.uint8)]
    for seed in seeds:
        case = synthesis.synthesize(volume.hu, lung, volume.spacing_zyx, int(seed), config, shape_bank)
        images, lung_s, inf, _ = host_slices(case.hu, lung, size, infection=case.mask, intensity=intensity)
        keep = inf.reshape(len(inf), -1).any(axis=1)     # lesion-free slices would repeat the negatives
        parts.append((images[keep], lung_s[keep], inf[keep]))
        kinds.append(np.ones(int(keep.sum()), np.uint8))
    return {"images": np.concatenate([p[0] for p in parts]), "lung": np.concatenate([p[1] for p in parts]),
            "infection": np.concatenate([p[2] for p in parts]), "kind": np.concatenate(kinds)}


def build(out: str | Path, slices_dir: str | Path | None = SHARED / "covid19ctseg2d",
          scan: str | Path | Sequence[str | Path] = SHARED / "ct" / "lidc_0001_ct.nii.gz", group: int = 20,
          overwrite: bool = False, synthetic_per_scan: int = 0, negative_repeat: int = 1, seed: int = 0,
          shape_bank: "synthesis.ShapeBank | None" = None, domain: str = "ctseg2d") -> int:
    """Write the 2D set plus, for each host ``scan`` (one volume group each, from ``group`` up), its lung
    slices as negatives (``negative_repeat`` copies, which weights healthy lung in uniform sampling) and
    the lesion slices of ``synthetic_per_scan`` synthetic-lesion copies (seeds ``seed + 1000 * i + k``).
    ``domain``: ``ctseg2d`` maps the HU slices into the COVID-19-CT-Seg slices' domain (``ctseg2d_domain``);
    ``hu`` stores them through the fixed window :data:`HU_WINDOW` (8 bits over -1024..400 HU, 5.6 HU a
    level), for networks that read Hounsfield units; the COVID-19-CT-Seg slices (not HU) are then left out
    (``slices_dir`` must be None). Returns the number of slices added."""
    out = Path(out)
    if domain not in ("ctseg2d", "hu"):
        raise ValueError(f"domain must be 'ctseg2d' or 'hu', got {domain!r}")
    if domain == "hu" and slices_dir is not None:
        raise ValueError("the COVID-19-CT-Seg slices are not in HU: build the 'hu' domain without them")
    intensity = dict(HU_WINDOW) if domain == "hu" else None
    scans = [scan] if isinstance(scan, (str, Path)) else list(scan)
    if is_evaluation_scan(*scans):
        raise ValueError("P001 and normal001 are kept for evaluation only; never train on them")
    targets = [out / "covid19ctseg2d.npz", out / "slices.csv"]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist(s); pass --overwrite to replace")
    if slices_dir is None:
        data = {"images": np.zeros((0, SIZE, SIZE), np.uint8), "lung": np.zeros((0, SIZE, SIZE), np.uint8),
                "infection": np.zeros((0, SIZE, SIZE), np.uint8), "group": np.zeros(0, np.int16)}
        rows: list[dict] = []
    else:
        slices_dir = Path(slices_dir)
        data = dict(np.load(slices_dir / "covid19ctseg2d.npz"))
        with (slices_dir / "slices.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
    used = set(int(g) for g in np.unique(data["group"]))
    groups = [group + i for i in range(len(scans))]
    if used & set(groups):
        raise ValueError(f"group(s) {sorted(used & set(groups))} are already used by the slices in {slices_dir}; "
                         "choose another --group")
    size = int(data["images"].shape[-1])
    arrays = {k: [data[k]] for k in ("images", "lung", "infection", "group")}
    fields = list(rows[0]) if rows else ["row", "group", "source_group"]
    fields += [k for k in ("host", "kind") if k not in fields]
    n_added = 0
    for i, (s, g) in enumerate(zip(scans, groups, strict=True)):
        part = synthetic_slices(s, [seed + 1000 * i + k for k in range(synthetic_per_scan)], size, shape_bank,
                                intensity=intensity)
        neg = part["kind"] == 0
        reps = np.concatenate([np.repeat(np.flatnonzero(neg), max(1, negative_repeat)), np.flatnonzero(~neg)])
        for k in ("images", "lung", "infection"):
            arrays[k].append(part[k][reps].astype(data[k].dtype))
        arrays["group"].append(np.full(len(reps), g, dtype=data["group"].dtype))
        n0 = len(rows)
        rows += [{**{k: "" for k in fields}, "row": str(n0 + j), "group": str(g), "source_group": "coronacases",
                  "host": io.case_name(s), "kind": "synthetic" if part["kind"][r] else "negative"}
                 for j, r in enumerate(reps)]
        n_added += len(reps)
    arrays = {k: np.concatenate(v) for k, v in arrays.items()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(targets[0], lambda tmp: np.savez(tmp, **arrays))

    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(targets[1], write_csv)
    return n_added


def is_evaluation_scan(*paths: str | Path) -> bool:
    """True if any path names one of the two scans kept for the external check (COVID-CT-MD P001, normal001)."""
    return any(p in io.case_name(x).lower() for x in paths for p in EVALUATION_ONLY)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.hard_negatives", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder (the reader's layout)")
    ap.add_argument("--slices", default=str(SHARED / "covid19ctseg2d"),
                    help="the COVID-19-CT-Seg slices folder ('none': host slices only)")
    ap.add_argument("--domain", choices=("ctseg2d", "hu"), default="ctseg2d",
                    help="intensity domain of the host slices: the 2D set's (CLAHE) or a fixed HU window")
    ap.add_argument("--scan", action="append", default=None,
                    help="a non-COVID HU chest CT used as host (repeat for several; default LIDC-IDRI-0001)")
    ap.add_argument("--group", type=int, default=20, help="volume group id of the first host (then +1 each)")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="add the lesion slices of N synthetic-lesion copies of each host (training.synthesis)")
    ap.add_argument("--negative-repeat", type=int, default=1, metavar="K",
                    help="repeat each host's healthy lung slices K times (weights them in uniform sampling)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first synthetic copy")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    scans = args.scan or [str(SHARED / "ct" / "lidc_0001_ct.nii.gz")]
    slices = None if args.slices.lower() == "none" else args.slices
    shapes = args.slices if slices else str(SHARED / "covid19ctseg2d")
    bank = synthesis.ShapeBank.from_ctseg2d(shapes) if args.synthetic else None
    try:
        n = build(args.out, slices, scans, args.group, args.overwrite, synthetic_per_scan=args.synthetic,
                  negative_repeat=args.negative_repeat, seed=args.seed, shape_bank=bank, domain=args.domain)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{n} slice(s) of {len(scans)} host scan(s) added; written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
