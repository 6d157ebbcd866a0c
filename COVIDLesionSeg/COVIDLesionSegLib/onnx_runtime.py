"""A network on the CPU through ONNX Runtime: optional and opt-in (``pip install "covidlesionseg[onnx]"``,
``COVIDLESIONSEG_RUNTIME=onnxruntime``), float32.

Why it exists: on a loaded 2-core CPU the default 2D nnU-Net on a batch of 16 slices took 0.79 s in ONNX
Runtime against 1.89 s in PyTorch bfloat16 and 2.37 s in PyTorch float32 (medians of 5, same process, 2
threads), with float32 arithmetic (logits within 3e-4 of PyTorch's float32; on P001 and normal001 the kept
masks equal float32's, where bfloat16 changes 121 voxels: ``runs/bench_precision_round9.json``). Why it is not
the default: side by side on the idle machine the whole pipeline on P001 took 17.1 s with it against 18.0 s
with PyTorch bfloat16 (1.05x) and peaked 290 MB higher (1285 against 992 MB; the 512 x 512 x 1000 scan 2280 MB,
over issue 14's 2 GB), ``runs/bench_round9_onnx.json``.

How: the network is exported once (``torch.onnx.export``, the TorchScript exporter, a dynamic batch axis) to
:func:`cache_folder`, named by its weights' sha256 and the torch version, so every later process only loads
the file (exporting takes seconds, loading a few milliseconds); the file is written atomically, so two
processes exporting at once leave one complete file. Anything that fails (the packages missing, an
operation the exporter does not know, a damaged cached file) leaves the network in PyTorch:
:class:`OnnxNetwork` is only made when :func:`load` succeeds, and the caller says so in the model's notes.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

#: ``NetworkModel(runtime=...)`` choices; ``auto`` is ONNX Runtime on the CPU when it is installed.
RUNTIMES = ("auto", "torch", "onnxruntime")
#: The runtime the catalogue loads the pipeline's networks with: PyTorch unless ``COVIDLESIONSEG_RUNTIME`` says
#: ``onnxruntime`` (or ``auto``) for every entry point (the module docstring says why PyTorch).
DEFAULT_RUNTIME = os.environ.get("COVIDLESIONSEG_RUNTIME", "torch")


def installed() -> bool:
    """Whether ONNX Runtime and the ONNX package (the exporter writes through it) are importable."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def cache_folder() -> Path:
    """Exported networks: beside the downloaded models (``catalogue.cache_dir()``), in ``onnx/``."""
    from .catalogue import cache_dir

    return cache_dir() / "onnx"


class _FirstOutput(torch.nn.Module):
    """The network's full-resolution output only (a deep-supervision list is not exported)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y[0] if isinstance(y, (list, tuple)) else y


class OnnxNetwork:
    """``network(x) -> float32 logits`` (torch tensors on the CPU, as the PyTorch network's)."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        self.path = path
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self._session.run(None, {self._input: array})[0])


def export_path(weights_sha256: str, input_shape: Sequence[int]) -> Path:
    shape = "x".join(str(int(n)) for n in input_shape)
    version = torch.__version__.split("+")[0]
    return cache_folder() / f"{weights_sha256[:24]}-{shape}-torch{version}.onnx"


def load(net: torch.nn.Module, weights_sha256: str, input_shape: Sequence[int],
         threads: Optional[int] = None) -> OnnxNetwork:
    """The network (in eval mode, on the CPU) in ONNX Runtime, exported first unless its file is cached.
    ``input_shape``: one input without the batch axis, ``(channels, *spatial)``. Raises on any failure."""
    if not installed():
        raise RuntimeError('ONNX Runtime is not installed (pip install "covidlesionseg[onnx]")')
    path = export_path(weights_sha256, input_shape)
    threads = torch.get_num_threads() if threads is None else threads
    if path.is_file():
        try:
            return OnnxNetwork(path, threads)
        except Exception:  # noqa: BLE001 - a damaged or foreign cached file: export it again
            pass
    from .outputs import atomic_write

    example = torch.zeros((1, *[int(n) for n in input_shape]), dtype=torch.float32)
    wrapped = _FirstOutput(net).eval()

    def write(tmp: Path) -> None:
        # The tracer's warnings (shape checks traced as constants, instance norm "in training mode", which is
        # what instance norm always is) are about tracing, not the user's case: not shown.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (example,), str(tmp), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return OnnxNetwork(path, threads)
