"""Dry run of the papers' full-scale configs: every stage they name, at tiny size, on the CPU, in minutes.

``python -m training dryrun CONFIG [CONFIG ...]`` and ``python -m training dryrun --all`` run a full-scale
config through the stages a researcher would run on a GPU - the pre-training it starts from
(``model.init`` = ``${PRETRAINED}`` / ``${NCOVSEGNET_STAGE1}``), every fold of its protocol (``cv``), the
test of each fold, the table, and the export of an engine checkpoint that the engine then loads - with the
config's own procedure, protocol, network topology, pipelines and evaluation, and only sizes shrunk:

- one epoch of one iteration per run (training batch sizes kept), no early stopping;
- networks of the nnU-Net family with the config's stages, strides and kernels but 1/16 of the features;
  nCoVSegNet at width 0.0625; 004's grid with one encoder of each family (covering every decoder, encoder
  family and experiment, not their product);
- 3D patches of the smallest size the network's strides allow, 2D inputs of 64 px; stand-in volumes of
  that patch size (one sliding window each), evaluation batches of 16;
- each pre-training once per session, shared by every config that starts from it (the five transfers and
  the collaborative run share one multi-lesion pre-training, nCoVSegNet stage 2 its stage 1);
- one torch thread (:data:`DRYRUN_THREADS`), also for configs that set ``train.num_threads``.

Data: a data set that exists on this machine (e.g. ``../shared/data/covid19ctseg2d``) is used as it is. One
that does not (most public data sets) is replaced by **tiny generated files in the data set's published
on-disk layout** - the layouts the readers of :mod:`training.datasets` read (Zenodo's COVID-19-CT-Seg
folders with the benchmark's 20 case names, MSD's ``dataset.json``/``imagesTr``/``labelsTr``, StructSeg's
patient folders, PleThora's ``images``/``effusion``, LIDC's DICOM series with a ``LidcReadMessage`` XML of
two readers, MedSeg's stacked ``tr_im`` and ``rp_im`` volumes, the shared 2D ``.npz``) - built from the
engine's synthetic chest phantom (``COVIDLesionSegLib.phantom``: HU, two lungs, lesions) in a temporary
folder. They exercise the readers, splits, pipelines and training code; their numbers mean nothing.

Cost of ``--all`` on the 2-core development machine (lightly loaded, load 1-3): 98 s wall, 91 s of CPU
(before these sizes, evaluation batches and the single thread: 209 s wall, 220 s of CPU). Two threads help the
larger 2D encoders of 004's grid on an idle machine (9 s against 20 s) but not on busy shared cores: there the
grid took 582 s with two threads. nCoVSegNet stage 2 (1280 test slices over its 5 folds) and 004's grid are
the largest shares.

``--all`` covers every config in ``training/configs`` that is not a CPU sibling (``*_cpu``) or a shared
base (``_*``). Each config's result (stages, wall time, the exported checkpoint) is printed and written to
``OUT/dryrun.json``; the exit status is 1 when any config failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

#: ``model.init`` variables of the full-scale configs -> the pre-training config whose run they name.
PRETRAINING: dict[str, str] = {"PRETRAINED": "multilesion_nnunet3d_pretrain",
                               "NCOVSEGNET_STAGE1": "ncovsegnet_stage1_lidc"}

#: Architectures of the nnU-Net family (their ``channels`` are shrunk, their plan kept).
NNUNET_FAMILY = ("nnunet", "collaborative_unet", "hybrid_encoder_unet", "multi_encoder_unet")

#: 2D input size of the dry run (a multiple of 32, the largest total stride of the 2D networks here).
SIZE_2D = 64

#: Feature reduction of the nnU-Net family.
WIDTH_DIVISOR = 16

#: nCoVSegNet's width in a dry run: 0.0625 (0.66 M parameters; 0.125 had 2.6 M, whose 32 MB training
#: checkpoints cost more to write and read than the training step itself).
NCOVSEGNET_WIDTH = 0.0625

#: Evaluation batch of a dry run (2D slices, 3D windows): fewer calls of the tiny networks, same results.
EVAL_BATCH = 16

#: torch intra-op threads of a dry run. Its networks are so small that a second thread saves little wall time
#: on an idle machine and, on a shared one, costs several times the CPU (the threads spin waiting for each
#: other): measured on 2 shared cores, body fine-tuning + nCoVSegNet's two stages took 38 s of CPU with one
#: thread and over 250 s with two.
DRYRUN_THREADS = 1


def paper_configs() -> list[str]:
    """Config names ``--all`` runs: every config of ``training/configs`` but the ``_*`` bases and ``*_cpu``."""
    from training.config import CONFIG_DIR

    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("_")
                  and not p.stem.endswith("_cpu"))


# ----------------------------------------------------------------------------------------------------------
# Tiny generated stand-ins in the published layouts
# ----------------------------------------------------------------------------------------------------------

#: Phantom grid of the stand-in volumes: the whole synthetic chest at a coarse spacing. 16 x 32 x 32 is the
#: smallest patch of the 3D plans' strides (2 x 8 along z, 32 in-plane), so a test volume is one sliding
#: window (40 x 40 took four); the engine's unsupervised lung mask, used by nCoVSegNet's lung crop, still
#: finds a lung box at this size.
PHANTOM_SHAPE, PHANTOM_SPACING = (16, 32, 32), (16.0, 11.25, 11.25)


def _phantom(seed: int, nodule: bool = False):
    from COVIDLesionSegLib.phantom import make_chest_phantom

    return make_chest_phantom(PHANTOM_SHAPE, PHANTOM_SPACING, seed=seed, nodule=nodule)


def _write(path: Path, array_zyx: np.ndarray, like) -> Path:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    img.CopyInformation(like)
    sitk.WriteImage(img, str(path))
    return path


def _lung_labels(truth: Mapping[str, np.ndarray]) -> np.ndarray:
    return (truth["right_lung"].astype(np.uint8) + 2 * truth["left_lung"].astype(np.uint8))


def standin_covid19ctseg(root: Path) -> None:
    """Zenodo 3757476's folders with the benchmark's 20 case names (the published folds need all of them);
    the Radiopaedia volumes windowed to [-1250, 250] and scaled to 0..255 as the data set ships them."""
    import SimpleITK as sitk

    from training.datasets.covid19ctseg import BENCHMARK_TASK1_TRAIN, RADIOPAEDIA_WINDOW

    ids = sorted({i for fold in BENCHMARK_TASK1_TRAIN for i in fold})
    for n, cid in enumerate(ids):
        img, truth = _phantom(seed=n)
        hu = sitk.GetArrayFromImage(img)
        if cid.startswith("radiopaedia"):
            m = re.match(r"radiopaedia_(\d+)_(\d+)_(\d+)", cid)
            name = f"radiopaedia_org_covid-19-pneumonia-{m.group(1)}_{m.group(2)}_{m.group(3)}-dcm.nii.gz"
            lo, hi = RADIOPAEDIA_WINDOW
            hu = np.round((np.clip(hu, lo, hi) - lo) / (hi - lo) * 255.0).astype(np.int16)
        else:
            name = f"coronacases_org_{cid.split('_')[1]}.nii.gz"
        _write(root / "COVID-19-CT-Seg_20cases" / name, hu, img)
        _write(root / "Infection_Mask" / f"{cid}.nii.gz", truth["infection"].astype(np.uint8), img)
        _write(root / "Lung_Mask" / f"{cid}.nii.gz", _lung_labels(truth), img)


def _lesion(truth: Mapping[str, np.ndarray]) -> np.ndarray:
    """The stand-in lesion of a non-COVID data set: the phantom's lesions (any non-empty mask will do)."""
    return (truth["infection"] | truth["consolidation"] | truth.get("nodule", truth["infection"])).astype(np.uint8)


def standin_msd(root: Path, n: int = 5) -> None:
    """MSD Task06_Lung: ``dataset.json`` listing ``imagesTr``/``labelsTr`` pairs (label 1 = cancer)."""
    import SimpleITK as sitk

    training = []
    for k in range(1, n + 1):
        img, truth = _phantom(seed=100 + k, nodule=True)
        _write(root / "imagesTr" / f"lung_{k:03d}.nii.gz", sitk.GetArrayFromImage(img), img)
        _write(root / "labelsTr" / f"lung_{k:03d}.nii.gz", _lesion(truth), img)
        training.append({"image": f"./imagesTr/lung_{k:03d}.nii.gz", "label": f"./labelsTr/lung_{k:03d}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "Lung", "labels": {"0": "background", "1": "cancer"},
                                                   "training": training, "test": []}, indent=1))


def standin_structseg(root: Path, n: int = 3) -> None:
    """StructSeg 2019 Lung_GTV: numbered patient folders with ``data.nii.gz`` and ``label.nii.gz``."""
    import SimpleITK as sitk

    for k in range(1, n + 1):
        img, truth = _phantom(seed=200 + k, nodule=True)
        _write(root / str(k) / "data.nii.gz", sitk.GetArrayFromImage(img), img)
        _write(root / str(k) / "label.nii.gz", _lesion(truth), img)


def standin_nsclc_effusion(root: Path, n: int = 3) -> None:
    """PleThora on NSCLC-Radiomics: ``images/<patient>.nii.gz`` and ``effusion/<patient>_effusion_first_reviewer``."""
    import SimpleITK as sitk

    for k in range(1, n + 1):
        img, truth = _phantom(seed=300 + k)
        patient = f"LUNG1-{k:03d}"
        _write(root / "images" / f"{patient}.nii.gz", sitk.GetArrayFromImage(img), img)
        _write(root / "effusion" / f"{patient}_effusion_first_reviewer.nii.gz", _lesion(truth), img)


def standin_lidc(root: Path, n: int = 3) -> None:
    """TCIA's LIDC-IDRI: ``LIDC-IDRI-<nnnn>/<study>/<series>/*.dcm`` with the readers' ``LidcReadMessage`` XML
    beside them; two readers outline the phantom's nodule (and its lesions) on every slice they touch."""
    import SimpleITK as sitk

    for k in range(1, n + 1):
        img, truth = _phantom(seed=400 + k, nodule=True)
        hu = sitk.GetArrayFromImage(img).astype(np.int16)
        lesion = _lesion(truth).astype(bool)
        series_uid = f"1.2.826.0.1.3680043.2.1125.{k}"
        series = root / f"LIDC-IDRI-{k:04d}" / f"1.2.826.0.1.3680043.2.1125.{k}.1" / series_uid
        series.mkdir(parents=True, exist_ok=True)
        sz, sy, sx = PHANTOM_SPACING
        z_positions = [float(-100.0 + sz * i) for i in range(hu.shape[0])]
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for i in range(hu.shape[0]):
            sl = sitk.GetImageFromArray(hu[i])
            sl.SetSpacing((sx, sy))
            tags = {"0008|0060": "CT", "0010|0020": f"LIDC-IDRI-{k:04d}", "0020|000d": f"{series_uid}.0",
                    "0020|000e": series_uid, "0008|0018": f"{series_uid}.{i + 1}", "0020|0013": str(i + 1),
                    "0020|0032": f"-180\\-180\\{z_positions[i]}", "0020|0037": "1\\0\\0\\0\\1\\0",
                    "0018|0050": str(sz), "0028|0030": f"{sy}\\{sx}", "0028|1052": "0", "0028|1053": "1"}
            for tag, value in tags.items():
                sl.SetMetaData(tag, value)
            writer.SetFileName(str(series / f"{i + 1:06d}.dcm"))
            writer.Execute(sl)
        rois = []
        for i in np.flatnonzero(lesion.any(axis=(1, 2))):
            ys, xs = np.nonzero(lesion[i])
            y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
            edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>"
                            for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)))
            rois.append(f"<roi><imageZposition>{z_positions[i]}</imageZposition><imageSOP_UID>{series_uid}.{i + 1}"
                        f"</imageSOP_UID><inclusion>TRUE</inclusion>{edges}</roi>")
        sessions = "".join(f"<readingSession><servicingRadiologistID>{r}</servicingRadiologistID>"
                           f"<unblindedReadNodule><noduleID>N{r}</noduleID>{''.join(rois)}</unblindedReadNodule>"
                           f"</readingSession>" for r in (1, 2))
        (series / "069.xml").write_text(
            f'<?xml version="1.0" encoding="UTF-8"?>\n<LidcReadMessage><ResponseHeader><SeriesInstanceUid>'
            f"{series_uid}</SeriesInstanceUid></ResponseHeader>{sessions}</LidcReadMessage>\n")


def standin_medseg(root: Path, n_slices: int = 12, n_rp: int = 9) -> None:
    """MedSeg's release: ``tr_im``/``tr_mask``/``tr_lungmasks_updated`` stacks of axial slices (mask classes
    1 ground glass, 2 consolidation, 3 effusion) and the Radiopaedia volumes ``rp_im``/``rp_msk``/
    ``rp_lung_msk/<n>.nii.gz`` (``n`` = 1..9, the names ``grid004_medseg.yaml`` lists)."""
    import SimpleITK as sitk

    ims, masks, lungs = [], [], []
    for k in range(n_slices):
        img, truth = _phantom(seed=500 + k)
        hu = sitk.GetArrayFromImage(img)
        z = int(np.argmax(truth["infection"].sum(axis=(1, 2))))     # the most infected axial slice
        ims.append(hu[z])
        masks.append(truth["infection"][z].astype(np.uint8) + truth["consolidation"][z].astype(np.uint8))
        lungs.append((truth["right_lung"] | truth["left_lung"])[z].astype(np.uint8))
    like = sitk.GetImageFromArray(np.stack(ims))
    like.SetSpacing((PHANTOM_SPACING[2], PHANTOM_SPACING[1], 1.0))
    _write(root / "tr_im.nii.gz", np.stack(ims), like)
    _write(root / "tr_mask.nii.gz", np.stack(masks), like)
    _write(root / "tr_lungmasks_updated.nii.gz", np.stack(lungs), like)
    for k in range(1, n_rp + 1):
        img, truth = _phantom(seed=600 + k)
        _write(root / "rp_im" / f"{k}.nii.gz", sitk.GetArrayFromImage(img), img)
        _write(root / "rp_msk" / f"{k}.nii.gz", truth["infection"].astype(np.uint8), img)
        _write(root / "rp_lung_msk" / f"{k}.nii.gz", (truth["right_lung"] | truth["left_lung"]).astype(np.uint8), img)


def standin_covid19ctseg2d(root: Path, per_group: int = 2) -> None:
    """The shared 2D set's ``covid19ctseg2d.npz`` (uint8 ``images``, ``lung``, ``infection`` (N, 256, 256),
    ``group``): groups 0-7 (coronacases) and 10-19 (Radiopaedia), infected slices, 8-bit stretched."""
    import SimpleITK as sitk

    from COVIDLesionSegLib.preprocessing import resize_slices

    images, lungs, infs, groups = [], [], [], []
    for g in list(range(8)) + list(range(10, 20)):
        img, truth = _phantom(seed=700 + g)
        hu = sitk.GetArrayFromImage(img).astype(np.float32)
        rows = np.flatnonzero(truth["infection"].any(axis=(1, 2)))[:per_group]
        for z in rows:
            x = np.clip(hu[z], -1250, 250)
            x = (x - x.min()) / max(float(x.max() - x.min()), 1.0) * 255.0
            images.append(resize_slices(x[None], (256, 256))[0])
            lungs.append(resize_slices((truth["right_lung"] | truth["left_lung"])[z][None].astype(np.float32), (256, 256), "nearest")[0])
            infs.append(resize_slices(truth["infection"][z][None].astype(np.float32), (256, 256), "nearest")[0])
            groups.append(g)
    root.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(root / "covid19ctseg2d.npz", images=np.clip(np.stack(images), 0, 255).astype(np.uint8),
                        lung=(np.stack(lungs) > 0.5).astype(np.uint8), infection=(np.stack(infs) > 0.5).astype(np.uint8),
                        group=np.asarray(groups, dtype=np.int16))


#: Stand-in builders by reader name (``training.trainer.READERS``).
STANDINS: dict[str, Callable[[Path], None]] = {
    "covid19ctseg": standin_covid19ctseg,
    "msd": standin_msd,
    "structseg": standin_structseg,
    "nsclc_effusion": standin_nsclc_effusion,
    "lidc": standin_lidc,
    "medseg": standin_medseg,
    "covid19ctseg2d": standin_covid19ctseg2d,
}


def _present(spec: Mapping[str, Any]) -> bool:
    from training.config import ConfigError, expand_path

    try:
        root = expand_path(spec["root"])
    except ConfigError:   # ${VAR} not set: the data set is not on this machine
        return False
    return Path(root).exists()


def data_roots(config: Mapping[str, Any], standins: Path, use_real: bool = True) -> tuple[list[str], list[str]]:
    """``--set`` overrides pointing every data set of ``config`` that is absent here (or every one, with
    ``use_real=False``) to a generated stand-in (built once per reader under ``standins``); and notes."""
    overrides, notes = [], []
    specs = [("data", config["data"])] + [(f"aux_data.{n}", s) for n, s in config["aux_data"].items()]
    for where, spec in specs:
        if use_real and _present(spec):
            notes.append(f"{where}: real data at {spec['root']}")
            continue
        reader = spec["reader"]
        if reader not in STANDINS:
            raise RuntimeError(f"{where}: reader {reader!r} has no stand-in and {spec['root']!r} is not on this "
                               f"machine; add a builder to training.dryrun.STANDINS")
        root = standins / reader
        if not root.exists():
            STANDINS[reader](root)
        overrides.append(f"{where}.root={root}")
        notes.append(f"{where}: tiny generated {reader} files in its published layout ({root})")
    return overrides, notes


# ----------------------------------------------------------------------------------------------------------
# Tiny sizes
# ----------------------------------------------------------------------------------------------------------

def _plan_overrides(config: Mapping[str, Any]) -> tuple[list[str], tuple[int, ...] | None]:
    """Overrides of the network (same stages / strides / kernels, fewer features) and the smallest input
    the plan's strides divide (``None`` for networks without an nnU-Net plan)."""
    from COVIDLesionSegLib.models.nnunet import network_plan

    arch, args = config["model"]["arch"], dict(config["model"]["args"])
    if arch == "ncovsegnet":
        return [f"model.args.width={NCOVSEGNET_WIDTH}"], None
    if arch not in NNUNET_FAMILY:
        return [], None
    dims = int(args.get("spatial_dims", 3))
    chans, strides, kernels = network_plan(dims, args.get("channels"), args.get("strides"), args.get("kernel_sizes"))
    small = [max(2, int(c) // WIDTH_DIVISOR) for c in chans]
    total = tuple(int(np.prod([s[a] for s in strides])) for a in range(dims))
    return [f"model.args.channels={json.dumps(small)}", f"model.args.strides={json.dumps([list(s) for s in strides])}",
            f"model.args.kernel_sizes={json.dumps([list(k) for k in kernels])}"], total


def tiny_overrides(config: Mapping[str, Any]) -> list[str]:
    """``--set`` overrides that shrink a validated config to a dry run (module docstring)."""
    over = ["train.epochs=1", "train.iterations_per_epoch=1", "train.val_every=1", "train.patience=null",
            "train.progress=false", "train.checkpoint_every=1", "eval.max_val_cases=2", f"eval.batch_size={EVAL_BATCH}",
            "train.num_threads=null"]   # the session's DRYRUN_THREADS (a config's own count would stay set after it)
    plan, total = _plan_overrides(config)
    over += plan
    specs = [("data", config["data"])] + [(f"aux_data.{n}", s) for n, s in config["aux_data"].items()]
    for where, spec in specs:
        over.append(f"{where}.num_workers=0")
        args = spec["transform_args"]
        if spec["transforms"] == "nnunet_3d":
            # the network's total stride, twice along z (the bottleneck must hold more than one voxel)
            patch = [2 * total[0], total[1], total[2]] if total is not None and len(total) == 3 else [16, 32, 32]
            over.append(f"{where}.transform_args.patch_size={json.dumps(patch)}")
        elif "size" in args or spec["transforms"] in ("slice_2d", "ncovsegnet", "bizopoulos_004"):
            over.append(f"{where}.transform_args.size={SIZE_2D}")
            if isinstance(args.get("intensity"), Mapping) and "size" in args["intensity"]:
                over.append(f"{where}.transform_args.intensity.size={SIZE_2D}")
        if spec["reader"] in ("covid19ctseg2d",) and _present(spec):
            over.append(f"{where}.max_cases_per_group=1")
    return over


def _grid_cover(configs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The fewest grid runs that contain every decoder, every encoder family and every experiment at least
    once (instead of their product: 004's 456 runs)."""
    def family(enc: str) -> str:
        return re.sub(r"[-_]?b?\d+$", "", enc)

    keys = [("arch", lambda c: c["model"]["arch"]), ("family", lambda c: family(c["model"]["args"]["encoder"])),
            ("experiment", lambda c: c["procedure"]["experiment"])]
    missing = {name: {fn(c) for c in configs} for name, fn in keys}
    chosen: list[Mapping[str, Any]] = []
    while any(missing.values()):
        best = max(configs, key=lambda c: sum(fn(c) in missing[name] for name, fn in keys))
        chosen.append(best)
        for name, fn in keys:
            missing[name].discard(fn(best))
    return chosen


# ----------------------------------------------------------------------------------------------------------
# Running the stages
# ----------------------------------------------------------------------------------------------------------

class DryRun:
    """One dry-run session: a work folder, the stand-ins (shared by all configs), the pre-trainings run."""

    def __init__(self, out: Path, device: str = "cpu", use_real: bool = True, log: Callable[[str], None] | None = None):
        self.out = Path(out)
        self.device = device
        self.use_real = use_real
        self.log = log or (lambda m: print(m, flush=True))
        self.standins = self.out / "standins"
        self.pretrained: dict[str, Path] = {}
        self.results: dict[str, dict[str, Any]] = {}

    def _config(self, name: str) -> tuple[dict[str, Any], list[str], list[str]]:
        from training.config import load_config

        base = load_config(name)
        roots, notes = data_roots(base, self.standins, self.use_real)
        over = roots + tiny_overrides(base)
        init = base["model"].get("init")
        if init:
            m = re.fullmatch(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", str(init))
            if m and m.group(1) in PRETRAINING:
                pre = PRETRAINING[m.group(1)]
                over.append(f"model.init={self.pretraining(pre)}")
                notes.append(f"model.init: the dry run of {pre}")
            elif not Path(os.path.expandvars(str(init))).exists():
                raise RuntimeError(f"model.init {init!r} names no pre-training config of the dry run "
                                   f"(known: {', '.join('${' + k + '}' for k in PRETRAINING)})")
        return load_config(name, over), over, notes

    def pretraining(self, name: str) -> Path:
        """The run folder of a pre-training config's dry run (run once per session)."""
        if name not in self.pretrained:
            result = self.run_config(name)
            if result["status"] != "ok":
                raise RuntimeError(f"pre-training {name} failed: {result.get('error')}")
            self.pretrained[name] = Path(result["runs"][0])
        return self.pretrained[name]

    def run_config(self, name: str) -> dict[str, Any]:
        """Every stage of one config; returns (and keeps) its result record."""
        if name in self.results:
            return self.results[name]
        t0, c0 = time.perf_counter(), time.process_time()
        record: dict[str, Any] = {"config": name, "stages": [], "runs": [], "notes": []}
        try:
            config, over, notes = self._config(name)
            record["notes"] = notes
            if config["procedure"]["name"] == "grid004":
                self._grid(name, config, over, record)
            else:
                self._folds(name, config, over, record)
            record["status"] = "ok"
        except Exception as exc:  # one config's failure must not hide the others
            record["status"] = "failed"
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc()
            self.log(record["traceback"])
        record["wall_s"] = round(time.perf_counter() - t0, 2)
        record["cpu_s"] = round(time.process_time() - c0, 2)   # includes the pre-training it ran first
        self.results[name] = record
        self.log(f"dryrun {name}: {record['status']} in {record['wall_s']:.1f} s "
                 f"({', '.join(record['stages']) or 'no stage'})" + (f": {record['error']}" if record.get("error") else ""))
        return record

    def _train(self, config: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
        from training.trainer import Trainer

        summary = Trainer(config, run_dir, device=self.device, progress=False, log=lambda m: None).fit()
        if summary["status"] not in ("completed", "early_stopped"):
            raise RuntimeError(f"{run_dir}: status {summary['status']}")
        return summary

    def _folds(self, name: str, config: Mapping[str, Any], over: Sequence[str], record: dict[str, Any]) -> None:
        from training.config import load_config
        from training.runs import RunDir
        from training.tables import build_table, write_tables
        from training.trainer import load_cases, protocol_folds

        folds = protocol_folds(config, load_cases(config["data"]))
        base = self.out / "runs" / name
        dirs = []
        stage = "pre-training" if not config["eval"]["test"] else "train"
        for k in range(len(folds)):
            cfg = load_config(name, list(over) + [f"protocol.fold={k}"])
            run_dir = base / f"fold{k}" if len(folds) > 1 else base
            summary = self._train(cfg, run_dir)
            dirs.append(run_dir)
            record["stages"].append(f"{stage} fold {k}" + (f" (test {summary['n_test']})" if summary.get("n_test") else ""))
        record["runs"] = [str(d) for d in dirs]
        if all(RunDir(d).test_json.exists() for d in dirs):   # pre-trainings and final models have no test set
            table = build_table([RunDir(d) for d in dirs])
            write_tables(table, base / "table.md", base / "table.csv")
            record["stages"].append(f"table ({len(dirs)} run(s))")
        self._export(dirs[0], record)

    def _grid(self, name: str, config: Mapping[str, Any], over: Sequence[str], record: dict[str, Any]) -> None:
        from training.procedures.grid004 import expand_grid, run_one
        from training.runs import RunDir
        from training.tables import build_table, write_tables

        configs = _grid_cover(expand_grid(config))
        base = self.out / "runs" / name
        dirs = []
        for cfg in configs:
            run_dir = base / cfg["name"]
            summary = run_one(cfg, run_dir, self.device, log=lambda m: None)
            if summary["status"] not in ("completed", "early_stopped"):
                raise RuntimeError(f"{run_dir}: status {summary['status']}")
            dirs.append(run_dir)
            record["stages"].append(f"grid {cfg['procedure']['experiment']} {cfg['model']['arch']} "
                                    f"{cfg['model']['args']['encoder']} (test {summary.get('n_test')})")
        record["runs"] = [str(d) for d in dirs]
        table = build_table([RunDir(d) for d in dirs], metrics=["dsc", "sensitivity", "specificity"])
        write_tables(table, base / f"{name}_grid.md", base / f"{name}_grid.csv")
        record["stages"].append(f"table ({len(dirs)} run(s))")
        self._export(dirs[0], record)

    def _export(self, run_dir: Path, record: dict[str, Any]) -> None:
        from COVIDLesionSegLib.models.checkpoint import load_checkpoint
        from training.export import export_run

        path, sha = export_run(run_dir, run_dir / "model.pt")
        load_checkpoint(path)   # the engine reads what was exported
        record["export"] = str(path)
        record["stages"].append("export")


def run(configs: Sequence[str], out: str | os.PathLike | None = None, device: str = "cpu", use_real: bool = True,
        log: Callable[[str], None] | None = None, threads: int | None = DRYRUN_THREADS) -> dict[str, Any]:
    """Dry-run ``configs`` (names or paths) into ``out`` (default: a temporary folder, removed afterwards);
    returns ``{"configs": {name: record}, "wall_s", "cpu_s", "ok"}`` and writes it to ``OUT/dryrun.json``.
    ``threads``: torch's intra-op threads meanwhile (restored afterwards; ``None`` leaves them)."""
    import torch

    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    keep = out is not None
    folder = Path(out) if keep else Path(tempfile.mkdtemp(prefix="covidlesionseg_dryrun_"))
    folder.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    session = DryRun(folder, device=device, use_real=use_real, log=log)
    try:
        with torch.random.fork_rng():
            for name in configs:
                session.run_config(name)
        report = {"configs": session.results, "wall_s": round(time.perf_counter() - t0, 2),
                  "cpu_s": round(time.process_time() - c0, 2),
                  "ok": all(r["status"] == "ok" for r in session.results.values())}
        (folder / "dryrun.json").write_text(json.dumps(report, indent=1, default=str))
        return report
    finally:
        torch.set_num_threads(threads_before)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


__all__ = ["DryRun", "PRETRAINING", "STANDINS", "data_roots", "paper_configs", "run", "tiny_overrides"]
