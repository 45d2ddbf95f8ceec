"""Event-driven reactors for pynetdicom associations: no per-loop sleep, no stolen responses.

pynetdicom (checked up to 3.0.4) runs two polling loops per association:

* the DUL thread (``dul.DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay`` (1 ms)
  whenever a loop found no event, then looks at its queues and ``select``\\ s the socket with a
  zero timeout;
* the association thread (``association.Association._run_reactor``) sleeps 1 ms on every loop
  before it looks for a DIMSE message, a release or an abort.

Every PDU and every DIMSE message therefore waits up to a millisecond on each side, and an idle
association wakes both threads a thousand times a second. The history is in pynetdicom's issues:
https://github.com/pydicom/pynetdicom/issues/120 (storescp slow),
https://github.com/pydicom/pynetdicom/pull/139 (a shorter sleep, 4x the throughput) and
https://github.com/pydicom/pynetdicom/issues/650 (35x slower than DCMTK; the fix there only
skips the sleep while events are queued).

:func:`install` turns one association, before its threads start, into one whose threads block
until there is something to do:

* the DUL thread waits (``poll``) on its socket and on a wake-up socket pair that is written
  when a primitive is queued for it from another thread or when it is told to stop; the wait
  ends at the ARTIM timer's expiry, and at :data:`MAX_WAIT_S` at the latest;
* the association thread waits on an event set when an ACSE primitive is queued for it, when a
  DIMSE message is (unless a request holds the reactor paused: the request takes its response
  itself, and setting the checkpoint again wakes the reactor), when it is killed and when the
  DUL thread ends; the wait ends at the network (idle) timer's expiry, and at
  :data:`MAX_WAIT_S` at the latest.

Nothing else changes: the state machine, the timers, the PDU reading (and so the listener's PDU
guard, :mod:`pneumonode.dicom.wire_limits`), TLS (bytes already decrypted count as readable), the
release and abort paths are pynetdicom's.

The association thread also parks correctly before a request. pynetdicom's requestor clears
``_reactor_checkpoint`` and waits for ``_is_paused``, but its reactor sets that flag *before* it
waits on the checkpoint, so it can be seen paused while it is already past the wait and about to
take a message from the DIMSE queue: with TCP_NODELAY on a fast link the C-STORE response arrives
in that window, the reactor takes it as an unexpected request ("Received unexpected C-STORE
service message") and the sender waits out its DIMSE timeout (pydicom/pynetdicom#875,
https://github.com/pydicom/pynetdicom/issues/875; the checkpoint came with
pydicom/pynetdicom#351). Here the reactor, once past the checkpoint, clears ``_is_paused`` and
then looks at the checkpoint again; if a request cleared it meanwhile it parks instead of
touching the queue. A requestor that sees ``_is_paused`` after clearing the checkpoint is
therefore safe, whatever the timing.

Only pynetdicom :data:`~pneumonode.dicom.pynetdicom_internals.SUPPORTED_PYNETDICOM_MAJOR`.x is
touched: for another version :func:`install` leaves the association as pynetdicom made it (and
the listener refuses to start, :func:`~pneumonode.dicom.pynetdicom_internals.check_pynetdicom`).
"""

from __future__ import annotations

import logging
import math
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.timer import Timer
from pynetdicom.utils import make_target

from pneumonode.dicom.pynetdicom_internals import is_supported

LOGGER = logging.getLogger(__name__)

#: Longest single wait of either thread: a backstop only, every wake-up source is signalled.
MAX_WAIT_S = 1.0
#: How long the DUL waits for a last PDU before closing in Sta13 (pynetdicom's loop delay).
STA13_WAIT_S = 0.001
#: Most bytes of queued P-DATA-TF PDUs written in one socket send.
MAX_COALESCED_BYTES = 256 * 1024


class _NotifyingQueue(queue.Queue[Any]):
    """A ``queue.Queue`` that calls ``_notify`` after every put (adopted by class swap)."""

    _notify: Callable[[], None]

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


def _adopt_queue(q: queue.Queue[Any], notify: Callable[[], None]) -> None:
    """Make ``q`` notify on put, keeping its items and every reference to it."""
    q.__class__ = _NotifyingQueue
    cast(_NotifyingQueue, q)._notify = notify


class _Waker:
    """A socket pair the DUL thread polls beside its connection; written only while it waits.

    ``armed`` is set by the DUL thread before it checks its queues and cleared after its wait,
    so a producer that queues an item and then finds ``armed`` false knows the check will see
    the item; one that finds it true writes a byte that ends the wait.
    """

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        self._lock = threading.Lock()
        self._closed = False
        self.armed = False
        self.held = 0

    def hold(self) -> None:
        """Defer wake-ups until :meth:`release` (a burst of puts wakes the reader once)."""
        with self._lock:
            self.held += 1

    def release(self) -> None:
        with self._lock:
            self.held -= 1
        self.wake()

    def fileno(self) -> int:
        return self._read.fileno()

    def wake(self) -> None:
        if not self.armed or self.held:
            return
        with self._lock:
            if self._closed or self.held:
                return
            try:
                self._write.send(b"\0")
            except BlockingIOError:
                pass  # the pair is full: the reader is woken already

    def drain(self) -> None:
        try:
            while self._read.recv(4096):
                pass
        except BlockingIOError:
            return

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._read.close()
            self._write.close()


class _WakingEvent(threading.Event):
    """The reactor checkpoint (adopted by class swap): setting it also wakes the reactor, which
    is not woken for DIMSE messages while a request holds it paused."""

    _also: threading.Event

    def set(self) -> None:
        super().set()
        self._also.set()


def _running_remaining(timer: Timer) -> float | None:
    """Seconds until a *running* pynetdicom timer expires (negative once past), else None."""
    if timer.timeout is None or getattr(timer, "_start_time", None) is None:
        return None
    if getattr(timer, "_end_time", None) is not None:
        return None  # stopped
    return timer.remaining


def _wait_timeout(timer: Timer, cap: float) -> float:
    remaining = _running_remaining(timer)
    if remaining is None:
        return cap
    return max(0.0, min(cap, remaining))


def wait_readable(fds: list[int], timeout: float) -> set[int]:
    """The descriptors of ``fds`` readable within ``timeout`` seconds (all of them on error)."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            for fd in fds:
                poller.register(fd, select.POLLIN)
            return {fd for fd, _ in poller.poll(math.ceil(timeout * 1000))}
        ready, _, _ = select.select(fds, [], [], timeout)
        return set(ready)
    except (OSError, ValueError):
        return set(fds)  # let the reactor find what is wrong through pynetdicom's own checks


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL provider whose thread blocks on its socket and queues between events."""

    _waker: _Waker
    _on_exit: Callable[[], None]
    _event_target: Callable[[], Any]
    reactor_done: bool

    @property
    def _kill_thread(self) -> bool:
        return bool(self.__dict__.get("_kill_thread", False))

    @_kill_thread.setter
    def _kill_thread(self, value: bool) -> None:
        self.__dict__["_kill_thread"] = value
        if value and "_waker" in self.__dict__:
            self._waker.wake()

    def run(self) -> None:
        """The thread's body (the target pynetdicom bound before the class changed is unused)."""
        self._event_target()

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop, waiting on the socket and queues instead of sleeping."""
        try:
            self._loop()
        finally:
            self.reactor_done = True
            self._waker.close()
            self._on_exit()

    def _loop(self) -> None:
        self._idle_timer.start()
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                idle = True
            # the socket is looked at after a wait that did not rule it out; between events
            # the next wait's poll looks at it (pynetdicom selects it on every loop instead)
            look_at_socket = self._wait_for_work() if idle else False
            if self._kill_thread:
                return
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif look_at_socket and self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:  # as pynetdicom does: an A-ABORT bypassing the state machine
                LOGGER.exception("DUL reactor failed; aborting the association")
                self._abort_now()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False

    def _process_recv_primitive(self) -> bool:
        """pynetdicom's, except that P-DATA queued in Sta6 is sent at once, several PDUs to a
        socket send, without an event per PDU (what DT-1, Sta6 to Sta6, does for each)."""
        if self.state_machine.current_state == "Sta6" and self._send_queued_data():
            return True
        return bool(super()._process_recv_primitive())

    def _send_queued_data(self) -> bool:
        """Send the P-DATA primitives at the head of the queue; False when there were none."""
        pdus: list[P_DATA_TF] = []
        encoded: list[bytes] = []
        size = 0
        pending = self.to_provider_queue
        while size < MAX_COALESCED_BYTES:
            try:
                head = pending.queue[0]
            except IndexError:
                break
            if not isinstance(head, P_DATA):
                break
            pdu = P_DATA_TF(cast(P_DATA, pending.get(False)))
            pdus.append(pdu)
            encoded.append(pdu.encode())
            size += len(encoded[-1])
        if not pdus:
            return False
        if self.socket is None:
            LOGGER.warning("P-DATA not sent: the connection is closed")
            return True
        self.socket.send(b"".join(encoded))
        for pdu in pdus:
            evt.trigger(self.assoc, evt.EVT_PDU_SENT, {"pdu": pdu})
            evt.trigger(self.assoc, evt.EVT_FSM_TRANSITION, {
                "action": "DT-1", "current_state": "Sta6", "fsm_event": "Evt9",
                "next_state": "Sta6",
            })
        return True

    def _abort_now(self) -> None:
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x00
        if self.socket is not None:
            self.socket.send(abort.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True

    def _work_pending(self) -> bool:
        if self._kill_thread or self.artim_timer.expired:
            return True
        if not self.to_provider_queue.empty() or not self.event_queue.empty():
            return True
        raw = self._connected_socket()
        return isinstance(raw, ssl.SSLSocket) and raw.pending() > 0

    def _connected_socket(self) -> socket.socket | None:
        sock = self.socket
        if sock is None or sock.socket is None or not getattr(sock, "_is_connected", False):
            return None
        return sock.socket

    def _wait_for_work(self) -> bool:
        """Block until there may be work; False when the socket was polled and is not readable
        (in Sta13 True: pynetdicom closes the connection when nothing more is to be read)."""
        waker = self._waker
        waker.armed = True
        woken: set[int] = set()
        try:
            if self._work_pending():
                return True
            fds = [waker.fileno()]
            raw = self._connected_socket()
            fd = raw.fileno() if raw is not None else -1
            if fd >= 0:
                fds.append(fd)
            timeout = _wait_timeout(self.artim_timer, MAX_WAIT_S)
            closing = self.state_machine.current_state == "Sta13"
            if closing:
                timeout = min(timeout, STA13_WAIT_S)
            woken = wait_readable(fds, timeout)
            return closing or fd < 0 or fd in woken
        finally:
            waker.armed = False
            if waker.fileno() in woken:
                waker.drain()


class EventDrivenAssociation(Association):
    """pynetdicom's association whose thread waits on an event and parks before requests."""

    _wake: threading.Event
    dul: EventDrivenDUL

    @property
    def _kill(self) -> bool:
        return bool(self.__dict__.get("_kill", False))

    @_kill.setter
    def _kill(self, value: bool) -> None:
        self.__dict__["_kill"] = value
        if value and "_wake" in self.__dict__:
            self._wake.set()

    def _run_reactor(self) -> None:
        """Serve DIMSE requests, releases, aborts and the network timeout as they come."""
        while not self._kill:
            if not self._park():
                continue
            self._wake.clear()
            if self._step():
                continue
            if self._kill:
                return
            self._is_paused = True  # a request may go ahead while this thread waits
            self._wake.wait(_wait_timeout(self.dul._idle_timer, MAX_WAIT_S))

    def _park(self) -> bool:
        """Wait at the checkpoint; False when a request cleared it after the wait returned."""
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        return self._reactor_checkpoint.is_set()

    def _step(self) -> bool:
        """One look at everything; True when a request was served (look again at once)."""
        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, cast(int, context_id))
            return True
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            LOGGER.info("association released by the peer")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
        elif self.acse.is_aborted():
            LOGGER.info("association aborted%s",
                        " (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else "")
            self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
        elif not self.dul.is_alive() or self.dul.reactor_done:
            self.kill()
        elif self.dul.idle_timer_expired():
            LOGGER.error("network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
        return False


@contextmanager
def one_wake_up(assoc: Association) -> Iterator[None]:
    """Queue the PDUs of one message for the DUL thread and wake it once, after the last.

    Without this the DUL thread, faster than the producer, is woken for every PDU: a thread
    switch each time on a busy machine.
    """
    waker = getattr(assoc.dul, "_waker", None)
    if not isinstance(waker, _Waker):
        yield
        return
    waker.hold()
    try:
        yield
    finally:
        waker.release()


@contextmanager
def paused(assoc: Association) -> Iterator[None]:
    """Hold ``assoc``'s reactor parked at its checkpoint while a request and its response pass.

    As pynetdicom's own ``send_*`` methods do; with :class:`EventDrivenAssociation` the reactor
    is parked whenever it waits, so this rarely waits at all, and once ``_is_paused`` is seen it
    cannot take the response (see the module docstring).
    """
    assoc._reactor_checkpoint.clear()
    try:
        while not assoc._is_paused:
            time.sleep(0.0001)
        yield
    finally:
        assoc._reactor_checkpoint.set()


#: pynetdicom's "standard" logging handlers, bound to every association: they describe every
#: PDU and DIMSE message (at DEBUG and INFO, under the AE's lock) whether or not it is logged.
STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def _unbind_silent_log_handlers(assoc: Association) -> None:
    """Unbind the standard logging handlers while nothing they log would be emitted."""
    if logging.getLogger(standard_pdu_sent_handler.__module__).isEnabledFor(logging.INFO):
        return
    for event, handler in STANDARD_LOG_HANDLERS:
        assoc.unbind(event, handler)


def install(assoc: Association) -> bool:
    """Give ``assoc`` the event-driven reactors; call before its threads start.

    Also unbinds pynetdicom's standard logging handlers when its logger is above INFO (the
    node sets it to WARNING), as they build log lines for every PDU that are then dropped.
    Returns False (and changes nothing) for a pynetdicom version other than the one reviewed.

    Raises
    ------
    RuntimeError
        When the association or its DUL thread is already running.
    """
    if not is_supported():
        return False
    dul = assoc.dul
    if assoc.is_alive() or dul.is_alive():
        raise RuntimeError("the reactors of a running association cannot be replaced")
    wake = threading.Event()
    waker = _Waker()
    _adopt_queue(dul.to_provider_queue, waker.wake)
    _adopt_queue(dul.event_queue, waker.wake)
    _adopt_queue(dul.to_user_queue, wake.set)

    def message_queued() -> None:
        if assoc._reactor_checkpoint.is_set():  # else the request takes it, then sets it
            wake.set()

    _adopt_queue(assoc.dimse.msg_queue, message_queued)
    checkpoint = assoc._reactor_checkpoint
    checkpoint.__class__ = _WakingEvent
    cast(_WakingEvent, checkpoint)._also = wake
    dul.__class__ = EventDrivenDUL
    event_dul = cast(EventDrivenDUL, dul)
    event_dul._waker = waker
    event_dul._on_exit = wake.set
    event_dul.reactor_done = False
    event_dul._event_target = make_target(event_dul.run_reactor)
    assoc.__class__ = EventDrivenAssociation
    cast(EventDrivenAssociation, assoc)._wake = wake
    _unbind_silent_log_handlers(assoc)
    return True
