"""The DICOM SR result and per-destination routing: SR UIDs and path on jobs, objects on deliveries.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Frozen like 0001: types and names spelled out. Existing jobs keep NULL SR columns (they had no
SR); existing deliveries keep NULL ``objects``, read as "SEG and SC", what they were made with.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the SR columns of jobs and the routed objects of deliveries."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("sr_series_uid", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("sr_sop_uid", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("sr_path", sa.String(length=1024), nullable=True))
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("objects", sa.String(length=32), nullable=True))


def downgrade() -> None:
    """Drop them again."""
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("objects")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("sr_path")
        batch.drop_column("sr_sop_uid")
        batch.drop_column("sr_series_uid")
