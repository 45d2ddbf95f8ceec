"""Works around a pynetdicom requestor race: the association's reactor is parked before a request.

pynetdicom (checked up to 3.0.4) pauses its requestor-side reactor by clearing an event and then
waiting for ``_is_paused``; but the reactor sets that flag *before* it waits, so it can be seen
paused while it is already past the wait and about to poll the message queue. With TCP_NODELAY
on a fast link the C-STORE response can arrive inside that window; the reactor then takes it as
an unexpected request ("Received unexpected C-STORE service message") and the sender waits out
its DIMSE timeout. Seen here about 7 times in 300 sends under load.

Upstream: the symptom is pydicom/pynetdicom#875 (https://github.com/pydicom/pynetdicom/issues/875,
"Received unexpected C-FIND service message" between requests in a row); the checkpoint this
relies on came with pydicom/pynetdicom#351. Only pynetdicom
:data:`~pneumonode.dicom.pynetdicom_internals.SUPPORTED_PYNETDICOM_MAJOR`.x is touched: for
another version the workaround does nothing until it is reviewed (and the listener refuses to
start, :func:`~pneumonode.dicom.pynetdicom_internals.check_pynetdicom`).
"""

from __future__ import annotations

import time

from pynetdicom.association import Association

from pneumonode.dicom.pynetdicom_internals import is_supported


def quiesce_reactor(assoc: Association, settle_s: float = 0.003) -> None:
    """Make sure the association's reactor thread is parked before a request is sent.

    Nothing has been sent yet when this runs, so a reactor still going round its loop finds no
    message; once the flag has stayed set across more than one loop period (1 ms), the reactor
    is blocked on the cleared event and cannot steal the response.
    """
    if not is_supported():
        return
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None or not hasattr(assoc, "_is_paused"):
        return
    checkpoint.clear()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        while not assoc._is_paused and time.monotonic() < deadline:
            time.sleep(0.0001)
        time.sleep(settle_s)
        if assoc._is_paused:
            return
