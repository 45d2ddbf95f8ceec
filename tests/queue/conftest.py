"""Fixtures running the queue suite against SQLite and the throwaway PostgreSQL of conftest."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine

from pneumonode.queue.db import create_schema, make_engine
from pneumonode.queue.models import Base
from pneumonode.queue.records import DeliveryTarget, FindingRecord, JobView, NewJob, ResultUIDs
from pneumonode.queue.repository import JobRepository

T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
"""A fixed 'now' for tests that check times exactly."""

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """The database the test runs against."""
    name: str = request.param
    return name


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL to an empty database of the chosen backend."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'queue.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def engine(database_url: str, backend: str) -> Iterator[Engine]:
    """An engine on a freshly created queue schema."""
    engine = make_engine(database_url)
    if backend == "postgresql":
        Base.metadata.drop_all(engine)
    create_schema(engine)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def repo(engine: Engine) -> JobRepository:
    """A repository on the fresh schema."""
    return JobRepository(engine)


@dataclass
class Kit:
    """Builds jobs in given states through the repository's own transitions."""

    repo: JobRepository

    @staticmethod
    def new_job(n: int, *, skip_reason: str | None = None, spool: bool = True) -> NewJob:
        return NewJob(
            sop_instance_uid=f"1.2.826.0.1.3680043.10.99.{n}",
            sop_class_uid=CR_IMAGE_STORAGE,
            study_instance_uid=f"1.2.826.0.1.3680043.10.98.{n}",
            series_instance_uid=f"1.2.826.0.1.3680043.10.97.{n}",
            calling_aet="MODALITY",
            peer_host="127.0.0.1",
            spool_path=f"spool/{n}.dcm" if spool else None,
            skip_reason=skip_reason,
        )

    @staticmethod
    def uids(n: int, generation: int = 1) -> ResultUIDs:
        base = f"1.2.826.0.1.3680043.10.96.{n}.{generation}"
        return ResultUIDs(*(f"{base}.{i}" for i in range(1, 7)))

    @staticmethod
    def finding(n: int) -> FindingRecord:
        return FindingRecord(
            present=True,
            score=0.875,
            area_mm2=1234.5,
            model_uid="1.2.826.0.1.3680043.10.95.1",
            seg_path=f"out/{n}/seg.dcm",
            sc_path=f"out/{n}/sc.dcm",
        )

    @staticmethod
    def target(name: str, port: int = 11113) -> DeliveryTarget:
        return DeliveryTarget(destination=name, ae_title=name.upper(), host="127.0.0.1", port=port)

    def enqueued(self, n: int, now: datetime = T0) -> int:
        return self.repo.enqueue(self.new_job(n), now=now).job_id

    def processing(self, n: int, worker: str = "w1", now: datetime = T0) -> JobView:
        job_id = self.enqueued(n, now)
        claimed = self.repo.claim_jobs(worker, limit=1, now=now)
        assert [job.id for job in claimed] == [job_id]
        return claimed[0]

    def delivering(
        self, n: int, destinations: tuple[str, ...] = ("pacs",), now: datetime = T0
    ) -> int:
        job = self.processing(n, now=now)
        self.repo.reserve_result_uids(job.id, self.uids(n), now=now)
        self.repo.finish_processing(
            job.id, "w1", self.finding(n), [self.target(d) for d in destinations], now=now
        )
        return job.id


@pytest.fixture
def kit(repo: JobRepository) -> Kit:
    """Helpers that put jobs into a wanted state."""
    return Kit(repo)
