"""Fixtures for the service tests: a tiny model, a notify socket, fresh PostgreSQL databases."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import make_tiny_package
from service.nodekit import NotifySocket
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


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


@pytest.fixture
def pg_database(postgres_url: str) -> Iterator[str]:
    """A new, empty database on the throwaway PostgreSQL server; dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(make_url(postgres_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
