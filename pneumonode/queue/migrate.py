"""Schema migrations of the queue database with Alembic: upgrade, current and head revisions."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from pneumonode.queue.db import write_transaction

LOGGER = logging.getLogger(__name__)

SCRIPT_LOCATION = "pneumonode.queue:migrations"
"""Where the migration scripts live, as an Alembic package resource (packaged with the wheel)."""

INITIAL_REVISION = "0001"
"""The revision equal to the schema that ``create_schema`` made before migrations existed."""

_UNVERSIONED_REVISION = "0002"
"""The revision of tables that ``create_schema`` makes now (it has the columns of 0002)."""

_MIGRATION_LOCK_KEY = 0x706E6D6D696772
"""PostgreSQL advisory lock key serialising migrations of nodes sharing a database ('pnmmigr')."""


class SchemaError(RuntimeError):
    """The database schema is not the one this pneumonode needs; the message says what to run."""


@dataclass(frozen=True)
class UpgradeResult:
    """What :func:`upgrade` did: the revision before (None: empty database) and after."""

    before: str | None
    after: str | None
    adopted: bool

    @property
    def changed(self) -> bool:
        """True when a migration ran or an unversioned schema was adopted."""
        return self.adopted or self.before != self.after


def _config(connection: Connection | None = None, url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if connection is not None:
        config.attributes["connection"] = connection
    if url is not None:
        config.attributes["url"] = url
    return config


def head_revision() -> str:
    """The newest revision shipped with this pneumonode.

    Raises
    ------
    SchemaError
        When the migration scripts have several heads (a packaging error).
    """
    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:
        raise SchemaError(f"no migration scripts found at {SCRIPT_LOCATION}")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None when it has never been migrated.

    Parameters
    ----------
    engine:
        An engine from :func:`pneumonode.queue.db.make_engine`.
    """
    with engine.connect() as conn:
        revision = MigrationContext.configure(conn).get_current_revision()
        conn.rollback()
    return revision


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})


def upgrade(engine: Engine, revision: str = "head") -> UpgradeResult:
    """Migrate the queue database to ``revision`` in one transaction.

    A database whose tables were made by :func:`pneumonode.queue.db.create_schema` (no
    ``alembic_version`` table) is first stamped with the revision its columns match
    (:data:`INITIAL_REVISION` for tables from before the SR existed), then migrated.
    On SQLite the transaction holds the write lock (``BEGIN IMMEDIATE``); on PostgreSQL an
    advisory lock makes nodes that upgrade at the same time wait for each other, and the
    second one finds nothing left to do.

    Parameters
    ----------
    engine:
        An engine from :func:`pneumonode.queue.db.make_engine`.
    revision:
        The target revision; ``head`` (the default) is the newest shipped.

    Returns
    -------
    UpgradeResult
        The revision before and after, and whether an unversioned schema was adopted.
    """
    with write_transaction(engine) as conn:
        _lock(conn)
        before = MigrationContext.configure(conn).get_current_revision()
        tables = set(inspect(conn).get_table_names())
        adopted = before is None and "jobs" in tables
        config = _config(connection=conn)
        if adopted:
            columns = {c["name"] for c in inspect(conn).get_columns("jobs")}
            found = _UNVERSIONED_REVISION if "sr_path" in columns else INITIAL_REVISION
            LOGGER.warning(
                "queue database has tables but no migration history: adopting it as revision %s",
                found,
            )
            command.stamp(config, found)
        command.upgrade(config, revision)
        after = MigrationContext.configure(conn).get_current_revision()
    if before != after:
        LOGGER.info("queue database migrated from %s to %s", before or "(empty)", after)
    return UpgradeResult(before=before, after=after, adopted=adopted)


def upgrade_sql(url: str, revision: str = "head") -> str:
    """The SQL that :func:`upgrade` runs on an empty database of ``url``'s kind, as text.

    For a database administrator who applies schema changes by hand; nothing is connected.
    """
    buffer = io.StringIO()
    config = _config(url=url)
    config.output_buffer = buffer
    command.upgrade(config, revision, sql=True)
    return buffer.getvalue()


def check_schema(engine: Engine) -> str:
    """Make sure the database is at the head revision; returns it.

    Raises
    ------
    SchemaError
        Naming the revision found, the one needed and the command that fixes it.
    """
    head = head_revision()
    found = current_revision(engine)
    if found != head:
        shown = "empty (never migrated)" if found is None else f"at revision {found}"
        raise SchemaError(
            f"queue database schema is {shown}, this pneumonode needs revision {head}: "
            "run `pneumonode db upgrade` (once, from one machine)"
        )
    return head


def prepare_schema(engine: Engine) -> str:
    """Bring a SQLite queue to the newest schema; check that a PostgreSQL one is there already.

    Nodes sharing a PostgreSQL database are upgraded once, on purpose, with
    ``pneumonode db upgrade``; a node never migrates a shared database by itself.

    Returns
    -------
    str
        The schema revision in use.

    Raises
    ------
    SchemaError
        When a PostgreSQL database is not at the newest revision.
    """
    if engine.dialect.name == "sqlite":
        after = upgrade(engine).after
        if after is None:
            raise SchemaError("queue database upgrade on SQLite left no revision recorded")
        return after
    return check_schema(engine)
