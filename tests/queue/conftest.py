"""Fixtures running the queue suite against SQLite and a throwaway PostgreSQL server."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine

from pneumonode.queue.db import create_schema, make_engine
from pneumonode.queue.models import Base
from pneumonode.queue.repository import (
    DeliveryTarget,
    FindingRecord,
    JobRepository,
    JobView,
    NewJob,
    ResultUIDs,
)

T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
"""A fixed 'now' for tests that check times exactly."""

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def _pg_bindir() -> Path | None:
    """Where initdb and pg_ctl live: on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path is not None and shutil.which("initdb") is not None:
        return Path(on_path).parent
    candidates = []
    for bindir in Path("/usr/lib/postgresql").glob("*/bin"):
        version = bindir.parent.name
        if re.fullmatch(r"\d+", version) and (bindir / "initdb").is_file():
            candidates.append((int(version), bindir))
    return max(candidates)[1] if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """Start a throwaway PostgreSQL cluster on a free loopback port; yield its URL."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under "
            "/usr/lib/postgresql/*/bin: install Debian's postgresql to run the queue suite "
            "against PostgreSQL"
        )
    run_as: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="pneumonode-pg-"))
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        if shutil.which("runuser") is None:
            shutil.rmtree(root)
            pytest.skip("running as root and runuser is missing to start the server as postgres")
        os.chown(root, account.pw_uid, account.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    subprocess.run(
        [
            *run_as,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    port = 0
    for _ in range(5):
        port = _free_port()
        options = (
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=60"
        )
        started = subprocess.run(
            [
                *run_as,
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "server.log"),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ],
            capture_output=True,
            text=True,
        )
        if started.returncode == 0:
            break
    else:
        log = (root / "server.log").read_text(errors="replace")[-2000:]
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {started.stderr}\n{log}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


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
        return ResultUIDs(f"{base}.1", f"{base}.2", f"{base}.3", f"{base}.4")

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
