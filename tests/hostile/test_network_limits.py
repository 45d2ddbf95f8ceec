"""Wire limits against a running node: PDU sizes, data set size while receiving, ARTIM and
per-PDU deadlines, slow peers, and who holds the slots when associations are refused."""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import NodeProcess, free_port, wait_for, write_config
from hostile.wire import (
    associate_rq,
    c_store_command,
    echo,
    p_data,
    pdu,
    read_pdu,
)

pytestmark = pytest.mark.slow

A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT = 0x02, 0x03, 0x07
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
MAX_PDU = 16384
MAX_ASSOCIATIONS = 3
#: node.association_request_timeout_s and node.pdu_timeout_s at their defaults.
ARTIM_S, PDU_TIMEOUT_S = 10.0, 30.0
#: delivery.network_timeout_s here: a trickle of one byte a second never trips it.
NETWORK_TIMEOUT_S = 3.0
SLACK_S = 8.0
MIB = 1024 * 1024

NETWORK_ENV = {
    "PNEUMONODE_NODE__MAX_ASSOCIATIONS": str(MAX_ASSOCIATIONS),
    "PNEUMONODE_NODE__MAX_PDU_LENGTH": str(MAX_PDU),
    "PNEUMONODE_NODE__MAX_INSTANCE_MB": "1",
    "PNEUMONODE_NODE__ALLOWED_CALLING_AETS": '["HOSTILE", "VALID", "PROBE"]',
    "PNEUMONODE_DELIVERY__NETWORK_TIMEOUT_S": str(NETWORK_TIMEOUT_S),
    "PNEUMONODE_DELIVERY__ACSE_TIMEOUT_S": "3",
    "PNEUMONODE_WORKER__ENABLED": "false",
    "PNEUMONODE_METRICS__ENABLED": "false",
}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("network-node")
    config = write_config(root / "node.toml", port=free_port(), data_dir=root / "data")
    process = NodeProcess(config, root / "node.log", env=NETWORK_ENV).start()
    try:
        yield process
    finally:
        process.stop()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/PID/status")


class PeakRss:
    """Samples a process's resident set size in a thread; ``growth`` over the first sample."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = _rss_mib(pid)
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mib(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> float:
        return self.peak - self.base


def _pid(node: NodeProcess) -> int:
    assert node.proc is not None and node.proc.poll() is None, node.tail()
    return node.proc.pid


def _send_until_refused(sock: socket.socket, chunks: Iterator[bytes], timeout: float) -> int:
    """Send ``chunks`` until the node closes the connection; the bytes it took."""
    sent = 0
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    try:
        for chunk in chunks:
            if time.monotonic() > deadline:
                break
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """The node closes ``sock`` (after an A-ABORT or nothing) within ``seconds``."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            if sock.recv(65536) == b"":
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def _associated(port: int, abstract: str = CR_IMAGE) -> socket.socket:
    """An association as PROBE, once a slot is free (a released one may take a moment)."""
    deadline = time.monotonic() + SLACK_S
    while True:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(associate_rq(calling="PROBE", abstract=abstract))
        kind, _ = read_pdu(sock)
        if kind == A_ASSOCIATE_AC:
            return sock
        sock.close()
        assert kind == A_ASSOCIATE_RJ and time.monotonic() < deadline, f"PDU type {kind}"
        time.sleep(0.2)


def _echo_works(port: int) -> None:
    wait_for(lambda: echo(port, calling="VALID") == 0, ARTIM_S + SLACK_S,
             "a C-ECHO answered", step=0.5)


def test_one_gib_association_request_is_dropped_before_it_is_read(node: NodeProcess) -> None:
    """pynetdicom read a declared 1 GiB A-ASSOCIATE-RQ whole before the calling AE check (the
    node grew by 2 GiB); now the declared length alone drops the connection."""
    pid = _pid(node)
    megabyte = b"\0" * MIB
    with PeakRss(pid) as rss, socket.create_connection(("127.0.0.1", node.port)) as sock:
        header = struct.pack(">BBL", 0x01, 0, 1 << 30)
        sent = _send_until_refused(sock, iter([header, *[megabyte] * 128]), timeout=30)
    assert sent < 16 * MIB, f"the node took {sent} bytes of a 1 GiB association request"
    assert rss.growth < 8, f"node RSS grew by {rss.growth:.0f} MiB"
    assert "declares 1073741824 bytes, over the association request limit" in node.log.read_text()
    _echo_works(node.port)


def test_p_data_over_max_pdu_length_aborts_the_association(node: NodeProcess) -> None:
    with _associated(node.port) as sock:
        body = struct.pack(">LBB", MAX_PDU - 4 + 1, 1, 0x01) + b"\0" * (MAX_PDU - 6 + 1)
        assert len(body) == MAX_PDU + 1
        sock.sendall(pdu(0x04, body))
        sock.settimeout(ARTIM_S)
        kind, _ = read_pdu(sock)
        assert kind in (A_ABORT, 0), f"PDU type 0x{kind:02X} instead of an A-ABORT"
        assert _closed_within(sock, SLACK_S)
    assert f"over node.max_pdu_length ({MAX_PDU})" in node.log.read_text()
    _echo_works(node.port)


def test_p_data_at_max_pdu_length_is_accepted(node: NodeProcess) -> None:
    """A P-DATA-TF of exactly the advertised length is within the limit (PS3.8 D.1)."""
    with _associated(node.port) as sock:
        command = c_store_command(CR_IMAGE, b"1.2.3.4")
        sock.sendall(p_data(1, 0x03, command))
        fill = MAX_PDU - 6
        sock.sendall(pdu(0x04, struct.pack(">LBB", fill + 2, 1, 0x00) + b"\0" * fill))
        assert not _closed_within(sock, 2.0), "the node dropped a P-DATA within the limit"
        sock.sendall(pdu(0x07, b"\0\0\0\0"))


def test_data_set_beyond_twice_max_instance_mb_aborts_while_receiving(node: NodeProcess) -> None:
    """pynetdicom collects a data set's fragments in memory whatever their total; now more than
    twice node.max_instance_mb (1 MiB here) aborts the association as it arrives."""
    pid = _pid(node)
    fragment = MAX_PDU - 6
    with PeakRss(pid) as rss, _associated(node.port) as sock:
        sock.sendall(p_data(1, 0x03, c_store_command(CR_IMAGE, b"1.2.3.5")))
        one = pdu(0x04, struct.pack(">LBB", fragment + 2, 1, 0x00) + b"\0" * fragment)
        sent = _send_until_refused(sock, iter([one] * (64 * MIB // fragment)), timeout=30)
    assert sent < 16 * MIB, f"the node took {sent} bytes of data set (limit 2 MiB)"
    assert rss.growth < 16, f"node RSS grew by {rss.growth:.0f} MiB"
    assert "(twice node.max_instance_mb) while receiving" in node.log.read_text()
    _echo_works(node.port)


def test_malformed_requests_free_their_slots_at_once(node: NodeProcess) -> None:
    """A first PDU that is not a decodable A-ASSOCIATE-RQ left pynetdicom's association thread
    waiting for the ACSE timeout, holding a slot; now the slot is free when the peer is."""
    _echo_works(node.port)
    garbage = [pdu(0x01, b"\xff" * 300), pdu(0x04, b"\0" * 20), b"GET / HTTP/1.1\r\n\r\n"]
    for n in range(2 * MAX_ASSOCIATIONS):
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
            sock.sendall(garbage[n % len(garbage)])
            assert _closed_within(sock, 5.0)
    started = time.monotonic()
    wait_for(lambda: echo(node.port, calling="VALID") == 0, 2.0, "a C-ECHO at once", step=0.2)
    assert time.monotonic() - started < 2.0
    log = node.log.read_text()
    assert "undecodable association request" in log
    assert "its first PDU is of type 0x04, not an A-ASSOCIATE-RQ" in log
    assert "its first PDU is of type 0x47, not an A-ASSOCIATE-RQ" in log


def test_connections_beyond_four_per_slot_are_closed_unread(node: NodeProcess) -> None:
    """Every connection costs threads and up to 64 KiB of association request; at most
    4 x node.max_associations are open at once."""
    limit = 4 * MAX_ASSOCIATIONS
    held = [socket.create_connection(("127.0.0.1", node.port), timeout=5) for _ in range(limit)]
    try:
        time.sleep(1.0)
        assert not any(_closed_within(sock, 0.05) for sock in held)
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as extra:
            assert _closed_within(extra, 2.0), "a connection over the limit is closed at once"
    finally:
        for sock in held:
            sock.close()
    line = next(x for x in node.log.read_text().splitlines() if "closed unread" in x)
    assert f"{limit} connections open (4 x node.max_associations)" in line, line
    assert "held by: 127.0.0.1 (AE unknown)" in line, line
    _echo_works(node.port)


def _trickle(port: int, stop: threading.Event, closed: list[float], started: float) -> None:
    data = associate_rq(calling="PROBE")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for byte in data:
            if stop.is_set():
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed.append(time.monotonic() - started)
                return
            if _closed_within(sock, 1.0):
                closed.append(time.monotonic() - started)
                return


def test_trickling_peers_lose_their_slots_and_are_named(node: NodeProcess) -> None:
    """Ten peers sending an association request one byte a second held every slot for ever;
    now each is dropped at the ARTIM time, a sender gets in, and the refusals name holders."""
    stop = threading.Event()
    closed: list[float] = []
    started = time.monotonic()
    peers = [threading.Thread(target=_trickle, args=(node.port, stop, closed, started))
             for _ in range(10)]
    for peer in peers:
        peer.start()
    try:
        time.sleep(1.5)
        assert echo(node.port, calling="VALID") is None, "slots should all be held now"
        _echo_works(node.port)
        served_after = time.monotonic() - started
        for peer in peers:  # each ends once it sees its connection closed
            peer.join(ARTIM_S + SLACK_S)
    finally:
        stop.set()
        for peer in peers:
            peer.join(30)
    assert served_after < ARTIM_S + SLACK_S
    assert len(closed) == 10 and max(closed) < ARTIM_S + SLACK_S, closed
    log = node.log.read_text()
    line = next((x for x in log.splitlines() if "local limit exceeded" in x), None)
    assert line is not None, "a local-limit rejection is logged"
    assert "as 'VALID' rejected" in line and "node.max_associations = 3" in line, line
    assert re.search(r"slots held by: 127\.0\.0\.1 \(AE unknown\) \d+\.\d s awaiting its "
                     r"association request \(\d+ of 6 bytes\)", line), line
    assert "no whole association request within node.association_request_timeout_s" in log


def test_pdu_trickled_after_association_is_dropped_at_the_pdu_deadline(
    node: NodeProcess,
) -> None:
    with _associated(node.port, abstract="1.2.840.10008.1.1") as sock:
        data = p_data(1, 0x03, b"\0" * 200)
        started = time.monotonic()
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            if _closed_within(sock, 1.0):
                break
        elapsed = time.monotonic() - started
    assert PDU_TIMEOUT_S - 2 < elapsed < PDU_TIMEOUT_S + SLACK_S, elapsed
    assert "PDU not complete within node.pdu_timeout_s (30 s" in node.log.read_text()
