"""Helpers shared by the engine's test files (and the Slicer tests that reuse them): test-only networks and
checkpoints, small CT images and DICOM series. Fixtures built on them are in ``Testing/conftest.py``;
``faults.py`` beside this file holds the fault-injection helpers."""

from __future__ import annotations

import contextlib

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from COVIDLesionSegLib.models import registry
from COVIDLesionSegLib.models.checkpoint import save_checkpoint

# ------------------------------------------------------------------------------------------------------------
# Test-only networks and checkpoints
# ------------------------------------------------------------------------------------------------------------

def _tiny(dims: int, in_channels: int = 1, out_channels: int = 1, width: int = 4) -> nn.Module:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return nn.Sequential(conv(in_channels, width, 3, padding=1), nn.ReLU(), conv(width, out_channels, 1))


class _LungRule(nn.Module):
    """Logits from intensity and column: lung where the (0..1 windowed) input < 0.3; the image's left half
    (small x = patient right) is channel ``right``. Stands in for a trained 3-class lung network."""

    def __init__(self, right: int = 2, left: int = 1):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))
        self.right, self.left = right, left

    def forward(self, x):
        lung = (x[:, :1] < 0.3).float()
        w = x.shape[-1]
        is_left_of_image = (torch.arange(w, device=x.device) < w / 2).float().view(*([1] * (x.ndim - 1)), w)
        logits = torch.full((x.shape[0], 3, *x.shape[2:]), -1.0, device=x.device) * self.scale
        logits[:, 0] = self.scale * (1 - 2 * lung[:, 0])
        logits[:, self.right] = self.scale * (2 * lung[:, 0] * is_left_of_image - 1)
        logits[:, self.left] = self.scale * (2 * lung[:, 0] * (1 - is_left_of_image) - 1)
        return logits


TEST_ARCHS = {
    "test-pred-tiny2d": (lambda **kw: _tiny(2, **kw), (2,)),
    "test-pred-tiny3d": (lambda **kw: _tiny(3, **kw), (3,)),
    "test-pred-linear2d": (lambda: nn.Conv2d(1, 1, 1), (2,)),
    "test-pred-linear3d": (lambda: nn.Conv3d(1, 1, 1), (3,)),
    "test-pred-lungrule": (lambda: _LungRule(), (2, 3)),
}


@contextlib.contextmanager
def registered_test_archs():
    """:data:`TEST_ARCHS` in the architecture registry for the duration (the ``test_archs`` fixture)."""
    registry.architectures()  # import the real networks first
    for arch_id, (builder, dims) in TEST_ARCHS.items():
        registry.register(arch_id, dims=dims, paper="test", summary="test-only")(builder)
    try:
        yield
    finally:
        for arch_id in TEST_ARCHS:
            del registry._ARCHITECTURES[arch_id]


WINDOW = {"name": "hu_window_01", "lo": -1000.0, "hi": 0.0}


def _spec(dims: int, intensity=WINDOW, **extra):
    spec = {"dims": dims, "in_channels": 1, "intensity": dict(intensity)}
    if dims == 2:
        spec["slice_size"] = [32, 32]
    else:
        spec.update(spacing_zyx=[2.0, 1.2, 1.2], patch_size=[8, 16, 16])
    spec.update(extra)
    return spec


def _checkpoint(tmp_path, arch, net, dims, *, task="infection", name="m", args=None, labels=None, output=None,
                **spec_extra):
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, net, model_config={"arch": arch, "args": args or {}}, input_spec=_spec(dims, **spec_extra),
                    labels=labels or {"0": "background", "1": "infection"},
                    output=output or {"activation": "sigmoid"}, task=task, model_id=name, version="1")
    return path


def _linear(dims: int) -> nn.Module:
    """logit = 20 * window01(HU) - 10: > 0.5 where HU > -500 (dense lesion, tissue), ~0 in aerated lung."""
    net = nn.Conv2d(1, 1, 1) if dims == 2 else nn.Conv3d(1, 1, 1)
    with torch.no_grad():
        net.weight.fill_(20.0)
        net.bias.fill_(-10.0)
    return net


def pretend_full_gpu(model, monkeypatch) -> list[str]:
    """Make a CPU ``NetworkModel`` (infection) believe it sits on a GPU that runs out of memory on its first
    attempt, as the CUDA out-of-memory fallback must handle; returns the device type of every attempt."""
    attempts: list[str] = []
    model._device = torch.device("cuda")
    real = model._predict

    def flaky(volume, mask, progress, *rest):
        attempts.append(model.device.type)
        if model.device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(volume, mask, progress, *rest)

    monkeypatch.setattr(model, "_predict", flaky)
    return attempts


# ------------------------------------------------------------------------------------------------------------
# Small CT images and DICOM series
# ------------------------------------------------------------------------------------------------------------

def hu_image(shape_zyx=(8, 80, 80), value=-1000, dtype=np.int16, spacing=(0.8, 0.8, 2.5)) -> sitk.Image:
    """A small CT-like volume: air around a water body with air-filled 'lungs'."""
    z, y, x = shape_zyx
    arr = np.full(shape_zyx, value, dtype=dtype)
    yy, xx = np.mgrid[:y, :x]
    body = ((yy - y / 2) / (0.4 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 < 1
    arr[:, body] = 40
    for cx in (0.33 * x, 0.67 * x):
        lung = ((yy - y / 2) / (0.25 * y)) ** 2 + ((xx - cx) / (0.12 * x)) ** 2 < 1
        arr[:, lung] = -850
    arr[:, y // 2, x // 2] = 700  # a bit of bone
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    return img


def _write_dicom_series(folder, arr, spacing, series_uid, tilt_mm_per_slice=0.0, positions_z=None, extra_tags=None):
    """Write a CT DICOM series with SimpleITK (one file per slice, real tags), in shuffled file order.

    ``extra_tags`` adds or replaces tags of every slice (e.g. ``{"0008|103e": "a description"}``)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n = arr.shape[0]
    order = np.random.default_rng(1).permutation(n)
    for k in range(n):
        sl = sitk.GetImageFromArray(arr[k].astype(np.int16))
        sl.SetSpacing(spacing[:2])
        z = positions_z[k] if positions_z is not None else k * spacing[2]
        tags = {
            "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": series_uid,
            "0020|0032": f"0\\{k * tilt_mm_per_slice}\\{z}", "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(k + 1), "0008|0018": f"{series_uid}.{k + 1}", "0028|1052": "0", "0028|1053": "1",
        }
        tags.update(extra_tags or {})
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"img{order[k]:03d}.dcm"))
        writer.Execute(sl)


def _ramp_series(folder, positions_z, uid, tags=None):
    """A DICOM series whose every voxel of slice k holds a value linear in its z position, so that an
    interpolated slice has a known exact value."""
    arr = sitk.GetArrayFromImage(hu_image(shape_zyx=(len(positions_z), 80, 80))).astype(np.int16)
    arr[:, :4, :4] = (np.round(np.asarray(positions_z) * 4) - 900).astype(np.int16)[:, None, None]  # the ramp
    _write_dicom_series(folder, arr, (0.8, 0.8, 2.5), uid, positions_z=list(positions_z), extra_tags=tags)
    return arr
