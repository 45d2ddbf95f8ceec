"""A job's way through processing: enqueue (resend policy), claim, heartbeat, results, fail."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import fields
from datetime import datetime
from types import MappingProxyType
from typing import Any

from sqlalchemy import Connection, Insert, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from pneumonode.queue.db import write_transaction
from pneumonode.queue.deliveries import (
    describe_target,
    pending_delivery,
    reopen_failed_deliveries,
)
from pneumonode.queue.models import DeliveryState, JobState
from pneumonode.queue.records import (
    DeliveryTarget,
    EnqueueResult,
    FindingRecord,
    FinishedJob,
    JobNotFound,
    JobView,
    NewJob,
    QueueError,
    ResultUIDs,
    StaleTransition,
    check_actor,
    check_limit,
    check_worker,
    clip_error,
    utc,
)
from pneumonode.queue.retry import RetryPolicy
from pneumonode.queue.rows import (
    DELIVERIES,
    JOBS,
    EngineBound,
    add_event,
    add_events,
    claim_rows,
    delivery_views,
    event_row,
    failed_attempt,
    heartbeat,
    job_view_or_raise,
    job_views,
    released,
    update_job,
)

logger = logging.getLogger(__name__)

_ARRIVAL = ("spool_path", "skip_reason", "calling_aet", "peer_host")
"""The columns a job takes from each copy of its instance that is received."""

_RESULT_UID_GROUPS = (
    ("seg_series_uid", "seg_sop_uid", "sc_series_uid", "sc_sop_uid"),
    ("sr_series_uid", "sr_sop_uid"),  # the SR came later: fixed apart from the SEG and SC
)
"""The result UID columns, in the groups that are fixed together."""

_RESULT_UID_COLUMNS = tuple(f.name for f in fields(ResultUIDs))

_NEW_JOB_COLUMNS = tuple(f.name for f in fields(NewJob))
"""Every field of NewJob is a column of the same name."""

_INSERT_NEW_JOB: Mapping[str, Insert] = MappingProxyType(
    {
        name: dialect.insert(JOBS)
        .on_conflict_do_nothing(index_elements=[JOBS.c.sop_instance_uid])
        .returning(JOBS.c.id)
        for name, dialect in (("sqlite", sqlite), ("postgresql", postgresql))
    }
)
"""Per dialect, built once: insert a job unless its SOP Instance UID is known; its id or none."""


class JobTransitions(EngineBound):
    """What intake and the worker do to jobs; every change a guarded UPDATE with its event.

    A transition of a claimed job raises :class:`StaleTransition` when the job is no longer
    ``processing`` under the caller's claim: the caller must stop working on it.
    """

    def enqueue(
        self, new: NewJob, now: datetime | None = None, *, actor: str = "intake"
    ) -> EnqueueResult:
        """Record a received instance as a job, once per SOP Instance UID.

        Parameters
        ----------
        new:
            The instance. With ``skip_reason`` the job is created ``skipped``, else
            ``received`` and due at once.
        now:
            The time of receipt.
        actor:
            Who receives, for the event log.

        Returns
        -------
        EnqueueResult
            The job's id and ``created=True``. For a SOP Instance UID already known, the
            existing job's id and ``created=False``, following the resend policy: a
            ``skipped`` or ``failed`` job is taken up again (``reopened``): processed again
            from the new copy, or, when it already has results, its failed deliveries are
            sent again with the same UIDs. A job in any other state is left as it is (a
            ``done`` job is redelivered only by the operator). Concurrent enqueues of one UID
            are decided by the unique constraint.
        """
        return self.enqueue_many([new], now, actor=actor)[0]

    def enqueue_many(
        self, news: Sequence[NewJob], now: datetime | None = None, *, actor: str = "intake"
    ) -> list[EnqueueResult]:
        """Record several received instances in one transaction: one commit, one sync.

        Each instance is recorded as :meth:`enqueue` records it, in order; a UID that appears
        twice in ``news`` is a duplicate of its first copy. Intake groups the instances that
        arrive at the same time (group commit), so that concurrent associations share one
        durable commit.

        Returns
        -------
        list of EnqueueResult
            One per instance, in the order of ``news``.
        """
        at = utc(now)
        for new in news:
            check_actor(actor, new.sop_instance_uid)
        if not news:
            return []
        with write_transaction(self._engine) as conn:
            insert_job = _INSERT_NEW_JOB[conn.dialect.name]
            return [self._enqueue_one(conn, insert_job, new, at, actor) for new in news]

    def _enqueue_one(
        self, conn: Connection, insert_job: Insert, new: NewJob, at: datetime, actor: str
    ) -> EnqueueResult:
        """Insert the job of one instance, or apply the resend policy when its UID is known."""
        state = JobState.RECEIVED if new.skip_reason is None else JobState.SKIPPED
        row = {name: getattr(new, name) for name in _NEW_JOB_COLUMNS}
        row.update(
            state=state, attempts=0, next_attempt_at=at, received_at=at, updated_at=at
        )
        # ON CONFLICT DO NOTHING: a known UID inserts nothing and returns no id (on
        # PostgreSQL after waiting for a concurrent insert of the same UID to end)
        job_id: int | None = conn.execute(insert_job, row).scalar_one_or_none()
        if job_id is None:
            existing: int = conn.execute(
                select(JOBS.c.id).where(JOBS.c.sop_instance_uid == new.sop_instance_uid)
            ).scalar_one()
            return _received_again(conn, existing, new, at, actor)
        detail = f"received from {new.calling_aet}"
        if new.skip_reason is not None:
            detail += f"; skipped: {new.skip_reason}"
        add_event(conn, job_id, at, None, state, actor, detail)
        return EnqueueResult(job_id=job_id, created=True)

    def claim_jobs(
        self, worker_id: str, limit: int = 1, now: datetime | None = None
    ) -> list[JobView]:
        """Take the oldest due ``received`` jobs for processing.

        Parameters
        ----------
        worker_id:
            The claiming worker, e.g. ``host:pid:thread``.
        limit:
            The most jobs to take (>= 1).
        now:
            The current time: jobs whose ``next_attempt_at`` is later are not due.

        Returns
        -------
        list of JobView
            The claimed jobs, oldest first, now ``processing`` with ``attempts`` increased,
            ``claimed_by`` set and ``heartbeat_at = now``. Each job is claimed by one worker
            only.
        """
        at = utc(now)
        check_worker(worker_id)
        check_limit(limit)
        with write_transaction(self._engine) as conn:
            ids = claim_rows(
                conn, JOBS, [JOBS.c.next_attempt_at <= at], [JOBS.c.id], limit,
                expected=JobState.RECEIVED, to=JobState.PROCESSING, worker_id=worker_id, at=at,
            )
            claimed = job_views(conn, JOBS.c.id.in_(ids), order=JOBS.c.id) if ids else []
            for job in claimed:
                add_event(
                    conn, job.id, at, JobState.RECEIVED, JobState.PROCESSING, worker_id,
                    f"claimed, attempt {job.attempts}",
                )
        for job in claimed:
            logger.info("job %d: claimed by %s, attempt %d", job.id, worker_id, job.attempts)
        return claimed

    def heartbeat_job(self, job_id: int, worker_id: str, now: datetime | None = None) -> None:
        """Tell the queue a worker still processes its job (StaleTransition: claim lost)."""
        heartbeat(self._engine, JOBS, job_id, worker_id, utc(now))

    def reserve_result_uids(
        self,
        job_id: int,
        proposed: ResultUIDs,
        *,
        actor: str = "worker",
        now: datetime | None = None,
    ) -> ResultUIDs:
        """Fix a job's result UIDs the first time; later calls get the first UIDs back.

        Parameters
        ----------
        job_id:
            The job.
        proposed:
            Freshly generated UIDs, stored only when the job has none yet.
        actor:
            Who reserves, for the event log.
        now:
            The time of the reservation.

        Returns
        -------
        ResultUIDs
            The UIDs stored on the job, so a retried job re-sends identical instances.

        Raises
        ------
        JobNotFound
            When there is no such job.
        """
        outcome = self.reserve_result_uids_many({job_id: proposed}, actor=actor, now=now)[job_id]
        if isinstance(outcome, QueueError):
            raise outcome
        return outcome

    def finish_processing(
        self,
        job_id: int,
        worker_id: str,
        finding: FindingRecord,
        targets: Sequence[DeliveryTarget],
        now: datetime | None = None,
    ) -> None:
        """Record a job's results and create one pending delivery per destination.

        The job goes ``processing -> delivering``, or ``processing -> done`` when there is no
        destination. Its result UIDs must have been reserved with
        :meth:`reserve_result_uids` before the outputs were written.

        Raises
        ------
        QueueError
            When the job's result UIDs were never reserved.
        ValueError
            When two targets share a destination name.
        """
        outcome = self.finish_processing_many(
            [FinishedJob(job_id, finding, tuple(targets))], worker_id, now
        )[job_id]
        if outcome is not None:
            raise outcome

    def reserve_result_uids_many(
        self,
        proposed: Mapping[int, ResultUIDs],
        *,
        actor: str = "worker",
        now: datetime | None = None,
    ) -> dict[int, ResultUIDs | QueueError]:
        """Fix the result UIDs of several jobs (one batch) in one transaction.

        Each job as :meth:`reserve_result_uids` does it: the proposed UIDs are stored only
        where the job has none yet (the SR's apart from the SEG's and SC's), with one event
        the first time.

        Parameters
        ----------
        proposed:
            Freshly generated UIDs per job id.
        actor:
            Who reserves, for the event log.
        now:
            The time of the reservation.

        Returns
        -------
        dict
            Per job id of ``proposed``: the UIDs stored on the job, or the error for that job
            alone (:class:`JobNotFound` when there is no such job, :class:`QueueError` when
            its UIDs are partly set), which leaves that job unchanged and the others reserved.
        """
        at = utc(now)
        check_actor(actor)
        if not proposed:
            return {}
        outcomes: dict[int, ResultUIDs | QueueError] = {}
        with write_transaction(self._engine) as conn:
            found = job_views(conn, JOBS.c.id.in_(list(proposed)), order=JOBS.c.id, lock=True)
            jobs = {job.id: job for job in found}
            events = []
            for job_id, uids in proposed.items():
                job = jobs.get(job_id)
                if job is None:
                    outcomes[job_id] = JobNotFound(f"job {job_id}: no such job")
                    continue
                stored = {name: getattr(job, name) for name in _RESULT_UID_COLUMNS}
                values: dict[str, str] = {}
                first = False
                for group in _RESULT_UID_GROUPS:
                    if all(stored[name] is None for name in group):
                        values.update({name: getattr(uids, name) for name in group})
                        first = first or group is _RESULT_UID_GROUPS[0]
                stored.update(values)
                if None in stored.values():
                    outcomes[job_id] = QueueError(
                        f"job {job_id}: result UIDs are partly set; refusing to mix them "
                        f"(SOP Instance UID {job.sop_instance_uid})"
                    )
                    continue
                result = ResultUIDs(**stored)
                if values:
                    conn.execute(
                        update(JOBS).where(JOBS.c.id == job_id).values(updated_at=at, **values)
                    )
                if first:
                    events.append(event_row(
                        job_id, at, job.state, job.state, actor,
                        f"result UIDs fixed: SEG {result.seg_sop_uid}, SC {result.sc_sop_uid}, "
                        f"SR {result.sr_sop_uid}",
                    ))
                outcomes[job_id] = result
            add_events(conn, events)
        return outcomes

    def finish_processing_many(
        self,
        finished: Sequence[FinishedJob],
        worker_id: str,
        now: datetime | None = None,
    ) -> dict[int, QueueError | None]:
        """Record the results of several jobs of one batch in one transaction.

        Each job as :meth:`finish_processing` records it: ``processing -> delivering`` (or
        ``-> done`` without destinations) by a guarded UPDATE, its event row, one pending
        delivery per target with its event row. A job that can not be finished is left as it
        is and does not hold back the others.

        Parameters
        ----------
        finished:
            The jobs, each with its finding and targets; a job id at most once.
        worker_id:
            The worker whose claim every job must still be under.
        now:
            The time of the transition.

        Returns
        -------
        dict
            Per job id of ``finished``: None when recorded; :class:`StaleTransition` when the
            job is no longer ``processing`` under this worker's claim (the worker must drop
            it); :class:`QueueError` when its result UIDs were never reserved.

        Raises
        ------
        ValueError
            When a job id appears twice.
        """
        at = utc(now)
        check_worker(worker_id)
        ids = [item.job_id for item in finished]
        if len(set(ids)) != len(ids):
            raise ValueError(f"finish_processing_many: job ids must be unique, got {ids}")
        if not finished:
            return {}
        outcomes: dict[int, QueueError | None] = {}
        with write_transaction(self._engine) as conn:
            found = job_views(conn, JOBS.c.id.in_(ids), order=JOBS.c.id, lock=True)
            jobs = {job.id: job for job in found}
            events = []
            deliveries = []
            for item in finished:
                job_id = item.job_id
                job = jobs.get(job_id)
                to = JobState.DELIVERING if item.targets else JobState.DONE
                if job is not None and job.result_uids is None and _held(job, worker_id):
                    outcomes[job_id] = QueueError(
                        f"job {job_id}: cannot finish processing: result UIDs were never "
                        f"reserved (SOP Instance UID {job.sop_instance_uid})"
                    )
                    continue
                guarded = conn.execute(
                    update(JOBS)
                    .where(
                        JOBS.c.id == job_id,
                        JOBS.c.state == JobState.PROCESSING,
                        JOBS.c.claimed_by == worker_id,
                    )
                    .values(**_finished_values(item.finding, to, at))
                )
                if guarded.rowcount != 1:
                    found_text = "no such job" if job is None else (
                        f"state '{job.state.value}' claimed by {job.claimed_by!r} "
                        f"(SOP Instance UID {job.sop_instance_uid})"
                    )
                    outcomes[job_id] = StaleTransition(
                        f"job {job_id}: cannot finish processing ({to}): expected state "
                        f"'processing' claimed by {worker_id!r}, found {found_text}"
                    )
                    continue
                events.append(event_row(
                    job_id, at, JobState.PROCESSING, to, worker_id,
                    _finished_detail(item.finding, item.targets),
                ))
                for target in item.targets:
                    deliveries.append({
                        "job_id": job_id,
                        "destination": target.destination,
                        "created_at": at,
                        **pending_delivery(target, at),
                    })
                    events.append(event_row(
                        job_id, at, None, DeliveryState.PENDING, worker_id,
                        describe_target(target), destination=target.destination,
                    ))
                outcomes[job_id] = None
            if deliveries:
                conn.execute(insert(DELIVERIES), deliveries)
            add_events(conn, events)
        for job_id, outcome in outcomes.items():
            if outcome is not None:
                logger.warning("job %d: %s", job_id, outcome)
        return outcomes

    def skip_job(
        self, job_id: int, worker_id: str, reason: str, now: datetime | None = None
    ) -> None:
        """End a job ``skipped`` with the reason (not a chest radiograph, for example).
        """
        at = utc(now)
        if not reason.strip():
            raise ValueError(f"skip_job: reason must not be blank (job {job_id})")
        with write_transaction(self._engine) as conn:
            update_job(
                conn,
                job_id,
                expected=JobState.PROCESSING,
                worker_id=worker_id,
                transition="skip",
                values=released(at, state=JobState.SKIPPED, skip_reason=reason),
            )
            add_event(conn, job_id, at, JobState.PROCESSING, JobState.SKIPPED, worker_id, reason)

    def fail_job(
        self,
        job_id: int,
        worker_id: str,
        error: str,
        policy: RetryPolicy,
        now: datetime | None = None,
    ) -> JobView:
        """Record a failed processing attempt: retry later, or give up after the budget.

        Returns
        -------
        JobView
            The job, ``received`` with ``next_attempt_at`` from the policy's backoff, or
            ``failed`` once ``attempts`` reached ``policy.max_attempts``; ``last_error`` holds
            the error either way.
        """
        at = utc(now)
        message = clip_error(error)
        with write_transaction(self._engine) as conn:
            found = job_views(conn, JOBS.c.id == job_id, lock=True)
            if not found:
                raise StaleTransition(f"job {job_id}: cannot fail: no such job")
            to, values, detail = failed_attempt(
                policy, found[0].attempts, at, message,
                again=JobState.RECEIVED, give_up=JobState.FAILED,
            )
            job = update_job(
                conn,
                job_id,
                expected=JobState.PROCESSING,
                worker_id=worker_id,
                transition=f"fail ({to})",
                values=values,
            )
            add_event(conn, job_id, at, JobState.PROCESSING, to, worker_id, detail)
        return job


def _received_again(
    conn: Connection, job_id: int, new: NewJob, at: datetime, actor: str
) -> EnqueueResult:
    """Apply the resend policy to an instance that already has job ``job_id``."""
    duplicate = EnqueueResult(job_id, created=False, unused_spool_path=new.spool_path)
    job = job_view_or_raise(conn, job_id, lock=True)
    if job.state not in (JobState.SKIPPED, JobState.FAILED):
        return duplicate
    deliveries = delivery_views(conn, DELIVERIES.c.job_id == job_id)
    if deliveries:
        failed = [d for d in deliveries if d.state is DeliveryState.FAILED]
        if not failed:
            return duplicate
        detail = f"received again from {new.calling_aet}: re-sending its results"
        reopen_failed_deliveries(conn, job, failed, at, actor, detail)
        return EnqueueResult(
            job_id, created=False, reopened=True, unused_spool_path=new.spool_path
        )
    if new.skip_reason is not None and job.state is JobState.SKIPPED:
        return duplicate
    to = JobState.RECEIVED if new.skip_reason is None else JobState.SKIPPED
    update_job(
        conn,
        job_id,
        expected=job.state,
        worker_id=None,
        transition="received again",
        values=released(
            at, state=to, attempts=0, next_attempt_at=at, last_error=None,
            # the new copy: where it lies, who sent it, why it is skipped
            **{name: getattr(new, name) for name in _ARRIVAL},
        ),
    )
    detail = f"received again from {new.calling_aet}: processed again"
    if new.skip_reason is not None:
        detail += f"; skipped: {new.skip_reason}"
    add_event(conn, job_id, at, job.state, to, actor, detail)
    return EnqueueResult(
        job_id,
        created=False,
        reopened=True,
        unused_spool_path=job.spool_path if job.spool_path != new.spool_path else None,
    )


def _held(job: JobView, worker_id: str) -> bool:
    """Whether a job is ``processing`` under ``worker_id``'s claim."""
    return job.state is JobState.PROCESSING and job.claimed_by == worker_id


def _finished_values(finding: FindingRecord, to: JobState, at: datetime) -> dict[str, Any]:
    """The job row's values when its processing ends with ``finding``, going to ``to``."""
    return released(
        at,
        state=to,
        finding_present=finding.present,
        finding_score=finding.score,
        finding_area_mm2=finding.area_mm2,
        model_uid=finding.model_uid,
        seg_path=finding.seg_path,
        sc_path=finding.sc_path,
        sr_path=finding.sr_path,
    )


def _finished_detail(finding: FindingRecord, targets: Sequence[DeliveryTarget]) -> str:
    """The event detail of a job whose processing ended: the finding, where it goes."""
    outcome = "pneumothorax found" if finding.present else "no pneumothorax found"
    outcome += f" (score {finding.score:.3f})"
    if targets:
        return f"{outcome}; delivering to {', '.join(t.destination for t in targets)}"
    return f"{outcome}; no destinations take it, nothing to deliver"


