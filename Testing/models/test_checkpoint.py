"""The checkpoint format (models/checkpoint.py): round trips, half storage, verification and error messages."""

from __future__ import annotations

import os
import zipfile

import pytest
import torch
from torch import nn

from COVIDLesionSegLib.models import registry
from COVIDLesionSegLib.models.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    file_sha256,
    load_checkpoint,
    metadata_sha256,
    save_checkpoint,
    state_dict_sha256,
)

ARCH = "test-ckpt-tiny2d"


def _tiny2d(in_channels: int = 1, out_channels: int = 1, width: int = 6) -> nn.Module:
    # BatchNorm gives float buffers and an int64 buffer (num_batches_tracked) to round-trip as well.
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, out_channels, 1))


@pytest.fixture(scope="module", autouse=True)
def tiny_arch():
    registry.architectures()  # load the real ones first so _load_all cannot interfere later
    registry.register(ARCH, dims=(2,), paper="test", summary="test-only tiny 2D net",
                      tiny_args={"width": 6})(_tiny2d)
    yield ARCH
    del registry._ARCHITECTURES[ARCH]


def _trained_like(width: int = 6) -> nn.Module:
    torch.manual_seed(0)
    net = _tiny2d(width=width)
    # Non-trivial running statistics, as after training.
    net.train()
    with torch.no_grad():
        net(torch.randn(4, 1, 16, 16))
    return net.eval()


META = dict(
    model_config={"arch": ARCH, "args": {"width": 6}},
    input_spec={"dims": 2, "in_channels": 1, "intensity": {"name": "hu_window_01", "lo": -1250.0, "hi": 250.0},
                "slice_size": [64, 64], "orientation": "LPS"},
    labels={"0": "background", "1": "infection"},
    output={"activation": "sigmoid", "foreground_channel": 0, "threshold": 0.4},
    task="infection", model_id="tiny-test", version="1.2", description="test model",
    provenance={"data": "synthetic", "protocol": "none", "epochs": 3, "metrics": {"dsc": 0.5, "nsd": 0.25}},
)


def _save(path, net=None, **overrides):
    kwargs = dict(META)
    kwargs.update(overrides)
    return save_checkpoint(path, net if net is not None else _trained_like(), **kwargs)


def _resave_raw(path, edit):
    """Load the raw dict (as an attacker or a careless script would), edit it, write it back."""
    raw = torch.load(path, weights_only=True)
    edit(raw)
    torch.save(raw, path)


# ------------------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------------------

def test_round_trip_is_bit_exact_and_plain(tmp_path):
    net = _trained_like()
    path = tmp_path / "m.pt"
    digest = _save(path, net)
    assert digest == file_sha256(path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"], "the temporary file must be renamed away"

    raw = torch.load(path, weights_only=True)  # plain data only: no pickled classes
    assert raw["format"] == FORMAT and raw["format_version"] == FORMAT_VERSION
    assert set(raw) >= {"model", "input", "labels", "output", "task", "model_id", "version", "description",
                        "provenance", "state_dict", "state_dict_sha256"}

    ckpt = load_checkpoint(path)
    original = net.state_dict()
    assert set(ckpt.state_dict) == set(original)
    for name, tensor in original.items():
        assert ckpt.state_dict[name].dtype == tensor.dtype, name
        assert torch.equal(ckpt.state_dict[name], tensor), name
    assert ckpt.model_config == META["model_config"]
    assert ckpt.input_spec == META["input_spec"]
    assert ckpt.labels == META["labels"] and ckpt.output == META["output"]
    assert (ckpt.task, ckpt.model_id, ckpt.version, ckpt.description) == ("infection", "tiny-test", "1.2", "test model")
    for key, value in META["provenance"].items():
        assert ckpt.provenance[key] == value
    assert ckpt.provenance["software"]["torch"] == str(torch.__version__)
    assert ckpt.provenance["created"]
    assert ckpt.state_dict_sha256 == state_dict_sha256(original)

    rebuilt = ckpt.build()
    assert not rebuilt.training
    x = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))


def test_half_storage_is_smaller_and_loads_as_float32(tmp_path):
    net = _trained_like(width=32)
    full, half = tmp_path / "full.pt", tmp_path / "half.pt"
    _save(full, net, model_config={"arch": ARCH, "args": {"width": 32}})
    _save(half, net, model_config={"arch": ARCH, "args": {"width": 32}}, half=True)
    float_bytes = sum(t.numel() * t.element_size() for t in net.state_dict().values() if t.is_floating_point())
    # float32 -> float16 halves the tensor bytes; the rest of the file (metadata, zip headers) is unchanged.
    assert os.path.getsize(full) - os.path.getsize(half) >= 0.45 * float_bytes
    stored = torch.load(half, weights_only=True)["state_dict"]
    assert stored["0.weight"].dtype == torch.float16

    ckpt = load_checkpoint(half)
    assert ckpt.storage["float_dtype"] == "float16"
    for name, tensor in net.state_dict().items():
        got = ckpt.state_dict[name]
        if tensor.is_floating_point():
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, tensor, rtol=1e-3, atol=1e-4)
        else:
            assert torch.equal(got, tensor)


def test_edit_through_api_keeps_file_valid(tmp_path):
    path = tmp_path / "m.pt"
    _save(path)
    ckpt = load_checkpoint(path)
    ckpt.provenance["metrics"] = {"dsc": 0.7}
    ckpt.save(path)
    again = load_checkpoint(path)
    assert again.provenance["metrics"] == {"dsc": 0.7}
    assert again.state_dict_sha256 == ckpt.state_dict_sha256


def test_expected_file_sha256(tmp_path):
    path = tmp_path / "m.pt"
    digest = _save(path)
    assert load_checkpoint(path, expected_sha256=digest.upper()).file_sha256 == digest
    with pytest.raises(CheckpointError, match="manifest expects"):
        load_checkpoint(path, expected_sha256="0" * 64)


# ------------------------------------------------------------------------------------------------------------
# Tampering and damaged files
# ------------------------------------------------------------------------------------------------------------

def test_modified_weights_are_refused(tmp_path):
    path = tmp_path / "m.pt"
    _save(path)

    def edit(raw):
        raw["state_dict"]["0.weight"][0, 0, 0, 0] += 1.0

    _resave_raw(path, edit)
    with pytest.raises(CheckpointError, match="state_dict_sha256"):
        load_checkpoint(path)


def test_flipped_bytes_in_tensor_data_are_refused(tmp_path):
    path = tmp_path / "m.pt"
    net = _trained_like()
    _save(path, net)
    data = bytearray(path.read_bytes())
    needle = net.state_dict()["3.weight"].numpy().tobytes()
    at = data.find(needle)
    assert at > 0, "tensor bytes are stored uncompressed in the zip"
    data[at + 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt|modified"):
        load_checkpoint(path)


def test_edited_metadata_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    _save(path)

    def edit(raw):
        raw["output"]["threshold"] = 0.05

    _resave_raw(path, edit)
    with pytest.raises(CheckpointError, match="metadata"):
        load_checkpoint(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "m.pt"
    _save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_empty_file(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_bare_state_dict(tmp_path):
    path = tmp_path / "sd.pt"
    state = _trained_like().state_dict()
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=f"bare state dict of {len(state)} tensors") as info:
        load_checkpoint(path)
    assert "save_checkpoint" in str(info.value)


def test_foreign_training_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": _trained_like().state_dict(), "epoch": 12, "optimizer": {}}, path)
    with pytest.raises(CheckpointError, match="another project's training checkpoint") as info:
        load_checkpoint(path)
    assert "'epoch'" in str(info.value)


def test_pickled_module_is_not_unpickled(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(_trained_like(), path)  # a whole pickled nn.Module
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path)


def test_other_format_header(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"format": "someone-else", "weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="'someone-else'"):
        load_checkpoint(path)


def _resave_with_valid_hash(path, edit):
    def full_edit(raw):
        edit(raw)
        raw["metadata_sha256"] = metadata_sha256(raw)

    _resave_raw(path, full_edit)


def test_newer_format_version(tmp_path):
    path = tmp_path / "m.pt"
    _save(path)
    _resave_with_valid_hash(path, lambda raw: raw.__setitem__("format_version", FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match=rf"format_version {FORMAT_VERSION + 1}.*Update COVIDLesionSeg"):
        load_checkpoint(path)


def test_unknown_architecture(tmp_path):
    path = tmp_path / "m.pt"
    _save(path)
    _resave_with_valid_hash(path, lambda raw: raw["model"].__setitem__("arch", "no-such-net"))
    with pytest.raises(CheckpointError, match="unknown architecture 'no-such-net'") as info:
        load_checkpoint(path)
    assert ARCH in str(info.value), "the message lists the known architectures"


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    path = tmp_path / "m.pt"
    wide = _trained_like(width=8)
    # verify_architecture=False lets a buggy script write it; loading must still refuse it.
    _save(path, wide, verify_architecture=False)
    with pytest.raises(CheckpointError, match=r"do not fit architecture.*0\.weight expects \(6, 1, 3, 3\)"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        _save(tmp_path / "n.pt", wide)
    extra = dict(_trained_like().state_dict())
    extra["extra.bias"] = torch.zeros(3)
    del extra["3.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys: 3\.bias.*unexpected keys: extra\.bias"):
        _save(tmp_path / "o.pt", extra)


@pytest.mark.parametrize("overrides, message", [
    ({"task": "tumour"}, "task must be one of"),
    ({"input_spec": {**META["input_spec"], "intensity": {"name": "magic"}}}, "unknown intensity transform 'magic'"),
    ({"input_spec": {**META["input_spec"], "intensity": {"name": "mu_sigma", "mean": 3}}}, "bad parameters"),
    ({"input_spec": {**META["input_spec"], "dims": 4}}, "input.dims"),
    ({"input_spec": {k: v for k, v in META["input_spec"].items() if k != "slice_size"}}, "slice_size"),
    ({"input_spec": {**META["input_spec"], "dims": 3}}, "spacing_zyx"),
    ({"output": {"activation": "relu"}}, "output.activation"),
    ({"labels": {"background": "0"}}, "'labels' must map"),
    ({"provenance": {"weird": object()}}, "only str, int, float"),
    ({"model_config": {"arch": "no-such-net", "args": {}}}, "unknown architecture"),
])
def test_invalid_metadata_is_refused_on_save(tmp_path, overrides, message):
    with pytest.raises(CheckpointError, match=message):
        _save(tmp_path / "m.pt", **overrides)
    assert not any(tmp_path.iterdir()), "nothing is written when saving fails"


def test_atomic_overwrite_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    _save(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(path, description="new")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_checkpoint_zip_is_standard(tmp_path):
    path = tmp_path / "m.pt"
    _save(path)
    assert zipfile.is_zipfile(path)


# ------------------------------------------------------------------------------------------------------------
# Every registered architecture (skips until the networks land)
# ------------------------------------------------------------------------------------------------------------

_REAL = sorted(a for a in registry.architectures() if not a.startswith("test-"))


@pytest.mark.parametrize("arch_id", _REAL or [pytest.param(None, marks=pytest.mark.skip(
    reason="no architectures registered yet (models/_load_all.py is empty)"))])
def test_registered_architecture_round_trip(tmp_path, arch_id):
    arch = registry.architectures()[arch_id]
    config = {"arch": arch_id, "args": dict(arch.tiny_args)}
    torch.manual_seed(0)
    net = registry.build(config)
    dims = arch.dims[0]
    spec = {"dims": dims, "in_channels": 1, "intensity": {"name": "mu_sigma", "mu": -500.0, "sigma": 500.0}}
    spec.update({"slice_size": [64, 64]} if dims == 2 else {"spacing_zyx": [2.0, 1.0, 1.0], "patch_size": [16, 64, 64]})
    path = tmp_path / f"{arch_id}.pt"
    save_checkpoint(path, net, model_config=config, input_spec=spec, labels={"0": "background", "1": "infection"},
                    output={"activation": "sigmoid"}, task="infection", model_id=arch_id, version="0")
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, Checkpoint)
    original = net.state_dict()
    assert set(ckpt.state_dict) == set(original)
    for name, tensor in original.items():
        assert torch.equal(ckpt.state_dict[name], tensor), name
    rebuilt = ckpt.build()
    assert not rebuilt.training
    for name, tensor in rebuilt.state_dict().items():
        assert torch.equal(tensor, original[name]), name
