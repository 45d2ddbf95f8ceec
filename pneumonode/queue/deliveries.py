"""A delivery's way out: claim in destination order, heartbeat, succeed, fail; the job settled."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from pneumonode.queue.db import write_transaction
from pneumonode.queue.models import DeliveryState, JobState
from pneumonode.queue.reads import QueueReads
from pneumonode.queue.records import (
    DeliveryTarget,
    DeliveryView,
    JobView,
    check_limit,
    check_worker,
    clip_error,
    utc,
)
from pneumonode.queue.retry import RetryPolicy
from pneumonode.queue.rows import (
    DELIVERIES,
    TERMINAL_DELIVERY_STATES,
    add_event,
    blocked_by_earlier_delivery,
    claim_rows,
    delivery_views,
    failed_attempt,
    guarded_update,
    heartbeat,
    lock_delivery_job,
    released,
    update_job,
)
from pneumonode.results import encode_kinds

logger = logging.getLogger(__name__)


class DeliveryTransitions(QueueReads):
    """What a sender does to deliveries, with the reads it needs (the job, the next due time).

    A transition of a claimed delivery raises :class:`StaleTransition` when it is no longer
    ``sending`` under the caller's claim: the caller must stop working on it.
    """

    def claim_deliveries(
        self, worker_id: str, limit: int = 1, now: datetime | None = None
    ) -> list[DeliveryView]:
        """Take due ``pending`` deliveries for sending, keeping each destination in order.

        A delivery is claimable only when it is the oldest (by job id) delivery of its
        destination that is neither done nor failed, and when no delivery of that
        destination is ``sending``: a destination receives results one at a time, in the
        order the images were received, and a delivery waiting for its backoff holds back
        the later ones. Destinations are independent of each other.

        Returns
        -------
        list of DeliveryView
            The claimed deliveries, now ``sending`` with ``attempts`` increased; at most one
            per destination.
        """
        at = utc(now)
        check_worker(worker_id)
        check_limit(limit)
        with write_transaction(self._engine) as conn:
            ids = claim_rows(
                conn,
                DELIVERIES,
                [DELIVERIES.c.next_attempt_at <= at, ~blocked_by_earlier_delivery()],
                [DELIVERIES.c.job_id, DELIVERIES.c.id],
                limit,
                expected=DeliveryState.PENDING,
                to=DeliveryState.SENDING,
                worker_id=worker_id,
                at=at,
            )
            claimed = delivery_views(conn, DELIVERIES.c.id.in_(ids)) if ids else []
            for delivery in claimed:
                add_event(
                    conn, delivery.job_id, at, DeliveryState.PENDING, DeliveryState.SENDING,
                    worker_id, f"claimed, attempt {delivery.attempts}",
                    destination=delivery.destination,
                )
        for delivery in claimed:
            logger.info(
                "job %d: delivery %d to %s claimed by %s, attempt %d",
                delivery.job_id, delivery.id, delivery.destination, worker_id, delivery.attempts,
            )
        return claimed

    def heartbeat_delivery(
        self, delivery_id: int, worker_id: str, now: datetime | None = None
    ) -> None:
        """Tell the queue a worker still sends its delivery (StaleTransition: claim lost)."""
        heartbeat(self._engine, DELIVERIES, delivery_id, worker_id, utc(now))

    def delivery_succeeded(
        self, delivery_id: int, worker_id: str, now: datetime | None = None
    ) -> None:
        """Record a delivery as sent; the job is ``done`` once all its deliveries are.
        """
        at = utc(now)
        self._end_send(
            delivery_id, worker_id, at, "succeed",
            lambda delivery: (
                DeliveryState.DONE,
                released(at, state=DeliveryState.DONE, last_error=None),
                f"sent, attempt {delivery.attempts}",
            ),
        )

    def delivery_failed(
        self,
        delivery_id: int,
        worker_id: str,
        error: str,
        policy: RetryPolicy,
        now: datetime | None = None,
    ) -> DeliveryView:
        """Record a failed send: retry later, or give up after the budget.

        When every delivery of the job has ended and one of them failed, the job goes
        ``delivering -> failed`` with the reason.

        Returns
        -------
        DeliveryView
            The delivery, ``pending`` with its backoff or ``failed``; ``last_error`` set.
        """
        at = utc(now)
        message = clip_error(error)
        return self._end_send(
            delivery_id, worker_id, at, "fail",
            lambda delivery: failed_attempt(
                policy, delivery.attempts, at, message,
                again=DeliveryState.PENDING, give_up=DeliveryState.FAILED,
            ),
        )

    def _end_send(
        self,
        delivery_id: int,
        worker_id: str,
        at: datetime,
        transition: str,
        outcome: Callable[[DeliveryView], tuple[DeliveryState, dict[str, Any], str]],
    ) -> DeliveryView:
        """End a send: ``outcome`` gives the new state, values and detail from the delivery."""
        with write_transaction(self._engine) as conn:
            delivery = lock_delivery_job(conn, delivery_id, transition)
            to, values, detail = outcome(delivery)
            guarded_update(
                conn,
                DELIVERIES,
                delivery_id,
                expected=DeliveryState.SENDING,
                worker_id=worker_id,
                transition=transition if to is DeliveryState.DONE else f"{transition} ({to})",
                values=values,
            )
            add_event(
                conn, delivery.job_id, at, DeliveryState.SENDING, to, worker_id, detail,
                destination=delivery.destination,
            )
            if to in TERMINAL_DELIVERY_STATES:
                settle_job(conn, delivery.job_id, at, worker_id)
            return delivery_views(conn, DELIVERIES.c.id == delivery_id)[0]


def pending_delivery(target: DeliveryTarget, at: datetime) -> dict[str, Any]:
    """The values of a delivery row for ``target``: ``pending``, no attempt yet, due at ``at``."""
    return released(
        at,
        ae_title=target.ae_title,
        host=target.host,
        port=target.port,
        objects=encode_kinds(target.kinds),
        state=DeliveryState.PENDING,
        attempts=0,
        next_attempt_at=at,
        last_error=None,
    )


def describe_target(target: DeliveryTarget) -> str:
    """What goes where, for the event log: ``SEG,SC to AE@host:port``."""
    return f"{encode_kinds(target.kinds).upper()} to {target.ae_title}@{target.host}:{target.port}"


def reopen_failed_deliveries(
    conn: Connection,
    job: JobView,
    failed: Sequence[DeliveryView],
    at: datetime,
    actor: str,
    detail: str = "operator retry",
) -> None:
    """Give a job's failed deliveries another go: ``pending``, attempts reset, due at ``at``.

    A ``failed`` job goes back to ``delivering``.
    """
    for delivery in failed:
        guarded_update(
            conn,
            DELIVERIES,
            delivery.id,
            expected=DeliveryState.FAILED,
            worker_id=None,
            transition="operator retry",
            values=released(at, state=DeliveryState.PENDING, attempts=0, next_attempt_at=at),
        )
        add_event(
            conn, job.id, at, DeliveryState.FAILED, DeliveryState.PENDING, actor, detail,
            destination=delivery.destination,
        )
    if job.state is JobState.FAILED:
        update_job(
            conn,
            job.id,
            expected=JobState.FAILED,
            worker_id=None,
            transition=f"{detail} (deliveries)",
            values={"state": JobState.DELIVERING, "updated_at": at},
        )
        destinations = ", ".join(d.destination for d in failed)
        add_event(
            conn, job.id, at, JobState.FAILED, JobState.DELIVERING, actor,
            f"{detail}: re-sending to {destinations}",
        )


def settle_job(conn: Connection, job_id: int, at: datetime, actor: str) -> None:
    """Move a delivering job to done or failed once all its deliveries have ended."""
    deliveries = delivery_views(conn, DELIVERIES.c.job_id == job_id)
    if not all(d.state in TERMINAL_DELIVERY_STATES for d in deliveries):
        return
    failed = [d for d in deliveries if d.state is DeliveryState.FAILED]
    if failed:
        reason = "; ".join(
            f"delivery to {d.destination} failed after {d.attempts} attempts: {d.last_error}"
            for d in failed
        )
        to = JobState.FAILED
        values: dict[str, Any] = {"state": to, "last_error": clip_error(reason)}
        detail = reason
    else:
        to = JobState.DONE
        values = {"state": to, "last_error": None}  # an earlier failure is history now
        detail = f"all {len(deliveries)} deliveries done"
    values["updated_at"] = at
    job = update_job(
        conn,
        job_id,
        expected=JobState.DELIVERING,
        worker_id=None,
        transition=f"settle deliveries ({to})",
        values=values,
    )
    add_event(conn, job_id, at, JobState.DELIVERING, to, actor, clip_error(detail))
    logger.info("job %d: %s (SOP Instance UID %s)", job_id, to, job.sop_instance_uid)
