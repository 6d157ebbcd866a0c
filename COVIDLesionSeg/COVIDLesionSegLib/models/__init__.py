"""The papers' networks and losses, shared by the engine, the Slicer module and ``training/``.

Use :func:`build` with a config ``{"arch": id, "args": {...}}``; :func:`architectures` lists the ids.
"""

from .registry import Architecture, architectures, build, get, register  # noqa: F401
