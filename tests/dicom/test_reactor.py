"""The event-driven association reactors: idle costs no CPU, timeouts still fire, and a parked
reactor never takes a response meant for a request (``pneumonode.dicom.reactor``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import free_port, wait_for
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from pneumonode.dicom import scu
from pneumonode.dicom.intake import Intake
from pneumonode.dicom.reactor import (
    STANDARD_LOG_HANDLERS,
    EventDrivenAssociation,
    EventDrivenDUL,
    install,
)
from pneumonode.dicom.scp import VERIFICATION, DicomServer
from pneumonode.queue.db import create_schema, make_engine
from pneumonode.queue.repository import JobRepository
from pneumonode.settings import Settings

#: CPU seconds two idle associations' four threads may use in IDLE_S (pynetdicom's 1 ms polling
#: loops use several times this).
IDLE_CPU_BUDGET_S = 0.05
IDLE_S = 2.0


def _listener(tmp_path: Path, network_timeout_s: float = 60.0) -> tuple[DicomServer, int]:
    port = free_port()
    settings = Settings(
        node={"port": port, "host": "127.0.0.1", "data_dir": tmp_path / "data",
              "allowed_calling_aets": ["PACS"]},
        delivery={"network_timeout_s": network_timeout_s},
    )
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    create_schema(engine)
    server = DicomServer(settings, Intake(tmp_path / "data", JobRepository(engine)))
    server.start()
    return server, port


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[DicomServer, int]]:
    server, port = _listener(tmp_path)
    try:
        yield server, port
    finally:
        server.shutdown()


def _open(port: int, network_timeout_s: float = 60.0) -> Association:
    ae = scu._make_ae("PACS", scu.Timeouts(acse=5, dimse=5, network=network_timeout_s))
    ae.add_requested_context(VERIFICATION)
    return scu._associate(ae, scu.Remote("PNEUMONODE", "127.0.0.1", port), None)


def _acceptors(server: DicomServer) -> list[Association]:
    return list(server._ae.active_associations)


def test_idle_associations_use_no_cpu(listener: tuple[DicomServer, int]) -> None:
    server, port = listener
    assoc = _open(port)
    try:
        wait_for(lambda: len(_acceptors(server)) == 1, 10, "the listener to hold the association")
        (acceptor,) = _acceptors(server)
        for side in (assoc, acceptor):
            assert isinstance(side, EventDrivenAssociation)
            assert isinstance(side.dul, EventDrivenDUL)
        assert assoc.send_c_echo().Status == 0
        wait_for(lambda: assoc._is_paused and acceptor._is_paused, 10, "both reactors to park")
        before = time.process_time()
        time.sleep(IDLE_S)
        used = time.process_time() - before
        assert assoc.is_established
        assert used < IDLE_CPU_BUDGET_S, f"{used:.3f} s of CPU in {IDLE_S} s idle"
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    assert assoc.is_released
    wait_for(lambda: not _acceptors(server), 10, "the listener to end the association")


def test_network_timeout_still_aborts_an_idle_association(tmp_path: Path) -> None:
    server, port = _listener(tmp_path, network_timeout_s=1.0)
    try:
        assoc = _open(port)
        wait_for(lambda: assoc.is_aborted, 15, "the listener to abort on its network timeout")
        wait_for(lambda: not _acceptors(server), 10, "the listener to free the slot")
        assert not assoc.is_alive() or assoc.is_aborted
    finally:
        server.shutdown()


def test_requestor_network_timeout_aborts(listener: tuple[DicomServer, int]) -> None:
    server, port = listener
    assoc = _open(port, network_timeout_s=1.0)
    wait_for(lambda: assoc.is_aborted, 15, "the requestor to abort on its network timeout")
    wait_for(lambda: not assoc.is_alive(), 10, "the requestor's thread to end")
    wait_for(lambda: not _acceptors(server), 10, "the listener to free the slot")


class _HeldCheckpoint(threading.Event):
    """A checkpoint whose first wait, once passed, holds the reactor in pynetdicom's race window
    (past the wait, ``_is_paused`` still set) until ``proceed`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.set()
        self.in_window = threading.Event()
        self.proceed = threading.Event()
        self.waited_again = threading.Event()
        self.calls = 0

    def wait(self, timeout: Any = None) -> bool:
        self.calls += 1
        if self.calls > 1:
            self.waited_again.set()
        passed = super().wait(timeout)
        if self.calls == 1:
            self.in_window.set()
            self.proceed.wait(10)
        return passed


def test_a_paused_reactor_leaves_the_response_to_the_request(
    listener: tuple[DicomServer, int], caplog: pytest.LogCaptureFixture
) -> None:
    _, port = listener
    assoc = _open(port)
    try:
        wait_for(lambda: assoc._is_paused, 10, "the reactor to park")
        held = _HeldCheckpoint()
        assoc._reactor_checkpoint = held
        assoc._wake.set()  # the reactor goes round and stops in the window
        assert held.in_window.wait(10)
        assert assoc._is_paused  # what a request checks: it would go ahead now
        held.clear()  # a request pauses the reactor ...
        response = C_STORE()
        response.MessageIDBeingRespondedTo = 1
        response.Status = 0x0000
        assoc.dimse.msg_queue.put((1, response))  # ... and its response arrives
        held.proceed.set()
        assert held.waited_again.wait(10), "the reactor did not park again"
        assert assoc.dimse.msg_queue.qsize() == 1, "the reactor took the response"
        assert assoc.dimse.get_msg(block=False)[1] is response
        held.set()
    finally:
        assoc.release()
    assert assoc.is_released
    assert not [r for r in caplog.records if "unexpected" in r.getMessage()]


@pytest.mark.parametrize(("level", "bound"), [(logging.WARNING, False), (logging.INFO, True)])
def test_standard_log_handlers_kept_only_when_they_can_log(
    level: int, bound: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(level, logger="pynetdicom")
    assoc = Association(scu._make_ae("PACS", scu.Timeouts()), "requestor")
    assert install(assoc)
    for event, handler in STANDARD_LOG_HANDLERS:
        assert (handler in [h for h, _ in assoc.get_handlers(event)]) is bound
