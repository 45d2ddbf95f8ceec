"""The DICOM listener: association policy, C-ECHO and C-STORE handlers (no inference here)."""

from __future__ import annotations

import logging
import math
import shutil
import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom.uid as pduid
from pydicom.pixels.decoders.base import get_decoder
from pynetdicom import AE, evt, sop_class
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from pneumonode.dicom.access import AccessPolicy, handle_requested
from pneumonode.dicom.instance import (
    CommandIdentity,
    InstanceTooLarge,
    UndecodableInstance,
    spool_file_bytes,
)
from pneumonode.dicom.intake import Intake, Status
from pneumonode.dicom.pynetdicom_internals import check_pynetdicom
from pneumonode.dicom.tls import server_context
from pneumonode.dicom.wire_limits import (
    CONNECTIONS_PER_SLOT,
    BoundedRequestHandler,
    ConnectionGate,
    WireLimits,
)
from pneumonode.identifiers import is_valid_uid
from pneumonode.settings import Settings

LOGGER = logging.getLogger(__name__)

#: The Verification SOP Class (pynetdicom generates its SOP class names when imported).
VERIFICATION: str = sop_class.Verification  # type: ignore[attr-defined]

MIB = 1024 * 1024

#: Storage SOP classes the node accepts: the projection radiography classes and Secondary Capture
#: (whose Modality must then be CR or DX; SIIM challenge files are such SC objects).
ACCEPTED_SOP_CLASSES: dict[str, str] = {
    str(uid): uid.name
    for uid in (
        pduid.ComputedRadiographyImageStorage,
        pduid.DigitalXRayImageStorageForPresentation,
        pduid.DigitalXRayImageStorageForProcessing,
        pduid.SecondaryCaptureImageStorage,
    )
}


def decodable_transfer_syntaxes() -> list[str]:
    """Every transfer syntax whose pixel data the installed pydicom decoders can read.

    Uncompressed syntaxes come first so they are preferred when a sender proposes several.
    """
    preferred = [
        pduid.ExplicitVRLittleEndian,
        pduid.ImplicitVRLittleEndian,
        pduid.DeflatedExplicitVRLittleEndian,
        pduid.ExplicitVRBigEndian,
    ]
    result: list[str] = [str(ts) for ts in preferred]
    for candidate in pduid.AllTransferSyntaxes:
        if str(candidate) in result:
            continue
        try:
            decoder = get_decoder(candidate)
        except NotImplementedError:
            continue
        if decoder.is_available:
            result.append(str(candidate))
    return result


def set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle's algorithm: without it every DIMSE message waits ~40 ms for a delayed ACK."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def handle_conn_open(event: Event) -> None:
    """Set TCP_NODELAY on the accepted (or opened) connection."""
    transport = event.assoc.dul.socket
    if transport is not None and transport.socket is not None:
        set_nodelay(transport.socket)


@dataclass(frozen=True)
class InstanceLimits:
    """What the listener refuses with 0xA700 (out of resources) before decoding or writing.

    Attributes
    ----------
    data_dir:
        The node's data folder, whose file system's free space is checked.
    max_instance_bytes:
        Largest received data set accepted.
    min_free_disk_bytes:
        Every instance is refused while ``data_dir`` has less free space; 0 turns this off.
    """

    data_dir: Path
    max_instance_bytes: int
    min_free_disk_bytes: int = 0

    def __post_init__(self) -> None:
        if self.max_instance_bytes < 1:
            raise ValueError(f"max_instance_bytes must be positive, got {self.max_instance_bytes}")
        if self.min_free_disk_bytes < 0:
            raise ValueError(f"min_free_disk_bytes must be >= 0, got {self.min_free_disk_bytes}")

    @classmethod
    def from_settings(cls, settings: Settings) -> InstanceLimits:
        """``node.max_instance_mb`` and ``node.min_free_disk_mb`` (MiB) for ``node.data_dir``."""
        node = settings.node
        return cls(node.data_dir, node.max_instance_mb * MIB, node.min_free_disk_mb * MIB)

    def refusal(self, size: int) -> str | None:
        """Why an instance of ``size`` bytes must be refused now, or None to receive it."""
        if size > self.max_instance_bytes:
            return (
                f"instance of {size} bytes exceeds node.max_instance_mb "
                f"({self.max_instance_bytes / MIB:g} MiB)"
            )
        if not self.min_free_disk_bytes:
            return None
        try:
            free = shutil.disk_usage(self.data_dir).free
        except OSError as exc:
            return f"cannot check the free space of {self.data_dir}: {exc.strerror}"
        if free < self.min_free_disk_bytes:
            return (
                f"free disk space of {self.data_dir} ({free // MIB} MiB) is under "
                f"node.min_free_disk_mb ({self.min_free_disk_bytes // MIB} MiB)"
            )
        return None


def handle_echo(event: Event) -> int:
    """Answer C-ECHO."""
    return 0x0000


def handle_store(event: Event, intake: Intake, limits: InstanceLimits) -> int | tuple[int, Any]:
    """Answer C-STORE only after the instance is durable (see :class:`Intake`).

    Size and free-disk limits are checked first, on the raw data set (0xA700, nothing written),
    and a deflated data set is inflated within the size limit. Anything that goes wrong becomes
    a failure status so the sender keeps its copy.
    """
    requestor = event.assoc.requestor
    request = event.request
    if not isinstance(request, C_STORE):
        return int(Status.CANNOT_UNDERSTAND)
    command_uid = str(request.AffectedSOPInstanceUID or "")
    shown_uid = command_uid if is_valid_uid(command_uid) else "(invalid UID)"
    refusal = limits.refusal(_dataset_size(request.DataSet))
    if refusal is not None:
        LOGGER.warning(
            "refused SOP Instance %s from %s: %s", shown_uid, requestor.ae_title, refusal
        )
        return int(Status.OUT_OF_RESOURCES)
    command_class = str(request.AffectedSOPClassUID or "")
    if command_class != str(event.context.abstract_syntax):
        LOGGER.warning(
            "refused SOP Instance %s from %s: the request's SOP Class is not its presentation "
            "context's", shown_uid, requestor.ae_title,
        )
        return int(Status.DATASET_DOES_NOT_MATCH)
    try:
        if not isinstance(request.DataSet, BytesIO):
            raise UndecodableInstance("the C-STORE request has no data set")
        with request.DataSet.getbuffer() as view:
            encoded = spool_file_bytes(view, event.file_meta, limits.max_instance_bytes)
    except InstanceTooLarge as exc:
        LOGGER.warning("refused SOP Instance %s from %s: %s", shown_uid, requestor.ae_title, exc)
        return int(Status.OUT_OF_RESOURCES)
    except UndecodableInstance as exc:
        LOGGER.warning("refused SOP Instance %s from %s: %s", shown_uid, requestor.ae_title, exc)
        return int(Status.CANNOT_UNDERSTAND)
    except Exception as exc:  # a malformed request becomes a status, not a dropped association
        LOGGER.warning(
            "refused SOP Instance %s from %s: cannot encode it (%s)",
            shown_uid, requestor.ae_title, type(exc).__name__,
        )
        LOGGER.debug("encoding error", exc_info=True)
        return int(Status.CANNOT_UNDERSTAND)
    try:
        result = intake.receive(
            encoded,
            requestor.ae_title,
            requestor.address,
            CommandIdentity(command_class, command_uid),
        )
    except Exception:  # turn any intake failure into a failure status; the sender retries
        LOGGER.exception("intake failed for an instance from %s", requestor.ae_title)
        return int(Status.PROCESSING_FAILURE)
    return int(result.status)


def _dataset_size(dataset: object) -> int:
    """Bytes of the received data set (a BytesIO as pynetdicom hands it over), 0 if none."""
    if isinstance(dataset, BytesIO):
        with dataset.getbuffer() as view:
            return view.nbytes
    return 0


def build_ae(settings: Settings) -> AE:
    """An application entity configured for receiving, from settings."""
    node = settings.node
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_length
    ae.acse_timeout = node.association_request_timeout_s  # the acceptor's ARTIM
    ae.dimse_timeout = settings.delivery.dimse_timeout_s
    ae.network_timeout = settings.delivery.network_timeout_s
    ae.require_called_aet = True
    ae.require_calling_aet = list(node.allowed_calling_aets)
    syntaxes = decodable_transfer_syntaxes()
    ae.add_supported_context(VERIFICATION)
    for uid in ACCEPTED_SOP_CLASSES:
        ae.add_supported_context(uid, syntaxes)
    return ae


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, hardened for hostile networks.

    * Accepted sockets get the network timeout, so a peer that stops mid-PDU frees its thread
      (and its association slot) instead of blocking a read forever.
    * Every PDU is read within ``wire_limits`` (:mod:`pneumonode.dicom.wire_limits`): its
      declared length checked before it is read (64 KiB before the association request is
      known, ``node.max_pdu_length`` for P-DATA), the association request whole within the ARTIM
      time of the connection and each PDU whole within ``node.pdu_timeout_s``.
    * The TLS handshake runs in the connection's own thread with that timeout, not in the accept
      loop, so a client that never completes it cannot stop the node accepting others; it must
      be complete within ``node.association_request_timeout_s`` too (then the ARTIM starts).
    * At most ``CONNECTIONS_PER_SLOT`` x ``maximum_associations`` connections are open at once
      (served, being read, turned away or in a TLS handshake); one more is closed unread.
    """

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[Any],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        wire_limits: WireLimits,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._tls = tls if tls is not None else ssl_context
        self._handshake_timeout_s = wire_limits.association_request_timeout_s
        self._gate = ConnectionGate(CONNECTIONS_PER_SLOT * ae.maximum_associations)
        self._handshakes = 0
        self._handshakes_lock = threading.Lock()
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            None,
            evt_handlers=evt_handlers,
            request_handler=partial(BoundedRequestHandler, limits=wire_limits),
        )

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection and give it the network timeout."""
        sock, address = super().get_request()
        sock.settimeout(self.ae.network_timeout)
        return sock, address

    def verify_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> bool:
        """Serve the connection only while fewer than the connection limit are open."""
        return self._gate.admit(str(client_address[0]), self.active_associations,
                                self._handshakes)

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        """Complete the TLS handshake (when TLS is on), then serve the association."""
        if self._tls is not None and isinstance(request, socket.socket):
            with self._handshakes_lock:
                self._handshakes += 1
            # CPython's TLS handshake takes the socket timeout as a deadline for all of it
            handshake_s = min(self._handshake_timeout_s, self.ae.network_timeout or math.inf)
            request.settimeout(handshake_s)
            try:
                request = self._tls.wrap_socket(request, server_side=True)
            except OSError as exc:  # ssl.SSLError, timeouts and resets are all OSError
                reason = (
                    f"not complete within {handshake_s:g} s (node.association_request_timeout_s"
                    " or delivery.network_timeout_s)"
                    if isinstance(exc, TimeoutError)
                    else str(exc)
                )
                LOGGER.warning("TLS handshake with %s failed: %s", client_address[0], reason)
                self.shutdown_request(request)
                return
            finally:
                with self._handshakes_lock:
                    self._handshakes -= 1
            request.settimeout(self.ae.network_timeout)
        super().process_request_thread(request, client_address)


class DicomServer:
    """The listening socket and its association threads.

    Raises
    ------
    pneumonode.dicom.tls.TlsError
        When ``[tls] enabled`` and its certificate, key or CA file cannot be used.
    pneumonode.dicom.pynetdicom_internals.UnsupportedPynetdicom
        When the installed pynetdicom is not the major version the PDU limits hook.
    """

    def __init__(self, settings: Settings, intake: Intake) -> None:
        check_pynetdicom()
        self._settings = settings
        self._wire_limits = WireLimits.from_settings(settings)
        self._intake = intake
        self._ae = build_ae(settings)
        self._policy = AccessPolicy.from_settings(settings)
        self._limits = InstanceLimits.from_settings(settings)
        self._tls = server_context(settings.tls) if settings.tls.enabled else None
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> tuple[str, int]:
        """Start listening (non-blocking); returns the bound address.

        Raises
        ------
        OSError
            When the port cannot be bound (in use, not permitted).
        """
        handlers: Sequence[Any] = [
            (evt.EVT_CONN_OPEN, handle_conn_open),
            (evt.EVT_REQUESTED, handle_requested, [lambda: self._policy]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self._intake, self._limits]),
        ]
        node = self._settings.node
        server = self._ae.make_server(
            (node.host, node.port),
            evt_handlers=list(handlers),
            server_class=ListenerServer,
            wire_limits=self._wire_limits,
            tls=self._tls,
        )
        self._ae._servers.append(server)  # as AE.start_server does, so AE.shutdown stops it
        threading.Thread(
            target=server.serve_forever, name=f"listener:{node.port}", daemon=True
        ).start()
        self._server = server
        host, port = server.server_address[:2]
        LOGGER.info(
            "listening as %s on %s:%d%s",
            node.ae_title,
            host,
            port,
            " (TLS)" if self._tls is not None else "",
        )
        return str(host), int(port)

    def reload_access(self, settings: Settings) -> None:
        """Apply the allowlist and ``[[peers]]`` of ``settings`` to new associations.

        Peer host names are resolved again, once, here.
        """
        self._policy = AccessPolicy.from_settings(settings)

    def stop_accepting(self) -> None:
        """Stop accepting new associations; those in progress finish."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def active_associations(self) -> int:
        """Number of associations still running."""
        return len(self._ae.active_associations)

    def shutdown(self) -> None:
        """Stop accepting and close everything."""
        self.stop_accepting()
        self._ae.shutdown()
