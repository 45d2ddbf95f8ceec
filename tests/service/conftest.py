"""Fixtures for the service tests: a tiny model package and a notify socket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import make_tiny_package
from service.nodekit import NotifySocket


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-member 64 px model package: the node loads and runs it in a second."""
    return make_tiny_package(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    """A bound notify socket, removed after the test."""
    sock = NotifySocket()
    try:
        yield sock
    finally:
        sock.close()
