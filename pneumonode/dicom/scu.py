"""Sending DICOM: C-ECHO and C-STORE of files to a remote AE, with TCP_NODELAY and timeouts."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom.uid as pduid
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category
from pynetdicom.transport import AddressInformation, AssociationSocket

from pneumonode.dicom.encoded_store import EncodedFile, send_encoded
from pneumonode.dicom.reactor import install
from pneumonode.dicom.scp import VERIFICATION, handle_conn_open

LOGGER = logging.getLogger(__name__)

_UNCOMPRESSED = (
    pduid.ExplicitVRLittleEndian,
    pduid.ImplicitVRLittleEndian,
)
#: Compressed syntaxes the node writes (the SC with ``output.sc_compression = "jpeg-ls"``): also
#: offered uncompressed, and decompressed for a peer that accepts only that.
_DECOMPRESSIBLE = (pduid.JPEGLSLossless,)


class SendError(RuntimeError):
    """The association could not be made, or broke, before every instance was answered."""


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for association negotiation, DIMSE responses and network reads."""

    acse: float = 30.0
    dimse: float = 60.0
    network: float = 60.0


@dataclass(frozen=True)
class Remote:
    """Where to send: the called AE title and its address."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class StoreOutcome:
    """The peer's answer for one instance."""

    path: Path
    sop_instance_uid: str
    status: int

    @property
    def ok(self) -> bool:
        """Success or warning (as ``code_to_category`` reads PS3.7 C.4): the peer kept it."""
        return code_to_category(self.status) in (STATUS_SUCCESS, STATUS_WARNING)


class SenderAE(AE):
    """pynetdicom's AE whose associations get the event-driven reactors
    (:func:`pneumonode.dicom.reactor.install`) before their threads start."""

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[ssl.SSLContext, str] | None,
    ) -> AssociationSocket:
        install(assoc)
        return super()._create_socket(assoc, address, tls_args)


def _make_ae(calling_ae: str, timeouts: Timeouts) -> AE:
    ae = SenderAE(ae_title=calling_ae)
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = timeouts.dimse
    ae.network_timeout = timeouts.network
    return ae


def _associate(ae: AE, remote: Remote, tls: ssl.SSLContext | None) -> Association:
    assoc = ae.associate(
        remote.host,
        remote.port,
        ae_title=remote.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, handle_conn_open)],
        tls_args=None if tls is None else (tls, remote.host),
    )
    if not assoc.is_established:
        if assoc.is_rejected:
            raise SendError(f"association rejected by {remote}")
        how = "TLS handshake failed, " if tls is not None else ""
        raise SendError(
            f"cannot associate with {remote}: {how}connection refused, aborted or timed out"
        )
    return assoc


def echo(
    calling_ae: str,
    remote: Remote,
    timeouts: Timeouts = Timeouts(),
    tls: ssl.SSLContext | None = None,
) -> int:
    """Send C-ECHO; returns the status (0 = success). Raises SendError when no answer.

    ``tls``: a client context (:func:`pneumonode.dicom.tls.client_context`) to use DICOM TLS.
    """
    ae = _make_ae(calling_ae, timeouts)
    ae.add_requested_context(VERIFICATION)
    assoc = _associate(ae, remote, tls)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        raise SendError(f"no C-ECHO response from {remote.ae_title}")
    return int(status.Status)


def _requested_contexts(files: Sequence[EncodedFile]) -> dict[str, list[str]]:
    """One context per SOP class: uncompressed files in explicit or implicit VR, compressed
    ones in their own syntax. A file goes as it is on disk when the peer picks its syntax."""
    contexts: dict[str, list[str]] = {}
    for f in files:
        wanted = contexts.setdefault(str(f.sop_class_uid), [])
        ts = f.transfer_syntax_uid
        if ts in _UNCOMPRESSED:
            offered = list(_UNCOMPRESSED)
        elif ts in _DECOMPRESSIBLE:
            offered = [ts, *_UNCOMPRESSED]  # a peer without the codec gets it uncompressed
        else:
            offered = [ts]
        for syntax in offered:
            if syntax not in wanted:
                wanted.append(syntax)
    return contexts


def _exact_context(assoc: Association, f: EncodedFile) -> int | None:
    """The ID of an accepted context with the file's SOP class and transfer syntax."""
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == f.sop_class_uid and cx.transfer_syntax[0] == \
                f.transfer_syntax_uid and cx.context_id is not None:
            return int(cx.context_id)
    return None


def _send_one(assoc: Association, f: EncodedFile, message_id: int) -> Dataset:
    """C-STORE one file: as encoded on disk when the peer took its syntax, else re-encoded."""
    context_id = _exact_context(assoc, f)
    if context_id is not None:
        return send_encoded(assoc, f, context_id, message_id)
    ds = dcmread(f.path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()  # the peer took the uncompressed syntaxes only (Explicit VR LE now)
    return assoc.send_c_store(ds, msg_id=message_id)


def store(
    paths: Sequence[Path],
    calling_ae: str,
    remote: Remote,
    timeouts: Timeouts = Timeouts(),
    on_progress: Callable[[StoreOutcome], None] | None = None,
    tls: ssl.SSLContext | None = None,
) -> list[StoreOutcome]:
    """C-STORE the DICOM files at ``paths`` over one association, in order.

    Uncompressed files may go in explicit or implicit VR; compressed ones in their own syntax.
    A file whose transfer syntax the peer accepted goes as its data set bytes are on disk (after
    the file meta information, which must name the SOP class and instance); otherwise it is
    decoded and encoded again in the syntax accepted.
    ``tls``: a client context (:func:`pneumonode.dicom.tls.client_context`) to use DICOM TLS.

    Raises
    ------
    SendError
        When the association fails or aborts before every file has an answer, or a file has
        no file meta information naming its SOP class, instance and transfer syntax.
    """
    files: list[EncodedFile] = []
    for path in paths:
        meta = EncodedFile.read_meta(path)
        if meta is None:
            raise SendError(
                f"{path.name} has no file meta information naming its SOP class, SOP instance "
                "and transfer syntax"
            )
        files.append(meta)
    contexts = _requested_contexts(files)
    if len(contexts) > 128:
        raise SendError(f"{len(contexts)} SOP classes exceed the 128 presentation contexts")
    ae = _make_ae(calling_ae, timeouts)
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)
    assoc = _associate(ae, remote, tls)
    outcomes: list[StoreOutcome] = []
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        for number, f in enumerate(files, start=1):
            if str(f.sop_class_uid) not in accepted:
                raise SendError(
                    f"{remote} accepted no presentation context for SOP class {f.sop_class_uid} "
                    f"(instance {f.sop_instance_uid})"
                )
            response = _send_one(assoc, f, (number - 1) % 0xFFFF + 1)
            if "Status" not in response:
                raise SendError(
                    f"no C-STORE response from {remote.ae_title} for {f.sop_instance_uid} "
                    "(timeout or abort)"
                )
            outcome = StoreOutcome(f.path, str(f.sop_instance_uid), int(response.Status))
            outcomes.append(outcome)
            if on_progress is not None:
                on_progress(outcome)
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes
