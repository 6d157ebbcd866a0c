"""Progress reporting and cancellation shared by the pipeline, the CLI, the Slicer worker and training.

A progress callback has the signature ``callback(fraction: float, message: str) -> None`` where
``fraction`` is the completed share of the current stage in [0, 1]. A callback cancels the run by raising
:class:`Cancelled`; long loops call it often enough (every slice batch / window) for a prompt stop.
"""

from __future__ import annotations

from typing import Callable, Optional

ProgressCallback = Callable[[float, str], None]


class Cancelled(Exception):
    """The user cancelled the run. Nothing is written after this is raised."""


def report(callback: Optional[ProgressCallback], fraction: float, message: str = "") -> None:
    """Call ``callback`` if there is one (keeps call sites free of ``if callback`` noise)."""
    if callback is not None:
        callback(min(max(float(fraction), 0.0), 1.0), message)
