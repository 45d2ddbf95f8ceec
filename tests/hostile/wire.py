"""Sending what DCMTK would refuse to: raw C-STORE data sets and hand-made PDUs."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hostile.corpus import Case
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID
from pynetdicom import AE, _config

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


@contextmanager
def chunked_sending() -> Iterator[None]:
    """pynetdicom sends a file's data set bytes as they are, without decoding them."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def case_file(case: Case, folder: Path) -> Path:
    """A Part 10 file whose file meta names the case's UIDs and syntax, followed by its payload."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = case.sop_class_uid
    meta.MediaStorageSOPInstanceUID = case.sop_instance_uid
    meta.TransferSyntaxUID = case.transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path = folder / f"{case.name}.dcm"
    path.write_bytes(buffer.getvalue() + case.payload)
    return path


def store_raw(port: int, case: Case, folder: Path, calling: str = "HOSTILE") -> str:
    """C-STORE a case over its own association; the outcome as the corpus table spells it.

    Returns ``status:0xNNNN``, ``no-context`` (nothing accepted for the SOP class/syntax),
    ``rejected`` (association rejected) or ``aborted`` (no response).
    """
    path = case_file(case, folder)
    ae = AE(ae_title=calling)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 10, 60, 60
    ae.add_requested_context(case.sop_class_uid, [case.transfer_syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMONODE")
    if not assoc.accepted_contexts and assoc.rejected_contexts:
        return "no-context"  # pynetdicom aborts an association with nothing accepted
    if not assoc.is_established:
        return "rejected" if assoc.is_rejected else "aborted"
    try:
        with chunked_sending():
            status = assoc.send_c_store(path)
        if "Status" not in status:
            return "aborted"
        return f"status:0x{int(status.Status):04X}"
    finally:
        if assoc.is_established:
            assoc.release()


def echo(port: int, calling: str = "HOSTILE") -> int | None:
    """C-ECHO status, or None when no association or no answer."""
    ae = AE(ae_title=calling)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 10, 10, 10
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMONODE")
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()


# --- hand-made PDUs (PS3.8 9.3)


def _ae(title: str | bytes) -> bytes:
    raw = title if isinstance(title, bytes) else title.encode("ascii")
    return raw.ljust(16)[:16]


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def pdu(kind: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU: type, reserved byte, 4-byte big endian length (which may lie), body."""
    return struct.pack(">BBL", kind, 0, len(body) if length is None else length) + body


def associate_rq(
    calling: str | bytes = "HOSTILE", called: str = "PNEUMONODE", abstract: str = VERIFICATION
) -> bytes:
    """A valid A-ASSOCIATE-RQ proposing ``abstract`` (Verification) in Implicit VR Little Endian
    as presentation context 1; ``calling`` as bytes goes into the field as it is (16 at most)."""
    context = _item(0x20, b"\x01\0\0\0" + _item(0x30, abstract.encode())
                    + _item(0x40, b"1.2.840.10008.1.2"))
    user = _item(0x50, _item(0x51, struct.pack(">L", 16384))
                 + _item(0x52, b"1.2.826.0.1.3680043.9999.2"))
    body = (struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + b"\0" * 32
            + _item(0x10, APPLICATION_CONTEXT.encode()) + context + user)
    return pdu(0x01, body)


def p_data(context_id: int, header: int, data: bytes) -> bytes:
    """A P-DATA-TF with one PDV (``header``: bit 0 command, bit 1 last fragment)."""
    pdv = struct.pack(">LB", len(data) + 2, context_id) + bytes([header]) + data
    return pdu(0x04, pdv)


def c_store_command(sop_class: str, sop_instance: bytes, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (Implicit VR Little Endian, data set follows) whose Affected SOP
    Instance UID is ``sop_instance`` as it is, control characters included."""
    elements = [
        (0x0002, sop_class.encode() + b"\0" * (len(sop_class) % 2)),
        (0x0100, struct.pack("<H", 0x0001)),
        (0x0110, struct.pack("<H", message_id)),
        (0x0700, struct.pack("<H", 0)),
        (0x0800, struct.pack("<H", 0x0000)),
        (0x1000, sop_instance + b"\0" * (len(sop_instance) % 2)),
    ]
    body = b"".join(struct.pack("<HHL", 0, tag, len(v)) + v for tag, v in elements)
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


@dataclass(frozen=True)
class Reply:
    """What the node sent back on a raw connection, and whether it closed the connection."""

    data: bytes
    closed: bool

    @property
    def pdu_type(self) -> int | None:
        return self.data[0] if self.data else None


def exchange(port: int, data: bytes, *, wait_s: float = 5.0, then: bytes = b"") -> Reply:
    """Send raw bytes on a fresh connection; return what comes back until close or ``wait_s``.

    ``then`` is sent once the first answer (e.g. an A-ASSOCIATE-AC) has arrived.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        answer = bytearray()
        try:
            if then:
                answer += sock.recv(65536)
                sock.sendall(then)
            while not _ends_in_abort(answer) and (chunk := sock.recv(65536)):
                answer += chunk
        except TimeoutError:
            return Reply(bytes(answer), closed=False)
        except (ConnectionResetError, BrokenPipeError):
            pass
        return Reply(bytes(answer), closed=True)


def _ends_in_abort(data: bytes | bytearray) -> bool:
    """The PDUs in ``data`` are complete and the last is an A-ABORT (after which a peer closes)."""
    at, last = 0, None
    while at + 6 <= len(data):
        last = data[at]
        at += 6 + struct.unpack(">L", data[at + 2 : at + 6])[0]
    return at == len(data) and last == 0x07


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One whole PDU from ``sock``: its type and body; type 0 when the peer closed instead."""
    header = _read(sock, 6)
    if len(header) < 6:
        return 0, b""
    kind, _, length = struct.unpack(">BBL", header)
    return kind, _read(sock, length)


def _read(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def send_and_close(port: int, data: bytes) -> None:
    """A peer that vanishes right after sending ``data`` (mid-PDU, before any answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_RDWR)
