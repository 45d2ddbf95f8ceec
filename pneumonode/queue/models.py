"""The queue's tables as SQLAlchemy 2 typed ORM classes: jobs, deliveries and job events."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UID_LENGTH = 64
"""Maximum length of a DICOM UID (PS3.5 section 9.1)."""

AE_TITLE_LENGTH = 16
"""Maximum length of a DICOM Application Entity title."""

PATH_LENGTH = 1024
"""Maximum length of a path stored relative to the data directory."""

HOST_LENGTH = 255
"""Maximum length of a host name or address."""

WORKER_ID_LENGTH = 255
"""Maximum length of a worker id such as ``host:pid:thread``."""

DESTINATION_LENGTH = 64
"""Maximum length of a configured destination name."""

OBJECTS_LENGTH = 32
"""Maximum length of a delivery's routed result kinds, e.g. ``seg,sc,sr``."""


class JobState(enum.StrEnum):
    """Where one received instance stands.

    ``received -> processing -> delivering -> done``, with the side exits ``skipped`` (not a
    chest radiograph, with the reason) and ``failed`` (retry budget spent, with the error).
    """

    RECEIVED = "received"
    PROCESSING = "processing"
    DELIVERING = "delivering"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class DeliveryState(enum.StrEnum):
    """Where the sending of one job's results to one destination stands."""

    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every database.

    PostgreSQL stores ``timestamp with time zone``; SQLite has no time zones, so the value is
    stored as naive UTC and made aware again when read. Naive datetimes are refused on the way
    in, so a local time can never be mistaken for UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert an aware datetime to UTC (naive UTC for SQLite)."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"UTCDateTime requires a timezone-aware datetime, got naive {value.isoformat()}"
            )
        utc = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return utc.replace(tzinfo=None)
        return utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return the stored value as an aware UTC datetime."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _enum_values(enum_class: type[enum.StrEnum]) -> list[str]:
    return [member.value for member in enum_class]


def _state_type(enum_class: type[enum.StrEnum], name: str) -> Enum:
    return Enum(
        enum_class,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        validate_strings=True,
        values_callable=_enum_values,
    )


class Base(DeclarativeBase):
    """Declarative base holding the queue's metadata, with constraint names fixed for Alembic."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Job(Base):
    """One received instance, from intake to the delivery of its results."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    calling_aet: Mapped[str] = mapped_column(String(AE_TITLE_LENGTH))
    peer_host: Mapped[str | None] = mapped_column(String(HOST_LENGTH))
    spool_path: Mapped[str | None] = mapped_column(String(PATH_LENGTH))
    state: Mapped[JobState] = mapped_column(_state_type(JobState, "job_state"))
    skip_reason: Mapped[str | None] = mapped_column(Text)
    last_error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    claimed_by: Mapped[str | None] = mapped_column(String(WORKER_ID_LENGTH))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    seg_series_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    seg_sop_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    sc_series_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    sc_sop_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    finding_present: Mapped[bool | None] = mapped_column(Boolean)
    finding_score: Mapped[float | None] = mapped_column(Float)
    finding_area_mm2: Mapped[float | None] = mapped_column(Float)
    model_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    seg_path: Mapped[str | None] = mapped_column(String(PATH_LENGTH))
    sc_path: Mapped[str | None] = mapped_column(String(PATH_LENGTH))
    sr_series_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    sr_sop_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    sr_path: Mapped[str | None] = mapped_column(String(PATH_LENGTH))

    __table_args__ = (
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        Index("ix_jobs_claim", "state", "next_attempt_at", "id"),
        Index("ix_jobs_stale", "state", "heartbeat_at"),
        {"sqlite_autoincrement": True},
    )


class Delivery(Base):
    """The sending of one job's results to one destination, with its own retries."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(DESTINATION_LENGTH))
    ae_title: Mapped[str] = mapped_column(String(AE_TITLE_LENGTH))
    host: Mapped[str] = mapped_column(String(HOST_LENGTH))
    port: Mapped[int] = mapped_column(Integer)
    state: Mapped[DeliveryState] = mapped_column(_state_type(DeliveryState, "delivery_state"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(WORKER_ID_LENGTH))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    objects: Mapped[str | None] = mapped_column(String(OBJECTS_LENGTH))

    __table_args__ = (
        UniqueConstraint("job_id", "destination"),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        CheckConstraint("port >= 1 AND port <= 65535", name="port_range"),
        Index("ix_deliveries_claim", "state", "next_attempt_at"),
        Index("ix_deliveries_order", "destination", "state", "job_id"),
        Index("ix_deliveries_stale", "state", "heartbeat_at"),
        {"sqlite_autoincrement": True},
    )


class JobEvent(Base):
    """One transition of a job or of one of its deliveries; rows are only ever appended.

    ``destination`` is None for a transition of the job itself and names the destination for a
    transition of a delivery; ``from_state`` and ``to_state`` are then delivery states.
    """

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(WORKER_ID_LENGTH))
    detail: Mapped[str] = mapped_column(Text, default="")
    destination: Mapped[str | None] = mapped_column(String(DESTINATION_LENGTH))

    __table_args__ = (
        Index("ix_job_events_job", "job_id", "id"),
        {"sqlite_autoincrement": True},
    )
