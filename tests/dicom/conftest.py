"""Fixtures of the DICOM network tests: a throwaway PKI made at test time."""

from __future__ import annotations

import pytest
from dicom.pki import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))
