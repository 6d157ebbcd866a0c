"""Hard negatives for the 2D infection models: the COVID-19-CT-Seg slices plus healthy lung slices of a real HU scan.

Why: the shared 2D set holds **only infected slices**, so a model trained on it alone never sees healthy lung
and marks infection on clean slices of real scans (docs/default_models.md, section 2). This adds the lung
slices of a non-COVID HU scan (default: LIDC-IDRI-0001, CC BY 3.0) with an empty infection mask, mapped into
the slices' domain exactly as the engine maps a scan at inference: the whole axial slice resized to 256 x 256,
then the ``ctseg2d_domain`` intensity transform (window, per-slice stretch, CLAHE), stored as 8-bit like the
other slices. Lung slices are those where the engine's HU lung mask covers at least 1 % of the slice.

The output folder has the reader's layout (``covid19ctseg2d.npz`` + ``slices.csv``); the negatives form one
new volume group (default 20, source group ``coronacases`` so the ctseg2d protocols treat it as a reliable
volume). Nothing is overwritten unless ``--overwrite``; both files are written atomically.

    python -m training.hard_negatives OUT [--slices DIR] [--scan CT] [--group 20] [--overwrite]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from COVIDLesionSegLib import checks, io
from COVIDLesionSegLib.outputs import atomic_write
from COVIDLesionSegLib.predictor import HULungModel
from COVIDLesionSegLib.preprocessing import apply_intensity, resize_slices
from COVIDLesionSegLib.volume import CTVolume
from training.config import shared_data_dir

SHARED = shared_data_dir()
SIZE = 256
MIN_LUNG_FRACTION = 0.01


def negative_slices(scan: str | Path, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (n, size, size), lung {0,1} (n, size, size))``: the lung slices of an HU scan in the
    COVID-19-CT-Seg slices' domain, with the engine's HU lung mask resized alike (nearest)."""
    image, _ = io.read_image(scan)
    image, _ = checks.check_ct(image, None)
    volume = CTVolume.from_image(image)
    lung = HULungModel().segment(volume) > 0
    zs = np.flatnonzero(lung.sum(axis=(1, 2)) >= MIN_LUNG_FRACTION * lung[0].size)
    if zs.size == 0:
        raise ValueError(f"{scan}: no slice with lung found; give a chest CT in Hounsfield units")
    x = resize_slices(volume.hu[zs].astype(np.float32), (size, size))
    x = apply_intensity(x, {"name": "ctseg2d_domain", "size": size})
    images = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    lung_small = resize_slices(lung[zs].astype(np.float32), (size, size), mode="nearest") > 0.5
    return images, lung_small.astype(np.uint8)


def build(out: str | Path, slices_dir: str | Path = SHARED / "covid19ctseg2d",
          scan: str | Path = SHARED / "ct" / "lidc_0001_ct.nii.gz", group: int = 20,
          overwrite: bool = False) -> int:
    """Write the 2D set plus the negatives of ``scan`` to ``out``; returns the number of negatives."""
    out, slices_dir = Path(out), Path(slices_dir)
    targets = [out / "covid19ctseg2d.npz", out / "slices.csv"]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist(s); pass --overwrite to replace")
    data = np.load(slices_dir / "covid19ctseg2d.npz")
    if group in set(int(g) for g in np.unique(data["group"])):
        raise ValueError(f"group {group} is already used by the slices in {slices_dir}; choose another --group")
    images, lung = negative_slices(scan, size=int(data["images"].shape[-1]))
    n = len(images)
    arrays = {"images": np.concatenate([data["images"], images]),
              "lung": np.concatenate([data["lung"], lung.astype(data["lung"].dtype)]),
              "infection": np.concatenate([data["infection"], np.zeros_like(lung, dtype=data["infection"].dtype)]),
              "group": np.concatenate([data["group"], np.full(n, group, dtype=data["group"].dtype)])}
    with (slices_dir / "slices.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    fields = list(rows[0]) if rows else ["row", "group", "source_group"]
    n0 = len(data["images"])
    rows += [{**{k: "" for k in fields}, "row": str(n0 + i), "group": str(group), "source_group": "coronacases"}
             for i in range(n)]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(targets[0], lambda tmp: np.savez(tmp, **arrays))

    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(targets[1], write_csv)
    return n


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.hard_negatives", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder (the reader's layout)")
    ap.add_argument("--slices", default=str(SHARED / "covid19ctseg2d"), help="the COVID-19-CT-Seg slices folder")
    ap.add_argument("--scan", default=str(SHARED / "ct" / "lidc_0001_ct.nii.gz"), help="a non-COVID HU chest CT")
    ap.add_argument("--group", type=int, default=20, help="volume group id of the negatives")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    n = build(args.out, args.slices, args.scan, args.group, args.overwrite)
    print(f"{n} negative slice(s) of {args.scan} added; written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
