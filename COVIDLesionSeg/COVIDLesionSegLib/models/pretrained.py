"""ImageNet initialisation of the MONAI ResNets from a local torchvision-format state dict.

nCoVSegNet's first transfer stage (003, section 3.3) and the grid's "ImageNet" encoders (004) start from
torchvision's ImageNet ResNets. Nothing can be downloaded at run time here, so the loader reads a local
file that a user fetched once (e.g. ``curl -O`` the URL below on a machine with internet access).

Key mapping: the 2D MONAI ``ResNet`` built by ``encoders.build_torchvision_layout_resnet`` (shortcut "B"
without bias, ``feed_forward=False``) names its tensors exactly like torchvision (``conv1.weight``,
``bn1.*``, ``layerS.B.convK.weight``, ``layerS.B.bnK.*``, ``layerS.0.downsample.0/1.*``); the only
differences are

- ``fc.*`` (the ImageNet classifier) has no counterpart and is ignored;
- nCoVSegNet's ``layerS.B.eca.conv.weight`` (ECA) has no ImageNet counterpart and keeps its initialisation;
- ``*.num_batches_tracked`` is absent from the legacy file (saved before PyTorch 0.4.1) and optional;
- stages removed from a truncated encoder (set to ``None``, e.g. PSPNet's depth-3 encoder) are skipped;
- a wrapper's prefix (``module.`` from DataParallel) is stripped.

``conv1.weight`` (64, 3, 7, 7) is adapted to a 1-channel stem by summing the RGB filters: a grey image x
then gives the response the RGB network gives to (x, x, x). Other channel counts are refused.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.networks.nets import ResNet
from torch import nn

__all__ = ["IMAGENET_RESNET50_URL", "IMAGENET_RESNET50_SHA256_PREFIX", "LEGACY_IMAGENET_RESNET50_URL",
           "LEGACY_IMAGENET_RESNET50_SHA256", "LoadReport", "load_torchvision_resnet_state_dict",
           "verify_torchvision_file_hash", "find_resnet"]

# torchvision ``ResNet50_Weights.IMAGENET1K_V1`` (top-1 76.13 %, 25,557,032 parameters, the original
# recipe that nCoVSegNet's authors used in 2020-21). torchvision names its files ``<arch>-<first 8 hex
# digits of the file's sha256>.pth`` and torch.hub checks that prefix; the full digest is not published.
IMAGENET_RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
IMAGENET_RESNET50_SHA256_PREFIX = "0676ba61"
# The same V1 weights under torchvision's pre-2021 URL, in the legacy (non-zip) torch.save format
# (102,502,400 bytes). ``resnet50-11ad3fa6.pth`` is the different, later IMAGENET1K_V2 recipe (80.86 %).
LEGACY_IMAGENET_RESNET50_URL = "https://download.pytorch.org/models/resnet50-19c8e357.pth"
LEGACY_IMAGENET_RESNET50_SHA256 = "19c8e3572231adff6824a2da93fd67b5986919a2e65f8b6007eab4edee220097"

_KNOWN_SHA256 = {"resnet50-19c8e357.pth": LEGACY_IMAGENET_RESNET50_SHA256}
_TORCHVISION_NAME = re.compile(r"^[\w.]+-([0-9a-f]{8,64})\.pth$")


@dataclass
class LoadReport:
    """What :func:`load_torchvision_resnet_state_dict` did, by target key."""

    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)        # loaded after summing RGB filters
    ignored: list[str] = field(default_factory=list)        # file keys deliberately not used (fc, dropped stages)
    not_in_file: list[str] = field(default_factory=list)    # target keys left at their initialisation
    unexpected: list[str] = field(default_factory=list)     # file keys the backbone has no place for


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_torchvision_file_hash(path: str | Path) -> bool | None:
    """Check a weights file against the hash its torchvision file name carries (or a known full digest).

    Returns True when it matches, None when the name carries no hash (nothing to check); raises
    ``ValueError`` when it does not match (a truncated or corrupted download).
    """
    path = Path(path)
    expected = _KNOWN_SHA256.get(path.name)
    if expected is None:
        m = _TORCHVISION_NAME.match(path.name)
        if not m:
            return None
        expected = m.group(1)
    actual = _sha256(path)
    if not actual.startswith(expected):
        raise ValueError(f"{path} is corrupted or incomplete: its sha256 {actual[:16]}... does not match "
                         f"{expected[:16]}... expected from its name; download it again")
    return True


def find_resnet(model_or_backbone: nn.Module) -> ResNet:
    """The single MONAI ``ResNet`` inside a model (or the model itself)."""
    if isinstance(model_or_backbone, ResNet):
        return model_or_backbone
    found = [m for m in model_or_backbone.modules() if isinstance(m, ResNet)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one MONAI ResNet inside {type(model_or_backbone).__name__}, "
                         f"found {len(found)}: ImageNet weights exist for ResNet backbones only")
    return found[0]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle/EOF errors all mean the same thing to the user
        raise ValueError(f"could not read {path} as a PyTorch state dict (corrupted, truncated or not "
                         f"written by torch.save): {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in obj.items()):
        raise ValueError(f"{path} does not hold a state dict (a non-empty mapping of names to tensors)")
    prefix = "module."
    if all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_torchvision_resnet_state_dict(model_or_backbone: nn.Module, path: str | Path, *, strict: bool = True,
                                       verify_hash: bool = True) -> LoadReport:
    """Copy a torchvision ResNet state dict (saved with ``torch.save``) into the model's MONAI ResNet.

    Args:
        model_or_backbone: a MONAI ``ResNet`` or a model containing exactly one (nCoVSegNet, a grid model
            with a ResNet encoder).
        path: local file, e.g. ``resnet50-0676ba61.pth`` downloaded from ``IMAGENET_RESNET50_URL``.
        strict: raise when a backbone tensor (other than ECA weights and ``num_batches_tracked``) is missing
            from the file or the file has tensors the backbone cannot take (other than ``fc`` and dropped
            stages). Shape mismatches always raise.
        verify_hash: check the file's sha256 against the hash in its torchvision name when it has one.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: corrupted/unreadable file, hash mismatch, shape mismatch (naming the key), or, when
            ``strict``, missing/unexpected keys.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights file {path} not found. Nothing is downloaded at run time: "
                                f"fetch {IMAGENET_RESNET50_URL} (ResNet-50) or the matching torchvision file "
                                "on a machine with internet access and pass its local path")
    if verify_hash:
        verify_torchvision_file_hash(path)
    source = _read_state_dict(path)
    target = find_resnet(model_or_backbone)
    target_sd = target.state_dict()
    report = LoadReport()
    new_sd: dict[str, torch.Tensor] = {}
    errors: list[str] = []
    unexpected: list[str] = []
    for key, tensor in source.items():
        top = key.split(".", 1)[0]
        if top == "fc" or (top in target._modules and target._modules[top] is None):
            report.ignored.append(key)
            continue
        if key not in target_sd:
            unexpected.append(key)
            continue
        want = target_sd[key].shape
        if tensor.shape == want:
            new_sd[key] = tensor.to(target_sd[key].dtype)
            report.loaded.append(key)
        elif (key == "conv1.weight" and tensor.ndim == 4 and tensor.shape[1] == 3 and want[1] == 1
              and tensor.shape[0] == want[0] and tensor.shape[2:] == want[2:]):
            new_sd[key] = tensor.sum(dim=1, keepdim=True).to(target_sd[key].dtype)
            report.adapted.append(key)
        else:
            errors.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(want)}")
    if errors:
        hint = ("; the stem can only be adapted from 3 to 1 input channels" if any(e.startswith("conv1.weight")
                                                                               for e in errors) else
                "; is it the right ResNet depth, and is the model built at width 1.0?")
        raise ValueError(f"shape mismatch loading {path.name} into {type(target).__name__} for "
                         f"{len(errors)} tensor(s): " + "; ".join(errors[:5]) + hint)
    optional = (".num_batches_tracked", ".eca.conv.weight")
    missing = [k for k in target_sd if k not in new_sd]
    report.not_in_file = missing
    report.unexpected = unexpected
    hard_missing = [k for k in missing if not k.endswith(optional) and ".eca." not in k]
    if strict and (hard_missing or unexpected):
        raise ValueError(f"{path.name} does not match the backbone: missing {len(hard_missing)} key(s) "
                         f"{hard_missing[:5]}, unexpected {len(unexpected)} key(s) {unexpected[:5]}")
    target.load_state_dict(new_sd, strict=False)
    return report
