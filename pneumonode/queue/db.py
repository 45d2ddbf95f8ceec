"""Opens the queue database: engine setup per backend, explicit transactions, schema creation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from pneumonode.queue.models import Base

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite connection waits for a lock before failing."""

POSTGRESQL_CONNECT_TIMEOUT_S = 10
"""How long opening a PostgreSQL connection may take unless the URL sets connect_timeout."""

SQLITE_BEGIN_OPTION = "pneumonode_sqlite_begin"
"""Connection execution option naming the kind of BEGIN emitted on SQLite."""

_SQLITE_BEGIN_STATEMENTS = MappingProxyType(
    {
        "DEFERRED": "BEGIN DEFERRED",
        "IMMEDIATE": "BEGIN IMMEDIATE",
    }
)

_SQLITE_DRIVERS = frozenset({"sqlite", "sqlite+pysqlite"})
_POSTGRESQL_DRIVERS = frozenset({"postgresql+psycopg"})

_SCHEMA_LOCK_KEY = 0x706E6D6E6F6465
"""PostgreSQL advisory lock key serialising schema creation across nodes ('pnmnode')."""


def make_engine(url: str) -> Engine:
    """Create the engine for the queue database.

    Parameters
    ----------
    url:
        A SQLAlchemy URL: ``sqlite:///path/to/queue.db`` (a file; its parent folder is
        created) or ``postgresql+psycopg://user:password@host:port/database``.

    Returns
    -------
    Engine
        For SQLite, every connection runs in WAL mode with ``synchronous=FULL`` (a committed
        job survives power loss), a 30 s busy timeout and foreign keys on; pysqlite's own
        transaction handling is turned off and the engine emits ``BEGIN`` itself, so that
        :func:`write_transaction` can take the write lock up front with ``BEGIN IMMEDIATE``.
        For PostgreSQL, connections are checked before use (``pool_pre_ping``) and opening
        one gives up after 10 s unless the URL sets ``connect_timeout``.

    Raises
    ------
    ValueError
        When the URL cannot be parsed, names another database or driver, or names an
        in-memory SQLite database (the queue must be durable).
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ValueError(f"database url: cannot parse {url!r} as a SQLAlchemy URL") from exc
    shown = parsed.render_as_string(hide_password=True)
    if parsed.drivername in _SQLITE_DRIVERS:
        return _make_sqlite_engine(parsed, shown)
    if parsed.drivername in _POSTGRESQL_DRIVERS:
        connect_args = {}
        if "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = POSTGRESQL_CONNECT_TIMEOUT_S
        return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    raise ValueError(
        f"database url: driver must be one of sqlite, sqlite+pysqlite or postgresql+psycopg, "
        f"got {parsed.drivername!r} in {shown!r}"
    )


def create_schema(engine: Engine) -> None:
    """Create the queue's tables and indexes where they do not exist yet.

    Parameters
    ----------
    engine:
        An engine from :func:`make_engine`. On PostgreSQL an advisory lock serialises nodes
        that start at the same time against one database.
    """
    with write_transaction(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        Base.metadata.create_all(conn)


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """Open a transaction that will write; commit on success, roll back on an exception.

    Parameters
    ----------
    engine:
        An engine from :func:`make_engine`.

    Yields
    ------
    Connection
        A connection inside the transaction. On SQLite the transaction starts with
        ``BEGIN IMMEDIATE``: it holds the database's write lock from its first statement, so
        what it reads cannot change before it writes, and lock waits obey the busy timeout
        instead of failing on a snapshot conflict.
    """
    with engine.connect() as conn:
        conn.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
        with conn.begin():
            yield conn


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """Yield a connection of ``engine`` inside a transaction that only reads.

    On SQLite it starts ``BEGIN DEFERRED`` and sees one consistent snapshot.
    """
    with engine.connect() as conn, conn.begin():
        yield conn


def _make_sqlite_engine(parsed: URL, shown: str) -> Engine:
    database = parsed.database
    if not database or database == ":memory:" or "mode=memory" in str(parsed.query):
        raise ValueError(
            f"database url: SQLite must be a file database for a durable queue, got {shown!r}"
        )
    if not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed)
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


def _configure_sqlite_connection(dbapi_connection: Any, connection_record: Any) -> None:
    """Set the pragmas of a new pysqlite connection and hand transaction control to SQLAlchemy."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS:d}")
        mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(
                f"SQLite journal_mode: the queue needs WAL, the database answered {mode!r}"
            )
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _begin_sqlite_transaction(conn: Connection) -> None:
    """Emit the BEGIN that pysqlite no longer emits, IMMEDIATE when the connection asks."""
    mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
    statement = _SQLITE_BEGIN_STATEMENTS.get(mode)
    if statement is None:
        raise ValueError(
            f"{SQLITE_BEGIN_OPTION} must be one of {sorted(_SQLITE_BEGIN_STATEMENTS)}, got {mode!r}"
        )
    conn.exec_driver_sql(statement)
