"""What operators and the scheduler do: retry, resend, take back expired claims, purge."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, and_, delete, exists, insert, select, update

from pneumonode.queue.db import write_transaction
from pneumonode.queue.deliveries import (
    describe_target,
    pending_delivery,
    reopen_failed_deliveries,
    settle_job,
)
from pneumonode.queue.models import DeliveryState, JobState
from pneumonode.queue.reads import QueueReads
from pneumonode.queue.records import (
    DeliveryTarget,
    DeliveryView,
    JobView,
    NotRetryable,
    StaleTransition,
    check_actor,
    check_limit,
    utc,
)
from pneumonode.queue.retry import RetryPolicy
from pneumonode.queue.rows import (
    DELIVERIES,
    EVENTS,
    FINISHED_JOB_STATES,
    JOBS,
    TERMINAL_DELIVERY_STATES,
    StateT,
    add_event,
    delivery_views,
    job_view_or_raise,
    job_views,
    lock_job,
    released,
    update_job,
)

logger = logging.getLogger(__name__)


class QueueAdmin(QueueReads):
    """Operator retry and resend, stale-claim recovery, purge; with the reads the CLI needs."""

    def requeue_stale(
        self,
        stale_before: datetime,
        now: datetime | None = None,
        *,
        policy: RetryPolicy | None = None,
        delivery_policy: RetryPolicy | None = None,
        actor: str = "scheduler",
    ) -> int:
        """Give expired claims back to the queue.

        ``processing`` jobs and ``sending`` deliveries whose ``heartbeat_at`` is before
        ``stale_before`` go back to ``received`` / ``pending``, due at once, with the event
        "claim expired". With a ``policy``, jobs whose attempts already reached
        ``policy.max_attempts`` end ``failed`` instead, so an image that crashes or wedges
        its worker every time cannot loop forever; deliveries follow ``delivery_policy``
        (``policy`` when it is not given) the same way.

        Returns
        -------
        int
            The number of jobs and deliveries taken back.
        """
        at = utc(now)
        cutoff = utc(stale_before)
        check_actor(actor)
        count = 0
        with write_transaction(self._engine) as conn:
            stale_jobs = job_views(
                conn,
                and_(JOBS.c.state == JobState.PROCESSING, JOBS.c.heartbeat_at < cutoff),
                order=JOBS.c.id,
                skip_locked=True,
            )
            for job in stale_jobs:
                to, values, detail = _expired(job, policy, at, JobState.RECEIVED, JobState.FAILED)
                if _take_back(conn, JOBS, job.id, JobState.PROCESSING, cutoff, values):
                    add_event(conn, job.id, at, JobState.PROCESSING, to, actor, detail)
                    logger.warning("job %d: %s, now %s", job.id, detail, to)
                    count += 1
        delivery_budget = delivery_policy if delivery_policy is not None else policy
        with write_transaction(self._engine) as conn:
            stale_deliveries = delivery_views(
                conn,
                and_(
                    DELIVERIES.c.state == DeliveryState.SENDING,
                    DELIVERIES.c.heartbeat_at < cutoff,
                ),
            )
            for delivery in stale_deliveries:
                lock_job(conn, delivery.job_id)
                to_delivery, values, detail = _expired(
                    delivery, delivery_budget, at, DeliveryState.PENDING, DeliveryState.FAILED
                )
                if not _take_back(
                    conn, DELIVERIES, delivery.id, DeliveryState.SENDING, cutoff, values
                ):
                    continue
                add_event(
                    conn, delivery.job_id, at, DeliveryState.SENDING, to_delivery, actor, detail,
                    destination=delivery.destination,
                )
                if to_delivery is DeliveryState.FAILED:
                    settle_job(conn, delivery.job_id, at, actor)
                logger.warning(
                    "job %d: delivery %d to %s %s, now %s",
                    delivery.job_id,
                    delivery.id,
                    delivery.destination,
                    detail,
                    to_delivery,
                )
                count += 1
        return count

    def purge_finished(
        self,
        finished_before: datetime,
        limit: int = 100,
        before_delete: Callable[[Sequence[JobView]], None] | None = None,
    ) -> list[JobView]:
        """Delete finished jobs that ended before a cutoff, with their deliveries and events.

        A job qualifies when it is ``done``, ``skipped`` or ``failed``, its last transition
        (``updated_at``) is before ``finished_before``, and none of its deliveries is
        ``pending`` or ``sending``: a job is never purged while a delivery may still happen.

        Parameters
        ----------
        finished_before:
            The cutoff: now minus the retention period.
        limit:
            The most jobs deleted in this one transaction (>= 1).
        before_delete:
            Called inside the transaction with the jobs about to be deleted, to remove their
            files first. When it raises, nothing is deleted and the exception propagates; a
            crash after it leaves rows whose files are gone, deleted by the next purge.

        Returns
        -------
        list of JobView
            The deleted jobs, oldest first; fewer than ``limit`` means none is left.
        """
        cutoff = utc(finished_before)
        check_limit(limit)
        unfinished_delivery = exists(
            select(DELIVERIES.c.id).where(
                DELIVERIES.c.job_id == JOBS.c.id,
                DELIVERIES.c.state.not_in(TERMINAL_DELIVERY_STATES),
            )
        )
        with write_transaction(self._engine) as conn:
            jobs = job_views(
                conn,
                and_(
                    JOBS.c.state.in_(FINISHED_JOB_STATES),
                    JOBS.c.updated_at < cutoff,
                    ~unfinished_delivery,
                ),
                order=JOBS.c.id,
                limit=limit,
                skip_locked=True,
            )
            if not jobs:
                return []
            if before_delete is not None:
                before_delete(jobs)
            ids = [job.id for job in jobs]
            conn.execute(delete(EVENTS).where(EVENTS.c.job_id.in_(ids)))
            conn.execute(delete(DELIVERIES).where(DELIVERIES.c.job_id.in_(ids)))
            result = conn.execute(
                delete(JOBS).where(
                    JOBS.c.id.in_(ids),
                    JOBS.c.state.in_(FINISHED_JOB_STATES),
                    JOBS.c.updated_at < cutoff,
                )
            )
            if result.rowcount != len(ids):
                raise StaleTransition(
                    f"jobs {ids}: purge expected {len(ids)} finished rows, deleted "
                    f"{result.rowcount}"
                )
        return jobs


    def retry(
        self, job_id: int, now: datetime | None = None, *, actor: str = "operator"
    ) -> JobView:
        """Operator retry: give a failed or skipped job, or its failed deliveries, another go.

        - A job with failed deliveries (``failed`` or still ``delivering``): its failed
          deliveries go back to ``pending`` with their attempts reset, and a ``failed`` job
          goes back to ``delivering``; the results are re-sent, not recomputed.
        - A ``failed`` job without deliveries, or a ``skipped`` job that has a spool file:
          back to ``received`` with its attempts reset, due at once; result UIDs already fixed
          are kept.

        Raises
        ------
        JobNotFound
            When there is no such job.
        NotRetryable
            When the job is in another state, has nothing failed, or was skipped at intake
            (no spool file was kept).
        """
        at = utc(now)
        check_actor(actor)
        with write_transaction(self._engine) as conn:
            job = job_view_or_raise(conn, job_id, lock=True)
            deliveries = delivery_views(conn, DELIVERIES.c.job_id == job_id)
            failed = [d for d in deliveries if d.state is DeliveryState.FAILED]
            if deliveries and job.state in (JobState.FAILED, JobState.DELIVERING):
                if not failed:
                    raise NotRetryable(
                        f"job {job_id}: retry needs a failed delivery, none of "
                        f"{len(deliveries)} failed (state {job.state}, "
                        f"SOP Instance UID {job.sop_instance_uid})"
                    )
                reopen_failed_deliveries(conn, job, failed, at, actor)
            elif job.state is JobState.FAILED or (
                job.state is JobState.SKIPPED and job.spool_path is not None
            ):
                update_job(
                    conn,
                    job_id,
                    expected=job.state,
                    worker_id=None,
                    transition="operator retry",
                    values=released(
                        at, state=JobState.RECEIVED, attempts=0, next_attempt_at=at,
                        skip_reason=None,
                    ),
                )
                add_event(conn, job_id, at, job.state, JobState.RECEIVED, actor, "operator retry")
            elif job.state is JobState.SKIPPED:
                raise NotRetryable(
                    f"job {job_id}: skipped at intake ({job.skip_reason}), so no copy was kept; "
                    "ask the sender to send the image again: a resend of a skipped image is "
                    f"processed again (SOP Instance UID {job.sop_instance_uid})"
                )
            else:
                raise NotRetryable(
                    f"job {job_id}: retry needs state failed, skipped or delivering with a "
                    f"failed delivery, got {job.state} "
                    f"(SOP Instance UID {job.sop_instance_uid})"
                )
            updated = job_view_or_raise(conn, job_id)
        logger.info("job %d: operator retry, now %s", job_id, updated.state)
        return updated

    def resend(
        self,
        job_id: int,
        targets: Sequence[DeliveryTarget],
        now: datetime | None = None,
        *,
        actor: str = "operator",
    ) -> JobView:
        """Operator resend: deliver a job's existing results again (same UIDs) to ``targets``.

        A target with a delivery row for this job gets it back ``pending`` (whatever its state,
        ``done`` included) with its attempts reset and its address and kinds updated; a new
        target gets a new pending delivery. A ``done`` or ``failed`` job goes back to
        ``delivering``. Nothing is recomputed.

        Raises
        ------
        JobNotFound
            When there is no such job.
        NotRetryable
            When the job has no results yet (not processed, skipped) or is being processed, or
            ``targets`` is empty or names a destination twice.
        """
        at = utc(now)
        check_actor(actor)
        names = [t.destination for t in targets]
        if not targets or len(set(names)) != len(names):
            raise NotRetryable(f"job {job_id}: resend needs distinct destinations, got {names}")
        with write_transaction(self._engine) as conn:
            job = job_view_or_raise(conn, job_id, lock=True)
            if job.state not in (JobState.DONE, JobState.FAILED, JobState.DELIVERING) or (
                job.seg_path is None and job.sc_path is None and job.sr_path is None
            ):
                raise NotRetryable(
                    f"job {job_id}: resend needs results; the job is {job.state} without them "
                    f"(SOP Instance UID {job.sop_instance_uid}); use jobs retry to process it"
                )
            existing = {
                d.destination: d for d in delivery_views(conn, DELIVERIES.c.job_id == job_id)
            }
            busy = [
                n for n in names if n in existing and existing[n].state is DeliveryState.SENDING
            ]
            if busy:
                raise NotRetryable(
                    f"job {job_id}: a delivery to {', '.join(busy)} is being sent now; "
                    "resend once it has ended"
                )
            for target in targets:
                _deliver_again(conn, job_id, target, existing.get(target.destination), at, actor)
            if job.state is not JobState.DELIVERING:
                update_job(
                    conn,
                    job_id,
                    expected=job.state,
                    worker_id=None,
                    transition="resend",
                    values={"state": JobState.DELIVERING, "updated_at": at},
                )
                add_event(
                    conn, job_id, at, job.state, JobState.DELIVERING, actor,
                    f"resend to {', '.join(names)}",
                )
            updated = job_view_or_raise(conn, job_id)
        logger.info("job %d: resend to %s", job_id, ", ".join(names))
        return updated

def _expired(
    claimed: JobView | DeliveryView,
    policy: RetryPolicy | None,
    at: datetime,
    again: StateT,
    give_up: StateT,
) -> tuple[StateT, dict[str, Any], str]:
    """The state, values and event detail of a claim that expired: back, or failed."""
    spent = policy is not None and claimed.attempts >= policy.max_attempts
    detail = f"claim expired (claimed by {claimed.claimed_by}, attempt {claimed.attempts})"
    if spent:
        detail += "; attempt budget spent"
        return give_up, released(at, state=give_up, next_attempt_at=at, last_error=detail), detail
    return again, released(at, state=again, next_attempt_at=at), detail


def _take_back(
    conn: Connection,
    table: Table,
    row_id: int,
    claimed: JobState | DeliveryState,
    cutoff: datetime,
    values: dict[str, Any],
) -> bool:
    """Apply ``values`` to a row still claimed and silent since before ``cutoff``."""
    result = conn.execute(
        update(table)
        .where(table.c.id == row_id, table.c.state == claimed, table.c.heartbeat_at < cutoff)
        .values(**values)
    )
    return result.rowcount == 1


def _deliver_again(
    conn: Connection,
    job_id: int,
    target: DeliveryTarget,
    before: DeliveryView | None,
    at: datetime,
    actor: str,
) -> None:
    """Make ``target``'s delivery of the job pending again, or new."""
    values = pending_delivery(target, at)
    if before is None:
        conn.execute(
            insert(DELIVERIES).values(
                job_id=job_id, destination=target.destination, created_at=at, **values
            )
        )
    else:
        conn.execute(update(DELIVERIES).where(DELIVERIES.c.id == before.id).values(**values))
    add_event(
        conn, job_id, at, None if before is None else before.state, DeliveryState.PENDING, actor,
        f"resend {describe_target(target)}",
        destination=target.destination,
    )
