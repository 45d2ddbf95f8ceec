"""The pynetdicom internals the node hooks, and the check at start that they are the ones known.

Three places reach past pynetdicom's public API, all written against pynetdicom 3.x:

* :mod:`pneumonode.dicom.wire_limits` replaces the acceptor's ``AssociationSocket`` (created in
  ``transport.RequestHandler._create_association``) and relies on how
  ``dul.DULServiceProvider._read_pdu_data`` reads a PDU;
* :mod:`pneumonode.dicom.reactor` replaces the loops of ``DULServiceProvider.run_reactor`` and
  ``Association._run_reactor`` (calling ``_process_recv_primitive``, ``_is_transport_event``,
  ``_serve_request``, the queues, timers and ``_reactor_checkpoint``/``_is_paused``), for the
  requestor from ``AE._create_socket`` and for the acceptor from ``_create_association``;
* :mod:`pneumonode.dicom.encoded_store` sends a C-STORE the way ``Association.send_c_store``
  does (``dimse.send_msg``/``get_msg``, ``_handle_no_response``, ``_check_received_status``).

:func:`check_pynetdicom` refuses to start the listener with another major version, so a
pynetdicom upgrade is a one-line error at start until they are reviewed; with another version
the reactors and the encoded send are not used (:func:`is_supported`).
"""

from __future__ import annotations

import pynetdicom
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler

SUPPORTED_PYNETDICOM_MAJOR = 3
"""The pynetdicom major version whose internals the hooks were written against."""


#: The pynetdicom methods the hooks call or replace.
HOOKED: tuple[tuple[type, str], ...] = (
    (RequestHandler, "_create_association"),
    (AssociationSocket, "recv"),
    (DULServiceProvider, "_read_pdu_data"),
    (DULServiceProvider, "_process_recv_primitive"),
    (DULServiceProvider, "_is_transport_event"),
    (DULServiceProvider, "run_reactor"),
    (Association, "_run_reactor"),
    (Association, "_serve_request"),
    (Association, "_handle_no_response"),
    (Association, "_check_received_status"),
    (ApplicationEntity, "_create_socket"),
    (DIMSEServiceProvider, "send_msg"),
    (DIMSEServiceProvider, "get_msg"),
)


class UnsupportedPynetdicom(RuntimeError):
    """The installed pynetdicom is not one whose internals the node's hooks know."""


def is_supported(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed pynetdicom) is the major version reviewed."""
    found = pynetdicom.__version__ if version is None else version
    major = found.split(".", 1)[0]
    return major.isdigit() and int(major) == SUPPORTED_PYNETDICOM_MAJOR


def check_pynetdicom(version: str | None = None) -> None:
    """Fail unless pynetdicom is the major version, with the internals, that the hooks expect.

    Raises
    ------
    UnsupportedPynetdicom
        Naming the version found and what to review (this module's docstring).
    """
    found = pynetdicom.__version__ if version is None else version
    if not is_supported(found):
        raise UnsupportedPynetdicom(
            f"pynetdicom {found} is installed; the listener's PDU limits hook pynetdicom "
            f"{SUPPORTED_PYNETDICOM_MAJOR}.x internals (see pneumonode/dicom/wire_limits.py): "
            f"install pynetdicom {SUPPORTED_PYNETDICOM_MAJOR}.x or review the hook"
        )
    for owner, name in HOOKED:
        if not callable(getattr(owner, name, None)):
            raise UnsupportedPynetdicom(
                f"pynetdicom {found} has no {owner.__name__}.{name}, which the listener's PDU "
                "limits and reactors hook (see pneumonode/dicom/pynetdicom_internals.py)"
            )
