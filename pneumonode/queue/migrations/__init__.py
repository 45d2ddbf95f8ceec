"""Alembic migrations of the queue database (SQLite and PostgreSQL); run them with migrate.py."""
