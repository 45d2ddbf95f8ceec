"""Fixtures shared by all tests: real test data beside the repository, the dciodvfy validator."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ``shared/data`` folder beside the repository (real SIIM files); skip when absent."""
    path = (REPO_ROOT / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip(f"real test data absent: no shared/data folder beside the repository ({path})")
    return path


@pytest.fixture(scope="session")
def dciodvfy() -> Path:
    """Path of dicom3tools' ``dciodvfy``; skip when it is not installed."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    return Path(exe)
