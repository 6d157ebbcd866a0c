"""Can a scan be segmented in the memory this process can still get? Checked from the image's header, before
any pixel is read (``io._check_size``).

Why: on Linux a process that needs more memory than there is does not get a ``MemoryError``: its allocations
succeed and the kernel's out-of-memory killer ends it later, with no message ("Killed"). A batch over a folder
would then stop at that scan, and no case after it would run. A scan that cannot fit is therefore refused at
once, as that case's failure (:class:`InsufficientMemoryError`, kind ``out_of_memory``), with what it needs and
what to do; the batch goes on with the next case.

What a scan needs, measured (``covidlesionseg segment``, 2 CPU threads, docs/default_models.md section 8.9):
P001 interpolated to 512 x 512 x 3050 slices (800 million voxels, the largest the reader accepts) peaked at
4.39 GB with the default models and 3.28 GB with ``--lungs-only``; 512 x 512 x 1000 at 1.80 GB. Whatever the
models, the CT in Hounsfield units (int16, 2 bytes a voxel) and the lung labelmap (1 byte) are held together
from the lung step to the end, so :func:`minimum_bytes` (3 bytes a voxel and :data:`BASE_BYTES` for the
interpreter and its libraries) is a need no run goes below: a scan is refused only when even that does not fit,
never on an estimate that might be pessimistic. The typical need (:func:`typical_bytes`) is said in the message.

Where the free memory comes from (:func:`available_bytes`): Linux's ``MemAvailable`` plus free swap (a run that
swaps is slow but ends), bounded by the cgroup's limit when the process runs in a container (cgroup v2
``memory.max`` less the memory charged to it, its reclaimable page cache excepted; v1 likewise); elsewhere
(Windows, macOS: the Slicer desktop) psutil's figures when psutil is installed, and no check otherwise.
``COVIDLESIONSEG_SKIP_MEMORY_CHECK=1`` turns the check off (a machine whose figures mislead).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from .errors import CovidLesionSegError

#: Bytes of memory per voxel no run does without: the int16 CT and the uint8 lung labelmap (module docstring).
MINIMUM_BYTES_PER_VOXEL = 3
#: The interpreter with numpy, SimpleITK and the engine imported, before any image (a fresh process: 143 MB, 182 MB
#: with the report's matplotlib).
BASE_BYTES = 200 * 1024 ** 2
#: Peak bytes per voxel beyond :data:`TYPICAL_BASE_BYTES` with the default models: the line through the two
#: measured scans of the module docstring (1.80 GB at 262 M voxels, 4.39 GB at 800 M).
TYPICAL_BYTES_PER_VOXEL = 5.2
TYPICAL_BASE_BYTES = 540 * 1024 ** 2
#: Set to 1 to skip the check.
SKIP_ENV = "COVIDLESIONSEG_SKIP_MEMORY_CHECK"

_CGROUP = Path("/sys/fs/cgroup")
_MEMINFO = Path("/proc/meminfo")


class InsufficientMemoryError(CovidLesionSegError, MemoryError):
    """The scan cannot be segmented in the memory that is free (found before reading it)."""

    kind = "out_of_memory"


def minimum_bytes(voxels: int) -> int:
    """The memory below which no run on a scan of ``voxels`` voxels can end (module docstring)."""
    return BASE_BYTES + MINIMUM_BYTES_PER_VOXEL * int(voxels)


def typical_bytes(voxels: int) -> int:
    """The peak measured with the default models, for a scan of ``voxels`` voxels (module docstring)."""
    return TYPICAL_BASE_BYTES + int(TYPICAL_BYTES_PER_VOXEL * int(voxels))


def _gb(n: float) -> str:
    return f"{n / 1024 ** 3:.1f} GB"


def check_fits(where, size) -> None:
    """Raise :class:`InsufficientMemoryError` when a scan of ``size`` voxels (per axis) cannot fit in the
    :func:`available_bytes` (unknown: no check)."""
    if os.environ.get(SKIP_ENV, "").strip() in ("1", "true", "yes"):
        return
    voxels = math.prod(int(n) for n in size)
    available = available_bytes()
    if available is None or minimum_bytes(voxels) <= available:
        return
    raise InsufficientMemoryError(
        f"{where}: this scan of {voxels / 1e6:.0f} million voxels {tuple(int(n) for n in size)} needs at least "
        f"{_gb(minimum_bytes(voxels))} of memory to be segmented (about {_gb(typical_bytes(voxels))} with the "
        f"default models), and {_gb(available)} are free; close other programs, or crop the scan to the chest "
        "or resample it to thicker slices first")


def available_bytes() -> Optional[int]:
    """Bytes this process can still allocate without being killed, or None when this system does not say
    (module docstring): the least of the machine's free memory and the container's headroom."""
    found = [n for n in (_machine_available(), _cgroup_headroom()) if n is not None]
    return min(found) if found else None


def _machine_available() -> Optional[int]:
    fields = _read_fields(_MEMINFO, scale=1024)          # /proc/meminfo counts in kB
    if "MemAvailable" in fields:
        return fields["MemAvailable"] + fields.get("SwapFree", 0)
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available + psutil.swap_memory().free)


def _cgroup_headroom(root: Path = _CGROUP, membership: Path = Path("/proc/self/cgroup")) -> Optional[int]:
    """The least, over this process's memory cgroup and its ancestors, of the limit less what is charged
    (reclaimable page cache excepted); None where no limit is set. ``membership`` names the process's cgroup
    (``/proc/self/cgroup``); a container that shows its own cgroup at ``root`` (a cgroup namespace, or Docker's
    bind mount on cgroup v1) has it there."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    headroom: list[int] = []
    for line in lines:
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):                       # cgroup v1's memory hierarchy
            node = _own_node(root / "memory", path)
            stat = _read_fields(node / "memory.stat", separator=" ")
            limit = _read_number(node / "memory.limit_in_bytes")
            usage = _read_number(node / "memory.usage_in_bytes")
            if limit is not None and usage is not None:
                limit = min(limit, stat.get("hierarchical_memory_limit", limit))
                if limit < 1 << 60:                                   # "no limit" is a huge number in v1
                    headroom.append(max(0, limit - max(0, usage - stat.get("total_inactive_file", 0))))
        elif number == "0" and not controllers:                     # cgroup v2 (unified; hybrid: unified/)
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            node = _own_node(base, path)
            while True:
                limit, usage = _read_number(node / "memory.max"), _read_number(node / "memory.current")
                if limit is not None and usage is not None:
                    cache = _read_fields(node / "memory.stat", separator=" ").get("inactive_file", 0)
                    headroom.append(max(0, limit - max(0, usage - cache)))
                if node == base or node.parent == node:
                    break
                node = node.parent
    return min(headroom) if headroom else None


def _own_node(base: Path, path: str) -> Path:
    """The cgroup folder of ``path`` under ``base``, or ``base`` itself where that folder is not visible."""
    node = base / path.strip("/")
    return node if node.is_dir() else base


def _read_number(path: Path) -> Optional[int]:
    """An integer file of the cgroup tree; None when absent, unreadable or ``max`` (no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _read_fields(path: Path, separator: str = ":", scale: int = 1) -> dict[str, int]:
    """``name<separator> number [unit]`` lines as {name: number * scale}; {} when the file cannot be read."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        name, _, rest = line.partition(separator)
        value = rest.split()
        if value and value[0].isdigit():
            fields[name.strip()] = int(value[0]) * scale
    return fields


__all__ = ["InsufficientMemoryError", "check_fits", "available_bytes", "minimum_bytes", "typical_bytes"]
