"""Exceptions the engine raises on purpose. Each message says what was found and what to do.

The CLI, the Slicer worker and the batch runner show ``str(error)`` to the user as it is, so messages are
written for a person, not for a traceback.
"""


class CovidLesionSegError(Exception):
    """Base class of every expected, user-facing failure."""


class InputError(CovidLesionSegError, ValueError):
    """The input image cannot be segmented as it is (wrong file, 2D, not CT in HU, empty, too large...)."""


class ModelError(CovidLesionSegError):
    """A model id is unknown, or its file is missing, corrupted, foreign or fails its checksum."""


class OutputError(CovidLesionSegError):
    """An output cannot be written (it exists and --overwrite was not given, or the folder is not writable)."""
