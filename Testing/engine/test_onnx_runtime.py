"""ONNX Runtime for networks on the CPU (onnx_runtime.py): the same probabilities as PyTorch's float32, one export
per network and torch version (cached, replaced when damaged), and PyTorch whenever it cannot run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from COVIDLesionSegLib import catalogue, onnx_runtime
from COVIDLesionSegLib.network_predictor import NetworkModel
from COVIDLesionSegLib.phantom import make_chest_phantom
from COVIDLesionSegLib.pipeline import _model_record
from COVIDLesionSegLib.volume import CTVolume
from Testing.engine.helpers import _checkpoint, _linear

pytest.importorskip("onnxruntime", reason="ONNX Runtime is optional (the onnx extra; the dev extra has it)")
pytest.importorskip("onnx", reason="ONNX Runtime is optional (the onnx extra; the dev extra has it)")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch, test_archs):
    """Exports go to this test's own model cache, not the user's; the test-only networks are registered
    (Testing/conftest.py)."""
    monkeypatch.setenv("COVIDLESIONSEG_MODEL_DIR", str(tmp_path / "cache"))


def _exports(tmp_path):
    return sorted((tmp_path / "cache" / "onnx").glob("*.onnx"))


def test_the_default_network_in_onnx_runtime_gives_pytorch_s_float32_probabilities(tmp_path):
    entry = catalogue.get_entry(catalogue.default_model_id("infection"))
    if entry.source == "built-in" or not entry.available:
        pytest.skip("the default infection model is not a shipped network here")
    image, _ = make_chest_phantom()
    volume = CTVolume.from_image(image)
    lungs = catalogue.load_model("hu-lungs", "lungs").segment(volume)
    exact = NetworkModel(entry.path, device="cpu", runtime="torch", cpu_amp=None)
    onnx = NetworkModel(entry.path, device="cpu", runtime="onnxruntime")
    assert onnx.runtime == "onnxruntime" and onnx.precision == "float32" and onnx.notes == []
    assert _model_record(onnx)["runtime"] == "onnxruntime" and _model_record(exact)["runtime"] == "torch"
    assert len(_exports(tmp_path)) == 1 and exact.runtime == "torch"
    p_torch = exact._predict(volume, lungs > 0, None)
    p_onnx = onnx._predict(volume, lungs > 0, None)
    assert (p_torch >= exact.threshold).sum() > 100
    assert np.abs(p_onnx - p_torch).max() < 1e-3
    flipped = ((p_onnx >= onnx.threshold) ^ (p_torch >= exact.threshold)).sum()
    assert flipped <= 1e-3 * (p_torch >= exact.threshold).sum()


def test_the_export_is_reused_and_a_damaged_one_exported_again(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path, "test-pred-linear2d", _linear(2), 2)
    first = NetworkModel(path, device="cpu", runtime="onnxruntime")
    x = torch.linspace(-1000, 200, 2 * 32 * 32).reshape(2, 1, *first.slice_size)
    expected = NetworkModel(path, device="cpu", runtime="torch", cpu_amp=None)._forward(x)
    torch.testing.assert_close(first._forward(x), expected, atol=1e-4, rtol=1e-5)
    (exported,) = _exports(tmp_path)
    stamp = exported.stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    with monkeypatch.context() as m:
        m.setattr(torch.onnx, "export", no_export)
        again = NetworkModel(path, device="cpu", runtime="onnxruntime")   # loads the cached file
    assert again.runtime == "onnxruntime" and exported.stat().st_mtime_ns == stamp
    size = exported.stat().st_size
    exported.write_bytes(exported.read_bytes()[: size // 3])              # a truncated file
    repaired = NetworkModel(path, device="cpu", runtime="onnxruntime")
    assert repaired.runtime == "onnxruntime" and exported.stat().st_size == size
    torch.testing.assert_close(repaired._forward(x), expected, atol=1e-4, rtol=1e-5)


def test_pytorch_runs_where_onnx_runtime_cannot(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path, "test-pred-linear2d", _linear(2), 2)
    with pytest.raises(ValueError, match="runtime"):
        NetworkModel(path, device="cpu", runtime="tvm")
    assert NetworkModel(path, device="cpu").runtime == "torch"             # the class's default
    with monkeypatch.context() as m:
        m.setattr(onnx_runtime, "installed", lambda: False)
        auto = NetworkModel(path, device="cpu", runtime="auto")
    assert auto.runtime == "torch" and auto.notes == []                    # not installed: PyTorch, quietly

    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::magic' to ONNX is not supported")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    model = NetworkModel(path, device="cpu", runtime="onnxruntime")
    assert model.runtime == "torch" and len(model.notes) == 1
    assert "ONNX Runtime could not run" in model.notes[0] and "aten::magic" in model.notes[0]
    assert _exports(tmp_path) == []                                        # nothing half-written is left
