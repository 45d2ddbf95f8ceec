"""What the CLI, the metrics, the sender and retention read from the queue; nothing here writes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum

from sqlalchemy import ColumnElement, Table, and_, func, select

from pneumonode.queue.db import read_transaction
from pneumonode.queue.models import DeliveryState, JobState
from pneumonode.queue.records import (
    DeliveryView,
    EventView,
    JobView,
    check_limit,
    job_state,
    utc,
)
from pneumonode.queue.rows import (
    DELIVERIES,
    EVENTS,
    FINISHED_JOB_STATES,
    JOBS,
    EngineBound,
    blocked_by_earlier_delivery,
    delivery_views,
    job_views,
    view,
)


class QueueReads(EngineBound):
    """Snapshots of jobs, deliveries and events, counts, and when work is next due."""

    def get_job(self, job_id: int) -> JobView | None:
        """The job with this id, or None."""
        with read_transaction(self._engine) as conn:
            views = job_views(conn, JOBS.c.id == job_id)
        return views[0] if views else None

    def find_job(self, sop_instance_uid: str) -> JobView | None:
        """The job of this SOP Instance UID, or None."""
        with read_transaction(self._engine) as conn:
            views = job_views(conn, JOBS.c.sop_instance_uid == sop_instance_uid)
        return views[0] if views else None

    def list_jobs(
        self, state: str | None = None, limit: int = 50, *, since: datetime | None = None
    ) -> list[JobView]:
        """The newest jobs first, optionally only those in one state or received since a time.

        Raises
        ------
        ValueError
            When ``state`` is not a job state or ``limit`` is below 1.
        """
        check_limit(limit)
        conditions: list[ColumnElement[bool]] = []
        if state is not None:
            conditions.append(JOBS.c.state == job_state(state))
        if since is not None:
            conditions.append(JOBS.c.received_at >= utc(since))
        condition = and_(*conditions) if conditions else None
        with read_transaction(self._engine) as conn:
            return job_views(conn, condition, order=JOBS.c.id.desc(), limit=limit)

    def events(self, job_id: int) -> list[EventView]:
        """A job's event log, oldest first."""
        with read_transaction(self._engine) as conn:
            rows = conn.execute(
                select(EVENTS).where(EVENTS.c.job_id == job_id).order_by(EVENTS.c.id)
            ).mappings()
            return [view(EventView, row) for row in rows]

    def deliveries(self, job_id: int) -> list[DeliveryView]:
        """A job's deliveries, in the order they were created."""
        with read_transaction(self._engine) as conn:
            return delivery_views(conn, DELIVERIES.c.job_id == job_id)

    def counts_by_state(self) -> dict[str, int]:
        """How many jobs are in each state; every state is present, zero included."""
        return self._counts(JOBS, JobState)

    def delivery_counts_by_state(self) -> dict[str, int]:
        """How many deliveries are in each state; every state is present, zero included."""
        return self._counts(DELIVERIES, DeliveryState)

    def _counts(self, table: Table, states: type[StrEnum]) -> dict[str, int]:
        counts = {state.value: 0 for state in states}
        with read_transaction(self._engine) as conn:
            for state, count in conn.execute(
                select(table.c.state, func.count()).group_by(table.c.state)
            ):
                counts[str(state)] = int(count)
        return counts

    def next_due(
        self, now: datetime | None = None, *, jobs: bool = True, deliveries: bool = True
    ) -> datetime | None:
        """The earliest time at which pending work becomes claimable.

        Considers ``received`` jobs and those ``pending`` deliveries that the destination
        order lets through (see ``DeliveryTransitions.claim_deliveries``), so a worker can
        sleep until then.

        Returns
        -------
        datetime or None
            The earliest ``next_attempt_at``, but never earlier than ``now`` (``now`` itself
            means work is claimable already), or None when nothing is waiting.
        """
        at = utc(now)
        waiting: list[tuple[Table, ColumnElement[bool]]] = []
        if jobs:
            waiting.append((JOBS, JOBS.c.state == JobState.RECEIVED))
        if deliveries:
            pending = and_(
                DELIVERIES.c.state == DeliveryState.PENDING, ~blocked_by_earlier_delivery()
            )
            waiting.append((DELIVERIES, pending))
        with read_transaction(self._engine) as conn:
            candidates = [
                due
                for table, condition in waiting
                if (
                    due := conn.execute(
                        select(func.min(table.c.next_attempt_at)).where(condition)
                    ).scalar_one_or_none()
                )
                is not None
            ]
        return max(min(candidates), at) if candidates else None

    def oldest_unfinished_received_at(self) -> datetime | None:
        """When the oldest job that is not yet done, skipped or failed was received, or None."""
        with read_transaction(self._engine) as conn:
            oldest: datetime | None = conn.execute(
                select(func.min(JOBS.c.received_at)).where(
                    JOBS.c.state.not_in(FINISHED_JOB_STATES)
                )
            ).scalar_one_or_none()
        return oldest

    def referenced_paths(self, paths: Sequence[str]) -> set[str]:
        """Which of these data-folder paths a job still refers to (spool, SEG, overlay, SR)."""
        found: set[str] = set()
        wanted = list(dict.fromkeys(paths))
        with read_transaction(self._engine) as conn:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                for column in (
                    JOBS.c.spool_path,
                    JOBS.c.seg_path,
                    JOBS.c.sc_path,
                    JOBS.c.sr_path,
                ):
                    found.update(
                        str(value)
                        for value in conn.execute(select(column).where(column.in_(chunk))).scalars()
                    )
        return found
