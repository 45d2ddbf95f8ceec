"""Tests of engine setup, transactions and the UTC column type in pneumonode.queue.db/models."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, select, text, update

from pneumonode.queue.db import create_schema, make_engine, read_transaction, write_transaction
from pneumonode.queue.models import Job

T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
"""The kit fixture's default 'now'."""


def test_sqlite_pragmas_and_parent_folder(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "queue.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            pragmas = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            }
        assert path.parent.is_dir()
        assert pragmas == {
            "journal_mode": "wal",
            "synchronous": 2,
            "busy_timeout": 30000,
            "foreign_keys": 1,
        }
    finally:
        engine.dispose()


def test_write_transaction_holds_the_sqlite_write_lock_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    engine = make_engine(f"sqlite:///{path}")
    create_schema(engine)
    inside = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with write_transaction(engine) as conn:
            conn.execute(select(Job.id)).all()
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(10)
        other = sqlite3.connect(path, timeout=0.05, isolation_level=None)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
            other.execute("BEGIN DEFERRED")
            other.execute("SELECT count(*) FROM jobs").fetchone()
            other.execute("ROLLBACK")
        finally:
            other.close()
    finally:
        release.set()
        holder.join(10)
        engine.dispose()


def test_schema_creation_is_idempotent_and_complete(engine: Engine) -> None:
    create_schema(engine)
    inspector = inspect(engine)
    assert {"jobs", "deliveries", "job_events"} <= set(inspector.get_table_names())
    indexes = {index["name"] for index in inspector.get_indexes("jobs")}
    assert {"ix_jobs_claim", "ix_jobs_stale"} <= indexes
    unique = inspector.get_unique_constraints("deliveries")
    assert any(set(u["column_names"]) == {"job_id", "destination"} for u in unique)


def test_times_come_back_as_aware_utc(engine: Engine, kit) -> None:
    plus_five = timezone(timedelta(hours=5))
    local = datetime(2024, 3, 1, 17, 30, 0, 123456, tzinfo=plus_five)
    job_id = kit.repo.enqueue(kit.new_job(1), now=local).job_id
    job = kit.repo.get_job(job_id)
    assert job is not None
    assert job.received_at == datetime(2024, 3, 1, 12, 30, 0, 123456, tzinfo=UTC)
    assert job.received_at.utcoffset() == timedelta(0)


def test_naive_datetimes_are_refused_by_the_column_type(engine: Engine, kit) -> None:
    job_id = kit.enqueued(1)
    with pytest.raises(Exception, match="timezone-aware"), write_transaction(engine) as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(updated_at=datetime(2024, 1, 1)))
    job = kit.repo.get_job(job_id)
    assert job is not None and job.updated_at == T0


def test_write_transaction_rolls_back_on_error(engine: Engine, kit) -> None:
    job_id = kit.enqueued(1)
    with pytest.raises(RuntimeError, match="boom"), write_transaction(engine) as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(calling_aet="CHANGED"))
        raise RuntimeError("boom")
    with read_transaction(engine) as conn:
        assert conn.execute(select(Job.calling_aet)).scalar_one() == "MODALITY"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://user:secret@db/queue", "driver must be one of"),
        ("postgresql://user:secret@db/queue", "driver must be one of"),
        ("sqlite://", "file database"),
        ("sqlite:///:memory:", "file database"),
        ("not a url", "cannot parse"),
    ],
)
def test_unsupported_urls_are_refused_without_leaking_passwords(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        make_engine(url)
    assert "secret" not in str(caught.value)


def test_postgresql_engine_pings_pooled_connections(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        assert engine.pool._pre_ping  # type: ignore[attr-defined]
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()
