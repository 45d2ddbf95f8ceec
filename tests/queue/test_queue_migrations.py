"""Alembic migrations: the initial revision builds exactly the models' schema on both databases."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from pneumonode.queue import migrate
from pneumonode.queue.db import create_schema, make_engine
from pneumonode.queue.models import Base
from pneumonode.queue.records import NewJob
from pneumonode.queue.repository import JobRepository

REPO = Path(__file__).resolve().parents[2]

CR = "1.2.840.10008.5.1.4.1.1.1"


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    url: str = request.getfixturevalue("pg_database")
    return url


@pytest.fixture
def fresh(fresh_url: str) -> Iterator[Engine]:
    engine = make_engine(fresh_url)
    try:
        yield engine
    finally:
        engine.dispose()


def _snapshot(engine: Engine) -> dict[str, Any]:
    """Everything the inspector sees of the queue tables, in a comparable form."""
    shot: dict[str, Any] = {}
    with engine.connect() as conn:
        inspector = inspect(conn)
        for table in sorted(set(inspector.get_table_names()) - {"alembic_version"}):
            shot[table] = {
                "columns": [
                    (c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)
                ],
                "pk": inspector.get_pk_constraint(table),
                "indexes": sorted(
                    (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                    for i in inspector.get_indexes(table)
                ),
                "unique": sorted(
                    (u["name"], tuple(u["column_names"]))
                    for u in inspector.get_unique_constraints(table)
                ),
                "checks": sorted(
                    (c["name"], " ".join(c["sqltext"].split()))
                    for c in inspector.get_check_constraints(table)
                ),
                "foreign_keys": sorted(
                    (f["name"], tuple(f["constrained_columns"]), f["referred_table"],
                     f["options"].get("ondelete"))
                    for f in inspector.get_foreign_keys(table)
                ),
            }
    return shot


@pytest.fixture
def second(fresh_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """Another empty database of the same kind as ``fresh``."""
    if fresh_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'second.db'}"
    else:
        url = request.getfixturevalue("pg_databases")()
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def test_upgrade_builds_the_schema_create_schema_builds(fresh: Engine, second: Engine) -> None:
    legacy = second
    result = migrate.upgrade(fresh)
    assert (result.before, result.after, result.adopted) == (None, migrate.head_revision(), False)
    create_schema(legacy)
    assert _snapshot(fresh) == _snapshot(legacy)
    assert set(_snapshot(fresh)) == {"jobs", "deliveries", "job_events"}
    with fresh.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_upgrade_is_idempotent_and_check_schema_follows_it(fresh: Engine) -> None:
    with pytest.raises(migrate.SchemaError, match=r"empty .*run `pneumonode db upgrade`"):
        migrate.check_schema(fresh)
    assert migrate.current_revision(fresh) is None
    migrate.upgrade(fresh)
    again = migrate.upgrade(fresh)
    assert not again.changed and again.before == again.after == migrate.head_revision()
    assert migrate.check_schema(fresh) == migrate.head_revision()


def test_an_unversioned_schema_is_adopted_with_its_jobs(fresh: Engine) -> None:
    create_schema(fresh)
    job = JobRepository(fresh).enqueue(
        NewJob("1.2.3.9", CR, "1.2.3", "1.2.3.4", "CR1", None, "spool/x.dcm")
    ).job_id
    result = migrate.upgrade(fresh)
    assert result.adopted and result.after == migrate.head_revision()
    assert JobRepository(fresh).get_job(job) is not None


def test_an_unversioned_schema_of_0_1_0_is_adopted_and_gains_the_sr_columns(
    fresh: Engine,
) -> None:
    migrate.upgrade(fresh, migrate.INITIAL_REVISION)
    with fresh.begin() as conn:  # as pneumonode 0.1.0 made it, before migrations existed
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text(
            "INSERT INTO jobs (sop_instance_uid, sop_class_uid, study_instance_uid, "
            "series_instance_uid, calling_aet, state, attempts, next_attempt_at, received_at, "
            "updated_at) VALUES ('1.2.3.9', '1.2.3', '1.2.3', '1.2.3.4', 'CR1', 'done', 1, "
            "'2026-01-01 00:00:00', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"))
    result = migrate.upgrade(fresh)
    assert (result.adopted, result.after) == (True, migrate.head_revision())
    job = JobRepository(fresh).find_job("1.2.3.9")
    assert job is not None and job.sr_path is None and job.result_uids is None


def test_nodes_upgrading_at_once_do_it_once(fresh: Engine) -> None:
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: migrate.upgrade(fresh), range(3)))
    assert sorted(r.before is None for r in results) == [False, False, True]
    assert {r.after for r in results} == {migrate.head_revision()}
    with fresh.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1


def test_prepare_schema_migrates_sqlite_only(tmp_path: Path, pg_database: str) -> None:
    sqlite = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    assert migrate.prepare_schema(sqlite) == migrate.head_revision()
    postgres = make_engine(pg_database)
    try:
        with pytest.raises(migrate.SchemaError):
            migrate.prepare_schema(postgres)
        assert migrate.current_revision(postgres) is None
    finally:
        postgres.dispose()


def test_offline_sql_for_a_dba() -> None:
    sql = migrate.upgrade_sql("postgresql+psycopg://u@db.example/pneumonode")
    assert "CREATE TABLE jobs" in sql and "CREATE TABLE job_events" in sql
    assert "INSERT INTO alembic_version (version_num) VALUES ('0001')" in sql
    assert "ALTER TABLE jobs ADD COLUMN sr_sop_uid" in sql
    assert f"UPDATE alembic_version SET version_num='{migrate.head_revision()}'" in sql


def test_migration_scripts_ship_with_the_package() -> None:
    folder = resources.files("pneumonode.queue") / "migrations"
    assert (folder / "env.py").is_file() and (folder / "script.py.mako").is_file()
    assert (folder / "versions" / "0001_initial.py").is_file()
    with (REPO / "pyproject.toml").open("rb") as fh:
        data = tomllib.load(fh)["tool"]["setuptools"]["package-data"]["pneumonode"]
    assert "queue/migrations/script.py.mako" in data  # not a .py file: needs package data


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pneumonode", "db", *args], capture_output=True, text=True,
        cwd=REPO, timeout=60, env={**os.environ, "PNEUMONODE_DATABASE__URL": url},
    )


def test_db_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    before = _cli(url, "current")
    assert before.returncode == 1 and "current: (empty, never migrated)" in before.stdout
    done = _cli(url, "upgrade")
    head = migrate.head_revision()
    assert done.returncode == 0 and f"upgraded from (empty) to {head}" in done.stdout
    after = _cli(url, "current")
    assert after.returncode == 0 and f"current: {head}" in after.stdout
    assert f"already at revision {head}" in _cli(url, "upgrade").stdout
    printed = _cli(url, "upgrade", "--sql")
    assert printed.returncode == 0 and "CREATE TABLE jobs" in printed.stdout
