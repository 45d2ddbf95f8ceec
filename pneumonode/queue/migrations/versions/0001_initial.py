"""Initial queue schema: jobs, deliveries and job events, as pneumonode 0.1.0 created them.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Frozen: it spells out every type and name instead of importing the models, so that it keeps
creating exactly this schema whatever the models become. Names follow the naming convention of
:class:`pneumonode.queue.models.Base`.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JOB_STATES = ("received", "processing", "delivering", "done", "skipped", "failed")
_DELIVERY_STATES = ("pending", "sending", "done", "failed")


def _state(values: Sequence[str], name: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the three tables and their indexes."""
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_aet", sa.String(length=16), nullable=False),
        sa.Column("peer_host", sa.String(length=255), nullable=True),
        sa.Column("spool_path", sa.String(length=1024), nullable=True),
        sa.Column("state", _state(_JOB_STATES, "job_state"), nullable=False),
        sa.Column("skip_reason", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _utc(), nullable=False),
        sa.Column("claimed_by", sa.String(length=255), nullable=True),
        sa.Column("heartbeat_at", _utc(), nullable=True),
        sa.Column("received_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.Column("seg_series_uid", sa.String(length=64), nullable=True),
        sa.Column("seg_sop_uid", sa.String(length=64), nullable=True),
        sa.Column("sc_series_uid", sa.String(length=64), nullable=True),
        sa.Column("sc_sop_uid", sa.String(length=64), nullable=True),
        sa.Column("finding_present", sa.Boolean(), nullable=True),
        sa.Column("finding_score", sa.Float(), nullable=True),
        sa.Column("finding_area_mm2", sa.Float(), nullable=True),
        sa.Column("model_uid", sa.String(length=64), nullable=True),
        sa.Column("seg_path", sa.String(length=1024), nullable=True),
        sa.Column("sc_path", sa.String(length=1024), nullable=True),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_jobs_attempts_not_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_jobs_sop_instance_uid")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_jobs_claim", "jobs", ["state", "next_attempt_at", "id"])
    op.create_index("ix_jobs_stale", "jobs", ["state", "heartbeat_at"])
    op.create_index(op.f("ix_jobs_study_instance_uid"), "jobs", ["study_instance_uid"])

    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("state", _state(_DELIVERY_STATES, "delivery_state"), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _utc(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("claimed_by", sa.String(length=255), nullable=True),
        sa.Column("heartbeat_at", _utc(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_deliveries_attempts_not_negative")),
        sa.CheckConstraint("port >= 1 AND port <= 65535", name=op.f("ck_deliveries_port_range")),
        _job_foreign_key("deliveries"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
        sa.UniqueConstraint("job_id", "destination", name=op.f("uq_deliveries_job_id_destination")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_deliveries_claim", "deliveries", ["state", "next_attempt_at"])
    op.create_index("ix_deliveries_order", "deliveries", ["destination", "state", "job_id"])
    op.create_index("ix_deliveries_stale", "deliveries", ["state", "heartbeat_at"])

    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("at", _utc(), nullable=False),
        sa.Column("from_state", sa.String(length=16), nullable=True),
        sa.Column("to_state", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=True),
        _job_foreign_key("job_events"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_job_events_job", "job_events", ["job_id", "id"])


def _job_foreign_key(table: str) -> sa.ForeignKeyConstraint:
    """``table.job_id`` refers to ``jobs.id``; a job's rows go with it."""
    return sa.ForeignKeyConstraint(
        ["job_id"], ["jobs.id"], name=op.f(f"fk_{table}_job_id_jobs"), ondelete="CASCADE"
    )


def downgrade() -> None:
    """Drop the three tables (and with them every job)."""
    op.drop_table("job_events")
    op.drop_table("deliveries")
    op.drop_table("jobs")
