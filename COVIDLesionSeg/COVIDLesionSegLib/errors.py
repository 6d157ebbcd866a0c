"""The engine's user-facing errors, and the one function that turns any exception into the user's message.

Every failure a user can meet on purpose is a :class:`CovidLesionSegError`: ``str(error)`` says what was
found, :attr:`~CovidLesionSegError.next_step` what to do about it (like TotalSegmentator's
``InstallError(restartRequired)``, the error carries the way out), and :attr:`~CovidLesionSegError.kind`
names the class of problem for programs (the Slicer worker's outcome line, ``results.csv``)::

    CovidLesionSegError                       errors.py
    ├── InputError (ValueError)               bad_input: not a chest CT in HU, unreadable, 2D, no lungs ...
    │   └── DatasetError                      training/datasets/base.py: a data set's files
    ├── ModelError                            model: unknown id, missing or foreign file, wrong checksum
    │   └── CheckpointError                   a checkpoint file that cannot be used (models/checkpoint.py)
    ├── DeviceError (RuntimeError)            device: ``cuda`` asked for where there is none
    ├── OutputError                           output: outputs.py
    │   ├── OutputExistsError (FileExistsError)   a complete result is there and --overwrite was not given
    │   └── OutputWriteError (OSError)        full disk, file-size limit, read-only folder
    ├── InsufficientMemoryError (MemoryError) out_of_memory: a scan too large for the free memory (memory.py)
    ├── WorkerError (RuntimeError)            worker.py: the segmentation process ended with an error
    └── training: ConfigError, ProcedureError (ValueError), RunError, TrainingError (RuntimeError)

:func:`user_message` is the only place that turns an exception into text for a person. The command line
(``cli.main``), the batch loop (``pipeline.segment_batch``), the Slicer worker (``worker.classify_error``),
``Scripts/batch.py`` and ``python -m training`` all show what it returns, so one condition reads the same
everywhere and an expected condition (an existing output, no lungs in the scan, a read-only folder) is never
called an "unexpected error": that phrase is kept for bugs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional


class CovidLesionSegError(Exception):
    """Base class of every expected, user-facing failure.

    Args:
        message: what was found, written for a person; most messages of the engine end with what to do, and
            ``next_step`` is then left empty.
        next_step: what to do next when the message does not say it (set where the remedy depends on more
            than the raiser knows, e.g. ``catalogue.load_model`` adds how to get a good copy of a model file).
    """

    kind: ClassVar[str] = "error"
    next_step: str = ""

    def __init__(self, message: str = "", *args: object, next_step: Optional[str] = None):
        super().__init__(message, *args)
        if next_step is not None:
            self.next_step = next_step


class InputError(CovidLesionSegError, ValueError):
    """The input image cannot be segmented as it is (wrong file, 2D, not CT in HU, empty, too large...)."""

    kind = "bad_input"


class ModelError(CovidLesionSegError):
    """A model id is unknown, or its file is missing, corrupted, foreign or fails its checksum."""

    kind = "model"


class CheckpointError(ModelError):
    """A checkpoint file cannot be used; the message says why and what to do."""


class DeviceError(CovidLesionSegError, RuntimeError):
    """The requested device cannot be used (e.g. ``cuda`` on a machine without CUDA)."""

    kind = "device"


class OutputError(CovidLesionSegError):
    """An output cannot be written (it exists and --overwrite was not given, or the folder is not writable)."""

    kind = "output"


#: What the user is told for kinds of failure that are not a :class:`CovidLesionSegError` of our own.
OUT_OF_MEMORY_GPU = ("The GPU ran out of memory. Choose the CPU as device (--device cpu), a smaller model, or "
                     "close other programs using the GPU.")
OUT_OF_MEMORY_CPU = ("The computer ran out of memory. Close other programs, choose a lighter model, or crop the "
                     "CT to the chest before segmenting.")
MISSING_DEPENDENCY = ("A Python package the segmentation needs is missing ({missing}). Install it with "
                      "'Install dependencies' in the Advanced section (or `pip install covidlesionseg` outside "
                      "Slicer).")


@dataclass(frozen=True)
class UserMessage:
    """What :func:`user_message` makes of an exception.

    ``kind`` is one of ``bad_input``, ``model``, ``device``, ``output``, ``file``, ``missing_dependency``,
    ``out_of_memory``, ``cancelled``, ``internal`` (a bug), or the kind of a training error; ``title`` is a
    short heading for a dialog; ``text`` the message itself (what happened and what to do next).
    """

    kind: str
    text: str
    title: str = ""

    @property
    def expected(self) -> bool:
        """False only for a bug: the one case where a traceback helps the person who reads it."""
        return self.kind != "internal"


_TITLES = {"bad_input": "The input cannot be segmented", "model": "Model problem", "device": "Device problem",
           "output": "The result cannot be written", "file": "File problem",
           "out_of_memory": "Out of memory", "missing_dependency": "Missing package", "cancelled": "Cancelled",
           "internal": "Unexpected error"}


def is_cuda_out_of_memory(exc: BaseException) -> bool:
    """A CUDA allocation failure, whichever library raised it (torch's OutOfMemoryError, cuBLAS, cuDNN)."""
    text = str(exc)
    return (type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text
            or "CUBLAS_STATUS_ALLOC_FAILED" in text or "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE" in text)


def is_cpu_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(exc)


def _with_next_step(exc: CovidLesionSegError) -> str:
    text = str(exc)
    step = exc.next_step
    if not step or step in text:
        return text
    return f"{text.rstrip('. ')}; {step}"


def user_message(exc: BaseException) -> UserMessage:
    """The message a person reads for ``exc`` (any exception): the one translator of the project.

    Order matters: our own errors first (they already say what to do), then the conditions of the machine
    (memory, missing packages, files), and only what is left is a bug ("unexpected error", kind
    ``internal``).
    """
    from .progress import Cancelled

    if isinstance(exc, Cancelled):
        return UserMessage("cancelled", "Segmentation was cancelled.", _TITLES["cancelled"])
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return UserMessage("cancelled", "Segmentation was interrupted.", _TITLES["cancelled"])
    if isinstance(exc, CovidLesionSegError):
        kind = getattr(exc, "kind", "error")
        return UserMessage(kind, _with_next_step(exc), _TITLES.get(kind, ""))
    if is_cuda_out_of_memory(exc):
        return UserMessage("out_of_memory", OUT_OF_MEMORY_GPU, _TITLES["out_of_memory"])
    if is_cpu_out_of_memory(exc):
        return UserMessage("out_of_memory", OUT_OF_MEMORY_CPU, _TITLES["out_of_memory"])
    if isinstance(exc, ImportError):
        missing = getattr(exc, "name", None) or str(exc)
        return UserMessage("missing_dependency", MISSING_DEPENDENCY.format(missing=missing),
                           _TITLES["missing_dependency"])
    if isinstance(exc, OSError) and exc.strerror:
        # A file the operating system refused (permissions, a vanished folder, a read-only disk): the user's
        # to fix, not a bug. Errors the engine can name better (a full disk) are OutputWriteError already.
        where = f"{exc.filename}: " if exc.filename else ""
        return UserMessage("file", f"{where}{exc.strerror}; check that the path exists and that you may read "
                                   "or write it, or choose another folder", _TITLES["file"])
    # Lower case on purpose: the tests look for "unexpected error" to prove an expected condition is not one.
    return UserMessage("internal", f"unexpected error: {type(exc).__name__}: {exc}", _TITLES["internal"])


def about(subject: str, message: str) -> str:
    """``subject: message`` for a list of failures, or the message alone when it already begins with the subject
    (most messages of a failed read begin with the input's path)."""
    return message if message.startswith(f"{subject}:") else f"{subject}: {message}"


__all__ = ["about", "CovidLesionSegError", "InputError", "ModelError", "CheckpointError", "DeviceError", "OutputError",
           "UserMessage", "user_message", "is_cuda_out_of_memory", "is_cpu_out_of_memory"]
