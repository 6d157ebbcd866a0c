"""Shared pytest fixtures.

Real data lives in ``../shared/data`` beside the checkout (never in git). Tests that need it skip with a
reason when it is absent, for example in a user's fresh clone. ``COVIDLESIONSEG_SHARED_DATA`` overrides
the location.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("COVIDLESIONSEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    """Path of a file under ``../shared/data``; skips the calling test when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared data {relative!r} not found under {SHARED_DATA} (only on development machines and CI)")
    return path


def readme_python_blocks() -> list[str]:
    """The ```python blocks of README.md, in order (the tests run the examples as printed)."""
    import re

    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not found (only on development machines and CI)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def test_archs():
    """The test-only architectures (``Testing/engine/helpers.py``) registered for one test module."""
    from Testing.engine.helpers import registered_test_archs

    with registered_test_archs():
        yield


@pytest.fixture
def remote_model(tmp_path, monkeypatch, test_archs):
    """A manifest listing one model by URL only (a file:// URL of a checkpoint this test writes) and an
    empty model cache."""
    import json

    from COVIDLesionSegLib import catalogue
    from COVIDLesionSegLib.models.checkpoint import file_sha256
    from Testing.engine.helpers import _checkpoint, _linear

    (tmp_path / "server").mkdir()
    served = _checkpoint(tmp_path / "server", "test-pred-linear2d", _linear(2), 2, name="big-variant")
    manifest = tmp_path / "manifest.json"
    record = {"id": "big-variant", "version": "1", "task": "infection", "description": "a larger variant",
              "url": served.as_uri(), "sha256": file_sha256(served), "size_bytes": served.stat().st_size,
              "licence": "test"}
    manifest.write_text(json.dumps({"models": [record], "defaults": {}}))
    monkeypatch.setattr(catalogue, "MANIFEST_PATH", manifest)
    monkeypatch.setenv("COVIDLESIONSEG_MODEL_DIR", str(tmp_path / "cache"))
    return served, record
