"""Malformed PDUs on raw sockets against the running node: it drops the peer and keeps serving."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import numpy as np
import pytest
import synthetic
from harness import wait_for
from hostile.conftest import HostileNode
from hostile.wire import (
    Reply,
    associate_rq,
    echo,
    exchange,
    p_data,
    pdu,
    send_and_close,
)
from pynetdicom import AE

A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT = 0x02, 0x03, 0x07
#: The node's network timeout in this suite (conftest NODE_ENV), plus slack for a loaded CI box.
CLOSE_WITHIN_S = 3 + 12

pytestmark = pytest.mark.slow

RNG = np.random.default_rng(77)
GARBAGE = RNG.integers(0, 256, 1000, dtype=np.uint8).tobytes()
ECHO_COMMAND_FRAGMENT = p_data(1, 0x01, b"\x00\x00\x00\x00\x04\x00\x00\x00")  # not last


def _dropped(reply: Reply) -> bool:
    """The node closed the connection, with nothing or only an A-ABORT said."""
    return reply.closed and reply.pdu_type in (None, A_ABORT)


def _ac_then_dropped(reply: Reply) -> bool:
    """An A-ASSOCIATE-AC, then the node aborted or closed."""
    if not reply.closed or reply.pdu_type != A_ASSOCIATE_AC:
        return False
    rest = reply.data[6 + struct.unpack(">L", reply.data[2:6])[0]:]
    return rest == b"" or rest[0] == A_ABORT


SCENARIOS: dict[str, tuple[Callable[[int], Reply | None], Callable[[Reply], bool]]] = {
    "unknown PDU type 0x09": (lambda port: exchange(port, pdu(0x09, b"\0" * 10)), _dropped),
    "HTTP request": (
        lambda port: exchange(port, b"GET / HTTP/1.1\r\nHost: node\r\n\r\n"), _dropped),
    "TLS ClientHello to the plain port": (
        lambda port: exchange(port, b"\x16\x03\x01\x00\x2a\x01\x00\x00\x26\x03\x03" + b"\0" * 38),
        _dropped),
    "P-DATA before association": (
        lambda port: exchange(port, p_data(1, 0x03, b"\0" * 20)), _dropped),
    "A-RELEASE-RQ before association": (
        lambda port: exchange(port, pdu(0x05, b"\0" * 4)), _dropped),
    "A-ASSOCIATE-AC sent to the acceptor": (
        lambda port: exchange(port, pdu(0x02, b"\0" * 80)), _dropped),
    "A-ASSOCIATE-RQ of length 0": (lambda port: exchange(port, pdu(0x01, b"")), _dropped),
    "A-ASSOCIATE-RQ of random bytes": (lambda port: exchange(port, pdu(0x01, GARBAGE)), _dropped),
    "A-ASSOCIATE-RQ claiming 4 GiB, 1000 bytes sent": (
        lambda port: exchange(port, pdu(0x01, GARBAGE, length=0xFFFFFFFF), wait_s=CLOSE_WITHIN_S),
        _dropped),
    "A-ASSOCIATE-RQ truncated, then held open": (
        lambda port: exchange(port, associate_rq(calling="PROBE")[:40], wait_s=CLOSE_WITHIN_S),
        _dropped),
    "A-ASSOCIATE-RQ truncated, then closed": (
        lambda port: send_and_close(port, associate_rq(calling="PROBE")[:40]), lambda r: True),
    "A-ASSOCIATE-RQ with a lying item length": (
        lambda port: exchange(port, pdu(0x01, associate_rq(calling="PROBE")[6:74]
                                        + b"\x10\x00\xff\xff" + b"\0" * 100)), _dropped),
    "garbage after the association": (
        lambda port: exchange(port, associate_rq(calling="PROBE"), then=GARBAGE),
        _ac_then_dropped),
    "P-DATA whose PDV overruns the PDU": (
        lambda port: exchange(port, associate_rq(calling="PROBE"),
                              then=pdu(0x04, struct.pack(">LB", 5000, 1) + b"\x03" + b"\0" * 20)),
        _ac_then_dropped),
    "P-DATA on a context never proposed": (
        lambda port: exchange(port, associate_rq(calling="PROBE"),
                              then=p_data(99, 0x03, b"\0" * 20)),
        _ac_then_dropped),
    "A-ABORT in the middle of a command": (
        lambda port: exchange(port, associate_rq(calling="PROBE"),
                              then=ECHO_COMMAND_FRAGMENT + pdu(0x07, b"\0\0\0\0")),
        lambda r: r.closed and r.pdu_type == A_ASSOCIATE_AC),
    "connection closed in the middle of a P-DATA": (
        lambda port: exchange(port, associate_rq(calling="PROBE"),
                              then=p_data(1, 0x03, b"\0" * 200)[:50], wait_s=CLOSE_WITHIN_S),
        _ac_then_dropped),
}


def _store_valid(port: int, seed: int) -> tuple[int | None, str]:
    ds = synthetic.make_radiograph(rows=48, columns=48, seed=seed)
    ae = AE(ae_title="VALID")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMONODE")
    if not assoc.is_established:
        return None, str(ds.SOPInstanceUID)
    try:
        status = assoc.send_c_store(ds)
        return (int(status.Status) if "Status" in status else None), str(ds.SOPInstanceUID)
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_malformed_pdu_is_dropped_and_node_keeps_serving(
    hostile_node: HostileNode, name: str
) -> None:
    send, acceptable = SCENARIOS[name]
    started = time.monotonic()
    reply = send(hostile_node.port)
    if reply is not None:
        assert acceptable(reply), f"{name}: node answered {reply.data[:16].hex()} " \
                                  f"(closed: {reply.closed})"
    assert time.monotonic() - started < CLOSE_WITHIN_S + 5
    assert hostile_node.alive(), hostile_node.process.tail()
    # the wire guard frees a dropped peer's slot at once; its threads may take a moment to end
    wait_for(lambda: echo(hostile_node.port, calling="PROBE") == 0, CLOSE_WITHIN_S,
             f"a C-ECHO answered after '{name}'", step=0.5)
    seed = 5000 + list(SCENARIOS).index(name)
    answers: list[int | None] = []

    def stored() -> bool:
        status, _ = _store_valid(hostile_node.port, seed)
        answers.append(status)
        return status is not None

    wait_for(stored, CLOSE_WITHIN_S, f"a C-STORE answered after '{name}'", step=0.5)
    assert answers[-1] == 0x0000
    uid = str(synthetic.make_radiograph(rows=48, columns=48, seed=seed).SOPInstanceUID)
    wait_for(lambda: (j := hostile_node.repo.find_job(uid)) is not None and j.state == "done",
             60, f"the valid image stored after '{name}' to be done")


def test_unknown_calling_ae_gets_a_associate_rj_with_reason_3(hostile_node: HostileNode) -> None:
    reply = exchange(hostile_node.port, associate_rq(calling="STRANGER"))
    # A-ASSOCIATE-RJ: reserved, result 1 (permanent), source 1 (service user), reason 3
    assert reply.data[:10] == bytes([A_ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, 1, 1, 3])


def test_peers_stalled_mid_pdu_release_their_association_slots(
    hostile_node: HostileNode,
) -> None:
    """More stalled peers than node.max_associations (6): after the network timeout the node has
    dropped them all and accepts associations again."""
    stalled = []
    try:
        for _ in range(8):
            sock = socket.create_connection(("127.0.0.1", hostile_node.port), timeout=30)
            sock.sendall(associate_rq(calling="PROBE")[:20])
            stalled.append(sock)
        deadline = time.monotonic() + CLOSE_WITHIN_S
        for sock in stalled:
            assert _closed_by_node(sock, deadline), "the node must drop a peer stalled mid-PDU"
    finally:
        for sock in stalled:
            sock.close()
    wait_for(lambda: echo(hostile_node.port, calling="PROBE") == 0, CLOSE_WITHIN_S,
             "a C-ECHO answered once the stalled peers are dropped", step=0.5)


def _closed_by_node(sock: socket.socket, deadline: float) -> bool:
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            if sock.recv(4096) == b"":
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False
