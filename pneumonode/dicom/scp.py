"""The DICOM listener: association policy, C-ECHO and C-STORE handlers (no inference here)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import Any

import pydicom.uid as pduid
from pydicom.pixels.decoders.base import get_decoder
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from pneumonode.dicom.intake import Intake, Status
from pneumonode.settings import Settings

LOGGER = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"

#: Storage SOP classes the node accepts: the projection radiography classes and Secondary Capture
#: (whose Modality must then be CR or DX; SIIM challenge files are such SC objects).
ACCEPTED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
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


def handle_echo(event: Event) -> int:
    """Answer C-ECHO."""
    return 0x0000


def handle_store(event: Event, intake: Intake) -> int | tuple[int, Any]:
    """Answer C-STORE only after the instance is durable (see :class:`Intake`).

    Anything that goes wrong becomes a failure status so the sender keeps its copy.
    """
    requestor = event.assoc.requestor
    try:
        header = event.dataset
        header.file_meta = event.file_meta
        encoded = event.encoded_dataset(include_meta=True)
    except Exception:  # a malformed dataset must become a status, not a dropped association
        LOGGER.exception("cannot decode C-STORE dataset from %s", requestor.ae_title)
        return int(Status.CANNOT_UNDERSTAND)
    try:
        result = intake.receive(header, encoded, requestor.ae_title, requestor.address)
    except Exception:  # turn any intake failure into a failure status; the sender retries
        LOGGER.exception("intake failed for an instance from %s", requestor.ae_title)
        return int(Status.PROCESSING_FAILURE)
    return int(result.status)


def build_ae(settings: Settings) -> AE:
    """An application entity configured for receiving, from settings."""
    node = settings.node
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_length
    ae.acse_timeout = settings.delivery.acse_timeout_s
    ae.dimse_timeout = settings.delivery.dimse_timeout_s
    ae.network_timeout = settings.delivery.network_timeout_s
    ae.require_called_aet = True
    ae.require_calling_aet = list(node.allowed_calling_aets)
    syntaxes = decodable_transfer_syntaxes()
    ae.add_supported_context(VERIFICATION)
    for sop_class in ACCEPTED_SOP_CLASSES:
        ae.add_supported_context(sop_class, syntaxes)
    return ae


class DicomServer:
    """The listening socket and its association threads."""

    def __init__(self, settings: Settings, intake: Intake) -> None:
        self._settings = settings
        self._intake = intake
        self._ae = build_ae(settings)
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
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self._intake]),
        ]
        node = self._settings.node
        server = self._ae.start_server(
            (node.host, node.port), block=False, evt_handlers=list(handlers)
        )
        assert server is not None
        self._server = server
        host, port = server.server_address[:2]
        LOGGER.info("listening as %s on %s:%d", node.ae_title, host, port)
        return str(host), int(port)

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
