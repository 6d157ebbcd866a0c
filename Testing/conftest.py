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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not found (only on development machines and CI)")
    return SHARED_DATA
