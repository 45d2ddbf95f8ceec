"""Alembic revisions of the queue schema, oldest first; Alembic itself ignores this file."""
