"""Where the training package finds things, and the error a bad config value raises.

A leaf module (it imports nothing of ``training``): ``training.config`` validates the procedures' options,
so the procedures take :class:`ConfigError` and :func:`expand_path` from here rather than from
``training.config``, and the two never import each other.

Paths may use ``${SHARED_DATA}`` (``COVIDLESIONSEG_SHARED_DATA`` or ``../shared/data`` beside the checkout, as
``Testing/conftest.py``), ``${REPO}`` (the checkout) and any environment variable (``${CONFIG_DIR}`` is
replaced by ``training.config`` when it reads a file, since it depends on that file).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from COVIDLesionSegLib.errors import CovidLesionSegError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(CovidLesionSegError, ValueError):
    """A config file is missing, malformed, or holds unknown keys / values of the wrong type."""

    kind = "config"


def shared_data_dir() -> Path:
    """``COVIDLESIONSEG_SHARED_DATA`` or ``../shared/data`` beside the checkout (as ``Testing/conftest.py``)."""
    return Path(os.environ.get("COVIDLESIONSEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_path(value: str | None) -> str | None:
    """Expand ``${SHARED_DATA}``, ``${REPO}`` and environment variables in a path."""
    if value is None:
        return None

    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name == "SHARED_DATA":
            return str(shared_data_dir())
        if name == "REPO":
            return str(REPO_ROOT)
        if name in os.environ:
            return os.environ[name]
        raise ConfigError(f"path {value!r} uses ${{{name}}}, which is not set (known: SHARED_DATA, REPO, CONFIG_DIR "
                          "and environment variables)")

    return os.path.expanduser(_VAR.sub(repl, str(value)))


__all__ = ["CONFIG_DIR", "REPO_ROOT", "ConfigError", "expand_path", "shared_data_dir"]
