"""A TLS listener against a peer trickling its handshake: dropped at the association request
deadline, not after one network timeout per byte."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom.pki import Pki, make_pki
from harness import free_port

from pneumonode.dicom.intake import Intake
from pneumonode.dicom.scp import DicomServer
from pneumonode.queue.db import create_schema, make_engine
from pneumonode.queue.repository import JobRepository
from pneumonode.settings import Settings

ARTIM_S = 1.5
#: The start of a TLS 1.2 ClientHello record (content type 22, length 512).
CLIENT_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x11" * 40


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_port(tmp_path: Path, pki: Pki) -> Iterator[int]:
    port = free_port()
    settings = Settings(
        node={"port": port, "host": "127.0.0.1", "data_dir": tmp_path / "data",
              "association_request_timeout_s": ARTIM_S},
        delivery={"network_timeout_s": 5.0},
        tls={"enabled": True, "certificate": pki.server_cert, "private_key": pki.server_key},
    )
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    create_schema(engine)
    server = DicomServer(settings, Intake(tmp_path / "data", JobRepository(engine)))
    server.start()
    try:
        yield port
    finally:
        server.shutdown()


def test_trickled_tls_handshake_is_dropped_at_the_deadline(
    tls_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    started = time.monotonic()
    closed_after = None
    with caplog.at_level(logging.WARNING), \
            socket.create_connection(("127.0.0.1", tls_port), timeout=5) as sock:
        for byte in CLIENT_HELLO_START:
            try:
                sock.sendall(bytes([byte]))
                sock.settimeout(0.5)
                if sock.recv(1024) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed_after = time.monotonic() - started
                break
        time.sleep(0.2)
    assert closed_after is not None and closed_after < ARTIM_S + 2, closed_after
    assert "TLS handshake with 127.0.0.1 failed: not complete within 1.5 s" in caplog.text
