"""Real faults for the output tests: a small file system that fills up, a read-only folder, a container's memory
limit, small CT cases.

A tmpfs is mounted where the tests may (root with mount rights, as on CI); otherwise the kernel's file-size
limit (``RLIMIT_FSIZE``, with ``SIGXFSZ`` ignored) makes every write past N bytes fail with ``EFBIG``, which is
the same fault for one file: a writer that fails after N bytes.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import SimpleITK as sitk

from COVIDLesionSegLib.phantom import make_chest_phantom

#: A small phantom: 28 slices of 64 x 64 voxels, the anatomy at coarse spacing (about 0.3 s per case).
SMALL_SHAPE, SMALL_SPACING = (28, 64, 64), (10.0, 5.6, 5.6)

CASE_SUFFIXES = (".seg.nrrd", "_labels.nii.gz", ".json")


def write_phantom(path: Path, seed: int = 0, small: bool = True) -> Path:
    """Write a phantom chest CT (``small`` or the default size) to ``path``."""
    image, _ = make_chest_phantom(SMALL_SHAPE, SMALL_SPACING, seed=seed) if small else make_chest_phantom(seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _mount(target: Path, options: str) -> bool:
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                          capture_output=True, text=True)
    return done.returncode == 0


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


@contextlib.contextmanager
def tmpfs(target: Path, size_bytes: int, readonly: bool = False) -> Iterator[Optional[Path]]:
    """Mount a tmpfs of ``size_bytes`` at ``target``; yields None when this machine does not allow it."""
    options = f"size={size_bytes}" + (",ro" if readonly else "")
    if not _mount(target, options):
        yield None
        return
    try:
        yield target
    finally:
        _umount(target)


def fill(folder: Path, leave_free: int) -> None:
    """Fill the file system of ``folder`` until about ``leave_free`` bytes are left (page granular)."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    with open(folder / "filler.bin", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_free))


@contextlib.contextmanager
def file_size_limit(limit_bytes: int) -> Iterator[None]:
    """Make every write past ``limit_bytes`` of any file fail with EFBIG in this process (the fallback)."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[Optional[Callable[[], None]]]:
    """A child of this process's cgroup v1 memory cgroup limited to ``limit_bytes`` (a container's memory limit:
    past it the kernel's out-of-memory killer ends the process). Yields a ``preexec_fn`` that moves a subprocess
    into it, or None when this machine does not allow it (not root, no cgroup v1 memory hierarchy)."""
    root = Path("/sys/fs/cgroup/memory")
    try:
        own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if "memory" in line.split(":", 2)[1].split(","))
    except (OSError, StopIteration, IndexError):
        own = None
    parent = root / own.strip("/") if own is not None else root
    if os.name != "posix" or os.geteuid() != 0 or not (parent / "memory.limit_in_bytes").exists():
        yield None
        return
    node = parent / f"covidlesionseg-test-{os.getpid()}"
    try:
        node.mkdir()
        (node / "memory.limit_in_bytes").write_text(str(limit_bytes))
    except OSError:
        yield None
        return
    procs = str(node / "cgroup.procs")

    def enter() -> None:      # runs in the child between fork and exec
        with open(procs, "w") as fh:
            fh.write(str(os.getpid()))

    try:
        yield enter
    finally:
        node.rmdir()          # its processes have ended: the caller waited for them


def case_files(folder: Path, name: str) -> list[Path]:
    return [folder / f"{name}{s}" for s in CASE_SUFFIXES if (folder / f"{name}{s}").exists()]


def cli_command(*args: str) -> list[str]:
    """The ``covidlesionseg`` command of this interpreter, as a subprocess argument list."""
    return [sys.executable, "-m", "COVIDLesionSegLib.cli", *args]


@contextlib.contextmanager
def readonly_folder(target: Path) -> Iterator[Path]:
    """A folder nothing can be written to: a read-only tmpfs (root), or a mode 555 folder (other users).

    Skips the calling test when neither works (root without mount rights ignores folder permissions).
    """
    import pytest

    with tmpfs(target, 1 << 20, readonly=True) as mounted:
        if mounted is None:
            if os.geteuid() == 0:
                pytest.skip("cannot mount a read-only tmpfs here, and root ignores folder permissions")
            target.mkdir(parents=True, exist_ok=True)
            target.chmod(0o555)
            mounted = target
        yield mounted
