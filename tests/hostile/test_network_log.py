"""The node's log against peers that write into it: control characters from an AE title or an
Affected SOP Instance UID are escaped, and a malformed request is one line, not a traceback."""

from __future__ import annotations

import logging
import re
import socket
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
from harness import NodeProcess, free_port, wait_for, write_config
from hostile.wire import associate_rq, c_store_command, echo, p_data, pdu, read_pdu

from pneumonode.dicom.log_escape import CONTINUATION, EscapingFormatter, FoldLibraryTracebacks

pytestmark = pytest.mark.slow

A_ASSOCIATE_AC = 0x02
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
#: A calling AE title (16 bytes) that would start a forged line and clear the screen.
FORGED_AE = b"A\nFORGED\x1b[2J\x00XY"
#: An Affected SOP Instance UID that would write a forged record and clear the screen.
FORGED_UID = b"1.2.3\n2026-01-01 00:00:00,000 INFO pneumonode forged\x1b[2J\x00"
#: Start of a record as the node writes it (pneumonode.cli.common.configure_logging).
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("log-node")
    config = write_config(root / "node.toml", port=free_port(), data_dir=root / "data")
    env = {
        "PNEUMONODE_NODE__ALLOWED_CALLING_AETS": '["HOSTILE", "VALID", "PROBE"]',
        "PNEUMONODE_DELIVERY__NETWORK_TIMEOUT_S": "3",
        "PNEUMONODE_WORKER__ENABLED": "false",
        "PNEUMONODE_METRICS__ENABLED": "false",
    }
    process = NodeProcess(config, root / "node.log", env=env).start()
    try:
        yield process
    finally:
        process.stop()


def _records_since(node: NodeProcess, offset: int) -> list[str]:
    """Lines the node wrote after ``offset`` bytes of its log, once it has gone quiet."""
    size = -1
    while size != node.log.stat().st_size:
        size = node.log.stat().st_size
        time.sleep(0.5)
    text = node.log.read_bytes()[offset:].decode("utf-8", "replace")
    return text.split("\n")[:-1]  # not splitlines(): it would split on \x1c, \x85, \u2028 too


def _answer(sock: socket.socket) -> int:
    sock.settimeout(10)
    try:
        return read_pdu(sock)[0]
    except (TimeoutError, ConnectionResetError):
        return 0


def _assert_no_raw_controls(lines: list[str]) -> None:
    for line in lines:
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", line), f"raw control in {line!r}"
        assert RECORD.match(line) or line.startswith(CONTINUATION), f"forged line {line!r}"
        assert not line.startswith(("FORGED", "2026-01-01")), f"forged line {line!r}"


def test_control_characters_in_a_calling_ae_title_are_escaped(node: NodeProcess) -> None:
    offset = node.log.stat().st_size
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(associate_rq(calling=FORGED_AE))
        _answer(sock)
    lines = _records_since(node, offset)
    _assert_no_raw_controls(lines)
    assert any("A\\nFORGED\\x1b[2J" in line for line in lines), lines
    assert not any("Traceback" in line for line in lines), lines
    assert echo(node.port, calling="PROBE") == 0


def test_control_characters_in_an_affected_sop_instance_uid_are_escaped(
    node: NodeProcess,
) -> None:
    offset = node.log.stat().st_size
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(associate_rq(calling="PROBE", abstract=CR_IMAGE))
        assert _answer(sock) == A_ASSOCIATE_AC
        sock.sendall(p_data(1, 0x03, c_store_command(CR_IMAGE, FORGED_UID)))
        sock.sendall(p_data(1, 0x02, b"\x08\x00\x16\x00\x02\x00\x00\x00AB"))
        _answer(sock)
        sock.sendall(pdu(0x05, b"\0\0\0\0"))
        _answer(sock)
    lines = _records_since(node, offset)
    _assert_no_raw_controls(lines)
    assert any("1.2.3\\n2026-01-01 00:00:00,000 INFO pneumonode forged\\x1b[2J" in line
               for line in lines), lines
    assert not any("Traceback" in line for line in lines), lines


def test_a_malformed_association_request_is_one_line(node: NodeProcess) -> None:
    """pynetdicom wrote an error and a traceback of some 20 lines for each undecodable PDU."""
    garbage = np.random.default_rng(77).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    wait_for(lambda: echo(node.port, calling="PROBE") == 0, 20, "the node answers")
    offset = node.log.stat().st_size
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(pdu(0x01, garbage))
        _answer(sock)
    lines = _records_since(node, offset)
    assert len(lines) == 1, lines
    assert "aborted connection from 127.0.0.1" in lines[0]
    assert "undecodable association request" in lines[0]


def test_formatter_escapes_messages_and_marks_traceback_lines() -> None:
    formatter = EscapingFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "peer %s said %r",
                               ("A\nB\x1b[2J\x00", "\u2028"), None)
    assert formatter.format(record) == "WARNING peer A\\nB\\x1b[2J\\x00 said '\\u2028'"
    try:
        raise ValueError("bad\n2026-01-01 forged\x1b")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None,
                                   sys.exc_info())
    first, *rest = formatter.format(failed).split("\n")
    assert first == "ERROR failed" and rest
    assert all(line.startswith(CONTINUATION) and "\x1b" not in line for line in rest)


def test_library_tracebacks_are_folded_or_dropped() -> None:
    fold = FoldLibraryTracebacks()
    try:
        raise ValueError("undecodable")
    except ValueError as exc:
        info = sys.exc_info()
        echoed = logging.LogRecord("pynetdicom.dul", logging.ERROR, __file__, 1, exc, None, info)
        other = logging.LogRecord("pynetdicom.acse", logging.ERROR, __file__, 1, "no %s",
                                  ("luck",), info)
        ours = logging.LogRecord("pneumonode.x", logging.ERROR, __file__, 1, "ours", None, info)
    assert fold.filter(echoed) is False
    assert fold.filter(other) is True
    assert other.exc_info is None and other.getMessage() == "no luck (ValueError: undecodable)"
    assert fold.filter(ours) is True and ours.exc_info is not None
