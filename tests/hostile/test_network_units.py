"""The wire guard and the connection gate on socket pairs, without a node: fast checks of the
limits that tests/hostile/test_network_limits.py shows against a running node."""

from __future__ import annotations

import logging
import socket
import struct
import time
from types import SimpleNamespace
from typing import Any

import pytest
from hostile.wire import associate_rq, p_data, pdu

from pneumonode.dicom.pynetdicom_internals import UnsupportedPynetdicom, check_pynetdicom
from pneumonode.dicom.wire_limits import (
    ABORT_INVALID_PARAMETER,
    MAX_ASSOCIATE_RQ_BYTES,
    ConnectionGate,
    PduGuard,
    WireLimits,
)
from pneumonode.settings import Settings

MIB = 1024 * 1024


def _limits(**changes: Any) -> WireLimits:
    values: dict[str, Any] = {
        "max_pdu_bytes": 16384, "max_dataset_bytes": 2 * MIB,
        "association_request_timeout_s": 5.0, "pdu_timeout_s": 5.0, "network_timeout_s": 5.0,
    }
    return WireLimits(**(values | changes))


def _guard(limits: WireLimits) -> tuple[PduGuard, socket.socket, socket.socket, list[str]]:
    node, peer = socket.socketpair()
    woken: list[str] = []
    guard = PduGuard(limits, "10.0.0.1", on_drop_before_request=lambda: woken.append("woken"))
    return guard, node, peer, woken


def _after_refusal(peer: socket.socket) -> bytes:
    peer.settimeout(2)
    data = b""
    while chunk := peer.recv(4096):
        data += chunk
    return data


def test_unknown_pynetdicom_major_version_fails_loudly() -> None:
    check_pynetdicom()
    with pytest.raises(UnsupportedPynetdicom, match=r"pynetdicom 4\.0\.0 is installed"):
        check_pynetdicom("4.0.0")
    with pytest.raises(UnsupportedPynetdicom):
        check_pynetdicom("2.1.1")


def test_limits_follow_the_settings() -> None:
    settings = Settings(node={"max_pdu_length": 32768, "max_instance_mb": 3,
                              "association_request_timeout_s": 7, "pdu_timeout_s": 9},
                        delivery={"network_timeout_s": 11})
    limits = WireLimits.from_settings(settings)
    assert limits == WireLimits(32768, 6 * MIB, 7.0, 9.0, 11.0)
    assert limits.pdu_limit(0x01, first=True)[0] == MAX_ASSOCIATE_RQ_BYTES
    assert limits.pdu_limit(0x04, first=False)[0] == 32768
    assert limits.pdu_limit(0x05, first=False)[0] == 64 * 1024
    unlimited = WireLimits.from_settings(Settings(node={"max_pdu_length": 0}))
    twice = 2 * Settings().node.max_instance_mb * MIB
    assert unlimited.pdu_limit(0x04, first=False) == (twice, "twice node.max_instance_mb")


def test_declared_length_over_the_limit_is_refused_unread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard, node, peer, woken = _guard(_limits())
    with node, peer:
        peer.sendall(struct.pack(">BBL", 0x01, 0, 1 << 30) + b"\0" * 1000)
        with caplog.at_level(logging.WARNING):
            assert guard.recv(node, 6) == bytearray()
        assert _after_refusal(peer) == ABORT_INVALID_PARAMETER
    assert woken == ["woken"] and guard.refused
    assert "declares 1073741824 bytes, over the association request limit" in caplog.text
    assert guard.recv(node, 6) == bytearray()


def test_a_valid_request_is_handed_over_header_then_body() -> None:
    guard, node, peer, woken = _guard(_limits())
    request = associate_rq(calling="CR1")
    with node, peer:
        peer.sendall(request)
        header = guard.recv(node, 6)
        body = guard.recv(node, struct.unpack(">L", header[2:6])[0])
    assert bytes(header + body) == request
    assert guard.requested and guard.calling_ae == "CR1" and woken == []


def test_p_data_over_max_pdu_length_is_refused() -> None:
    guard, node, peer, _ = _guard(_limits())
    with node, peer:
        peer.sendall(associate_rq())
        guard.recv(node, 6)
        guard.recv(node, len(associate_rq()) - 6)
        peer.sendall(p_data(1, 0x00, b"\0" * 16384))  # PDU length 16384 + 6
        assert guard.recv(node, 6) == bytearray()
        assert _after_refusal(peer) == ABORT_INVALID_PARAMETER


def test_data_set_fragments_over_the_limit_are_refused() -> None:
    guard, node, peer, _ = _guard(_limits(max_dataset_bytes=40000))
    with node, peer:
        peer.sendall(associate_rq())
        guard.recv(node, 6)
        guard.recv(node, len(associate_rq()) - 6)
        for n in range(3):
            peer.sendall(p_data(1, 0x00, b"\0" * 16000))
            header = guard.recv(node, 6)
            if n < 2:
                assert guard.recv(node, struct.unpack(">L", header[2:6])[0])
        assert header == bytearray() and guard.refused


def test_last_fragment_resets_the_data_set_count() -> None:
    guard, node, peer, _ = _guard(_limits(max_dataset_bytes=40000))
    with node, peer:
        peer.sendall(associate_rq())
        guard.recv(node, 6)
        guard.recv(node, len(associate_rq()) - 6)
        for n in range(6):
            peer.sendall(p_data(1, 0x02 if n % 2 else 0x00, b"\0" * 16000))
            header = guard.recv(node, 6)
            assert guard.recv(node, struct.unpack(">L", header[2:6])[0])
    assert not guard.refused


def test_association_request_must_be_whole_within_artim(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard, node, peer, woken = _guard(_limits(association_request_timeout_s=0.5,
                                              network_timeout_s=5.0))
    with node, peer:
        peer.sendall(associate_rq()[:40])
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            assert guard.recv(node, 6) == bytearray()
        assert 0.4 < time.monotonic() - started < 2.0
    assert woken == ["woken"]
    assert "no whole association request within node.association_request_timeout_s (0.5 s; " \
           "34 of " in caplog.text


def test_first_pdu_other_than_an_association_request_is_refused() -> None:
    guard, node, peer, woken = _guard(_limits())
    with node, peer:
        peer.sendall(pdu(0x05, b"\0\0\0\0"))
        assert guard.recv(node, 6) == bytearray()
        assert _after_refusal(peer)[9] == 0x02  # A-ABORT reason: unexpected PDU
    assert woken == ["woken"]


def test_gate_refuses_beyond_its_limit_and_logs_at_most_every_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    gate = ConnectionGate(2, interval_s=10.0, clock=lambda: now[0])
    holder: Any = SimpleNamespace(dul=SimpleNamespace(socket=None),
                                  requestor=SimpleNamespace(address="10.0.0.9"),
                                  is_established=True)
    with caplog.at_level(logging.WARNING):
        assert gate.admit("10.0.0.1", [holder], 0)
        assert not gate.admit("10.0.0.1", [holder], 1)
        assert not gate.admit("10.0.0.2", [holder, holder], 0)
        now[0] += 10.0
        assert not gate.admit("10.0.0.3", [holder, holder], 0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("connection from 10.0.0.1 closed unread: 2 connections open")
    assert "2 closed so since the last such line; held by: 10.0.0.9 (not tracked)" in lines[1]
