"""Destinations on bad days: refused, failing, hanging; backoff, order, budget, operator retry."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import synthetic
from harness import free_port
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event

from pneumonode.queue.db import create_schema, make_engine
from pneumonode.queue.records import DeliveryTarget, FindingRecord, NewJob, ResultUIDs
from pneumonode.queue.repository import JobRepository
from pneumonode.sender import Sender
from pneumonode.settings import Settings

DX = str(synthetic.DX_PRESENTATION_STORAGE)


class FakePacs:
    """A pynetdicom storage SCP whose behaviour a test chooses."""

    def __init__(self, status: int = 0x0000, delay_s: float = 0.0,
                 require_calling: list[str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.status = status
        self.delay_s = delay_s
        self.received: list[str] = []
        ae = AE(ae_title="PACS")
        ae.add_supported_context(DX)
        if require_calling is not None:
            ae.require_calling_aet = require_calling
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Event) -> int:
        time.sleep(self.delay_s)
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def repo(tmp_path: Path) -> JobRepository:
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'jobs.db'}")
    create_schema(engine)
    return JobRepository(engine)


def settings(tmp_path: Path, **delivery: object) -> Settings:
    return Settings(node={"data_dir": tmp_path / "data"},
                    delivery={"retry_base_delay_s": 10.0, "retry_max_delay_s": 40.0,
                              "acse_timeout_s": 1.0, "dimse_timeout_s": 1.0,
                              "network_timeout_s": 2.0, **delivery})


def delivering_job(repo: JobRepository, data_dir: Path, seed: int,
                   targets: list[DeliveryTarget]) -> int:
    """A job whose results exist (two small DICOM files) and whose deliveries are pending."""
    ds = synthetic.make_radiograph(rows=16, columns=16, seed=seed)
    job_id = repo.enqueue(NewJob(
        sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=DX,
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID), calling_aet="MOD", peer_host=None,
        spool_path=f"spool/{seed}.dcm")).job_id
    [job] = repo.claim_jobs("test:w", limit=1)
    assert job.id == job_id
    repo.reserve_result_uids(job_id, ResultUIDs(*(generate_uid() for _ in range(6))))
    folder = data_dir / "results" / str(job_id)
    folder.mkdir(parents=True)
    for name in ("seg.dcm", "overlay.dcm"):
        out = synthetic.make_radiograph(rows=16, columns=16, seed=seed * 10 + len(name))
        synthetic.write(out, folder / name)
    repo.finish_processing(job_id, "test:w", FindingRecord(
        present=False, score=0.1, area_mm2=None, model_uid="2.25.1",
        seg_path=f"results/{job_id}/seg.dcm", sc_path=f"results/{job_id}/overlay.dcm"), targets)
    return job_id


def target(pacs_port: int, name: str = "pacs") -> DeliveryTarget:
    return DeliveryTarget(destination=name, ae_title="PACS", host="127.0.0.1", port=pacs_port)


def send_due(repo: JobRepository, sender: Sender, at: datetime) -> list[int]:
    """Claim what is due at ``at`` and send it; returns the delivery ids attempted."""
    attempted = []
    while batch := repo.claim_deliveries("test:s", limit=1, now=at):
        for delivery in batch:
            sender.send(delivery)
            attempted.append(delivery.id)
    return attempted


@pytest.fixture
def pacs() -> Iterator[FakePacs]:
    server = FakePacs()
    yield server
    server.stop()


def test_refused_association_backs_off_then_delivers(tmp_path: Path, repo: JobRepository) -> None:
    refusing = FakePacs(require_calling=["SOMEONE_ELSE"])
    try:
        sender = Sender(settings(tmp_path), repo, "test:s", threading.Event())
        job = delivering_job(repo, tmp_path / "data", 1, [target(refusing.port)])
        now = datetime.now(UTC)
        assert len(send_due(repo, sender, now)) == 1
        [d] = repo.deliveries(job)
        assert d.state == "pending" and d.attempts == 1
        assert "association rejected" in (d.last_error or "")
        wait = (d.next_attempt_at - now).total_seconds()
        assert 9.0 <= wait <= 11.0, "first backoff is retry_base_delay_s"
        assert repo.claim_deliveries("test:s", now=now + timedelta(seconds=5)) == []
        refusing.server.ae.require_calling_aet = []
        assert len(send_due(repo, sender, now + timedelta(seconds=11))) == 1
        assert repo.get_job(job).state == "done"
        assert len(refusing.received) == 2
    finally:
        refusing.stop()


def test_failure_status_is_recorded_and_retried(tmp_path: Path, repo: JobRepository) -> None:
    failing = FakePacs(status=0xA700)
    try:
        sender = Sender(settings(tmp_path), repo, "test:s", threading.Event())
        job = delivering_job(repo, tmp_path / "data", 2, [target(failing.port)])
        send_due(repo, sender, datetime.now(UTC))
        [d] = repo.deliveries(job)
        assert d.state == "pending"
        assert "answered 0xA700" in (d.last_error or "")
    finally:
        failing.stop()


def test_hanging_destination_times_out(tmp_path: Path, repo: JobRepository) -> None:
    mute = socket.create_server(("127.0.0.1", 0))
    try:
        port = mute.getsockname()[1]
        sender = Sender(settings(tmp_path), repo, "test:s", threading.Event())
        job = delivering_job(repo, tmp_path / "data", 3, [target(port)])
        started = time.monotonic()
        send_due(repo, sender, datetime.now(UTC))
        assert time.monotonic() - started < 10, "ACSE timeout must bound a silent peer"
        [d] = repo.deliveries(job)
        assert d.state == "pending" and "cannot associate" in (d.last_error or "")
    finally:
        mute.close()


def test_dimse_hang_times_out(tmp_path: Path, repo: JobRepository) -> None:
    slow = FakePacs(delay_s=3.0)
    try:
        sender = Sender(settings(tmp_path), repo, "test:s", threading.Event())
        job = delivering_job(repo, tmp_path / "data", 4, [target(slow.port)])
        send_due(repo, sender, datetime.now(UTC))
        [d] = repo.deliveries(job)
        assert d.state == "pending" and "no C-STORE response" in (d.last_error or "")
    finally:
        slow.stop()


def test_budget_spent_fails_with_reason_then_operator_retry_resends(
    tmp_path: Path, repo: JobRepository
) -> None:
    down = free_port()
    sender = Sender(settings(tmp_path, max_attempts=2), repo, "test:s", threading.Event())
    job = delivering_job(repo, tmp_path / "data", 5, [target(down)])
    now = datetime.now(UTC)
    send_due(repo, sender, now)
    send_due(repo, sender, now + timedelta(seconds=60))
    after = repo.get_job(job)
    assert after.state == "failed"
    assert "cannot associate" in (after.last_error or "")
    [d] = repo.deliveries(job)
    assert d.state == "failed" and d.attempts == 2
    pacs = FakePacs(port=down)  # the destination comes back where it was configured
    try:
        retried = repo.retry(job)
        assert retried.state == "delivering"
        [d] = repo.deliveries(job)
        assert d.state == "pending"
        send_due(repo, sender, datetime.now(UTC) + timedelta(seconds=1))
        assert repo.get_job(job).state == "done"
        assert len(pacs.received) == 2
    finally:
        pacs.stop()


def test_per_destination_order_is_kept(tmp_path: Path, repo: JobRepository,
                                       pacs: FakePacs) -> None:
    down = free_port()
    sender = Sender(settings(tmp_path), repo, "test:s", threading.Event())
    targets = [target(down, "down"), target(pacs.port, "up")]
    first = delivering_job(repo, tmp_path / "data", 6, targets)
    second = delivering_job(repo, tmp_path / "data", 7, targets)
    now = datetime.now(UTC)
    send_due(repo, sender, now)
    states = {(d.job_id, d.destination): d.state
              for j in (first, second) for d in repo.deliveries(j)}
    assert states[(first, "up")] == "done" and states[(second, "up")] == "done"
    assert states[(first, "down")] == "pending"
    assert states[(second, "down")] == "pending"
    [d2] = [d for d in repo.deliveries(second) if d.destination == "down"]
    assert d2.attempts == 0, "the later job must wait behind the earlier one for 'down'"
