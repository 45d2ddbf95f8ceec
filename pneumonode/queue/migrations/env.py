"""Alembic environment: runs the queue's migrations on the connection pneumonode hands in.

Alembic executes this file as a script for every command, so its last line runs the migrations;
it is never imported by pneumonode itself. Use :mod:`pneumonode.queue.migrate`, not the
``alembic`` command: it opens the connection (SQLite pragmas, PostgreSQL advisory lock) first.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from pneumonode.queue.models import Base


def run_migrations() -> None:
    """Run the migrations online (on ``attributes['connection']``) or offline (SQL to a buffer)."""
    config = context.config
    if context.is_offline_mode():
        url = config.attributes.get("url")
        if not isinstance(url, str):
            raise RuntimeError("offline migrations need config.attributes['url'] (a database URL)")
        context.configure(
            url=url,
            target_metadata=Base.metadata,
            literal_binds=True,
            render_as_batch=True,
            dialect_opts={"paramstyle": "named"},
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError(
            "queue migrations run on a connection that pneumonode opens: use "
            "`pneumonode db upgrade`, not the alembic command"
        )
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
