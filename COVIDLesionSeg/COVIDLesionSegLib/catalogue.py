"""Model catalogue: which models exist, where their files are, and loading them by id.

Sources, in order (a later source cannot shadow an earlier id):

1. built-in non-learned models (``hu-lungs``, ``hu-threshold``);
2. the shipped manifest ``COVIDLesionSeg/Resources/Models/manifest.json`` (small default weights in the same
   folder; larger variants listed with a download URL, fetched only on request);
3. the user's model cache folder (``COVIDLESIONSEG_MODEL_DIR``, default ``~/.cache/covidlesionseg/models``),
   where ``covidlesionseg models import FILE`` places checkpoints, each with a ``<file>.json`` sidecar.

A manifest entry with a ``url`` is fetched only on request (``covidlesionseg models download ID``,
:func:`download_model`) into the cache, under the URL's file name, and checked against its sha256. Offline,
the same file downloaded elsewhere can be imported (:func:`import_model` puts a checkpoint whose id and
sha256 match such an entry where the catalogue looks for it).

Manifest entry fields: ``id``, ``version``, ``task`` (lungs|infection), ``description``, ``file`` (relative to
the manifest) or ``url``, ``sha256``, ``size_bytes``, ``licence``, ``expected_seconds`` ({"cpu": s, "gpu": s}),
``metrics`` and ``provenance``. ``defaults`` names the default id per task.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ModelError
from .predictor import HUInfectionModel, HULungModel

RESOURCES_DIR = Path(__file__).resolve().parent.parent / "Resources"
MANIFEST_PATH = Path(os.environ.get("COVIDLESIONSEG_MANIFEST", RESOURCES_DIR / "Models" / "manifest.json"))

BUILTIN_DEFAULTS = {"lungs": HULungModel.info.model_id, "infection": HUInfectionModel.info.model_id}


def cache_dir() -> Path:
    return Path(os.environ.get("COVIDLESIONSEG_MODEL_DIR", Path.home() / ".cache" / "covidlesionseg" / "models"))


@dataclass
class ModelEntry:
    model_id: str
    version: str
    task: str
    description: str
    source: str                       # "built-in", "shipped", "cache"
    path: Path | None = None          # local checkpoint file (None for built-ins and not-yet-downloaded)
    url: str | None = None
    sha256: str | None = None
    licence: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.source == "built-in" or (self.path is not None and self.path.is_file())


def _builtin_entries() -> list[ModelEntry]:
    out = []
    for cls in (HULungModel, HUInfectionModel):
        info = cls.info
        out.append(ModelEntry(info.model_id, info.version, info.task, info.description, "built-in",
                              licence="Apache-2.0 (no trained weights)"))
    return out


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"models": [], "defaults": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"the model manifest {path} is not valid JSON ({exc}); reinstall the extension") from None


def _entry_from_record(record: dict[str, Any], base: Path, source: str) -> ModelEntry:
    file = record.get("file")
    path = (base / file) if file else None
    if path is None and record.get("url"):
        cached = cache_dir() / Path(record["url"]).name
        path = cached
    return ModelEntry(
        model_id=record["id"], version=str(record.get("version", "")), task=record["task"],
        description=record.get("description", ""), source=source, path=path, url=record.get("url"),
        sha256=record.get("sha256"), licence=record.get("licence", ""),
        details={k: v for k, v in record.items() if k not in {"id", "version", "task", "description", "file"}},
    )


def list_models() -> list[ModelEntry]:
    """Every known model, built-in first, then shipped, then imported into the cache."""
    entries = _builtin_entries()
    seen = {e.model_id for e in entries}
    manifest = _read_manifest(MANIFEST_PATH)
    for record in manifest.get("models", []):
        if record["id"] not in seen:
            entries.append(_entry_from_record(record, MANIFEST_PATH.parent, "shipped"))
            seen.add(record["id"])
    cache = cache_dir()
    if cache.is_dir():
        for sidecar in sorted(cache.glob("*.json")):
            try:
                record = json.loads(sidecar.read_text())
            except json.JSONDecodeError:
                continue
            if record.get("id") and record["id"] not in seen:
                entries.append(_entry_from_record(record, cache, "cache"))
                seen.add(record["id"])
    return entries


def default_model_id(task: str) -> str:
    """The default model for ``task``: the manifest's choice when its file is present, else the built-in."""
    manifest = _read_manifest(MANIFEST_PATH)
    chosen = manifest.get("defaults", {}).get(task)
    if chosen:
        entry = next((e for e in list_models() if e.model_id == chosen), None)
        if entry is not None and entry.available:
            return chosen
    return BUILTIN_DEFAULTS[task]


def default_fallback_note(task: str) -> Optional[str]:
    """What to tell the user when the manifest's default for ``task`` cannot be used (its file is missing) and
    :func:`default_model_id` falls back to the built-in model; ``None`` when the default is the manifest's.
    Results made with the fallback differ from the documented default's, so they must not look the same."""
    chosen = _read_manifest(MANIFEST_PATH).get("defaults", {}).get(task)
    used = default_model_id(task)
    if not chosen or chosen == used:
        return None
    entry = next((e for e in list_models() if e.model_id == chosen), None)
    where = f" ({entry.path})" if entry is not None and entry.path else ""
    return (f"the default {task} model {chosen!r} is not available{where}; the built-in {used!r} was used "
            "instead, whose results differ (docs/default_models.md). Reinstall the extension or the package to "
            f"restore it, or choose a model with --model (`covidlesionseg models list`)")


def get_entry(model_id: str) -> ModelEntry:
    entries = list_models()
    for entry in entries:
        if entry.model_id == model_id:
            return entry
    known = ", ".join(e.model_id for e in entries)
    raise ModelError(f"unknown model {model_id!r}; known models: {known} (see `covidlesionseg models list`)")


def load_model(model_id: str, task: str, device: str = "auto", fast: bool = False, masks: bool = False,
               runtime: str | None = None):
    """Instantiate the model ``model_id`` for ``task`` ("lungs" or "infection") on ``device``.

    ``fast``: the fast mode (coarser grids for the built-in models; every second lung slice, the others
    interpolated, for a 2D infection network; nothing for other networks). ``masks``: an infection network
    gives its bool mask rather than probabilities (``NetworkModel(output="mask")``: what the pipeline needs,
    in a quarter of the memory); the built-in model always does. ``runtime``: a network's on the CPU
    (``NetworkModel(runtime=...)``); by default ``onnx_runtime.DEFAULT_RUNTIME``: PyTorch, or ONNX Runtime
    with ``COVIDLESIONSEG_RUNTIME=onnxruntime``.
    """
    entry = get_entry(model_id)
    if entry.task != task:
        raise ModelError(f"model {model_id!r} segments {entry.task}, not {task}")
    if entry.source == "built-in":
        return HULungModel(fast) if task == "lungs" else HUInfectionModel(fast)
    if not entry.available:
        hint = (f"download it with `covidlesionseg models download {model_id}` or import a copy with "
                "`covidlesionseg models import FILE`") if entry.url else "reinstall the extension"
        raise ModelError(f"the file of model {model_id!r} is missing ({entry.path}); {hint}")
    from . import onnx_runtime
    from .errors import CheckpointError
    from .network_predictor import NetworkModel

    try:
        return NetworkModel(entry.path, device=device, expected_sha256=entry.sha256,
                            slice_step=2 if fast and task == "infection" else 1,
                            output="mask" if masks and task == "infection" else "probabilities",
                            runtime=runtime or onnx_runtime.DEFAULT_RUNTIME)
    except CheckpointError as exc:
        # The file is damaged, replaced or foreign: how to get a good copy depends on where it came from,
        # which only the catalogue knows.
        if not exc.next_step:
            exc.next_step = _repair_hint(entry)
        raise


def _repair_hint(entry: ModelEntry) -> str:
    """How to get a good copy of ``entry``'s file."""
    if entry.url:
        return (f"fetch it again with `covidlesionseg models download {entry.model_id} --overwrite` (or import a "
                "good copy with `covidlesionseg models import FILE --overwrite`)")
    if entry.source == "cache":
        return ("import the model file again with `covidlesionseg models import FILE --overwrite`, or choose "
                "another model (`covidlesionseg models list`)")
    return ("reinstall the extension (or the package) to restore the shipped model, or choose another model with "
            "--model (`covidlesionseg models list`)")


def device_note(device: str, model_ids) -> str | None:
    """A note for the user when ``device`` asks for the GPU but some of ``model_ids`` never use it.

    The built-in models are Hounsfield-unit methods (NumPy/SciPy/SimpleITK) without a network: they run on
    the CPU whatever the device, so ``--device cuda`` with them (the defaults) silently did nothing.
    """
    if not str(device).startswith("cuda"):
        return None
    cpu_only = [m for m in model_ids if get_entry(m).source == "built-in"]
    if not cpu_only:
        return None
    names = " and ".join(cpu_only)
    return (f"--device cuda: {names} {'is a method' if len(cpu_only) == 1 else 'are methods'} without a neural "
            "network and always run on the CPU; only network models use the GPU (see `covidlesionseg models "
            "list`, then --model ID / --lung-model ID)")


def verify_models() -> list[tuple[ModelEntry, str]]:
    """Check every local model file against its sha256. Returns (entry, status) with status "ok",
    "missing", "not downloaded" or "MISMATCH ..."."""
    from .models.checkpoint import file_sha256

    results = []
    for entry in list_models():
        if entry.source == "built-in":
            results.append((entry, "ok (built-in)"))
        elif entry.path is None or not entry.path.is_file():
            results.append((entry, "not downloaded" if entry.url else "missing"))
        elif entry.sha256 is None:
            results.append((entry, "no checksum recorded"))
        else:
            digest = file_sha256(entry.path)
            results.append((entry, "ok" if digest == entry.sha256 else f"MISMATCH (file has sha256 {digest})"))
    return results


def download_model(model_id: str, overwrite: bool = False, timeout_s: float = 60.0) -> ModelEntry:
    """Fetch a manifest model listed with a ``url`` into the cache, checking its sha256 while streaming.

    Only ever called on request (the CLI's ``models download``); nothing downloads at segmentation time. The
    file is written atomically, so a failed or interrupted download leaves nothing behind. Offline, the
    error says how to import a copy fetched elsewhere. A file already cached with the right checksum is
    kept (``overwrite`` fetches it again).
    """
    import hashlib
    import urllib.error
    import urllib.request

    from .models.checkpoint import file_sha256
    from .outputs import atomic_write

    entry = get_entry(model_id)
    if not entry.url:
        where = "is built in" if entry.source == "built-in" else f"ships with the extension ({entry.path})"
        raise ModelError(f"model {model_id!r} has no download URL: it {where}")
    assert entry.path is not None  # a url entry always has its cache path
    if entry.available and not overwrite and (entry.sha256 is None or file_sha256(entry.path) == entry.sha256):
        return entry

    def fetch(tmp: Path) -> None:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(entry.url, timeout=timeout_s) as response, tmp.open("wb") as f:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ModelError(
                f"could not download model {model_id!r} from {entry.url} ({reason}). If this computer is offline, "
                f"download the file on another one, check its sha256 ({entry.sha256}) and run "
                f"`covidlesionseg models import FILE`.") from None
        if entry.sha256 and digest.hexdigest() != entry.sha256:
            raise ModelError(f"the download of model {model_id!r} from {entry.url} is corrupted or not the listed "
                             f"file: sha256 {digest.hexdigest()}, expected {entry.sha256}; nothing was saved")

    atomic_write(entry.path, fetch)
    return get_entry(model_id)


def import_model(path: str | os.PathLike, overwrite: bool = False) -> ModelEntry:
    """Copy a checkpoint into the cache after loading it (format and tensor checksums verified).

    A checkpoint of a manifest model listed with a ``url`` must match that entry's sha256 and goes where
    :func:`download_model` would put it; any other goes in as ``<id>-v<version>.pt`` with a sidecar record,
    so two exported runs both called ``model.pt`` do not collide.
    """
    from .models.checkpoint import file_sha256, load_checkpoint
    from .outputs import atomic_write, atomic_write_text

    src = Path(path)
    try:
        ckpt = load_checkpoint(src)
    except Exception as exc:  # CheckpointError and friends: the message already says what is wrong
        raise ModelError(f"{src} cannot be imported: {exc}") from None
    listed = next((e for e in list_models() if e.model_id == ckpt.model_id and e.source != "cache"), None)
    if listed is not None and listed.url:
        digest = file_sha256(src)
        if listed.sha256 and digest != listed.sha256:
            raise ModelError(f"{src} claims to be model {ckpt.model_id!r} but its sha256 {digest} is not the "
                             f"listed {listed.sha256}; it was not imported")
        assert listed.path is not None
        if listed.path.exists() and not overwrite:
            raise ModelError(f"{listed.path} already exists; pass --overwrite to replace it")
        atomic_write(listed.path, lambda tmp: shutil.copyfile(src, tmp))
        return get_entry(ckpt.model_id)
    if listed is not None:
        raise ModelError(f"model id {ckpt.model_id!r} is already taken by a {listed.source} model; export the "
                         "checkpoint with another --model-id")
    target_dir = cache_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{ckpt.model_id}-v{ckpt.version}{src.suffix or '.pt'}"
    sidecar = target.with_name(target.name + ".json")
    if (target.exists() or sidecar.exists()) and not overwrite:
        raise ModelError(f"{target} already exists; pass --overwrite to replace it")
    atomic_write(target, lambda tmp: shutil.copyfile(src, tmp))
    record = {"id": ckpt.model_id, "version": ckpt.version, "task": ckpt.task, "description": ckpt.description,
              "file": target.name, "sha256": file_sha256(target), "provenance": ckpt.provenance}
    atomic_write_text(sidecar, json.dumps(record, indent=2))
    return _entry_from_record(record, target_dir, "cache")
