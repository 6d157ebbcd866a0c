"""The 3D CPU comparison of issue 13: the papers' 3D protocols on synthetic-lesion HU volumes, scored through
the engine.

Compares training from scratch, the four transfer strategies of 000 (Continual Learning, Body Fine-tuning,
Pre-trained Lesion Representations, Hybrid-encoder), Multi-encoder (001) and relation-driven collaborative
learning (002) with a small 3D nnU-Net (``configs/_protocol3d_cpu.yaml``) on HU volumes with COVID-19-like
lesions inserted by :mod:`training.synthesis` into the three non-evaluation host scans of
``../shared/data/ct`` (LIDC-IDRI-0001, TCGA DE-A4MA, Lung-PET-CT-Dx A0002; never COVID-CT-MD P001 /
normal001), several seeds per host (:func:`prepare_data`). Folds are grouped by host
(``protocol: kfold``, 3 folds: each fold tests on every copy of one host and trains on the other two), so no
scan is on both sides. Non-COVID lesions for pre-training and for 002's non-COVID branch: the real LIDC-IDRI-0001
nodules (the reader consensus of ``../shared/data/ct``) and synthetic solid nodules (consolidation-only,
3-15 mm, random-field shapes) in the same hosts. The pre-training runs once **per fold** on that fold's
training hosts only, so that no method sees the test host in any stage.

Test volumes are scored through the deployed predictor (``eval.predictor: engine``): the run's weights as an
engine checkpoint (``training.export``) run by ``COVIDLesionSegLib.network_predictor.NetworkInfectionModel``
on the whole HU scan - lung box, resampling, intensity mapping, sliding window, Gaussian blending - and
thresholded inside the lung mask (``pipeline.infection_mask``), so the numbers are those
``covidlesionseg segment`` gives for these scans with this model.

Order: the data (once), then per fold the pre-training, then every method; then the tables. Finished runs
are skipped, so an interrupted comparison resumes where it stopped::

    python -m training.protocol_3d [--out runs/protocol3d] [--data runs/protocol3d_data] [--folds 0,1,2]
                                   [--methods scratch,continual,...] [--set key=value ...]

writes ``DATA/covid`` and ``DATA/noncovid`` (:func:`prepare_data`), ``OUT/<pre-training config>/fold<k>``,
``OUT/<config name>/fold<k>``, ``OUT/table.md`` / ``table.csv`` (``training.tables``), ``OUT/summary.md``
(one row per method beside the papers' numbers), ``OUT/reviewer.md`` (per-case spread, bootstrap intervals,
paired tests against scratch) and ``OUT/timing.json`` (wall time of every run and of the whole comparison).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from training.protocol_2d import PAPER_NUMBERS

#: The host scans (``../shared/data/ct``): never the two evaluation scans.
HOSTS = ("lidc_0001_ct.nii.gz", "tcga_de_a4ma_thorax_ct.nii.gz", "lungptctdx_a0002_ct.nii.gz")

#: COVID-19-like lesions, richer than ``LesionConfig``'s defaults (4-10 lesions of 8-45 mm radius instead of
#: 1-6 of 2.5-45 mm) so that a patch of a few centimetres holds lesion often enough for a short training.
COVID_LESIONS = {"n_lesions": (4, 10), "radius_mm": (8.0, 45.0)}
COVID_SEEDS = tuple(range(6))

#: Non-COVID lesions: solid nodules and small masses (consolidation-only, no air bronchogram, random-field
#: shapes; 3-15 mm radius), the stand-in for 000's MSD lung tumour / StructSeg GTV sets.
NONCOVID_LESIONS = {"n_lesions": (3, 8), "radius_mm": (3.0, 15.0),
                    "pattern_probs": {"consolidation": 1.0, "ggo": 0.0, "mixed": 0.0, "crazy_paving": 0.0},
                    "air_bronchogram_prob": 0.0, "shape_bank_prob": 0.0}
NONCOVID_SEEDS = tuple(range(100, 103))

#: Pre-training config (run once per fold on the fold's training hosts).
PRETRAINING: dict[str, str] = {"multilesion": "protocol3d_pretrain_noncovid_cpu"}

#: Compared methods: name -> (config, pre-training it starts from or None). Table order.
METHODS: dict[str, tuple[str, str | None]] = {
    "scratch": ("protocol3d_scratch_cpu", None),
    "continual": ("protocol3d_continual_cpu", "multilesion"),
    "body_finetune": ("protocol3d_body_finetune_cpu", "multilesion"),
    "lesion_representations": ("protocol3d_lesion_representations_cpu", "multilesion"),
    "hybrid_encoder": ("protocol3d_hybrid_encoder_cpu", "multilesion"),
    "multi_encoder": ("protocol3d_multi_encoder_cpu", "multilesion"),
    "collaborative": ("protocol3d_collaborative_cpu", "multilesion"),
}

#: The data sets of the pre-training and of the methods that the fold's host filter applies to.
NONCOVID_KEYS = {"protocol3d_pretrain_noncovid_cpu": ("data",), "protocol3d_collaborative_cpu": ("aux_data.noncovid",)}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


#: Written into the data folder when it is complete (what it holds); the runner makes the data only without it.
MANIFEST = "prepared.json"


def prepare_data(data: str | os.PathLike, hosts: Sequence[str | os.PathLike] | None = None,
                 covid_seeds: Sequence[int] = COVID_SEEDS, noncovid_seeds: Sequence[int] = NONCOVID_SEEDS,
                 shapes: str | os.PathLike | None = None, log=_log) -> dict[str, Path]:
    """Write the comparison's volumes (skipping those present): ``DATA/covid`` - COVID-19-like lesions
    (:data:`COVID_LESIONS`, the shape bank of the shared 2D COVID-19-CT-Seg masks when ``shapes`` holds it)
    in every host, one copy per seed; ``DATA/noncovid`` - solid nodules (:data:`NONCOVID_LESIONS`) in every
    host, plus the real LIDC-IDRI-0001 nodules (links to the shared files) when LIDC-IDRI-0001 is a host.
    Every volume keeps the host's lung mask beside it (``_lung.nii.gz``). Returns the two folders."""
    from COVIDLesionSegLib.io import case_name
    from training.config import shared_data_dir
    from training.hard_negatives import is_evaluation_scan, read_host
    from training.synthesis import LesionConfig, ShapeBank, synthesize_file

    shared = shared_data_dir()
    hosts = [Path(h) for h in (hosts or [shared / "ct" / h for h in HOSTS])]
    if is_evaluation_scan(*hosts):
        raise ValueError("P001 and normal001 are kept for evaluation only; choose other host scans")
    data = Path(data)
    folders = {"covid": data / "covid", "noncovid": data / "noncovid"}
    shapes = Path(shapes) if shapes is not None else shared / "covid19ctseg2d"
    bank = ShapeBank.from_ctseg2d(shapes) if (shapes / "covid19ctseg2d.npz").is_file() else None
    covid_cfg, noncovid_cfg = LesionConfig(**COVID_LESIONS), LesionConfig(**NONCOVID_LESIONS)
    for host in hosts:
        read = None
        for kind, seeds, cfg, shape_bank in (("covid", covid_seeds, covid_cfg, bank),
                                             ("noncovid", noncovid_seeds, noncovid_cfg, None)):
            for seed in seeds:
                if (folders[kind] / f"{case_name(host)}_syn{seed}.json").exists():
                    continue
                read = read or read_host(host)
                paths = synthesize_file(host, folders[kind], seed, shape_bank, cfg, lung=True, host_read=read)
                meta = json.loads(paths["json"].read_text())
                log(f"{paths['ct'].name}: {len(meta['lesions'])} lesion(s), {meta['lesion_volume_ml']} mL")
        if host.name == "lidc_0001_ct.nii.gz" and (host.parent / "lidc_0001_nodules.nii.gz").exists():
            _link_real_lidc(host, folders["noncovid"])
    (data / MANIFEST).write_text(json.dumps({
        "hosts": [str(h) for h in hosts], "covid_seeds": list(covid_seeds), "noncovid_seeds": list(noncovid_seeds),
        "covid_lesions": COVID_LESIONS, "noncovid_lesions": NONCOVID_LESIONS,
        "shape_bank": str(shapes) if bank is not None else None}, indent=2))
    return folders


def _link_real_lidc(host: Path, folder: Path) -> None:
    """The real LIDC-IDRI-0001 scan and its nodule consensus in the synthetic layout (links, no copies)."""
    stem = "lidc_0001_ct_real"
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, target in (("_ct.nii.gz", host), ("_mask.nii.gz", host.parent / "lidc_0001_nodules.nii.gz")):
        link = folder / f"{stem}{suffix}"
        if not link.exists():
            link.symlink_to(Path(target).resolve())
    lung = next(folder.glob("lidc_0001_ct_syn*_lung.nii.gz"), None)
    if lung is not None and not (folder / f"{stem}_lung.nii.gz").exists():
        (folder / f"{stem}_lung.nii.gz").symlink_to(lung.name)
    record = folder / f"{stem}.json"
    if not record.exists():
        record.write_text(json.dumps({"host": str(host), "seed": None, "kind": "real LIDC-IDRI nodules "
                                      "(>= 2 of 4 readers)"}, indent=2))


def write_standin_data(data: str | os.PathLike, n_hosts: int = 3, copies: int = 2,
                       shape_zyx: tuple[int, int, int] = (16, 32, 32),
                       spacing_zyx: tuple[float, float, float] = (16.0, 11.25, 11.25)) -> dict[str, Path]:
    """Tiny stand-ins of :func:`prepare_data`'s folders (tests, smoke runs): the engine's synthetic chest
    phantom (``COVIDLesionSegLib.phantom``) as ``n_hosts`` hosts x ``copies`` seeds, in the synthetic layout,
    with its infection + consolidation (``covid``) or its nodule (``noncovid``) as the lesion mask. Their
    numbers mean nothing."""
    import SimpleITK as sitk

    from COVIDLesionSegLib.phantom import make_chest_phantom

    data = Path(data)
    folders = {"covid": data / "covid", "noncovid": data / "noncovid"}
    for kind, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        for h in range(n_hosts):
            for c in range(copies):
                seed = 10 * h + c
                image, truth = make_chest_phantom(shape_zyx, spacing_zyx, seed=seed, nodule=kind == "noncovid")
                lesion = truth["nodule"] if kind == "noncovid" else truth["infection"] | truth["consolidation"]
                lung = truth["right_lung"] | truth["left_lung"]
                stem = f"host{h}_ct_syn{seed}"
                for suffix, array in (("_ct", sitk.GetArrayFromImage(image)), ("_mask", lesion), ("_lung", lung)):
                    out = sitk.GetImageFromArray(np.ascontiguousarray(array).astype(np.int16 if suffix == "_ct" else np.uint8))
                    out.CopyInformation(image)
                    sitk.WriteImage(out, str(folder / f"{stem}{suffix}.nii.gz"))
                (folder / f"{stem}.json").write_text(json.dumps({"host": f"host{h}_ct.nii.gz", "seed": seed}))
    (data / MANIFEST).write_text(json.dumps({"standin": True, "hosts": n_hosts, "copies": copies}))
    return folders


def fold_hosts(config_name: str, fold: int, overrides: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """``(training hosts, test hosts)`` of one fold of a method config (its split, grouped by host)."""
    from training.config import load_config
    from training.trainer import load_cases, make_split

    config = load_config(config_name, list(overrides) + [f"protocol.fold={fold}"])
    cases = load_cases(config["data"])
    split = make_split(config, cases)
    group = {c.id: c.group for c in cases}
    return sorted({group[i] for i in split.train}), sorted({group[i] for i in split.test})


def fold_overrides(config_name: str, train_hosts: Sequence[str]) -> list[str]:
    """Restrict the non-COVID data sets of ``config_name`` to the fold's training hosts."""
    return [f"{key}.groups={json.dumps(list(train_hosts))}" for key in NONCOVID_KEYS.get(config_name, ())]


def main(argv: Sequence[str] | None = None) -> int:
    from training.protocol_2d import comparison_main

    return comparison_main(argv, description=__doc__.split("\n")[0], default_out="runs/protocol3d",
                           default_folds="0,1,2", methods=METHODS, pretraining=PRETRAINING,
                           paper=PAPER_NUMBERS, per_fold_pretraining=True, prepare=_prepare_from_args,
                           fold_overrides=_fold_overrides, default_data="runs/protocol3d_data", unit="test volume")


def _prepare_from_args(args) -> tuple[list[str], dict[str, Path]]:
    """Write the data (``--data``, skipping what is there); returns the override pointing every COVID-19 data
    set at it and the two folders."""
    data = Path(args.data).resolve()
    if (data / MANIFEST).exists():
        _log(f"data: {data} ({(data / MANIFEST).read_text().strip()[:200]})")
        folders = {"covid": data / "covid", "noncovid": data / "noncovid"}
    else:
        folders = prepare_data(data)
    return [f"data.root={folders['covid']}"], {"covid": folders["covid"], "noncovid": folders["noncovid"]}


def _fold_overrides(config_name: str, fold: int, base_overrides: Sequence[str], roots: dict) -> list[str]:
    """A run's non-COVID data: the generated folder, restricted to the fold's training hosts."""
    over = []
    if config_name in NONCOVID_KEYS:
        over += [f"{key}.root={roots['noncovid']}" for key in NONCOVID_KEYS[config_name]]
    train_hosts, _ = fold_hosts(METHODS["scratch"][0], fold, base_overrides)
    return over + fold_overrides(config_name, train_hosts)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
