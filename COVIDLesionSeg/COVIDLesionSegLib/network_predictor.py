"""Runs any registered network from a checkpoint inside the engine: 2D slice-batched or 3D sliding-window,
on the CPU or CUDA.

:class:`NetworkModel` implements the interfaces of ``predictor.py`` according to the checkpoint's task:

- ``task == "infection"`` -> :class:`NetworkInfectionModel` with
  ``predict(volume, lungs, progress) -> float32 (z, y, x)`` probabilities in [0, 1] on the canonical grid;
- ``task == "lungs"`` -> :class:`NetworkLungModel` with ``segment(volume, progress) -> uint8 (z, y, x)``
  (0 background, 1 right lung, 2 left lung).

``NetworkModel(path)`` returns an instance of the matching subclass, so ``isinstance(model, InfectionModel)``
and ``isinstance(model, LungModel)`` tell the tasks apart.

How a volume is processed (the checkpoint's input spec decides, see ``models/checkpoint.py``):

- **2D** (``input.dims == 2``): the axial slices of the canonical LPS array, which are already in the
  radiological display orientation of the 2D training data (``preprocessing.py``). Only slices that contain
  lung (infection) or body (lungs) are run, in batches; the others get probability 0. Each slice (or its
  lung bounding box when ``input.crop == "lung_bbox"``, nCoVSegNet's lung-region crop) is resized
  bilinearly to ``input.slice_size``, intensity-transformed, run, and its probabilities resized back
  bilinearly. A 1-channel CT slice is repeated when the network expects ``in_channels > 1`` (nCoVSegNet's
  3-channel ResNet input).
- **3D** (``input.dims == 3``): the lung bounding box (+ ``margin_mm``) is cut out, resampled to
  ``input.spacing_zyx`` (trilinear), intensity-transformed, and run with MONAI's
  ``sliding_window_inference`` (``input.patch_size``, overlap 0.5, Gaussian blending as in nnU-Net); the
  blended probabilities are resampled back (trilinear) into the box.

Infection probabilities are zero outside the lung bounding box (+ margin). Memory: the result is the only
full-size float32 volume; 2D inputs are built per batch of slices and 3D inputs only for the lung box.

Devices: ``"auto"`` is CUDA when available, else the CPU; ``"cuda"`` without CUDA raises
:class:`DeviceError`. CUDA runs under autocast in float16 by default (nnU-Net's choice; its 10-bit mantissa
kept probabilities of the paper-size nnU-Net within 4e-3 (mean 1e-4) of float32 on an H100, where
bfloat16 differed by up to 0.02), with
a batch whose logits overflow to inf/NaN recomputed in float32. The CPU runs under autocast in bfloat16
where the processor computes it natively (AVX512-BF16 or AMX: :func:`cpu_has_native_bfloat16`), else in
float32 (``cpu_amp``): ``benchmarks/bench_infection_precision.py`` on the 2-core development machines (run
``runs/bench_precision_round8.json``, loaded) took the default infection model's step on P001 from 23.6 to
19.3 s, and changed its kept mask by 121 of 96,225 voxels (0.13 %), no slice's label and none of normal001's
voxels; emulated bfloat16 would be slower than float32, so processors without it keep float32.
A CUDA out-of-memory error (:func:`~.errors.is_cuda_out_of_memory`), while loading or running, moves the model
to the CPU and runs the case again there, with a warning in ``info.extra["notes"]`` and in ``volume.notes``
(:attr:`NetworkModel.fell_back_to_cpu` tells the worker); this is the only fallback of the project.

Progress: ``progress(fraction, message)`` is called after every batch of slices or windows; it may raise
:class:`~COVIDLesionSegLib.progress.Cancelled`, which propagates unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from . import onnx_runtime
from .errors import DeviceError, is_cuda_out_of_memory
from .infection_hu import segment_infection_hu
from .lungs import split_right_left
from .models.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .postprocess import InfectionPostprocess
from .predictor import ModelInfo
from .preprocessing import (
    apply_intensity,
    bounding_box,
    margin_voxels,
    pad_to_square,
    resampled_shape,
    resize_slices,
    resize_volume,
)
from .progress import ProgressCallback, report
from .volume import CTVolume

#: HU above which a voxel counts as body (not air) when a lung model looks for the slices to run.
BODY_HU = -500.0


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` -> CUDA if available else CPU; validates explicit ``"cpu"``/``"cuda[:i]"``."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "built without CUDA" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, but no GPU is visible"
            raise DeviceError(f"device 'cuda' was requested but CUDA is not available (PyTorch {torch.__version__} "
                              f"{build}). Use device 'auto' or 'cpu', or install a CUDA build of PyTorch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
        return dev
    if dev.type == "cpu":
        return dev
    raise DeviceError(f"device {device!r} is not supported; use 'auto', 'cpu' or 'cuda'")


@functools.lru_cache(maxsize=None)   # asked before every batch; the processor does not change
def cpu_has_native_bfloat16() -> bool:
    """Whether this processor computes bfloat16 natively (AVX512-BF16 or AMX tiles): then autocast in
    bfloat16 runs PyTorch's CPU convolutions about twice as fast as float32; without it they are emulated
    and slower. (PyTorch exposes the test only as ``torch.cpu._is_*_supported``; absent means no.)"""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def _window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's sliding_window_inference visits (for progress fractions)."""
    n = 1
    for size, r in zip(shape, roi, strict=True):
        if size <= r:
            continue
        step = max(int(r * (1.0 - overlap)), 1)
        n *= int(math.ceil((size - r) / step)) + 1
    return n


def sliding_window_3d(volume: Any, window: Callable[[torch.Tensor], torch.Tensor], *, patch_size: Sequence[int],
                      overlap: float, batch_size: int, spacing: Optional[Sequence[float]] = None,
                      target_spacing: Optional[Sequence[float]] = None,
                      prepare: Optional[Callable[[Any], torch.Tensor]] = None,
                      progress: Optional[ProgressCallback] = None, what: str = "") -> torch.Tensor:
    """3D sliding-window inference of one volume on its own grid: the one implementation (engine and training).

    ``volume`` (``(z, y, x)`` or ``(c, z, y, x)``, numpy or torch) is resampled trilinearly from ``spacing`` to
    ``target_spacing`` (when both are given and the grid changes), turned by ``prepare`` into the network's
    ``(1, C, z', y', x')`` input on its device (default: a float tensor with a batch axis), and run with MONAI's
    ``sliding_window_inference`` (``patch_size``, ``overlap``, Gaussian weighting as in nnU-Net; ``window`` maps
    a batch of patches to their outputs, e.g. probabilities or logits); the blended ``(K, z', y', x')`` outputs
    are resampled back (trilinear) to the input grid. ``progress(fraction, message)`` is told after every
    batch of windows. Returns a float32 tensor ``(K, z, y, x)`` on the input tensor's device.
    """
    from monai.inferers import sliding_window_inference

    shape = tuple(int(n) for n in volume.shape[-3:])
    x = volume
    if spacing is not None and target_spacing is not None:
        target = resampled_shape(shape, spacing, target_spacing)
        if target != shape:
            x = resize_volume(x, target, mode="trilinear")
    del volume
    grid = tuple(int(n) for n in x.shape[-3:])
    inputs = prepare(x) if prepare is not None else torch.as_tensor(x).float()[None]
    del x
    total = max(1, int(math.ceil(_window_count(grid, patch_size, overlap) / batch_size)))
    done = 0

    def predictor(patch: torch.Tensor) -> torch.Tensor:
        nonlocal done
        out = window(patch)
        done += 1
        report(progress, min(done / total, 1.0), f"{what}: window batch {min(done, total)}/{total}")
        return out

    out = sliding_window_inference(inputs, roi_size=tuple(patch_size), sw_batch_size=batch_size,
                                   predictor=predictor, overlap=overlap, mode="gaussian",
                                   sw_device=inputs.device, device=inputs.device)
    del inputs
    out = out[0].float()
    if tuple(out.shape[1:]) != shape:
        out = resize_volume(out, shape, mode="trilinear")
    return out


class NetworkModel:
    """A network from a checkpoint, as an engine model. ``NetworkModel(...)`` returns the task's subclass.

    Args:
        checkpoint: a checkpoint path or a loaded :class:`Checkpoint`.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (``"cuda:1"``...).
        batch_size: 2D: slices per batch; 3D: windows per batch. Default 8/16 (2D, CPU/CUDA) and 1/2 (3D).
        progress: default progress callback when ``predict``/``segment`` get none (also told of loading).
        overlap: sliding-window overlap (3D).
        margin_mm: margin around the lung (or body) bounding box.
        amp: autocast dtype on CUDA: ``"float16"`` (default), ``"bfloat16"`` or ``None`` (float32).
        cpu_amp: autocast on the CPU: ``"auto"`` (default: bfloat16 where the processor has it natively,
            else float32), ``"bfloat16"`` or ``None`` (float32).
        expected_sha256: sha256 of the checkpoint file from the model manifest, verified on loading.
        slice_step: 2D infection models: run every ``slice_step``-th lung slice (and the last one) and
            interpolate the others' probabilities linearly in z (the fast mode uses 2: half the network
            time for a coarser z resolution; ``docs/default_models.md`` section 8 measures the cost).
        output: infection models: ``"probabilities"`` (default: ``predict`` gives float32 probabilities) or
            ``"mask"`` (the pipeline's choice: ``predict`` gives the bool mask at the checkpoint's threshold,
            the same voxels as thresholding the probabilities, thresholded batch by batch so that no float32
            volume is ever held: 1 GB less on a 512 x 512 x 1000 scan).
        runtime: on the CPU, ``"torch"`` (default) or ``"onnxruntime"`` (``onnx_runtime.py``: optional,
            float32); ``"auto"`` is ONNX Runtime where it is installed. The catalogue loads the pipeline's
            networks with ``onnx_runtime.DEFAULT_RUNTIME`` (``COVIDLESIONSEG_RUNTIME``, PyTorch unless set).
            Where ONNX Runtime cannot run the network, it stays in PyTorch and :attr:`notes` says why.
    """

    def __new__(cls, checkpoint: str | os.PathLike | Checkpoint, *args: Any, **kwargs: Any):
        if cls is NetworkModel:
            ckpt = _as_checkpoint(checkpoint, kwargs.get("expected_sha256"))
            sub = {"infection": NetworkInfectionModel, "lungs": NetworkLungModel}[ckpt.task]
            obj = super().__new__(sub)
            obj._preloaded = ckpt
            return obj
        return super().__new__(cls)

    def __init__(self, checkpoint: str | os.PathLike | Checkpoint, device: str | torch.device = "auto",
                 batch_size: int | None = None, progress: Optional[ProgressCallback] = None, *,
                 overlap: float = 0.5, margin_mm: float = 10.0, expected_sha256: str | None = None,
                 amp: str | None = "float16", cpu_amp: str | None = "auto", slice_step: int = 1,
                 output: str = "probabilities", runtime: str = "torch"):
        ckpt = self.__dict__.pop("_preloaded", None) or _as_checkpoint(checkpoint, expected_sha256)
        expected_task = {NetworkInfectionModel: "infection", NetworkLungModel: "lungs"}.get(type(self))
        if expected_task is not None and ckpt.task != expected_task:
            raise CheckpointError(f"{ckpt.model_id!r} is a {ckpt.task!r} model; use NetworkModel(...) or the "
                                  f"matching class")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if amp not in (None, "float16", "bfloat16"):
            raise ValueError(f"amp must be 'float16', 'bfloat16' or None, got {amp!r}")
        self.amp = amp
        if cpu_amp not in (None, "auto", "bfloat16"):
            raise ValueError(f"cpu_amp must be 'auto', 'bfloat16' or None, got {cpu_amp!r}")
        self.cpu_amp = cpu_amp
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(slice_step) < 1:
            raise ValueError(f"slice_step must be >= 1, got {slice_step}")
        self.slice_step = int(slice_step)
        if output not in ("probabilities", "mask"):
            raise ValueError(f"output must be 'probabilities' or 'mask', got {output!r}")
        self.output = output
        if runtime not in onnx_runtime.RUNTIMES:
            raise ValueError(f"runtime must be one of {onnx_runtime.RUNTIMES}, got {runtime!r}")
        self._device = resolve_device(device)
        self._progress = progress
        self.overlap = float(overlap)
        self.margin_mm = float(margin_mm)
        self._batch_size = batch_size
        self.notes: list[str] = []
        self._fell_back = False
        #: Called with the warning when the model moves to the CPU after a CUDA out-of-memory error (the
        #: Slicer worker logs it at that moment).
        self.on_fallback: Optional[Callable[[str], None]] = None
        report(progress, 0.0, f"loading model {ckpt.model_id}")
        self._net = self._build_net(ckpt, ckpt.model_id)
        spec = ckpt.input_spec
        self.dims = int(spec["dims"])
        self.in_channels = int(spec["in_channels"])
        self.intensity = dict(spec["intensity"])
        self.slice_size = tuple(spec["slice_size"]) if self.dims == 2 else None
        self.spacing_zyx = tuple(float(s) for s in spec["spacing_zyx"]) if self.dims == 3 else None
        self.patch_size = tuple(int(p) for p in spec["patch_size"]) if self.dims == 3 else None
        self.crop = spec.get("crop", "none")
        self.activation = ckpt.output["activation"]
        self.foreground_channel = int(ckpt.output.get("foreground_channel", 1 if self.activation == "softmax" else 0))
        self.threshold = ckpt.threshold
        self.postprocess = InfectionPostprocess.from_spec(ckpt.output.get("postprocess"))
        self.labels = dict(ckpt.labels)
        self._onnx = self._onnx_network(ckpt, runtime)
        # The network holds its own copy of the weights; keep the metadata only.
        self.checkpoint = dataclasses.replace(ckpt, state_dict={})
        self.info = ModelInfo(
            model_id=ckpt.model_id, version=ckpt.version, task=ckpt.task, description=ckpt.description,
            threshold=self.threshold, device=str(self._device),
            extra={"arch": ckpt.arch, "dims": self.dims, "precision": self.precision, "runtime": self.runtime,
                   "checkpoint": str(ckpt.path) if ckpt.path else None,
                   "state_dict_sha256": ckpt.state_dict_sha256, "notes": list(self.notes)})
        report(progress, 1.0, f"model {ckpt.model_id} ready on {self._device}")

    # ------------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        if self._batch_size is not None:
            return self._batch_size
        cuda = self._device.type == "cuda"
        if self.dims == 2:
            # 8 on the CPU: the activations of 16 slices were the learned default's peak memory on P001 (400 MB
            # above the scan's working set against 142-278 MB; the whole run 1.00-1.10 GB against issue 14's
            # 1 GB) and gave no speed on this machine (predict 9.3 s median against 8.3 s; 4 slices 8.0 s;
            # runs/batch_size_round11.txt); an older CPU ran 16 in 0.57 of the CPU time of 4 (oneDNN), so 8
            # rather than 4. The mask does not change (the same 96,225 voxels on P001; probabilities by float rounding).
            return 16 if cuda else 8
        return 2 if cuda else 1

    def _amp_dtype(self) -> torch.dtype | None:
        if self._device.type == "cpu":
            if self.cpu_amp == "bfloat16" or (self.cpu_amp == "auto" and cpu_has_native_bfloat16()):
                return torch.bfloat16
            return None
        if self._device.type != "cuda" or self.amp is None:
            return None
        if self.amp == "bfloat16" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16

    @property
    def precision(self) -> str:
        """The arithmetic the network runs in on its device: ``"float32"``, ``"bfloat16"`` or ``"float16"``."""
        amp = None if self._onnx is not None else self._amp_dtype()
        return "float32" if amp is None else str(amp).replace("torch.", "")

    @property
    def runtime(self) -> str:
        """What runs the network: ``"onnxruntime"`` (only ever made on the CPU) or ``"torch"``."""
        return "onnxruntime" if self._onnx is not None else "torch"

    def _onnx_network(self, ckpt: Checkpoint, runtime: str):
        """The network in ONNX Runtime (``onnx_runtime.load``) when ``runtime`` asks for it on the CPU, else
        None; a failure of an explicit ``"onnxruntime"`` (or of ``"auto"`` with it installed) is a note."""
        if self._device.type != "cpu" or runtime == "torch" or (runtime == "auto" and not onnx_runtime.installed()):
            return None
        shape = ((self.in_channels, *self.slice_size) if self.dims == 2 else (self.in_channels, *self.patch_size))
        try:
            return onnx_runtime.load(self._net, ckpt.state_dict_sha256, shape)
        except Exception as exc:  # noqa: BLE001 - any export or loading failure leaves the network in PyTorch
            self.notes.append(f"ONNX Runtime could not run {ckpt.model_id!r} ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); it runs in PyTorch")
            return None

    def _net_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._net(x)
        if isinstance(y, (list, tuple)):  # tolerate a deep-supervision list: the first is full resolution
            y = y[0]
        return y.float()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._onnx is not None:
            return self._onnx(x)
        amp = self._amp_dtype()
        if amp is None:
            return self._net_forward(x)
        with torch.autocast(device_type=self._device.type, dtype=amp):
            y = self._net_forward(x)
        if not bool(torch.isfinite(y).all()):
            # Half precision overflowed somewhere in the network: this batch again in float32.
            note = f"half-precision overflow on {self._device.type.upper()}: some batches were recomputed in float32"
            if note not in self.notes:
                self.notes.append(note)
                self.info = dataclasses.replace(self.info, extra={**self.info.extra, "notes": list(self.notes)})
            y = self._net_forward(x)
        return y

    def _probabilities(self, logits: torch.Tensor, all_channels: bool = False) -> torch.Tensor:
        """(N, K, ...) probabilities: the foreground channel (K = 1) or every class (softmax, K = C)."""
        if self.activation == "sigmoid":
            k = self.foreground_channel if logits.shape[1] > 1 else 0
            return torch.sigmoid(logits[:, k:k + 1])
        p = torch.softmax(logits, dim=1)
        return p if all_channels else p[:, self.foreground_channel:self.foreground_channel + 1]

    def _input_tensor(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(1)  # (N, 1, ...)
        if self.in_channels > 1:
            t = t.expand(-1, self.in_channels, *t.shape[2:])
        return t.to(self._device, non_blocking=True)

    # ------------------------------------------------------------------------------------------------------
    def _run_2d(self, hu: np.ndarray, zs: np.ndarray, box_yx: tuple[slice, slice], all_channels: bool,
                sink: Callable[[np.ndarray, np.ndarray], None], progress: Optional[ProgressCallback],
                what: str) -> None:
        """Slice-batched inference: ``sink(z_indices, probs (n, K, h, w) on the box)`` per batch."""
        whole = self.crop != "lung_bbox"
        ys, xs = (slice(None), slice(None)) if whole else box_yx
        n = len(zs)
        bs = self.batch_size
        with torch.inference_mode():
            for start in range(0, n, bs):
                zb = zs[start:start + bs]
                x = np.asarray(hu[zb][:, ys, xs], dtype=np.float32)
                if whole:
                    x, inside = pad_to_square(x)      # whole slices keep their proportions (see its docstring)
                h, w = x.shape[1:]
                x = resize_slices(x, self.slice_size, mode="bilinear")
                x = apply_intensity(x, self.intensity)
                probs = self._probabilities(self._forward(self._input_tensor(x)), all_channels)
                probs = resize_slices(probs, (h, w), mode="bilinear").float().cpu().numpy()
                if whole:
                    sink(zb, probs[..., inside[0], inside[1]][..., box_yx[0], box_yx[1]])
                else:
                    sink(zb, probs)
                report(progress, (start + len(zb)) / n, f"{what}: slices {start + len(zb)}/{n}")

    def _run_3d(self, hu: np.ndarray, box: tuple[slice, ...], spacing: Sequence[float], all_channels: bool,
                progress: Optional[ProgressCallback], what: str) -> np.ndarray:
        """Sliding-window inference on ``hu[box]``; returns probabilities (K, *box shape) float32."""
        with torch.inference_mode():
            probs = sliding_window_3d(
                np.asarray(hu[box], dtype=np.float32),
                lambda patch: self._probabilities(self._forward(patch), all_channels).float(),
                patch_size=self.patch_size, overlap=self.overlap, batch_size=self.batch_size, spacing=spacing,
                target_spacing=self.spacing_zyx,
                # the intensity transform runs on the resampled grid (the smaller one for fine CT)
                prepare=lambda x: self._input_tensor(apply_intensity(x, self.intensity)[None]),
                progress=progress, what=what)
            return probs.clamp_(0.0, 1.0).cpu().numpy()

    # ------------------------------------------------------------------------------------------------------
    # -- the CUDA out-of-memory fallback: the one place that handles it (the worker, the CLI, batch.py and the
    # in-process Slicer logic all run networks through this class) ---------------------------------------------
    @property
    def fell_back_to_cpu(self) -> bool:
        """True once CUDA ran out of memory and the model moved to the CPU (reports say so)."""
        return self._fell_back

    def _build_net(self, ckpt: Checkpoint, model_id: str) -> torch.nn.Module:
        try:
            return ckpt.build(self._device)
        except Exception as exc:  # noqa: BLE001 - only CUDA's out-of-memory errors are handled
            if self._device.type != "cuda" or not is_cuda_out_of_memory(exc):
                raise
        # Outside the except block: the failed attempt's tensors are freed with its traceback.
        self._move_to_cpu(None, model_id)
        return ckpt.build(self._device)

    def _with_cpu_fallback(self, run: Callable[[], np.ndarray], volume: CTVolume) -> np.ndarray:
        try:
            return run()
        except Exception as exc:  # noqa: BLE001 - only CUDA's out-of-memory errors are handled
            if self._device.type != "cuda" or not is_cuda_out_of_memory(exc):
                raise
        self._fall_back_to_cpu(volume)
        return run()

    def _move_to_cpu(self, volume: CTVolume | None, model_id: str) -> str:
        msg = (f"CUDA ran out of memory running model {model_id!r}; it was moved to the CPU and "
               "this and later cases run there (slower). Free GPU memory or lower batch_size to use the GPU")
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        self._device = torch.device("cpu")
        self._fell_back = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.notes.append(msg)
        if volume is not None:
            volume.notes.append(msg)
        if self.on_fallback is not None:
            self.on_fallback(msg)
        return msg

    def _fall_back_to_cpu(self, volume: CTVolume | None) -> None:
        self._net.to("cpu")
        self._move_to_cpu(volume, self.info.model_id)
        self.info = dataclasses.replace(self.info, device="cpu", extra={**self.info.extra, "notes": list(self.notes),
                                                                         "precision": self.precision})


class NetworkInfectionModel(NetworkModel):
    """An infection network: ``predict(volume, lungs, progress) -> float32 (z, y, x)`` in [0, 1], or with
    ``output="mask"`` the bool mask those probabilities give at the threshold (after the post-processing).

    (On scans of thin slices the pipeline gives it slabs of about 1.25 mm: ``thin_slices.py``.)
    """

    def predict(self, volume: CTVolume, lungs: np.ndarray,
                progress: Optional[ProgressCallback] = None) -> np.ndarray:
        lungs = np.asarray(lungs)
        if lungs.shape != volume.shape:
            raise ValueError(f"lung mask shape {lungs.shape} does not match the volume {volume.shape}")
        progress = progress if progress is not None else self._progress
        hu_mask = needed = None
        if self.postprocess.confirm_hu_threshold:
            # The Hounsfield-band mask first: the network's output matters only on the slices near it
            # (InfectionPostprocess.slices_that_matter), so only those are run; the kept mask is the same.
            hu_mask = segment_infection_hu(volume.hu, lungs, volume.spacing_zyx)
            needed = self.postprocess.slices_that_matter(hu_mask, volume.spacing_zyx)
        as_mask = self.output == "mask"
        out = self._with_cpu_fallback(lambda: self._predict(volume, lungs > 0, progress, needed, as_mask), volume)
        if self.postprocess.is_identity:
            return out
        # The checkpoint's post-processing (postprocess.py) decides which voxels are infection.
        network_mask = out if as_mask else out >= self.threshold
        np.logical_and(network_mask, lungs, out=network_mask)
        kept = self.postprocess.apply(network_mask, volume.hu, volume.spacing_zyx, lungs, hu_mask=hu_mask)
        if as_mask:
            return kept
        # Dropped voxels get probability 0 and kept ones at least the threshold (confirm_hu_threshold keeps
        # Hounsfield-band voxels the network scored lower), so the pipeline's threshold gives exactly the kept
        # mask and the probabilities stay the network's wherever they agree with it.
        out[~kept & (out >= self.threshold)] = 0.0
        # Raised to the threshold on the kept voxels only (a full-size np.where was 155 MB more on P001).
        out[kept] = np.maximum(out[kept], np.float32(self.threshold))
        return out

    def _predict(self, volume: CTVolume, mask: np.ndarray, progress: Optional[ProgressCallback],
                 needed: Optional[np.ndarray] = None, as_mask: bool = False) -> np.ndarray:
        """Probabilities on the grid (with ``as_mask`` the bool ``probabilities >= threshold``, thresholded
        slice by slice); ``needed`` (bool per axial slice, 2D networks) limits the slices computed (others
        stay 0), each computed exactly as without it."""
        what = f"{self.info.model_id} ({self._device.type})"
        margin = margin_voxels(self.margin_mm, volume.spacing_zyx)
        box = bounding_box(mask, margin)
        out = np.zeros(volume.shape, dtype=bool if as_mask else np.float32)
        if box is None:
            report(progress, 1.0, f"{what}: no lung voxels, nothing to run")
            return out
        threshold = np.float32(self.threshold)

        def store(z: int, probs: np.ndarray) -> None:   # one slice's probabilities on the box
            np.clip(probs, 0.0, 1.0, out=probs)
            out[z, box[1], box[2]] = probs >= threshold if as_mask else probs

        hu = volume.hu
        if self.dims == 2:
            zs = np.flatnonzero(mask.any(axis=(1, 2)))
            step = self.slice_step
            run = zs if step == 1 else np.unique(np.append(zs[::step], zs[-1]))
            wanted = zs if needed is None else zs[np.asarray(needed, dtype=bool)[zs]]
            skipped = np.setdiff1d(wanted, run)   # fast mode: wanted slices between two that are run
            if needed is not None:
                # The run slices that are wanted themselves or bracket a wanted skipped one (zs[0] and zs[-1]
                # are always run, so every skipped slice has both).
                k = np.searchsorted(run, skipped)
                run = np.union1d(np.intersect1d(wanted, run), np.union1d(run[k - 1], run[k])).astype(zs.dtype)
            if run.size == 0:
                report(progress, 1.0, f"{what}: no slice needs the network")
                return out
            # Batches come in increasing z: a skipped slice is interpolated as soon as the run slice above it
            # arrives, from the one below (kept from the batch before when needed), then stored.
            below_z: int | None = None
            below_probs: np.ndarray | None = None

            def sink(zb: np.ndarray, probs: np.ndarray) -> None:
                nonlocal below_z, below_probs
                for z, p in zip(zb, probs[:, 0]):
                    if below_z is not None:
                        lo, hi = np.searchsorted(skipped, [below_z, z])
                        for s in skipped[lo:hi]:
                            w = np.float32((s - below_z) / (z - below_z))
                            store(int(s), (1 - w) * below_probs + w * p)
                    below_z, below_probs = int(z), p.copy()
                    store(int(z), p)

            self._run_2d(hu, run, (box[1], box[2]), False, sink, progress, what)
        else:
            probs = self._run_3d(hu, box, volume.spacing_zyx, False, progress, what)[0]
            np.clip(probs, 0.0, 1.0, out=probs)
            out[box] = probs >= threshold if as_mask else probs
        return out


class NetworkLungModel(NetworkModel):
    """A lung network: ``segment(volume, progress) -> uint8 (z, y, x)``, 0 background, 1 right, 2 left.

    A softmax network with three or more classes is read by argmax; its classes map to the engine's
    labels by name ("right..." -> 1, "left..." -> 2; otherwise channel 1 -> 1 and 2 -> 2, other channels
    background). A binary network (sigmoid, or 2-class softmax) gives one lung mask at ``output.threshold``
    that ``lungs.split_right_left`` (the HU lung model's own rule) splits into the two sides.
    """

    @property
    def multiclass(self) -> bool:
        return self.activation == "softmax" and len(self.labels) >= 3

    def _class_lut(self, n_channels: int) -> np.ndarray:
        lut = np.zeros(max(n_channels, len(self.labels)), dtype=np.uint8)
        named = False
        for key, name in self.labels.items():
            lname = name.lower()
            if "right" in lname:
                lut[int(key)] = 1
                named = True
            elif "left" in lname:
                lut[int(key)] = 2
                named = True
        if not named:
            lut[1:3] = [1, 2]
        return lut

    def segment(self, volume: CTVolume, progress: Optional[ProgressCallback] = None) -> np.ndarray:
        progress = progress if progress is not None else self._progress
        return self._with_cpu_fallback(lambda: self._segment(volume, progress), volume)

    def _segment(self, volume: CTVolume, progress: Optional[ProgressCallback]) -> np.ndarray:
        what = f"{self.info.model_id} ({self._device.type})"
        hu = volume.hu
        out = np.zeros(volume.shape, dtype=np.uint8)
        # Body voxels (a bool volume, 1 byte per voxel) give the slices and the box to run.
        body = hu > BODY_HU
        box = bounding_box(body, margin_voxels(self.margin_mm, volume.spacing_zyx))
        if box is None:
            report(progress, 1.0, f"{what}: no body voxels, nothing to run")
            return out
        multiclass = self.multiclass
        lut = self._class_lut(len(self.labels)) if multiclass else None
        if self.dims == 2:
            zs = np.flatnonzero(body.any(axis=(1, 2)))
            del body

            def sink(zb: np.ndarray, probs: np.ndarray) -> None:
                if multiclass:
                    out[zb, box[1], box[2]] = lut[np.argmax(probs, axis=1)]
                else:
                    out[zb, box[1], box[2]] = probs[:, 0] > self.threshold

            self._run_2d(hu, zs, (box[1], box[2]), multiclass, sink, progress, what)
        else:
            del body
            probs = self._run_3d(hu, box, volume.spacing_zyx, multiclass, progress, what)
            out[box] = lut[np.argmax(probs, axis=0)] if multiclass else probs[0] > self.threshold
            del probs
        if multiclass:
            return out
        right, left = split_right_left(out, volume.spacing_zyx)
        out[right] = 1
        out[left] = 2
        return out


def _as_checkpoint(checkpoint: str | os.PathLike | Checkpoint, expected_sha256: str | None = None) -> Checkpoint:
    if isinstance(checkpoint, Checkpoint):
        if expected_sha256 is not None:
            raise ValueError("expected_sha256 applies to checkpoint files; pass a path to verify it")
        return checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        return load_checkpoint(checkpoint, expected_sha256=expected_sha256)
    raise TypeError(f"expected a checkpoint path or Checkpoint, got {type(checkpoint).__name__}")


__all__ = ["NetworkModel", "NetworkInfectionModel", "NetworkLungModel", "DeviceError", "resolve_device",
           "sliding_window_3d"]
