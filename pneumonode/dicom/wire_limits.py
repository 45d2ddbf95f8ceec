"""Wire limits for the listener: PDU sizes and deadlines enforced before a PDU is read.

Why this hooks pynetdicom, and where
------------------------------------
pynetdicom 3.x (``dul.DULServiceProvider._read_pdu_data``) reads a PDU as ``recv(6)`` then
``recv(length)`` with whatever length the peer declared, and ``transport.AssociationSocket.recv``
loops on ``socket.recv`` until that many bytes have come:

* an A-ASSOCIATE-RQ declaring 1 GiB is read whole (and copied) before ``EVT_REQUESTED``, where
  the calling AE title is checked: memory before authentication;
* a P-DATA-TF longer than the Maximum Length we advertised is accepted, and the fragments of one
  data set are collected in memory whatever their total;
* a peer sending one byte per network timeout holds the DUL thread in that loop forever, and so
  its association slot; pynetdicom's ARTIM timer is only looked at between PDUs.

DCMTK and Orthanc refuse PDUs over the negotiated maximum and time the association request out
(ARTIM, PS3.8 9.1.5). Here the acceptor's ``AssociationSocket`` (created in
``transport.RequestHandler._create_association``) becomes a :class:`BoundedAssociationSocket`:
at the ``recv(6)`` that starts a PDU it checks the declared length against the limit for that
PDU, then reads the whole PDU before its deadline, and only then hands pynetdicom the bytes it
asks for. A PDU that breaks a limit is refused: one warning is logged, an A-ABORT is sent, the
connection is shut down and pynetdicom is told the transport closed (an empty read, Evt17).
A first PDU that is not an A-ASSOCIATE-RQ pynetdicom can decode is refused the same way, and
the association thread waiting for it is woken (pynetdicom would leave it waiting, holding an
association slot, until its ACSE timeout).

The hook depends on those two pynetdicom internals, so
:func:`pneumonode.dicom.pynetdicom_internals.check_pynetdicom` refuses to start the listener with
a pynetdicom major version other than the one it was written for.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from queue import Queue
from socketserver import BaseServer
from typing import TYPE_CHECKING, Any, cast

from pynetdicom.pdu import A_ASSOCIATE_RQ as A_ASSOCIATE_RQ_PDU
from pynetdicom.transport import AssociationSocket, RequestHandler

from pneumonode.dicom.reactor import install
from pneumonode.settings import Settings

if TYPE_CHECKING:
    from pynetdicom.association import Association

LOGGER = logging.getLogger(__name__)

MIB = 1024 * 1024
PDU_HEADER_BYTES = 6

#: Largest A-ASSOCIATE-RQ (or any first PDU) read, before the calling AE title is known. 128
#: presentation contexts (the most there can be) with a dozen transfer syntaxes each fit.
MAX_ASSOCIATE_RQ_BYTES = 64 * 1024
#: Largest other non-P-DATA PDU (A-RELEASE and A-ABORT carry 4 bytes).
MAX_CONTROL_PDU_BYTES = 64 * 1024
#: Most command-set bytes of one DIMSE message (a C-STORE command is about 200).
MAX_COMMAND_BYTES = 64 * 1024

A_ASSOCIATE_RQ, P_DATA_TF = 0x01, 0x04
PDU_TYPES = frozenset(range(0x01, 0x08))

#: A-ABORT PDUs from the service provider, by reason (PS3.8 9.3.8): not specified,
#: unrecognized PDU, unexpected PDU, invalid PDU parameter value.
ABORT_UNSPECIFIED = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x00)
ABORT_UNRECOGNIZED_PDU = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x01)
ABORT_UNEXPECTED_PDU = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x02)
ABORT_INVALID_PARAMETER = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x06)

#: Most holders named in one "local limit exceeded" line.
MAX_HOLDERS_SHOWN = 10
#: Connections open at once (associations, requests being read or turned away, TLS handshakes)
#: per association slot; a connection beyond is closed unread. It bounds the threads and the
#: association-request buffers a flood of connections can make.
CONNECTIONS_PER_SLOT = 4
#: Shortest time between two log lines about connections closed unread.
GATE_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class WireLimits:
    """What one connection to the listener may send.

    Attributes
    ----------
    max_pdu_bytes:
        Largest P-DATA-TF PDU length (the Maximum Length Received we advertise; the 6-byte
        header is not counted, PS3.8 D.1); 0 means no advertised maximum.
    max_dataset_bytes:
        Most data-set bytes of one DIMSE message; P-DATA beyond aborts the association.
    association_request_timeout_s:
        ARTIM: the whole A-ASSOCIATE-RQ must have arrived this long after the connection.
    pdu_timeout_s:
        Every PDU must have arrived whole this long after its first byte.
    network_timeout_s:
        Longest wait for any one read (the socket timeout otherwise in force).
    """

    max_pdu_bytes: int
    max_dataset_bytes: int
    association_request_timeout_s: float
    pdu_timeout_s: float
    network_timeout_s: float

    def __post_init__(self) -> None:
        if self.max_pdu_bytes < 0 or self.max_dataset_bytes < 1:
            raise ValueError(
                f"max_pdu_bytes must be >= 0 and max_dataset_bytes >= 1, got "
                f"{self.max_pdu_bytes} and {self.max_dataset_bytes}"
            )
        if min(self.association_request_timeout_s, self.pdu_timeout_s,
               self.network_timeout_s) <= 0:
            raise ValueError("wire timeouts must be positive")

    @classmethod
    def from_settings(cls, settings: Settings) -> WireLimits:
        """The listener's limits: ``node.max_pdu_length``, twice ``node.max_instance_mb`` per
        data set (so that sizes in between are still answered 0xA700 by the C-STORE handler),
        ``node.association_request_timeout_s``, ``node.pdu_timeout_s`` and
        ``delivery.network_timeout_s``."""
        node = settings.node
        return cls(
            max_pdu_bytes=node.max_pdu_length,
            max_dataset_bytes=2 * node.max_instance_mb * MIB,
            association_request_timeout_s=node.association_request_timeout_s,
            pdu_timeout_s=node.pdu_timeout_s,
            network_timeout_s=settings.delivery.network_timeout_s,
        )

    def pdu_limit(self, pdu_type: int, *, first: bool) -> tuple[int, str]:
        """Largest body accepted for a PDU of ``pdu_type``, and the rule that sets it."""
        if first:
            return MAX_ASSOCIATE_RQ_BYTES, "the association request limit (64 KiB)"
        if pdu_type == P_DATA_TF:
            if self.max_pdu_bytes:
                return self.max_pdu_bytes, f"node.max_pdu_length ({self.max_pdu_bytes})"
            return self.max_dataset_bytes, "twice node.max_instance_mb"
        return MAX_CONTROL_PDU_BYTES, "the control PDU limit (64 KiB)"


class Refused(Exception):
    """A connection broke a wire limit; the message says which (one line, no peer bytes)."""

    def __init__(self, reason: str, abort: bytes = ABORT_UNSPECIFIED) -> None:
        super().__init__(reason)
        self.abort = abort


class Closed(Exception):
    """The peer closed the connection, or it failed; ``between_pdus`` when no PDU was begun."""

    def __init__(self, reason: str, *, between_pdus: bool = False) -> None:
        super().__init__(reason)
        self.between_pdus = between_pdus


class PduGuard:
    """Reads one connection's PDUs within the :class:`WireLimits`; what it has seen so far.

    Attributes read by other threads (for the "local limit exceeded" log line): ``address``,
    ``accepted_at``, ``calling_ae``, ``requested``, ``received``, ``expected``.
    """

    def __init__(
        self,
        limits: WireLimits,
        address: str,
        clock: Callable[[], float] = time.monotonic,
        on_drop_before_request: Callable[[], None] = lambda: None,
    ) -> None:
        self.limits = limits
        self.address = address
        self.clock = clock
        self.on_drop_before_request = on_drop_before_request
        self.accepted_at = clock()
        self.calling_ae: str | None = None
        self.requested = False
        self.received = 0
        self.expected = 0
        self.refused = False
        self.between_pdus = True
        self._body: bytearray | None = None
        self._command_bytes = 0
        self._dataset_bytes = 0

    def recv(self, sock: socket.socket, nr_bytes: int) -> bytearray:
        """What pynetdicom asked for: a PDU header (read with its whole body), then the body.

        An empty result tells pynetdicom that the transport closed.
        """
        if self._body is not None:
            body, self._body = self._body, None
            return body if len(body) == nr_bytes else bytearray()
        if self.refused:
            return bytearray()
        try:
            return self._read_pdu(sock)
        except Refused as exc:
            self._refuse(sock, str(exc), exc.abort)
        except Closed as exc:
            level = logging.DEBUG if exc.between_pdus else logging.INFO
            LOGGER.log(level, "connection from %s%s closed: %s", self.address, self._as(), exc)
            self.refused = True
        if not self.requested:
            self.on_drop_before_request()
        return bytearray()

    def _read_pdu(self, sock: socket.socket) -> bytearray:
        first = not self.requested
        deadline = self.clock() + self.limits.pdu_timeout_s
        if first:
            deadline = min(deadline, self.accepted_at + self.limits.association_request_timeout_s)
        self.between_pdus = True
        header = self._read_exactly(sock, PDU_HEADER_BYTES, deadline, first=first)
        self.between_pdus = False
        pdu_type, _, length = struct.unpack(">BBL", header)
        if first and pdu_type != A_ASSOCIATE_RQ:
            raise Refused(
                f"its first PDU is of type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ",
                ABORT_UNEXPECTED_PDU if pdu_type in PDU_TYPES else ABORT_UNRECOGNIZED_PDU,
            )
        if pdu_type not in PDU_TYPES:
            return header  # pynetdicom reports it (Evt19) and aborts; nothing more is read
        limit, rule = self.limits.pdu_limit(pdu_type, first=first)
        if length > limit:
            raise Refused(
                f"PDU type 0x{pdu_type:02X} declares {length} bytes, over {rule}",
                ABORT_INVALID_PARAMETER,
            )
        body = self._read_exactly(sock, length, deadline, first=first)
        if first:
            self.calling_ae = _calling_ae(pdu_type, body)
            problem = _undecodable_request(header + body)
            if problem is not None:
                raise Refused(f"undecodable association request ({problem})",
                              ABORT_INVALID_PARAMETER)
            self.requested = True
        if pdu_type == P_DATA_TF:
            self._count_fragments(body)
        self._body = body
        return header

    def _read_exactly(
        self, sock: socket.socket, count: int, deadline: float, *, first: bool
    ) -> bytearray:
        buffer = bytearray(count)
        view = memoryview(buffer)
        self.received, self.expected = 0, count
        try:
            while self.received < count:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    raise Refused(self._late(first))
                sock.settimeout(min(remaining, self.limits.network_timeout_s))
                try:
                    got = sock.recv_into(view[self.received :], count - self.received)
                except TimeoutError:
                    if self.clock() >= deadline:
                        raise Refused(self._late(first)) from None
                    raise Refused(
                        "nothing received for delivery.network_timeout_s "
                        f"({self.limits.network_timeout_s:g} s) in the middle of a PDU"
                    ) from None
                except OSError as exc:
                    raise Closed(
                        f"{type(exc).__name__} after {self.received} of {count} bytes of a "
                        "PDU part",
                        between_pdus=self.between_pdus and self.received == 0,
                    ) from None
                if got == 0:
                    raise Closed(
                        f"after {self.received} of {count} bytes of a PDU part",
                        between_pdus=self.between_pdus and self.received == 0,
                    )
                self.received += got
        finally:
            view.release()
            _set_timeout(sock, self.limits.network_timeout_s)
        return buffer

    def _late(self, first: bool) -> str:
        progress = f"{self.received} of {self.expected} bytes"
        if first:
            return (
                "no whole association request within node.association_request_timeout_s "
                f"({self.limits.association_request_timeout_s:g} s; {progress} of a PDU part)"
            )
        return (
            f"PDU not complete within node.pdu_timeout_s ({self.limits.pdu_timeout_s:g} s; "
            f"{progress} of a PDU part)"
        )

    def _count_fragments(self, body: bytearray) -> None:
        """Add the PDVs' sizes to the current message's command and data set totals.

        A PDV that overruns the PDU stops the count; pynetdicom then refuses the PDU itself.
        """
        at = 0
        while at + 6 <= len(body):
            (item_length,) = struct.unpack_from(">L", body, at)
            if item_length < 2 or at + 4 + item_length > len(body):
                return
            control, size = body[at + 5], item_length - 2
            if control & 0x01:
                self._command_bytes += size
                if self._command_bytes > MAX_COMMAND_BYTES:
                    raise Refused(f"a command set over {MAX_COMMAND_BYTES} bytes")
                if control & 0x02:
                    self._command_bytes = 0
            else:
                self._dataset_bytes += size
                if self._dataset_bytes > self.limits.max_dataset_bytes:
                    raise Refused(
                        f"a data set over {self.limits.max_dataset_bytes} bytes "
                        "(twice node.max_instance_mb) while receiving"
                    )
                if control & 0x02:
                    self._dataset_bytes = 0
            at += 4 + item_length

    def _refuse(self, sock: socket.socket, reason: str, abort: bytes) -> None:
        self.refused = True
        stage = "association" if self.requested else "connection"
        LOGGER.warning("aborted %s from %s%s: %s", stage, self.address, self._as(), reason)
        try:
            sock.settimeout(1.0)
            sock.sendall(abort)
        except OSError:
            LOGGER.debug("A-ABORT not sent to %s", self.address)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            LOGGER.debug("connection from %s already shut down", self.address)

    def _as(self) -> str:
        return "" if self.calling_ae is None else f" as {self.calling_ae!r}"

    def describe(self, now: float, established: bool) -> str:
        """``address 'AE' 12.3 s state`` for the holders of association slots."""
        if not self.requested:
            state = f"awaiting its association request ({self.received} of {self.expected} bytes)"
        elif established:
            state = "established"
        else:
            state = "negotiating"
        calling = "(AE unknown)" if self.calling_ae is None else repr(self.calling_ae)
        return f"{self.address} {calling} {now - self.accepted_at:.1f} s {state}"


def _calling_ae(pdu_type: int, body: bytearray) -> str | None:
    """The Calling AE Title field of an A-ASSOCIATE-RQ body (PS3.8 9.3.2), for logging only."""
    if pdu_type != A_ASSOCIATE_RQ or len(body) < 36:
        return None
    return bytes(body[20:36]).decode("latin-1").strip()


def _undecodable_request(pdu: bytearray) -> str | None:
    """Why pynetdicom cannot decode this A-ASSOCIATE-RQ, or None.

    Decoded here first because a request pynetdicom fails to decode leaves its association
    thread waiting for the ACSE timeout (AA-1 in Sta2 tells it nothing), holding a slot; and
    pynetdicom logs a traceback for it.
    """
    try:
        A_ASSOCIATE_RQ_PDU().decode(bytes(pdu))
    except Exception as exc:  # anything pynetdicom's decoder raises: the request is refused
        LOGGER.debug("undecodable association request", exc_info=True)
        return f"{type(exc).__name__}: {exc}"
    return None


def _set_timeout(sock: socket.socket, seconds: float) -> None:
    try:
        sock.settimeout(seconds)
    except OSError:
        LOGGER.debug("socket closed before its timeout could be restored")


class BoundedAssociationSocket(AssociationSocket):
    """pynetdicom's acceptor socket whose reads go through a :class:`PduGuard`."""

    guard: PduGuard

    @classmethod
    def adopt(cls, sock: AssociationSocket, guard: PduGuard) -> BoundedAssociationSocket:
        """Turn the socket pynetdicom made into a bounded one (it already queued Evt5, so a
        second socket cannot be made in its place)."""
        sock.__class__ = cls
        bounded = cast(BoundedAssociationSocket, sock)
        bounded.guard = guard
        return bounded

    def recv(self, nr_bytes: int) -> bytearray:
        """Read through the guard (pynetdicom asks for 6 bytes, then the PDU's length)."""
        if self.socket is None:
            return bytearray()
        return self.guard.recv(self.socket, nr_bytes)


class BoundedRequestHandler(RequestHandler):
    """pynetdicom's request handler, whose association reads PDUs within ``limits`` and runs
    the event-driven reactors of :mod:`pneumonode.dicom.reactor`.

    Give the server ``functools.partial(BoundedRequestHandler, limits=...)`` as its handler.
    """

    def __init__(
        self, request: Any, client_address: Any, server: BaseServer, *, limits: WireLimits
    ) -> None:
        self.limits = limits
        super().__init__(request, client_address, server)  # handles the connection

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        install(assoc)
        if assoc.dul.socket is None:
            raise RuntimeError("pynetdicom made an association without a socket")
        guard = PduGuard(
            self.limits, str(self.client_address[0]), on_drop_before_request=_wake(assoc)
        )
        BoundedAssociationSocket.adopt(assoc.dul.socket, guard)
        return assoc


def _wake(assoc: Association) -> Callable[[], None]:
    """Ends ``assoc``'s wait for its A-ASSOCIATE-RQ (``Association.run_reactor`` treats an empty
    item as its ACSE timeout). Without it a connection dropped before its request keeps its
    association slot until that timeout: on Evt17 in Sta2 (AA-5) pynetdicom tells it nothing."""
    return lambda: cast("Queue[object]", assoc.dul.to_user_queue).put(None)


class ConnectionGate:
    """Admits a connection while fewer than ``limit`` are open; logs refusals, rate-limited."""

    def __init__(
        self,
        limit: int,
        interval_s: float = GATE_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.interval_s = interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._refused = 0
        self._logged_at: float | None = None

    def admit(self, address: str, open_now: Sequence[Association], handshakes: int) -> bool:
        """True to serve a connection from ``address``, given those open and TLS handshakes."""
        count = len(open_now) + handshakes
        if count < self.limit:
            return True
        with self._lock:
            self._refused += 1
            now = self.clock()
            if self._logged_at is not None and now - self._logged_at < self.interval_s:
                return False
            refused, self._refused, self._logged_at = self._refused, 0, now
        LOGGER.warning(
            "connection from %s closed unread: %d connections open (%d x node.max_associations); "
            "%d closed so since the last such line; held by: %s",
            address, count, CONNECTIONS_PER_SLOT, refused, slot_holders(open_now),
        )
        return False


def guard_of(assoc: Association) -> PduGuard | None:
    """The guard of an association accepted by the listener, if it has one."""
    sock = assoc.dul.socket
    return sock.guard if isinstance(sock, BoundedAssociationSocket) else None


def slot_holders(associations: Iterable[Association], now: float | None = None) -> str:
    """The peers holding association slots, oldest first (address, calling AE, age, state)."""
    when = time.monotonic() if now is None else now
    entries: list[tuple[float, str]] = []
    for assoc in associations:
        guard = guard_of(assoc)
        if guard is None:
            entries.append((0.0, f"{assoc.requestor.address} (not tracked)"))
            continue
        entries.append((guard.accepted_at, guard.describe(when, bool(assoc.is_established))))
    entries.sort()
    shown = [text for _, text in entries[:MAX_HOLDERS_SHOWN]]
    if len(entries) > MAX_HOLDERS_SHOWN:
        shown.append(f"and {len(entries) - MAX_HOLDERS_SHOWN} more")
    return "; ".join(shown) if shown else "none"
