"""Reading and writing queue rows: snapshots, locks, and the guarded UPDATE with its event row."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Table,
    and_,
    exists,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import RowMapping

from pneumonode.queue.db import write_transaction
from pneumonode.queue.models import Delivery, DeliveryState, Job, JobEvent, JobState
from pneumonode.queue.records import (
    DeliveryView,
    JobNotFound,
    JobView,
    StaleTransition,
)
from pneumonode.queue.retry import RetryPolicy, next_attempt

JOBS = Job.metadata.tables[Job.__tablename__]
DELIVERIES = Delivery.metadata.tables[Delivery.__tablename__]
EVENTS = JobEvent.metadata.tables[JobEvent.__tablename__]

_INSERT_EVENT = insert(EVENTS)
"""Built once: the values come as parameters, so the compiled form is reused."""

TERMINAL_DELIVERY_STATES = (DeliveryState.DONE, DeliveryState.FAILED)
FINISHED_JOB_STATES = (JobState.DONE, JobState.SKIPPED, JobState.FAILED)

_ViewT = TypeVar("_ViewT")
StateT = TypeVar("StateT", JobState, DeliveryState)
"""A job or a delivery state, the same kind throughout one call."""


class EngineBound:
    """A part of the queue: writes and reads through one engine.

    Every transition is one ``UPDATE ... WHERE id = :id AND state = :expected`` (and, for
    claimed work, ``AND claimed_by = :worker``), checked by its row count, written in the same
    transaction as its ``job_events`` row. Claims lock what they take: ``BEGIN IMMEDIATE`` on
    SQLite, ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL. Methods return frozen
    snapshots, never ORM objects. Times are timezone-aware; ``now`` defaults to the current
    UTC time.

    Parameters
    ----------
    engine:
        An engine from :func:`pneumonode.queue.db.make_engine` whose schema exists.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine


def view(view_class: type[_ViewT], row: RowMapping) -> _ViewT:
    """The frozen snapshot ``view_class`` of one row."""
    names = [f.name for f in fields(view_class)]  # type: ignore[arg-type]
    return view_class(**{name: row[name] for name in names})


def job_views(
    conn: Connection,
    condition: ColumnElement[bool] | None,
    *,
    order: Any = None,
    limit: int | None = None,
    lock: bool = False,
    skip_locked: bool = False,
) -> list[JobView]:
    """The jobs matching ``condition``; ``lock``/``skip_locked`` take row locks."""
    statement = select(JOBS)
    if condition is not None:
        statement = statement.where(condition)
    if order is not None:
        statement = statement.order_by(order)
    if limit is not None:
        statement = statement.limit(limit)
    if lock or skip_locked:
        statement = statement.with_for_update(skip_locked=skip_locked, key_share=True)
    return [view(JobView, row) for row in conn.execute(statement).mappings()]


def delivery_views(conn: Connection, condition: ColumnElement[bool]) -> list[DeliveryView]:
    """The deliveries matching ``condition``, in the order they were created."""
    statement = select(DELIVERIES).where(condition).order_by(DELIVERIES.c.id)
    return [view(DeliveryView, row) for row in conn.execute(statement).mappings()]


def job_view_or_raise(conn: Connection, job_id: int, *, lock: bool = False) -> JobView:
    """The job ``job_id``; JobNotFound when there is none."""
    views = job_views(conn, JOBS.c.id == job_id, lock=lock)
    if not views:
        raise JobNotFound(f"job {job_id}: no such job")
    return views[0]


def lock_job(conn: Connection, job_id: int) -> None:
    """Lock a job row (always the job before its deliveries)."""
    conn.execute(select(JOBS.c.id).where(JOBS.c.id == job_id).with_for_update(key_share=True))


def lock_delivery_job(conn: Connection, delivery_id: int, transition: str) -> DeliveryView:
    """Lock the job of a delivery (always job before delivery) and return the delivery."""
    job_id = conn.execute(
        select(DELIVERIES.c.job_id).where(DELIVERIES.c.id == delivery_id)
    ).scalar_one_or_none()
    if job_id is None:
        raise StaleTransition(f"delivery {delivery_id}: cannot {transition}: no such delivery")
    lock_job(conn, job_id)
    return delivery_views(conn, DELIVERIES.c.id == delivery_id)[0]


def add_event(
    conn: Connection,
    job_id: int,
    at: datetime,
    from_state: str | None,
    to_state: str,
    actor: str,
    detail: str,
    *,
    destination: str | None = None,
) -> None:
    """Append one row to the job's event log (``destination`` for delivery transitions)."""
    conn.execute(
        _INSERT_EVENT,
        event_row(job_id, at, from_state, to_state, actor, detail, destination=destination),
    )


def add_events(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append several rows built by :func:`event_row` to the event log in one statement."""
    if rows:
        conn.execute(_INSERT_EVENT, list(rows))


def event_row(
    job_id: int,
    at: datetime,
    from_state: str | None,
    to_state: str,
    actor: str,
    detail: str,
    *,
    destination: str | None = None,
) -> dict[str, Any]:
    """The values of one event row (see :func:`add_event`)."""
    return {
        "job_id": job_id,
        "at": at,
        "from_state": None if from_state is None else str(from_state),
        "to_state": str(to_state),
        "actor": actor,
        "detail": detail,
        "destination": destination,
    }


def guarded_update(
    conn: Connection,
    table: Table,
    row_id: int,
    *,
    expected: JobState | DeliveryState,
    worker_id: str | None,
    transition: str,
    values: Mapping[str, Any],
) -> None:
    """Run ``UPDATE ... WHERE id AND state (AND claimed_by)`` on a job or delivery row.

    Raises
    ------
    StaleTransition
        When it matches no row: the message says what was expected and what was found.
    """
    conditions = [table.c.id == row_id, table.c.state == expected]
    if worker_id is not None:
        conditions.append(table.c.claimed_by == worker_id)
    if conn.execute(update(table).where(*conditions).values(**values)).rowcount == 1:
        return
    what = "job" if table is JOBS else "delivery"
    claim = f" claimed by {worker_id!r}" if worker_id is not None else ""
    raise StaleTransition(
        f"{what} {row_id}: cannot {transition}: expected state {expected.value!r}{claim}, "
        f"found {_found(conn, table, row_id)}"
    )


def _found(conn: Connection, table: Table, row_id: int) -> str:
    """What a guarded update found instead of the row it expected."""
    if table is JOBS:
        job = next(iter(job_views(conn, JOBS.c.id == row_id)), None)
        return "no such job" if job is None else (
            f"state '{job.state.value}' claimed by {job.claimed_by!r} "
            f"(SOP Instance UID {job.sop_instance_uid})"
        )
    delivery = next(iter(delivery_views(conn, DELIVERIES.c.id == row_id)), None)
    return "no such delivery" if delivery is None else (
        f"job {delivery.job_id} to {delivery.destination!r} in state "
        f"'{delivery.state.value}' claimed by {delivery.claimed_by!r}"
    )


def update_job(
    conn: Connection,
    job_id: int,
    *,
    expected: JobState,
    worker_id: str | None,
    transition: str,
    values: Mapping[str, Any],
) -> JobView:
    """Run one guarded UPDATE of a job (:func:`guarded_update`); return the job after it."""
    guarded_update(
        conn, JOBS, job_id,
        expected=expected, worker_id=worker_id, transition=transition, values=values,
    )
    return job_views(conn, JOBS.c.id == job_id)[0]


def heartbeat(engine: Engine, table: Table, row_id: int, worker_id: str, at: datetime) -> None:
    """Set ``heartbeat_at`` of a job or delivery its worker still holds.

    Raises
    ------
    StaleTransition
        When the row is no longer ``processing`` / ``sending`` under this worker's claim.
    """
    claimed = JobState.PROCESSING if table is JOBS else DeliveryState.SENDING
    with write_transaction(engine) as conn:
        guarded_update(
            conn, table, row_id,
            expected=claimed, worker_id=worker_id, transition="heartbeat",
            values={"heartbeat_at": at},
        )


def claim_rows(
    conn: Connection,
    table: Table,
    due: Sequence[ColumnElement[bool]],
    order: Sequence[ColumnElement[Any]],
    limit: int,
    *,
    expected: StateT,
    to: StateT,
    worker_id: str,
    at: datetime,
) -> list[int]:
    """Lock up to ``limit`` rows in ``expected`` that are ``due`` and claim them for a worker.

    The rows go ``expected -> to`` with ``attempts`` increased, ``claimed_by = worker_id`` and
    ``heartbeat_at = at``; rows locked by another claim are passed over.

    Returns
    -------
    list of int
        The ids claimed, in ``order``.
    """
    ids = list(
        conn.execute(
            select(table.c.id)
            .where(table.c.state == expected, *due)
            .order_by(*order)
            .limit(limit)
            .with_for_update(skip_locked=True, key_share=True, of=table)
        ).scalars()
    )
    if not ids:
        return []
    result = conn.execute(
        update(table)
        .where(table.c.id.in_(ids), table.c.state == expected)
        .values(
            state=to,
            attempts=table.c.attempts + 1,
            claimed_by=worker_id,
            heartbeat_at=at,
            updated_at=at,
        )
    )
    if result.rowcount != len(ids):
        raise StaleTransition(
            f"{table.name} {ids}: claim expected state '{expected.value}' on {len(ids)} rows, "
            f"updated {result.rowcount}"
        )
    return ids


def released(at: datetime, **values: Any) -> dict[str, Any]:
    """The values of a row whose claim ends at ``at``, with ``values`` added."""
    return {"claimed_by": None, "heartbeat_at": None, "updated_at": at, **values}


def failed_attempt(
    policy: RetryPolicy,
    attempts: int,
    at: datetime,
    message: str,
    *,
    again: StateT,
    give_up: StateT,
) -> tuple[StateT, dict[str, Any], str]:
    """The state, row values and event detail of a failed attempt under ``policy``.

    ``again`` (due after the backoff) while the budget lasts, ``give_up`` after it.
    """
    due = next_attempt(policy, max(attempts, 1), at)
    if due is None:
        values = released(at, state=give_up, last_error=message)
        return give_up, values, f"gave up after {attempts} attempts: {message}"
    values = released(at, state=again, last_error=message, next_attempt_at=due)
    return again, values, f"attempt {attempts} failed, retry at {due.isoformat()}: {message}"


def blocked_by_earlier_delivery() -> ColumnElement[bool]:
    """True for a delivery that must wait: its destination is busy or owes an older job."""
    earlier = DELIVERIES.alias("earlier")
    return exists(
        select(earlier.c.id).where(
            earlier.c.destination == DELIVERIES.c.destination,
            earlier.c.id != DELIVERIES.c.id,
            or_(
                earlier.c.state == DeliveryState.SENDING,
                and_(
                    earlier.c.state == DeliveryState.PENDING,
                    earlier.c.job_id < DELIVERIES.c.job_id,
                ),
            ),
        )
    )
