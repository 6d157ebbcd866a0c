"""Selecting the infection model and its post-processing without fooling ourselves (issue 10).

Three kinds of evidence, kept apart:

1. **Validation** (used to choose): synthetic-lesion copies of a host scan that no candidate trained on
   (default TCGA-DE-A4MA, written by ``python -m training synthesize``), plus the host itself as a near-normal
   scan. Measured through the engine exactly as users run it (``hu-lungs`` on the scan, then the model):
   voxel DSC against the exact synthetic masks, slice-level sensitivity / specificity (a slice with lung is
   positive when it holds a lesion voxel), and the infected share of the host's own lungs. The
   probability threshold and the post-processing (``COVIDLesionSegLib.postprocess``) are chosen here: the
   setting with the highest slice Youden index (sensitivity + specificity - 1), ties to the higher voxel
   DSC. The slices pooled for it are those of the synthetic copies and the host's own lung slices, all
   negatives: a setting that marks a healthy scan pays for it in specificity.
2. **External check** (reported, never used to choose): COVID-CT-MD P001 against the radiologists'
   per-slice labels and the share of normal001's lungs marked infected, with the setting chosen in 1.
3. The 2D grouped cross-validation of the recipe (``python -m training cv``), reported in the docs.

    python -m training.selection --model hu-threshold --model runs/X/model.pt [--validation DIR]
        [--host CT] [--external] [-o results.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from COVIDLesionSegLib import catalogue
from COVIDLesionSegLib.evaluation import read_slice_labels, slice_agreement
from COVIDLesionSegLib.infection_hu import segment_infection_hu
from COVIDLesionSegLib.metrics import dice
from COVIDLesionSegLib.network_predictor import NetworkInfectionModel
from COVIDLesionSegLib.postprocess import InfectionPostprocess
from COVIDLesionSegLib.volume import CTVolume
from training.config import shared_data_dir
from training.hard_negatives import read_host

SHARED = shared_data_dir()
#: Probability thresholds tried on the validation data (the checkpoint's own threshold is always tried
#: first, and wins ties). A network trained on two hosts can be confident on lesions and merely unsure on a
#: new scanner's healthy lung; a higher threshold is the simplest rule that separates the two. The low ones
#: serve the network as evidence for ``confirm_hu_threshold``: a faint mark on a dense component is enough.
THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
#: The post-processing settings tried on the validation data.
GRID = {"min_component_ml": (0.0, 0.1, 0.25, 0.5, 1.0, 2.0), "min_hu": (None, -850.0, -800.0, -750.0),
        "min_rise_hu": (None, 50.0, 100.0, 150.0)}
#: Growth of the confirmed components into the network's mask (``grow_mm``) tried with the confirmation.
GROW_MM = (0.0, 5.0, 10.0, 15.0)


@dataclass
class Scan:
    """A scan as the engine sees it, its ``hu-lungs`` mask (bool) and, for synthetic copies, the exact lesion
    mask."""

    name: str
    volume: CTVolume
    lungs: np.ndarray
    truth: Optional[np.ndarray] = None

    @classmethod
    def read(cls, path: str | Path, mask: str | Path | None = None) -> "Scan":
        volume, lungs = read_host(path)
        truth = None
        if mask is not None:
            truth = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(mask)), "LPS")) > 0
        return cls(volume.name, volume, lungs, truth)

    def in_file_order(self, mask: np.ndarray) -> np.ndarray:
        """A canonical mask on the input file's own grid (per-slice labels index the file's z)."""
        return sitk.GetArrayFromImage(self.volume.to_input_geometry(mask.astype(np.uint8))) > 0


def load_model(ref: str, device: str = "cpu"):
    """A catalogue id or a checkpoint file. Network models come without their own post-processing, so the
    sweep sees raw thresholded masks (the stored setting is reported separately)."""
    model = (NetworkInfectionModel(ref, device=device) if Path(ref).is_file()
             else catalogue.load_model(ref, "infection", device))
    stored = getattr(model, "postprocess", None)
    if stored is not None:
        model.postprocess = InfectionPostprocess()
    return model, stored


def raw_probabilities(model, scans: Sequence[Scan]) -> tuple[list[np.ndarray], float]:
    """Infection probabilities (float32, 0 outside the lungs), and the seconds per scan."""
    out, t0 = [], time.perf_counter()
    for s in scans:
        probs = np.asarray(model.predict(s.volume, s.lungs), dtype=np.float32)
        probs[~(s.lungs > 0)] = 0.0
        out.append(probs)
    return out, (time.perf_counter() - t0) / max(1, len(scans))


def thresholds_for(model) -> list[float]:
    """The thresholds swept for a model: its own first, then :data:`THRESHOLDS`."""
    own = float(model.info.threshold)
    return [own] + [t for t in THRESHOLDS if abs(t - own) > 1e-9]


def grid_settings(grid: dict[str, Iterable] = GRID, grow_mm: Iterable[float] = GROW_MM) -> list[InfectionPostprocess]:
    """Every combination of ``grid``, then the network as a filter of ``hu-threshold``
    (``confirm_hu_threshold``, on its own: the HU rules would only thin the evidence), grown by each of
    ``grow_mm`` into the network's mask."""
    keys = list(grid)
    rules = [InfectionPostprocess(**dict(zip(keys, values))) for values in itertools.product(*grid.values())]
    return rules + [InfectionPostprocess(confirm_hu_threshold=True, grow_mm=g) for g in grow_mm]


def hu_threshold_mask(scan: Scan) -> np.ndarray:
    """The engine's Hounsfield-band infection mask of a scan (what ``confirm_hu_threshold`` filters),
    computed once per scan for the whole sweep."""
    return segment_infection_hu(scan.volume.hu, scan.lungs, scan.volume.spacing_zyx)


def validation_scores(masks: Sequence[np.ndarray], scans: Sequence[Scan], host: Optional[Scan],
                      host_mask: Optional[np.ndarray]) -> dict[str, Any]:
    """Voxel DSC and slice agreement over synthetic copies (the host's lung slices join the slice pool as
    negatives); the host's infected share of lung."""
    dscs, truth_slices, area_slices = [], [], []
    for m, s in zip(masks, scans):
        dscs.append(dice(m, s.truth))
        with_lung = s.lungs.reshape(len(s.lungs), -1).any(axis=1)
        truth_slices.append(s.truth.reshape(len(m), -1).any(axis=1)[with_lung])
        area_slices.append(m.reshape(len(m), -1).sum(axis=1)[with_lung])
    if host is not None and host_mask is not None:
        with_lung = host.lungs.reshape(len(host.lungs), -1).any(axis=1)
        area_slices.append(host_mask.reshape(len(host_mask), -1).sum(axis=1)[with_lung])
        truth_slices.append(np.zeros(int(with_lung.sum()), bool))
    agreement = slice_agreement(np.concatenate(area_slices), np.concatenate(truth_slices))
    out = {"synthetic_dsc": float(np.mean(dscs)), "synthetic_dsc_per_case": [round(float(d), 4) for d in dscs],
           "synthetic_slice_sensitivity": agreement["sensitivity"],
           "synthetic_slice_specificity": agreement["specificity"], "synthetic_slice_auc": agreement["auc"]}
    out["synthetic_slice_youden"] = out["synthetic_slice_sensitivity"] + out["synthetic_slice_specificity"] - 1
    if host is not None and host_mask is not None:
        out["host_infected_share"] = float(host_mask.sum() / max(1, (host.lungs > 0).sum()))
    return out


def choose(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The validation rule: highest slice Youden index on the validation slices, then higher voxel DSC, then
    the simpler setting (smaller component size); remaining ties go to the earlier row (the model's own
    threshold is swept first)."""
    return max(rows, key=lambda r: (round(r["synthetic_slice_youden"], 4), round(r["synthetic_dsc"], 4),
                                    -r["postprocess"].get("min_component_ml", 0.0)))


def external_checks(model, settings: dict[str, tuple[float, InfectionPostprocess]], labels_csv: Path,
                    p001: Scan, normal: Scan) -> dict[str, dict[str, Any]]:
    """Per named ``(threshold, rule)`` setting: P001 slice agreement with the radiologists' labels and
    normal001's infected share (reported only). Each scan is predicted once for all settings."""
    out: dict[str, dict[str, Any]] = {name: {} for name in settings}
    labels = read_slice_labels(labels_csv, "covidctmd_p001_ct")
    for s in (p001, normal):
        (probs,), _ = raw_probabilities(model, [s])
        hu_mask = hu_threshold_mask(s)
        for name, (threshold, rule) in settings.items():
            m = rule.apply(probs >= threshold, s.volume.hu, s.volume.spacing_zyx, s.lungs, hu_mask=hu_mask)
            if s is p001:
                area = s.in_file_order(m).reshape(len(m), -1).sum(axis=1)[labels["z"]]
                out[name]["p001"] = {k: (round(v, 4) if isinstance(v, float) else v)
                                     for k, v in slice_agreement(area, labels["infected"]).items()}
            else:
                out[name]["normal001_infected_share"] = round(float(m.sum() / max(1, (s.lungs > 0).sum())), 6)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.selection", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="model id or checkpoint file (repeatable)")
    ap.add_argument("--validation", default="runs/data/tcga_synthetic",
                    help="folder of synthetic copies (*_ct.nii.gz + *_mask.nii.gz) of the held-out host")
    ap.add_argument("--host", default=str(SHARED / "ct" / "tcga_de_a4ma_thorax_ct.nii.gz"),
                    help="the held-out host scan itself (near-normal lungs)")
    ap.add_argument("--external", action="store_true", help="also report the external check (P001, normal001)")
    ap.add_argument("-o", "--output", default=None, help="write the JSON here as well")
    args = ap.parse_args(argv)

    cts = sorted(Path(args.validation).glob("*_ct.nii.gz"))
    if not cts:
        raise SystemExit(f"error: no *_ct.nii.gz in {args.validation}; write some with python -m training synthesize")
    scans = [Scan.read(p, p.with_name(p.name.replace("_ct.nii.gz", "_mask.nii.gz"))) for p in cts]
    host = Scan.read(args.host)
    ext = None
    if args.external:
        ext = (Scan.read(SHARED / "ct" / "covidctmd_p001_ct.nii.gz"),
               Scan.read(SHARED / "ct" / "covidctmd_normal001_ct.nii.gz"))
    report: dict[str, Any] = {"validation": [p.name for p in cts], "host": args.host, "models": {}}
    for ref in args.model:
        model, stored = load_model(ref)
        probs, seconds = raw_probabilities(model, scans)
        (host_probs,), _ = raw_probabilities(model, [host])
        network = isinstance(model, NetworkInfectionModel)
        settings = grid_settings() if network else [InfectionPostprocess()]
        hu_masks = [hu_threshold_mask(s) for s in scans] if network else [None] * len(scans)
        host_hu_mask = hu_threshold_mask(host) if network else None
        rows = []
        for t in (thresholds_for(model) if network else [float(model.info.threshold)]):
            masks = [p >= t for p in probs]
            host_mask = host_probs >= t
            for rule in settings:
                kept = [rule.apply(m, s.volume.hu, s.volume.spacing_zyx, s.lungs, hu_mask=h)
                        for m, s, h in zip(masks, scans, hu_masks)]
                kept_host = rule.apply(host_mask, host.volume.hu, host.volume.spacing_zyx, host.lungs,
                                       hu_mask=host_hu_mask)
                rows.append({"threshold": t, "postprocess": rule.to_spec(),
                             **validation_scores(kept, scans, host, kept_host)})
        del probs, host_probs
        best = choose(rows)
        entry: dict[str, Any] = {"seconds_per_scan": round(seconds, 2), "chosen": best, "sweep": rows,
                                 "stored_postprocess": stored.to_spec() if stored is not None else None}
        if ext is not None:
            checks = external_checks(model, {
                "external_raw": (float(model.info.threshold), InfectionPostprocess()),
                "external_chosen": (best["threshold"], InfectionPostprocess(**best["postprocess"]))},
                SHARED / "ct" / "covidctmd_slice_labels.csv", *ext)
            entry.update(checks)
        report["models"][ref] = entry
        print(json.dumps({ref: {k: v for k, v in entry.items() if k != "sweep"}}, indent=1), file=sys.stderr,
              flush=True)
    text = json.dumps(report, indent=1)
    if args.output:
        from COVIDLesionSegLib.outputs import atomic_write_text

        atomic_write_text(args.output, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
