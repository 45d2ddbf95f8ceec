"""The pynetdicom internals the node hooks, and the check at start that they are the ones known.

Two places reach past pynetdicom's public API, both written against pynetdicom 3.x:

* :mod:`pneumonode.dicom.wire_limits` replaces the acceptor's ``AssociationSocket`` (created in
  ``transport.RequestHandler._create_association``) and relies on how
  ``dul.DULServiceProvider._read_pdu_data`` reads a PDU;
* :mod:`pneumonode.dicom.reactor` parks a requestor's reactor through
  ``Association._reactor_checkpoint`` and ``Association._is_paused``.

:func:`check_pynetdicom` refuses to start the listener with another major version, so a
pynetdicom upgrade is a one-line error at start until both are reviewed.
"""

from __future__ import annotations

import pynetdicom
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler

SUPPORTED_PYNETDICOM_MAJOR = 3
"""The pynetdicom major version whose internals the hooks were written against."""


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
    for owner, name in (
        (RequestHandler, "_create_association"),
        (AssociationSocket, "recv"),
        (DULServiceProvider, "_read_pdu_data"),
    ):
        if not callable(getattr(owner, name, None)):
            raise UnsupportedPynetdicom(
                f"pynetdicom {found} has no {owner.__name__}.{name}, which the listener's PDU "
                "limits hook (see pneumonode/dicom/wire_limits.py)"
            )
