"""Helpers shared by the training test files: small configs on the shared 2D slices and tiny 3D volumes in
the COVID-19-CT-Seg layout."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from Testing.conftest import shared_file
from training.config import config_from_dict

CTSEG2D = "covid19ctseg2d"


def ctseg2d_root() -> str:
    return str(shared_file(f"{CTSEG2D}/covid19ctseg2d.npz").parent)


def tiny_config(**over) -> dict:
    """A small 2D config on the shared slices (tests); ``over`` is merged (dotted keys allowed)."""
    cfg = {
        "name": "tiny",
        "seed": 3,
        "model": {"arch": "nnunet", "args": {"spatial_dims": 2, "channels": [4, 8, 16], "strides": [1, 2, 2],
                                             "kernel_sizes": [3, 3, 3], "deep_supervision": True}},
        "data": {"reader": "covid19ctseg2d", "root": ctseg2d_root(), "target": "infection",
                 "transforms": "slice_2d", "transform_args": {"size": 64, "intensity": "uint8_01"},
                 "max_cases_per_group": 2},
        "protocol": {"name": "ctseg2d", "n_folds": 2, "fold": 0},
        "optim": {"name": "adam", "lr": 3e-3, "weight_decay": 0.0},
        "schedule": {"name": "poly"},
        "train": {"epochs": 2, "iterations_per_epoch": 2, "batch_size": 2, "progress": False},
        "eval": {"unit": "group", "batch_size": 16, "metrics": ["dsc", "nsd", "sensitivity", "specificity",
                                                               "precision", "f1", "accuracy", "voe", "rvd"]},
        "export": {"input": {"intensity": {"name": "ctseg2d_domain"}}},
    }
    for key, value in over.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = copy.deepcopy(value)
    return config_from_dict(cfg)


def write_covid19ctseg_layout(root: Path, n: int = 2, shape=(20, 40, 44), spacing=(0.8, 0.8, 2.0)) -> list[str]:
    """Small HU volumes with a 'lung' and a spherical 'infection', written as COVID-19-CT-Seg's Zenodo folders."""
    rng = np.random.default_rng(0)
    (root / "COVID-19-CT-Seg_20cases").mkdir(parents=True)
    (root / "Infection_Mask").mkdir()
    (root / "Lung_Mask").mkdir()
    ids = []
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    for k in range(1, n + 1):
        img = np.full(shape, 40.0, np.float32) + rng.normal(0, 10, shape).astype(np.float32)
        lung = ((y - 20) ** 2 / 15 ** 2 + (x - 22) ** 2 / 17 ** 2 < 1) & (z > 1) & (z < shape[0] - 2)
        img[lung] = -850
        c = (10, 18 + k, 20 + 2 * k)
        inf = ((z - c[0]) ** 2 * 4 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < 36) & lung
        img[inf] = -250
        for folder, arr, name in (("COVID-19-CT-Seg_20cases", img, f"coronacases_org_{k:03d}.nii.gz"),
                                  ("Infection_Mask", inf.astype(np.uint8), f"coronacases_{k:03d}.nii.gz"),
                                  ("Lung_Mask", lung.astype(np.uint8), f"coronacases_{k:03d}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(spacing)
            im.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS-like storage: the reader reorients to LPS
            sitk.WriteImage(im, str(root / folder / name))
        ids.append(f"coronacases_{k:03d}")
    return ids


def config_3d(root: Path, ids: list[str], **over) -> dict:
    cfg = {
        "name": "tiny3d", "seed": 1,
        "model": {"arch": "nnunet", "args": {"spatial_dims": 3, "channels": [4, 8, 16], "strides": [1, 2, 2],
                                             "kernel_sizes": [3, 3, 3]}},
        "data": {"reader": "covid19ctseg", "root": str(root), "target": "infection", "transforms": "nnunet_3d",
                 "transform_args": {"target_spacing": "auto", "intensity": "fit", "patch_size": [8, 16, 16],
                                    "num_samples": 2}},
        "protocol": {"name": "fixed", "train": ids[:1], "test": ids[1:]},
        "train": {"epochs": 2, "iterations_per_epoch": 2, "batch_size": 2, "progress": False},
        "eval": {"metrics": ["dsc", "nsd", "sensitivity", "voe"], "batch_size": 4},
    }
    cfg.update(over)
    return config_from_dict(cfg)
