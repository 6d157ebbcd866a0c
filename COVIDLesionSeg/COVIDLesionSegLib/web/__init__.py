"""The browser app, ``covidlesionseg serve`` (optional: ``pip install -e ".[web]"``, which brings trame-slicer).

``session.py`` holds one session's files (uploads, the ``--data`` folder, downloads) and needs no trame;
``app.py`` is the trame-slicer page around the module's logic.
"""

from __future__ import annotations

#: What the web extra installs, for the message when it is missing.
WEB_EXTRA_HINT = 'the web app needs the web extra: pip install -e ".[web]" (trame-slicer)'


def missing_dependency() -> str | None:
    """None when the web app can start, else what to install."""
    import importlib.util

    for module in ("trame", "trame_slicer", "aiohttp"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed; {WEB_EXTRA_HINT}"
    return None
