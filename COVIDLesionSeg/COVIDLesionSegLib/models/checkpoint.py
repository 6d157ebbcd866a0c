"""The one self-describing checkpoint format of every COVIDLesionSeg model.

A checkpoint is a single file written by ``torch.save`` of a plain dict. It holds only tensors, ``str``,
``int``, ``float``, ``bool``, ``None``, lists and dicts (no pickled classes), so it loads with
``torch.load(path, weights_only=True)``: opening a checkpoint never runs code from the file.

Format (``format_version`` 1)::

    {
      "format": "covidlesionseg-checkpoint",
      "format_version": 1,
      "model":  {"arch": "<registry id>", "args": {...builder keywords...}},
      "input":  {"dims": 2 | 3,
                 "in_channels": 1,                       # a 1-channel CT slice is repeated when > 1
                 "intensity": {"name": "ct_zscore" | "hu_window_01" | "mu_sigma" | "ctseg2d_domain", ...params},
                 "slice_size": [h, w]                    # 2D: slices are resized to this
                 "spacing_zyx": [sz, sy, sx]             # 3D: volumes are resampled to this (mm)
                 "patch_size": [d, h, w] | [h, w],       # 3D: sliding-window size (2D: optional)
                 "orientation": "LPS",                   # canonical array orientation the model expects
                 "crop": "none" | "lung_bbox"},          # optional, 2D: in-plane crop before resizing
      "labels": {"0": "background", "1": "infection"},   # output channel index (as str) -> name
      "output": {"activation": "sigmoid" | "softmax", "foreground_channel": k, "threshold": 0.5,
                 "postprocess": {"min_component_ml": .., "min_hu": .., "max_hu": ..}},  # optional (postprocess.py)
      "task": "infection" | "lungs",
      "model_id": "...", "version": "...", "description": "...",
      "provenance": {"data": ..., "protocol": ..., "epochs": ..., "metrics": {...held-out...},
                     "created": ISO-8601 UTC, "software": {"covidlesionseg", "torch", "monai", "python"}},
      "storage": {"float_dtype": "float32" | "float16"},  # float16: shipped weights, loaded as float32
      "state_dict": {name: tensor},
      "state_dict_sha256": hex,                          # canonical hash of the tensors (below)
      "metadata_sha256": hex                             # canonical hash of every other field
    }

``state_dict_sha256`` hashes, for each tensor in sorted name order, its name, dtype, shape and raw bytes,
so it does not depend on how ``torch.save`` laid out the zip file. ``metadata_sha256`` hashes the
canonical JSON (sorted keys) of all fields except the state dict and the two hashes; together they make a
file edited by hand (a changed threshold, architecture argument or weight) fail to load with a message
saying which part changed. The model manifest may in addition pin the sha256 of the whole *file*
(:func:`file_sha256`), checked by :func:`load_checkpoint` when given ``expected_sha256``.

Every problem on loading raises :class:`CheckpointError` with a message saying what was found and what
to do: missing file, not a PyTorch file, truncated or corrupted file, a foreign file (a bare state dict,
another project's checkpoint), a newer ``format_version``, an unknown architecture, tensors or metadata
that do not match their hashes, and a state dict that does not fit the architecture (naming the keys).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import platform
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError
from ..outputs import atomic_write
from ..postprocess import InfectionPostprocess

FORMAT = "covidlesionseg-checkpoint"
FORMAT_VERSION = 1
TASKS = ("infection", "lungs")
ACTIVATIONS = ("sigmoid", "softmax")

_METADATA_FIELDS = ("format", "format_version", "model", "input", "labels", "output", "task", "model_id",
                    "version", "description", "provenance", "storage")
_REQUIRED_FIELDS = _METADATA_FIELDS + ("state_dict", "state_dict_sha256", "metadata_sha256")


# ----------------------------------------------------------------------------------------------------------
# Hashes
# ----------------------------------------------------------------------------------------------------------

def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (the value the model manifest pins)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Canonical hash of tensors: sorted names, each contributing name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{str(t.dtype)}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def metadata_sha256(payload: Mapping[str, Any]) -> str:
    """Canonical hash of a checkpoint's metadata (every field but the state dict and the hashes)."""
    return hashlib.sha256(_canonical_json({k: payload.get(k) for k in _METADATA_FIELDS})).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Plain-data validation
# ----------------------------------------------------------------------------------------------------------

def _plain(value: Any, where: str) -> Any:
    """Deep copy of ``value`` as plain data (tuples become lists); raise for anything torch would pickle."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)  # str subclasses (e.g. torch.__version__) would be pickled as classes
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalars
        return _plain(value.item(), where)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"checkpoint metadata {where}: keys must be strings, got {k!r}")
            out[str(k)] = _plain(v, f"{where}.{k}")
        return out
    raise CheckpointError(f"checkpoint metadata {where} is a {type(value).__name__}; only str, int, float, bool, "
                          "None, lists and dicts can be stored (the file must load with weights_only=True)")


def _validate_metadata(meta: dict[str, Any]) -> None:  # noqa: C901 (one flat list of field checks)
    """Check the fields the predictor relies on; raises CheckpointError naming the field."""
    from ..preprocessing import validate_intensity_spec

    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"invalid checkpoint metadata: {msg}")

    model = meta["model"]
    if not isinstance(model, dict) or not isinstance(model.get("arch"), str):
        raise bad(f"'model' must be {{'arch': id, 'args': {{...}}}}, got {model!r}")
    if not isinstance(model.get("args", {}), dict):
        raise bad("'model.args' must be a dict of builder keywords")
    inp = meta["input"]
    if not isinstance(inp, dict):
        raise bad("'input' must be a dict")
    dims = inp.get("dims")
    if dims not in (2, 3):
        raise bad(f"input.dims must be 2 or 3, got {dims!r}")
    if not isinstance(inp.get("in_channels"), int) or inp["in_channels"] < 1:
        raise bad(f"input.in_channels must be a positive int, got {inp.get('in_channels')!r}")
    try:
        validate_intensity_spec(inp.get("intensity"))
    except ValueError as exc:
        raise bad(f"input.intensity: {exc}") from None
    if dims == 2:
        size = inp.get("slice_size")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
            raise bad(f"2D input needs input.slice_size = [h, w] (positive ints), got {size!r}")
        if inp.get("crop", "none") not in ("none", "lung_bbox"):
            raise bad(f"input.crop must be 'none' or 'lung_bbox', got {inp.get('crop')!r}")
    else:
        sp = inp.get("spacing_zyx")
        if not (isinstance(sp, list) and len(sp) == 3 and all(isinstance(s, (int, float)) and s > 0 for s in sp)):
            raise bad(f"3D input needs input.spacing_zyx = [sz, sy, sx] in mm, got {sp!r}")
        ps = inp.get("patch_size")
        if not (isinstance(ps, list) and len(ps) == 3 and all(isinstance(s, int) and s > 0 for s in ps)):
            raise bad(f"3D input needs input.patch_size = [d, h, w] (positive ints), got {ps!r}")
    if inp.get("orientation", "LPS") != "LPS":
        raise bad(f"input.orientation must be 'LPS' (the engine's canonical orientation), got {inp.get('orientation')!r}")
    labels = meta["labels"]
    if not (isinstance(labels, dict) and labels and all(isinstance(k, str) and k.isdigit() and isinstance(v, str)
                                                        for k, v in labels.items())):
        raise bad(f"'labels' must map channel indices as strings to names, e.g. {{'0': 'background', "
                  f"'1': 'infection'}}, got {labels!r}")
    out = meta["output"]
    if not isinstance(out, dict) or out.get("activation") not in ACTIVATIONS:
        raise bad(f"output.activation must be one of {ACTIVATIONS}, got {out!r}")
    if not isinstance(out.get("foreground_channel", 0), int):
        raise bad("output.foreground_channel must be an int")
    thr = out.get("threshold", 0.5)
    if not (isinstance(thr, (int, float)) and 0.0 <= thr <= 1.0):
        raise bad(f"output.threshold must be a number in [0, 1], got {thr!r}")
    try:
        InfectionPostprocess.from_spec(out.get("postprocess"))
    except (TypeError, ValueError) as exc:
        raise bad(f"output.postprocess: {exc}") from None
    if meta["task"] not in TASKS:
        raise bad(f"task must be one of {TASKS}, got {meta['task']!r}")
    for key in ("model_id", "version", "description"):
        if not isinstance(meta[key], str):
            raise bad(f"{key} must be a string, got {meta[key]!r}")
    if not meta["model_id"]:
        raise bad("model_id must not be empty")


# ----------------------------------------------------------------------------------------------------------
# The loaded checkpoint
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A loaded (and verified) checkpoint. Field names follow :func:`save_checkpoint`'s keywords."""

    model_config: dict[str, Any]
    input_spec: dict[str, Any]
    labels: dict[str, str]
    output: dict[str, Any]
    task: str
    model_id: str
    version: str
    description: str
    provenance: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    state_dict_sha256: str = ""
    metadata_sha256: str = ""
    storage: dict[str, Any] = field(default_factory=lambda: {"float_dtype": "float32"})
    format_version: int = FORMAT_VERSION
    path: Path | None = None
    file_sha256: str | None = None

    @property
    def arch(self) -> str:
        return self.model_config["arch"]

    @property
    def dims(self) -> int:
        return int(self.input_spec["dims"])

    @property
    def threshold(self) -> float:
        return float(self.output.get("threshold", 0.5))

    def metadata(self) -> dict[str, Any]:
        """The metadata fields as stored in the file (without the state dict and hashes)."""
        return {"format": FORMAT, "format_version": self.format_version, "model": self.model_config,
                "input": self.input_spec, "labels": self.labels, "output": self.output, "task": self.task,
                "model_id": self.model_id, "version": self.version, "description": self.description,
                "provenance": self.provenance, "storage": self.storage}

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The network with these weights loaded, in eval mode, on ``device``."""
        net = _build_network(self.model_config, self._where())
        missing, unexpected, shapes = _compare_state(net.state_dict(), self.state_dict)
        if missing or unexpected or shapes:
            raise CheckpointError(_mismatch_message(self._where(), self.arch, missing, unexpected, shapes))
        net.load_state_dict(self.state_dict, strict=True)
        return net.to(device).eval()

    def save(self, path: str | os.PathLike, half: bool | None = None) -> str:
        """Write this checkpoint (e.g. after editing its provenance) to ``path``; returns the file's sha256."""
        return _write(path, dict(self.state_dict), self.metadata(),
                      half=(self.storage.get("float_dtype") == "float16") if half is None else half)

    def _where(self) -> str:
        return str(self.path) if self.path else f"checkpoint {self.model_id!r}"


def _build_network(model_config: Mapping[str, Any], where: str, device: str | None = None) -> torch.nn.Module:
    from .registry import architectures, build, get

    arch = model_config.get("arch")
    try:
        get(arch)
    except KeyError:
        known = ", ".join(sorted(architectures())) or "none registered"
        raise CheckpointError(f"{where}: unknown architecture {arch!r} (known: {known}). The checkpoint needs a "
                              "newer COVIDLesionSeg, or the architecture's module is missing from "
                              "models/_load_all.py") from None
    try:
        if device == "meta":
            with torch.device("meta"):
                return build(dict(model_config))
        return build(dict(model_config))
    except CheckpointError:
        raise
    except Exception as exc:  # a builder rejecting its stored arguments
        raise CheckpointError(f"{where}: cannot build architecture {arch!r} with args {model_config.get('args')}: "
                              f"{type(exc).__name__}: {exc}") from exc


def _compare_state(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]):
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted((k, tuple(expected[k].shape), tuple(found[k].shape)) for k in set(expected) & set(found)
                    if tuple(expected[k].shape) != tuple(found[k].shape))
    return missing, unexpected, shapes


def _mismatch_message(where: str, arch: str, missing, unexpected, shapes, limit: int = 8) -> str:
    def few(items):
        items = list(items)
        more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(str(i) for i in items[:limit]) + more

    parts = [f"{where}: the weights do not fit architecture {arch!r} with the stored args"]
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if shapes:
        parts.append("shape mismatches: " + few(f"{k} expects {e} but file has {f}" for k, e, f in shapes))
    parts.append("(was the checkpoint saved with different model args, or edited?)")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------

def _default_provenance() -> dict[str, Any]:
    import numpy
    try:
        import monai
        monai_version = monai.__version__
    except Exception:  # pragma: no cover - monai is a dependency
        monai_version = None
    from .. import __version__

    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "software": {"covidlesionseg": __version__, "torch": torch.__version__, "monai": monai_version,
                         "numpy": numpy.__version__, "python": platform.python_version()}}


def _write(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict[str, Any], half: bool) -> str:
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(f"state dict entry {name!r} is not a named tensor")
        t = t.detach().to("cpu").contiguous().clone()
        if half and t.is_floating_point():
            t = t.to(torch.float16)
        tensors[name] = t
    meta = dict(meta)
    meta["storage"] = {"float_dtype": "float16" if half else "float32"}
    payload = dict(meta)
    payload["state_dict"] = tensors
    payload["state_dict_sha256"] = state_dict_sha256(tensors)
    payload["metadata_sha256"] = metadata_sha256(meta)

    path = Path(path)
    # Atomic: a reader sees either the old file or the complete new one, never a half-written file.
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return file_sha256(path)


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module | Mapping[str, torch.Tensor], *,
                    model_config: Mapping[str, Any], input_spec: Mapping[str, Any], labels: Mapping[str, str],
                    output: Mapping[str, Any], task: str, model_id: str, version: str, description: str = "",
                    provenance: Mapping[str, Any] | None = None, half: bool = False,
                    verify_architecture: bool = True) -> str:
    """Write a checkpoint atomically (temp file in the same folder, then ``os.replace``).

    Args:
        model: the network, or its state dict.
        model_config: ``{"arch": id, "args": {...}}`` that rebuilds ``model`` through the registry.
        input_spec, labels, output, task, model_id, version, description: see the module docstring.
        provenance: data, protocol, epochs, held-out metrics...; ``created`` and ``software`` versions are
            added when absent.
        half: store floating-point tensors as float16 (shipped weights half the size); they load back as
            float32.
        verify_architecture: check that the registered architecture built from ``model_config`` has exactly
            these keys and shapes (built on the meta device, so nothing is allocated).

    Returns:
        The sha256 of the written file, for the model manifest.
    """
    state = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    labels_plain = {str(k): v for k, v in dict(labels).items()}
    prov = _default_provenance()
    prov.update(_plain(dict(provenance or {}), "provenance"))
    output_plain = {"foreground_channel": 1 if output.get("activation") == "softmax" else 0, "threshold": 0.5}
    output_plain.update(_plain(dict(output), "output"))
    input_plain = {"orientation": "LPS"}
    input_plain.update(_plain(dict(input_spec), "input"))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "model": _plain({"arch": model_config.get("arch"), "args": dict(model_config.get("args") or {})}, "model"),
            "input": input_plain, "labels": _plain(labels_plain, "labels"), "output": output_plain,
            "task": task, "model_id": model_id, "version": version, "description": description,
            "provenance": prov, "storage": {}}
    meta = _plain(meta, "checkpoint")
    _validate_metadata(meta)
    if verify_architecture:
        where = f"save_checkpoint({str(path)!r})"
        try:
            expected = _build_network(meta["model"], where, device="meta").state_dict()
        except CheckpointError:
            raise
        missing, unexpected, shapes = _compare_state(expected, state)
        if missing or unexpected or shapes:
            raise CheckpointError(_mismatch_message(where, meta["model"]["arch"], missing, unexpected, shapes))
    return _write(path, state, meta, half)


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------

def _describe_foreign(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj.keys())
        shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
        if keys and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return (f"a bare state dict of {len(keys)} tensors (e.g. {keys[0]!r}) without architecture, input "
                    "spec or labels. Wrap it with COVIDLesionSegLib.models.checkpoint.save_checkpoint(...), "
                    "giving the architecture and input spec it was trained with")
        if "format" in obj:
            return f"a file of format {obj.get('format')!r} (keys: {shown}), not {FORMAT!r}"
        hint = ""
        if "network_weights" in obj or "init_args" in obj:
            hint = " (looks like an nnU-Net checkpoint)"
        elif "pytorch-lightning_version" in obj:
            hint = " (looks like a PyTorch Lightning checkpoint)"
        elif "state_dict" in obj or "model" in obj or "model_state_dict" in obj:
            hint = " (looks like another project's training checkpoint)"
        return (f"a dict with keys {shown}{hint}, without the {FORMAT!r} header. Convert it with "
                "save_checkpoint(...) after loading its weights into the matching registered architecture")
    return f"a {type(obj).__name__}, not a checkpoint dict"


def _read_payload(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}. Check the path, or run "
                              "'covidlesionseg models list' to see the installed models")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a folder, expected a single .pt file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty (an interrupted download or copy?); "
                              "fetch or copy it again")
    if head[:4] == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupted ({size} bytes; its zip directory "
                              "is missing or unreadable: an interrupted download or copy?). Fetch or copy it again")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (first bytes {head!r}; a torch.save file is a "
                              "zip archive). Is it the right file?")
    try:
        with zipfile.ZipFile(path) as zf:
            bad_member = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {path} is corrupted ({exc}). Fetch or copy it again") from None
    if bad_member is not None:
        raise CheckpointError(f"checkpoint file {path} is corrupted: member {bad_member!r} fails its CRC check "
                              "(the file was damaged or modified). Fetch or copy it again")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path} is not a COVIDLesionSeg checkpoint: it stores pickled Python objects, which "
                              f"this format never contains and which are not loaded for safety ({first[:200]}). "
                              "If it is another project's checkpoint, load its weights in that project's "
                              "code and convert them with save_checkpoint(...)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"checkpoint file {path} is corrupted or not a PyTorch file "
                              f"({type(exc).__name__}: {str(exc)[:200]}). Fetch or copy it again") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a COVIDLesionSeg checkpoint: it contains {_describe_foreign(obj)}")
    return obj


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,  # noqa: C901 (one message per way a file can be wrong)
                    expected_sha256: str | None = None, verify_architecture: bool = True) -> Checkpoint:
    """Read, verify and return a checkpoint.

    Verifies, in order: the file's sha256 (when ``expected_sha256``, e.g. from the model manifest, is
    given), the file type, the format header and version, the required fields, the metadata and tensor
    hashes, the architecture (registered) and that the weights fit it (keys and shapes, checked on the
    meta device without allocating). Half-precision storage is converted back to float32.

    Raises:
        CheckpointError: with what was found and what to do.
    """
    path = Path(path)
    digest = None
    if expected_sha256 is not None:
        if not path.exists():
            _read_payload(path)  # raises the not-found message
        digest = file_sha256(path)
        if digest.lower() != expected_sha256.strip().lower():
            raise CheckpointError(f"checkpoint file {path} has sha256 {digest}, but the model manifest expects "
                                  f"{expected_sha256}: the file was modified, corrupted or replaced. Reinstall "
                                  "the model (or update the manifest if you replaced the weights on purpose)")
    payload = _read_payload(path)

    version = payload.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version is {version!r}, expected an integer; the file is corrupted")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses checkpoint format_version {version}, but this COVIDLesionSeg reads "
                              f"format_version <= {FORMAT_VERSION}. Update COVIDLesionSeg to use this model")
    if version < 1:
        raise CheckpointError(f"{path}: unknown checkpoint format_version {version}")
    missing = [k for k in _REQUIRED_FIELDS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing the field(s) {', '.join(missing)} "
                              "(damaged, or written by hand); re-save it with save_checkpoint(...)")
    meta = {k: payload[k] for k in _METADATA_FIELDS}
    found_meta = metadata_sha256(meta)
    if found_meta != payload["metadata_sha256"]:
        raise CheckpointError(f"{path}: the metadata (architecture, input spec, labels, output, provenance, ...) "
                              "do not match metadata_sha256: the file was edited after it was written. Edit "
                              "checkpoints through load_checkpoint(...).save(...) so the hashes are updated, or "
                              "restore the original file")
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' is not a dict of tensors; the file is corrupted")
    found_sd = state_dict_sha256(state)
    if found_sd != payload["state_dict_sha256"]:
        raise CheckpointError(f"{path}: the weights do not match state_dict_sha256 (stored "
                              f"{str(payload['state_dict_sha256'])[:16]}..., computed {found_sd[:16]}...): the "
                              "tensors were modified or corrupted after the file was written. Fetch or copy the "
                              "model again")
    try:
        _validate_metadata(copy.deepcopy(meta))
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None

    storage = dict(meta.get("storage") or {})
    if storage.get("float_dtype") == "float16":
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    ckpt = Checkpoint(model_config=meta["model"], input_spec=meta["input"], labels=meta["labels"],
                      output=meta["output"], task=meta["task"], model_id=meta["model_id"], version=meta["version"],
                      description=meta["description"], provenance=meta["provenance"], state_dict=state,
                      state_dict_sha256=payload["state_dict_sha256"], metadata_sha256=payload["metadata_sha256"],
                      storage=storage, format_version=version, path=path, file_sha256=digest)
    if verify_architecture:
        expected = _build_network(ckpt.model_config, str(path), device="meta").state_dict()
        missing_k, unexpected_k, shapes = _compare_state(expected, state)
        if missing_k or unexpected_k or shapes:
            raise CheckpointError(_mismatch_message(str(path), ckpt.arch, missing_k, unexpected_k, shapes))
    if map_location not in ("cpu", torch.device("cpu")):
        ckpt.state_dict = {k: v.to(map_location) for k, v in ckpt.state_dict.items()}
    return ckpt


__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "file_sha256", "state_dict_sha256", "metadata_sha256"]
