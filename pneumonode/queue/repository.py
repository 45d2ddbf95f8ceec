"""Every state transition of jobs and deliveries, as guarded updates with their event rows."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    and_,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError

from pneumonode.queue.db import read_transaction, write_transaction
from pneumonode.queue.models import (
    AE_TITLE_LENGTH,
    DESTINATION_LENGTH,
    HOST_LENGTH,
    PATH_LENGTH,
    UID_LENGTH,
    WORKER_ID_LENGTH,
    Delivery,
    DeliveryState,
    Job,
    JobEvent,
    JobState,
)
from pneumonode.queue.retry import RetryPolicy, next_attempt
from pneumonode.results import LEGACY_KINDS, ResultKind, decode_kinds, encode_kinds

logger = logging.getLogger(__name__)

MAX_ERROR_LENGTH = 8000
"""Longest error text stored; longer texts keep their head and tail."""

_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")

_JOBS = Job.metadata.tables[Job.__tablename__]
_DELIVERIES = Delivery.metadata.tables[Delivery.__tablename__]
_EVENTS = JobEvent.metadata.tables[JobEvent.__tablename__]

_TERMINAL_DELIVERY_STATES = (DeliveryState.DONE, DeliveryState.FAILED)
_FINISHED_JOB_STATES = (JobState.DONE, JobState.SKIPPED, JobState.FAILED)

_ViewT = TypeVar("_ViewT")


class QueueError(RuntimeError):
    """Base class of the errors the job queue raises."""


class StaleTransition(QueueError):
    """A guarded update matched no row: the job or delivery is not where the caller thinks.

    Typical causes: the claim expired and another worker took the work over, an operator
    retried it, or the caller's own bookkeeping is wrong. The caller must stop working on it.
    """


class JobNotFound(QueueError, LookupError):
    """No job has the given id."""


class NotRetryable(QueueError):
    """An operator retry was asked for a job that has nothing to retry."""


@dataclass(frozen=True)
class NewJob:
    """A received instance to put in the queue.

    Parameters
    ----------
    sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid:
        DICOM UIDs of the instance: digits and dots, at most 64 characters.
    calling_aet:
        The sender's AE title (1 to 16 characters, no backslash or control characters).
    peer_host:
        The sender's address, or None when unknown.
    spool_path:
        Where the instance lies, relative to the data directory; None only for an instance
        skipped at intake (nothing was kept).
    skip_reason:
        When given, the job is recorded directly as ``skipped`` with this reason.
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    calling_aet: str
    peer_host: str | None
    spool_path: str | None
    skip_reason: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "sop_instance_uid",
            "sop_class_uid",
            "study_instance_uid",
            "series_instance_uid",
        ):
            _check_uid(f"NewJob.{name}", getattr(self, name), self.sop_instance_uid)
        _check_ae_title("NewJob.calling_aet", self.calling_aet, self.sop_instance_uid)
        if self.peer_host is not None:
            _check_text("NewJob.peer_host", self.peer_host, HOST_LENGTH, self.sop_instance_uid)
        if self.spool_path is not None:
            _check_relative_path("NewJob.spool_path", self.spool_path, self.sop_instance_uid)
        if self.skip_reason is not None and not self.skip_reason.strip():
            raise ValueError(
                f"NewJob.skip_reason must not be blank when given "
                f"(SOP Instance UID {self.sop_instance_uid})"
            )
        if self.spool_path is None and self.skip_reason is None:
            raise ValueError(
                "NewJob.spool_path may be None only for a job skipped at intake "
                f"(skip_reason given); SOP Instance UID {self.sop_instance_uid}"
            )


@dataclass(frozen=True)
class EnqueueResult:
    """What :meth:`JobRepository.enqueue` did.

    Attributes
    ----------
    job_id:
        The instance's job.
    created:
        True when the job was created now.
    reopened:
        True when an existing ``skipped`` or ``failed`` job was taken up again by this resend.
    unused_spool_path:
        A spool file (relative to the data directory) that no job refers to after this call:
        the new copy of a duplicate, or the old copy a reopened job replaced. The caller
        deletes it.
    """

    job_id: int
    created: bool
    reopened: bool = False
    unused_spool_path: str | None = None


@dataclass(frozen=True)
class ResultUIDs:
    """The UIDs of a job's result objects, fixed the first time they are made."""

    seg_series_uid: str
    seg_sop_uid: str
    sc_series_uid: str
    sc_sop_uid: str
    sr_series_uid: str
    sr_sop_uid: str

    def __post_init__(self) -> None:
        values = [getattr(self, f.name) for f in fields(self)]
        for f, value in zip(fields(self), values, strict=True):
            _check_uid(f"ResultUIDs.{f.name}", value, None)
        if len(set(values)) != len(values):
            raise ValueError(f"ResultUIDs must be six distinct UIDs, got {values}")


@dataclass(frozen=True)
class DeliveryTarget:
    """A destination's address as configured when the job's results were made."""

    destination: str
    ae_title: str
    host: str
    port: int
    kinds: tuple[ResultKind, ...] = LEGACY_KINDS

    def __post_init__(self) -> None:
        if not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(
                f"DeliveryTarget.kinds must name distinct result kinds, got {self.kinds!r}"
            )
        _check_text("DeliveryTarget.destination", self.destination, DESTINATION_LENGTH, None)
        _check_ae_title("DeliveryTarget.ae_title", self.ae_title, None)
        _check_text("DeliveryTarget.host", self.host, HOST_LENGTH, None)
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise TypeError(f"DeliveryTarget.port must be an int, got {self.port!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"DeliveryTarget.port must lie in 1..65535, got {self.port}")


@dataclass(frozen=True)
class FindingRecord:
    """What processing found and where it wrote the outputs (paths relative to the data dir)."""

    present: bool
    score: float
    area_mm2: float | None
    model_uid: str
    seg_path: str | None
    sc_path: str | None
    sr_path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.present, bool):
            raise TypeError(f"FindingRecord.present must be a bool, got {self.present!r}")
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"FindingRecord.score must lie in [0, 1], got {self.score!r}")
        if self.area_mm2 is not None and not self.area_mm2 >= 0.0:
            raise ValueError(f"FindingRecord.area_mm2 must be >= 0, got {self.area_mm2!r}")
        _check_uid("FindingRecord.model_uid", self.model_uid, None)
        paths = {"seg_path": self.seg_path, "sc_path": self.sc_path, "sr_path": self.sr_path}
        for name, path in paths.items():
            if path is not None:
                _check_relative_path(f"FindingRecord.{name}", path, None)


@dataclass(frozen=True)
class JobView:
    """A snapshot of one job row."""

    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    calling_aet: str
    peer_host: str | None
    spool_path: str | None
    state: JobState
    skip_reason: str | None
    last_error: str | None
    attempts: int
    next_attempt_at: datetime
    claimed_by: str | None
    heartbeat_at: datetime | None
    received_at: datetime
    updated_at: datetime
    seg_series_uid: str | None
    seg_sop_uid: str | None
    sc_series_uid: str | None
    sc_sop_uid: str | None
    finding_present: bool | None
    finding_score: float | None
    finding_area_mm2: float | None
    model_uid: str | None
    seg_path: str | None
    sc_path: str | None
    sr_series_uid: str | None
    sr_sop_uid: str | None
    sr_path: str | None

    @property
    def result_uids(self) -> ResultUIDs | None:
        """The reserved result UIDs, or None before they are (all) reserved."""
        if (
            self.seg_series_uid is None
            or self.seg_sop_uid is None
            or self.sc_series_uid is None
            or self.sc_sop_uid is None
            or self.sr_series_uid is None
            or self.sr_sop_uid is None
        ):
            return None
        return ResultUIDs(
            seg_series_uid=self.seg_series_uid,
            seg_sop_uid=self.seg_sop_uid,
            sc_series_uid=self.sc_series_uid,
            sc_sop_uid=self.sc_sop_uid,
            sr_series_uid=self.sr_series_uid,
            sr_sop_uid=self.sr_sop_uid,
        )

    def result_path(self, kind: ResultKind) -> str | None:
        """Where this job's result of ``kind`` lies (relative to the data folder), if made."""
        return {ResultKind.SEG: self.seg_path, ResultKind.SC: self.sc_path,
                ResultKind.SR: self.sr_path}[kind]


@dataclass(frozen=True)
class DeliveryView:
    """A snapshot of one delivery row."""

    id: int
    job_id: int
    destination: str
    ae_title: str
    host: str
    port: int
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    claimed_by: str | None
    heartbeat_at: datetime | None
    created_at: datetime
    updated_at: datetime
    objects: str | None

    @property
    def kinds(self) -> tuple[ResultKind, ...]:
        """The result kinds this destination gets."""
        return decode_kinds(self.objects)


@dataclass(frozen=True)
class EventView:
    """One row of a job's event log; ``destination`` is set for delivery transitions."""

    id: int
    job_id: int
    at: datetime
    from_state: str | None
    to_state: str
    actor: str
    detail: str
    destination: str | None


class JobRepository:
    """The only code that changes job and delivery rows.

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

    @property
    def engine(self) -> Engine:
        """The engine this repository writes through."""
        return self._engine

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
        at = _utc(now)
        _check_text("actor", actor, WORKER_ID_LENGTH, new.sop_instance_uid)
        existing = self._find_job_id(new.sop_instance_uid)
        if existing is not None:
            return self._received_again(existing, new, at, actor)
        state = JobState.RECEIVED if new.skip_reason is None else JobState.SKIPPED
        try:
            with write_transaction(self._engine) as conn:
                job_id = conn.execute(
                    insert(_JOBS)
                    .values(
                        sop_instance_uid=new.sop_instance_uid,
                        sop_class_uid=new.sop_class_uid,
                        study_instance_uid=new.study_instance_uid,
                        series_instance_uid=new.series_instance_uid,
                        calling_aet=new.calling_aet,
                        peer_host=new.peer_host,
                        spool_path=new.spool_path,
                        state=state,
                        skip_reason=new.skip_reason,
                        attempts=0,
                        next_attempt_at=at,
                        received_at=at,
                        updated_at=at,
                    )
                    .returning(_JOBS.c.id)
                ).scalar_one()
                detail = f"received from {new.calling_aet}"
                if new.skip_reason is not None:
                    detail += f"; skipped: {new.skip_reason}"
                self._event(conn, job_id, at, None, state, actor, detail)
        except IntegrityError:
            existing = self._find_job_id(new.sop_instance_uid)
            if existing is None:
                raise
            return self._received_again(existing, new, at, actor)
        logger.info("job %d: %s, SOP Instance UID %s", job_id, state, new.sop_instance_uid)
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
        at = _utc(now)
        _check_worker(worker_id)
        _check_limit(limit)
        with write_transaction(self._engine) as conn:
            ids = list(
                conn.execute(
                    select(_JOBS.c.id)
                    .where(_JOBS.c.state == JobState.RECEIVED, _JOBS.c.next_attempt_at <= at)
                    .order_by(_JOBS.c.id)
                    .limit(limit)
                    .with_for_update(skip_locked=True, key_share=True)
                ).scalars()
            )
            if not ids:
                return []
            result = conn.execute(
                update(_JOBS)
                .where(_JOBS.c.id.in_(ids), _JOBS.c.state == JobState.RECEIVED)
                .values(
                    state=JobState.PROCESSING,
                    attempts=_JOBS.c.attempts + 1,
                    claimed_by=worker_id,
                    heartbeat_at=at,
                    updated_at=at,
                )
            )
            if result.rowcount != len(ids):
                raise StaleTransition(
                    f"jobs {ids}: claim expected state 'received' on {len(ids)} rows, "
                    f"updated {result.rowcount}"
                )
            claimed = self._job_views(conn, _JOBS.c.id.in_(ids), order=_JOBS.c.id)
            for job in claimed:
                self._event(
                    conn,
                    job.id,
                    at,
                    JobState.RECEIVED,
                    JobState.PROCESSING,
                    worker_id,
                    f"claimed, attempt {job.attempts}",
                )
        for job in claimed:
            logger.info("job %d: claimed by %s, attempt %d", job.id, worker_id, job.attempts)
        return claimed

    def heartbeat_job(self, job_id: int, worker_id: str, now: datetime | None = None) -> None:
        """Tell the queue a worker is still processing its job.

        Raises
        ------
        StaleTransition
            When the job is no longer ``processing`` under this worker's claim.
        """
        at = _utc(now)
        with write_transaction(self._engine) as conn:
            self._update_job(
                conn,
                job_id,
                expected=JobState.PROCESSING,
                worker_id=worker_id,
                transition="heartbeat",
                values={"heartbeat_at": at},
            )

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
        at = _utc(now)
        _check_text("actor", actor, WORKER_ID_LENGTH, None)
        with write_transaction(self._engine) as conn:
            result = conn.execute(
                update(_JOBS)
                .where(
                    _JOBS.c.id == job_id,
                    _JOBS.c.seg_series_uid.is_(None),
                    _JOBS.c.seg_sop_uid.is_(None),
                    _JOBS.c.sc_series_uid.is_(None),
                    _JOBS.c.sc_sop_uid.is_(None),
                )
                .values(
                    seg_series_uid=proposed.seg_series_uid,
                    seg_sop_uid=proposed.seg_sop_uid,
                    sc_series_uid=proposed.sc_series_uid,
                    sc_sop_uid=proposed.sc_sop_uid,
                    updated_at=at,
                )
            )
            # the SR came later: a job whose SEG and SC UIDs were fixed before gets SR UIDs now
            conn.execute(
                update(_JOBS)
                .where(
                    _JOBS.c.id == job_id,
                    _JOBS.c.sr_series_uid.is_(None),
                    _JOBS.c.sr_sop_uid.is_(None),
                )
                .values(
                    sr_series_uid=proposed.sr_series_uid,
                    sr_sop_uid=proposed.sr_sop_uid,
                    updated_at=at,
                )
            )
            job = self._job_view_or_raise(conn, job_id)
            stored = job.result_uids
            if stored is None:
                raise QueueError(
                    f"job {job_id}: result UIDs are partly set; refusing to mix them "
                    f"(SOP Instance UID {job.sop_instance_uid})"
                )
            if result.rowcount == 1:
                self._event(
                    conn,
                    job_id,
                    at,
                    job.state,
                    job.state,
                    actor,
                    f"result UIDs fixed: SEG {stored.seg_sop_uid}, SC {stored.sc_sop_uid}, "
                    f"SR {stored.sr_sop_uid}",
                )
        return stored

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
        StaleTransition
            When the job is not ``processing`` under this worker's claim.
        QueueError
            When the job's result UIDs were never reserved.
        ValueError
            When two targets share a destination name.
        """
        at = _utc(now)
        names = [target.destination for target in targets]
        if len(set(names)) != len(names):
            raise ValueError(f"finish_processing: destination names must be unique, got {names}")
        to = JobState.DELIVERING if targets else JobState.DONE
        with write_transaction(self._engine) as conn:
            job = self._update_job(
                conn,
                job_id,
                expected=JobState.PROCESSING,
                worker_id=worker_id,
                transition=f"finish processing ({to})",
                values={
                    "state": to,
                    "claimed_by": None,
                    "heartbeat_at": None,
                    "finding_present": finding.present,
                    "finding_score": finding.score,
                    "finding_area_mm2": finding.area_mm2,
                    "model_uid": finding.model_uid,
                    "seg_path": finding.seg_path,
                    "sc_path": finding.sc_path,
                    "sr_path": finding.sr_path,
                    "updated_at": at,
                },
            )
            if job.result_uids is None:
                raise QueueError(
                    f"job {job_id}: cannot finish processing: result UIDs were never reserved "
                    f"(SOP Instance UID {job.sop_instance_uid})"
                )
            outcome = "pneumothorax found" if finding.present else "no pneumothorax found"
            outcome += f" (score {finding.score:.3f})"
            if targets:
                detail = f"{outcome}; delivering to {', '.join(names)}"
            else:
                detail = f"{outcome}; no destinations take it, nothing to deliver"
            self._event(conn, job_id, at, JobState.PROCESSING, to, worker_id, detail)
            for target in targets:
                conn.execute(
                    insert(_DELIVERIES).values(
                        job_id=job_id,
                        destination=target.destination,
                        ae_title=target.ae_title,
                        host=target.host,
                        port=target.port,
                        objects=encode_kinds(target.kinds),
                        state=DeliveryState.PENDING,
                        attempts=0,
                        next_attempt_at=at,
                        created_at=at,
                        updated_at=at,
                    )
                )
                self._event(
                    conn,
                    job_id,
                    at,
                    None,
                    DeliveryState.PENDING,
                    worker_id,
                    f"{encode_kinds(target.kinds).upper()} to "
                    f"{target.ae_title}@{target.host}:{target.port}",
                    destination=target.destination,
                )
        logger.info("job %d: %s (SOP Instance UID %s)", job_id, to, job.sop_instance_uid)

    def skip_job(
        self, job_id: int, worker_id: str, reason: str, now: datetime | None = None
    ) -> None:
        """End a job ``skipped`` with the reason (not a chest radiograph, for example).

        Raises
        ------
        StaleTransition
            When the job is not ``processing`` under this worker's claim.
        """
        at = _utc(now)
        if not reason.strip():
            raise ValueError(f"skip_job: reason must not be blank (job {job_id})")
        with write_transaction(self._engine) as conn:
            self._update_job(
                conn,
                job_id,
                expected=JobState.PROCESSING,
                worker_id=worker_id,
                transition="skip",
                values={
                    "state": JobState.SKIPPED,
                    "skip_reason": reason,
                    "claimed_by": None,
                    "heartbeat_at": None,
                    "updated_at": at,
                },
            )
            self._event(conn, job_id, at, JobState.PROCESSING, JobState.SKIPPED, worker_id, reason)
        logger.info("job %d: skipped", job_id)

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

        Raises
        ------
        StaleTransition
            When the job is not ``processing`` under this worker's claim.
        """
        at = _utc(now)
        message = _clip_error(error)
        with write_transaction(self._engine) as conn:
            found = self._job_views(conn, _JOBS.c.id == job_id, lock=True)
            if not found:
                raise StaleTransition(f"job {job_id}: cannot fail: no such job")
            current = found[0]
            due = next_attempt(policy, max(current.attempts, 1), at)
            values: dict[str, Any] = {
                "last_error": message,
                "claimed_by": None,
                "heartbeat_at": None,
                "updated_at": at,
            }
            if due is None:
                to = JobState.FAILED
                detail = f"gave up after {current.attempts} attempts: {message}"
            else:
                to = JobState.RECEIVED
                values["next_attempt_at"] = due
                detail = f"attempt {current.attempts} failed, retry at {due.isoformat()}: {message}"
            values["state"] = to
            self._update_job(
                conn,
                job_id,
                expected=JobState.PROCESSING,
                worker_id=worker_id,
                transition=f"fail ({to})",
                values=values,
            )
            self._event(conn, job_id, at, JobState.PROCESSING, to, worker_id, detail)
            job = self._job_view_or_raise(conn, job_id)
        logger.warning("job %d: attempt %d failed, now %s", job_id, current.attempts, to)
        return job

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
        at = _utc(now)
        _check_worker(worker_id)
        _check_limit(limit)
        with write_transaction(self._engine) as conn:
            ids = list(
                conn.execute(
                    select(_DELIVERIES.c.id)
                    .where(
                        _DELIVERIES.c.state == DeliveryState.PENDING,
                        _DELIVERIES.c.next_attempt_at <= at,
                        ~_blocked_by_earlier_delivery(),
                    )
                    .order_by(_DELIVERIES.c.job_id, _DELIVERIES.c.id)
                    .limit(limit)
                    .with_for_update(skip_locked=True, key_share=True, of=_DELIVERIES)
                ).scalars()
            )
            if not ids:
                return []
            result = conn.execute(
                update(_DELIVERIES)
                .where(
                    _DELIVERIES.c.id.in_(ids),
                    _DELIVERIES.c.state == DeliveryState.PENDING,
                )
                .values(
                    state=DeliveryState.SENDING,
                    attempts=_DELIVERIES.c.attempts + 1,
                    claimed_by=worker_id,
                    heartbeat_at=at,
                    updated_at=at,
                )
            )
            if result.rowcount != len(ids):
                raise StaleTransition(
                    f"deliveries {ids}: claim expected state 'pending' on {len(ids)} rows, "
                    f"updated {result.rowcount}"
                )
            claimed = self._delivery_views(conn, _DELIVERIES.c.id.in_(ids))
            for delivery in claimed:
                self._event(
                    conn,
                    delivery.job_id,
                    at,
                    DeliveryState.PENDING,
                    DeliveryState.SENDING,
                    worker_id,
                    f"claimed, attempt {delivery.attempts}",
                    destination=delivery.destination,
                )
        for delivery in claimed:
            logger.info(
                "job %d: delivery %d to %s claimed by %s, attempt %d",
                delivery.job_id,
                delivery.id,
                delivery.destination,
                worker_id,
                delivery.attempts,
            )
        return claimed

    def heartbeat_delivery(
        self, delivery_id: int, worker_id: str, now: datetime | None = None
    ) -> None:
        """Tell the queue a worker is still sending its delivery.

        Raises
        ------
        StaleTransition
            When the delivery is no longer ``sending`` under this worker's claim.
        """
        at = _utc(now)
        with write_transaction(self._engine) as conn:
            self._update_delivery(
                conn,
                delivery_id,
                expected=DeliveryState.SENDING,
                worker_id=worker_id,
                transition="heartbeat",
                values={"heartbeat_at": at},
            )

    def delivery_succeeded(
        self, delivery_id: int, worker_id: str, now: datetime | None = None
    ) -> None:
        """Record a delivery as sent; the job is ``done`` once all its deliveries are.

        Raises
        ------
        StaleTransition
            When the delivery is not ``sending`` under this worker's claim.
        """
        at = _utc(now)
        with write_transaction(self._engine) as conn:
            delivery = self._lock_delivery_job(conn, delivery_id, "succeed")
            self._update_delivery(
                conn,
                delivery_id,
                expected=DeliveryState.SENDING,
                worker_id=worker_id,
                transition="succeed",
                values={
                    "state": DeliveryState.DONE,
                    "last_error": None,
                    "claimed_by": None,
                    "heartbeat_at": None,
                    "updated_at": at,
                },
            )
            self._event(
                conn,
                delivery.job_id,
                at,
                DeliveryState.SENDING,
                DeliveryState.DONE,
                worker_id,
                f"sent, attempt {delivery.attempts}",
                destination=delivery.destination,
            )
            self._settle_job(conn, delivery.job_id, at, worker_id)
        logger.info(
            "job %d: delivery %d to %s done", delivery.job_id, delivery_id, delivery.destination
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

        Raises
        ------
        StaleTransition
            When the delivery is not ``sending`` under this worker's claim.
        """
        at = _utc(now)
        message = _clip_error(error)
        with write_transaction(self._engine) as conn:
            delivery = self._lock_delivery_job(conn, delivery_id, "fail")
            due = next_attempt(policy, max(delivery.attempts, 1), at)
            values: dict[str, Any] = {
                "last_error": message,
                "claimed_by": None,
                "heartbeat_at": None,
                "updated_at": at,
            }
            if due is None:
                to = DeliveryState.FAILED
                detail = f"gave up after {delivery.attempts} attempts: {message}"
            else:
                to = DeliveryState.PENDING
                values["next_attempt_at"] = due
                detail = (
                    f"attempt {delivery.attempts} failed, retry at {due.isoformat()}: {message}"
                )
            values["state"] = to
            self._update_delivery(
                conn,
                delivery_id,
                expected=DeliveryState.SENDING,
                worker_id=worker_id,
                transition=f"fail ({to})",
                values=values,
            )
            self._event(
                conn,
                delivery.job_id,
                at,
                DeliveryState.SENDING,
                to,
                worker_id,
                detail,
                destination=delivery.destination,
            )
            if to is DeliveryState.FAILED:
                self._settle_job(conn, delivery.job_id, at, worker_id)
            updated = self._delivery_views(conn, _DELIVERIES.c.id == delivery_id)[0]
        logger.warning(
            "job %d: delivery %d to %s attempt %d failed, now %s",
            delivery.job_id,
            delivery_id,
            delivery.destination,
            delivery.attempts,
            to,
        )
        return updated

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
        at = _utc(now)
        cutoff = _utc(stale_before)
        _check_text("actor", actor, WORKER_ID_LENGTH, None)
        count = 0
        delivery_budget = delivery_policy if delivery_policy is not None else policy
        with write_transaction(self._engine) as conn:
            stale_jobs = self._job_views(
                conn,
                and_(_JOBS.c.state == JobState.PROCESSING, _JOBS.c.heartbeat_at < cutoff),
                order=_JOBS.c.id,
                skip_locked=True,
            )
            for job in stale_jobs:
                give_up = policy is not None and job.attempts >= policy.max_attempts
                to = JobState.FAILED if give_up else JobState.RECEIVED
                detail = f"claim expired (claimed by {job.claimed_by}, attempt {job.attempts})"
                values: dict[str, Any] = {
                    "state": to,
                    "claimed_by": None,
                    "heartbeat_at": None,
                    "next_attempt_at": at,
                    "updated_at": at,
                }
                if give_up:
                    values["last_error"] = f"{detail}; attempt budget spent"
                    detail = values["last_error"]
                result = conn.execute(
                    update(_JOBS)
                    .where(
                        _JOBS.c.id == job.id,
                        _JOBS.c.state == JobState.PROCESSING,
                        _JOBS.c.heartbeat_at < cutoff,
                    )
                    .values(**values)
                )
                if result.rowcount == 1:
                    self._event(conn, job.id, at, JobState.PROCESSING, to, actor, detail)
                    logger.warning("job %d: %s, now %s", job.id, detail, to)
                    count += 1
        with write_transaction(self._engine) as conn:
            stale_deliveries = self._delivery_views(
                conn,
                and_(
                    _DELIVERIES.c.state == DeliveryState.SENDING,
                    _DELIVERIES.c.heartbeat_at < cutoff,
                ),
            )
            for delivery in stale_deliveries:
                self._lock_job(conn, delivery.job_id)
                budget = delivery_budget.max_attempts if delivery_budget is not None else None
                give_up = budget is not None and delivery.attempts >= budget
                to_delivery = DeliveryState.FAILED if give_up else DeliveryState.PENDING
                detail = (
                    f"claim expired (claimed by {delivery.claimed_by}, attempt {delivery.attempts})"
                )
                values = {
                    "state": to_delivery,
                    "claimed_by": None,
                    "heartbeat_at": None,
                    "next_attempt_at": at,
                    "updated_at": at,
                }
                if give_up:
                    values["last_error"] = f"{detail}; attempt budget spent"
                    detail = values["last_error"]
                result = conn.execute(
                    update(_DELIVERIES)
                    .where(
                        _DELIVERIES.c.id == delivery.id,
                        _DELIVERIES.c.state == DeliveryState.SENDING,
                        _DELIVERIES.c.heartbeat_at < cutoff,
                    )
                    .values(**values)
                )
                if result.rowcount != 1:
                    continue
                self._event(
                    conn,
                    delivery.job_id,
                    at,
                    DeliveryState.SENDING,
                    to_delivery,
                    actor,
                    detail,
                    destination=delivery.destination,
                )
                if give_up:
                    self._settle_job(conn, delivery.job_id, at, actor)
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
        at = _utc(now)
        _check_text("actor", actor, WORKER_ID_LENGTH, None)
        with write_transaction(self._engine) as conn:
            job = self._job_view_or_raise(conn, job_id, lock=True)
            deliveries = self._delivery_views(conn, _DELIVERIES.c.job_id == job_id)
            failed = [d for d in deliveries if d.state is DeliveryState.FAILED]
            if deliveries and job.state in (JobState.FAILED, JobState.DELIVERING):
                if not failed:
                    raise NotRetryable(
                        f"job {job_id}: retry needs a failed delivery, none of "
                        f"{len(deliveries)} failed (state {job.state}, "
                        f"SOP Instance UID {job.sop_instance_uid})"
                    )
                self._retry_deliveries(conn, job, failed, at, actor)
            elif job.state is JobState.FAILED or (
                job.state is JobState.SKIPPED and job.spool_path is not None
            ):
                self._update_job(
                    conn,
                    job_id,
                    expected=job.state,
                    worker_id=None,
                    transition="operator retry",
                    values={
                        "state": JobState.RECEIVED,
                        "attempts": 0,
                        "next_attempt_at": at,
                        "skip_reason": None,
                        "claimed_by": None,
                        "heartbeat_at": None,
                        "updated_at": at,
                    },
                )
                self._event(conn, job_id, at, job.state, JobState.RECEIVED, actor, "operator retry")
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
            updated = self._job_view_or_raise(conn, job_id)
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
        at = _utc(now)
        _check_text("actor", actor, WORKER_ID_LENGTH, None)
        names = [t.destination for t in targets]
        if not targets or len(set(names)) != len(names):
            raise NotRetryable(f"job {job_id}: resend needs distinct destinations, got {names}")
        with write_transaction(self._engine) as conn:
            job = self._job_view_or_raise(conn, job_id, lock=True)
            if job.state not in (JobState.DONE, JobState.FAILED, JobState.DELIVERING) or (
                job.seg_path is None and job.sc_path is None and job.sr_path is None
            ):
                raise NotRetryable(
                    f"job {job_id}: resend needs results; the job is {job.state} without them "
                    f"(SOP Instance UID {job.sop_instance_uid}); use jobs retry to process it"
                )
            existing = {
                d.destination: d
                for d in self._delivery_views(conn, _DELIVERIES.c.job_id == job_id)
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
                values: dict[str, Any] = {
                    "ae_title": target.ae_title,
                    "host": target.host,
                    "port": target.port,
                    "objects": encode_kinds(target.kinds),
                    "state": DeliveryState.PENDING,
                    "attempts": 0,
                    "next_attempt_at": at,
                    "last_error": None,
                    "claimed_by": None,
                    "heartbeat_at": None,
                    "updated_at": at,
                }
                before = existing.get(target.destination)
                if before is None:
                    conn.execute(
                        insert(_DELIVERIES).values(job_id=job_id, destination=target.destination,
                                                   created_at=at, **values)
                    )
                else:
                    conn.execute(
                        update(_DELIVERIES).where(_DELIVERIES.c.id == before.id).values(**values)
                    )
                self._event(
                    conn,
                    job_id,
                    at,
                    None if before is None else before.state,
                    DeliveryState.PENDING,
                    actor,
                    f"resend {encode_kinds(target.kinds).upper()} to "
                    f"{target.ae_title}@{target.host}:{target.port}",
                    destination=target.destination,
                )
            if job.state is not JobState.DELIVERING:
                self._update_job(
                    conn,
                    job_id,
                    expected=job.state,
                    worker_id=None,
                    transition="resend",
                    values={"state": JobState.DELIVERING, "updated_at": at},
                )
                self._event(
                    conn, job_id, at, job.state, JobState.DELIVERING, actor,
                    f"resend to {', '.join(names)}",
                )
            updated = self._job_view_or_raise(conn, job_id)
        logger.info("job %d: resend to %s", job_id, ", ".join(names))
        return updated

    def get_job(self, job_id: int) -> JobView | None:
        """The job with this id, or None."""
        with read_transaction(self._engine) as conn:
            views = self._job_views(conn, _JOBS.c.id == job_id)
        return views[0] if views else None

    def find_job(self, sop_instance_uid: str) -> JobView | None:
        """The job of this SOP Instance UID, or None."""
        with read_transaction(self._engine) as conn:
            views = self._job_views(conn, _JOBS.c.sop_instance_uid == sop_instance_uid)
        return views[0] if views else None

    def get_delivery(self, delivery_id: int) -> DeliveryView | None:
        """The delivery with this id, or None."""
        with read_transaction(self._engine) as conn:
            views = self._delivery_views(conn, _DELIVERIES.c.id == delivery_id)
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
        _check_limit(limit)
        conditions: list[ColumnElement[bool]] = []
        if state is not None:
            conditions.append(_JOBS.c.state == _job_state(state))
        if since is not None:
            conditions.append(_JOBS.c.received_at >= _utc(since))
        condition = and_(*conditions) if conditions else None
        with read_transaction(self._engine) as conn:
            return self._job_views(conn, condition, order=_JOBS.c.id.desc(), limit=limit)

    def events(self, job_id: int) -> list[EventView]:
        """A job's event log, oldest first."""
        with read_transaction(self._engine) as conn:
            rows = conn.execute(
                select(_EVENTS).where(_EVENTS.c.job_id == job_id).order_by(_EVENTS.c.id)
            ).mappings()
            return [_view(EventView, row) for row in rows]

    def deliveries(self, job_id: int) -> list[DeliveryView]:
        """A job's deliveries, in the order they were created."""
        with read_transaction(self._engine) as conn:
            return self._delivery_views(conn, _DELIVERIES.c.job_id == job_id)

    def counts_by_state(self) -> dict[str, int]:
        """How many jobs are in each state; every state is present, zero included."""
        counts = {state.value: 0 for state in JobState}
        with read_transaction(self._engine) as conn:
            for state, count in conn.execute(
                select(_JOBS.c.state, func.count()).group_by(_JOBS.c.state)
            ):
                counts[str(state)] = int(count)
        return counts

    def delivery_counts_by_state(self) -> dict[str, int]:
        """How many deliveries are in each state; every state is present, zero included."""
        counts = {state.value: 0 for state in DeliveryState}
        with read_transaction(self._engine) as conn:
            for state, count in conn.execute(
                select(_DELIVERIES.c.state, func.count()).group_by(_DELIVERIES.c.state)
            ):
                counts[str(state)] = int(count)
        return counts

    def next_due(
        self, now: datetime | None = None, *, jobs: bool = True, deliveries: bool = True
    ) -> datetime | None:
        """The earliest time at which pending work becomes claimable.

        Considers ``received`` jobs and those ``pending`` deliveries that the destination
        order lets through (:meth:`claim_deliveries`), so a worker can sleep until then.

        Returns
        -------
        datetime or None
            The earliest ``next_attempt_at``, but never earlier than ``now`` (``now`` itself
            means work is claimable already), or None when nothing is waiting.
        """
        at = _utc(now)
        candidates: list[datetime] = []
        with read_transaction(self._engine) as conn:
            if jobs:
                job_due = conn.execute(
                    select(func.min(_JOBS.c.next_attempt_at)).where(
                        _JOBS.c.state == JobState.RECEIVED
                    )
                ).scalar_one_or_none()
                if job_due is not None:
                    candidates.append(job_due)
            if deliveries:
                delivery_due = conn.execute(
                    select(func.min(_DELIVERIES.c.next_attempt_at)).where(
                        _DELIVERIES.c.state == DeliveryState.PENDING,
                        ~_blocked_by_earlier_delivery(),
                    )
                ).scalar_one_or_none()
                if delivery_due is not None:
                    candidates.append(delivery_due)
        return max(min(candidates), at) if candidates else None

    def oldest_unfinished_received_at(self) -> datetime | None:
        """When the oldest job that is not yet done, skipped or failed was received, or None."""
        with read_transaction(self._engine) as conn:
            oldest: datetime | None = conn.execute(
                select(func.min(_JOBS.c.received_at)).where(
                    _JOBS.c.state.not_in(_FINISHED_JOB_STATES)
                )
            ).scalar_one_or_none()
        return oldest

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
        cutoff = _utc(finished_before)
        _check_limit(limit)
        unfinished_delivery = exists(
            select(_DELIVERIES.c.id).where(
                _DELIVERIES.c.job_id == _JOBS.c.id,
                _DELIVERIES.c.state.not_in(_TERMINAL_DELIVERY_STATES),
            )
        )
        with write_transaction(self._engine) as conn:
            jobs = self._job_views(
                conn,
                and_(
                    _JOBS.c.state.in_(_FINISHED_JOB_STATES),
                    _JOBS.c.updated_at < cutoff,
                    ~unfinished_delivery,
                ),
                order=_JOBS.c.id,
                limit=limit,
                skip_locked=True,
            )
            if not jobs:
                return []
            if before_delete is not None:
                before_delete(jobs)
            ids = [job.id for job in jobs]
            conn.execute(delete(_EVENTS).where(_EVENTS.c.job_id.in_(ids)))
            conn.execute(delete(_DELIVERIES).where(_DELIVERIES.c.job_id.in_(ids)))
            result = conn.execute(
                delete(_JOBS).where(
                    _JOBS.c.id.in_(ids),
                    _JOBS.c.state.in_(_FINISHED_JOB_STATES),
                    _JOBS.c.updated_at < cutoff,
                )
            )
            if result.rowcount != len(ids):
                raise StaleTransition(
                    f"jobs {ids}: purge expected {len(ids)} finished rows, deleted "
                    f"{result.rowcount}"
                )
        logger.info("purged %d finished jobs (ended before %s)", len(jobs), cutoff.isoformat())
        return jobs

    def referenced_paths(self, paths: Sequence[str]) -> set[str]:
        """Which of these data-folder paths a job still refers to (spool, SEG or overlay)."""
        found: set[str] = set()
        wanted = list(dict.fromkeys(paths))
        with read_transaction(self._engine) as conn:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                for column in (
                    _JOBS.c.spool_path,
                    _JOBS.c.seg_path,
                    _JOBS.c.sc_path,
                    _JOBS.c.sr_path,
                ):
                    found.update(
                        str(value)
                        for value in conn.execute(select(column).where(column.in_(chunk))).scalars()
                    )
        return found

    def _find_job_id(self, sop_instance_uid: str) -> int | None:
        with read_transaction(self._engine) as conn:
            found: int | None = conn.execute(
                select(_JOBS.c.id).where(_JOBS.c.sop_instance_uid == sop_instance_uid)
            ).scalar_one_or_none()
        return found

    def _received_again(
        self, job_id: int, new: NewJob, at: datetime, actor: str
    ) -> EnqueueResult:
        """Apply the resend policy to an instance that already has job ``job_id``."""
        duplicate = EnqueueResult(job_id, created=False, unused_spool_path=new.spool_path)
        with write_transaction(self._engine) as conn:
            job = self._job_view_or_raise(conn, job_id, lock=True)
            if job.state not in (JobState.SKIPPED, JobState.FAILED):
                return duplicate
            deliveries = self._delivery_views(conn, _DELIVERIES.c.job_id == job_id)
            if deliveries:
                failed = [d for d in deliveries if d.state is DeliveryState.FAILED]
                if not failed:
                    return duplicate
                detail = f"received again from {new.calling_aet}: re-sending its results"
                self._retry_deliveries(conn, job, failed, at, actor, detail)
                return EnqueueResult(
                    job_id, created=False, reopened=True, unused_spool_path=new.spool_path
                )
            if new.skip_reason is not None and job.state is JobState.SKIPPED:
                return duplicate
            to = JobState.RECEIVED if new.skip_reason is None else JobState.SKIPPED
            self._update_job(
                conn,
                job_id,
                expected=job.state,
                worker_id=None,
                transition="received again",
                values={
                    "state": to,
                    "spool_path": new.spool_path,
                    "skip_reason": new.skip_reason,
                    "calling_aet": new.calling_aet,
                    "peer_host": new.peer_host,
                    "attempts": 0,
                    "next_attempt_at": at,
                    "last_error": None,
                    "claimed_by": None,
                    "heartbeat_at": None,
                    "updated_at": at,
                },
            )
            detail = f"received again from {new.calling_aet}: processed again"
            if new.skip_reason is not None:
                detail += f"; skipped: {new.skip_reason}"
            self._event(conn, job_id, at, job.state, to, actor, detail)
        logger.info("job %d: %s, now %s", job_id, detail, to)
        return EnqueueResult(
            job_id,
            created=False,
            reopened=True,
            unused_spool_path=job.spool_path if job.spool_path != new.spool_path else None,
        )

    def _retry_deliveries(
        self,
        conn: Connection,
        job: JobView,
        failed: Sequence[DeliveryView],
        at: datetime,
        actor: str,
        detail: str = "operator retry",
    ) -> None:
        for delivery in failed:
            self._update_delivery(
                conn,
                delivery.id,
                expected=DeliveryState.FAILED,
                worker_id=None,
                transition="operator retry",
                values={
                    "state": DeliveryState.PENDING,
                    "attempts": 0,
                    "next_attempt_at": at,
                    "claimed_by": None,
                    "heartbeat_at": None,
                    "updated_at": at,
                },
            )
            self._event(
                conn,
                job.id,
                at,
                DeliveryState.FAILED,
                DeliveryState.PENDING,
                actor,
                detail,
                destination=delivery.destination,
            )
        if job.state is JobState.FAILED:
            self._update_job(
                conn,
                job.id,
                expected=JobState.FAILED,
                worker_id=None,
                transition=f"{detail} (deliveries)",
                values={"state": JobState.DELIVERING, "updated_at": at},
            )
            destinations = ", ".join(d.destination for d in failed)
            self._event(
                conn,
                job.id,
                at,
                JobState.FAILED,
                JobState.DELIVERING,
                actor,
                f"{detail}: re-sending to {destinations}",
            )

    def _settle_job(self, conn: Connection, job_id: int, at: datetime, actor: str) -> None:
        """Move a delivering job to done or failed once all its deliveries have ended."""
        deliveries = self._delivery_views(conn, _DELIVERIES.c.job_id == job_id)
        if not all(d.state in _TERMINAL_DELIVERY_STATES for d in deliveries):
            return
        failed = [d for d in deliveries if d.state is DeliveryState.FAILED]
        if failed:
            reason = "; ".join(
                f"delivery to {d.destination} failed after {d.attempts} attempts: {d.last_error}"
                for d in failed
            )
            to = JobState.FAILED
            values: dict[str, Any] = {"state": to, "last_error": _clip_error(reason)}
            detail = reason
        else:
            to = JobState.DONE
            values = {"state": to, "last_error": None}  # an earlier failure is history now
            detail = f"all {len(deliveries)} deliveries done"
        values["updated_at"] = at
        job = self._update_job(
            conn,
            job_id,
            expected=JobState.DELIVERING,
            worker_id=None,
            transition=f"settle deliveries ({to})",
            values=values,
        )
        self._event(conn, job_id, at, JobState.DELIVERING, to, actor, _clip_error(detail))
        logger.info("job %d: %s (SOP Instance UID %s)", job_id, to, job.sop_instance_uid)

    def _update_job(
        self,
        conn: Connection,
        job_id: int,
        *,
        expected: JobState,
        worker_id: str | None,
        transition: str,
        values: Mapping[str, Any],
    ) -> JobView:
        """Run one guarded UPDATE of a job; raise StaleTransition when it matches no row."""
        conditions = [_JOBS.c.id == job_id, _JOBS.c.state == expected]
        if worker_id is not None:
            conditions.append(_JOBS.c.claimed_by == worker_id)
        result = conn.execute(update(_JOBS).where(*conditions).values(**values))
        views = self._job_views(conn, _JOBS.c.id == job_id)
        if result.rowcount != 1:
            found = (
                "no such job"
                if not views
                else f"state '{views[0].state.value}' claimed by {views[0].claimed_by!r}"
            )
            claim = f" claimed by {worker_id!r}" if worker_id is not None else ""
            raise StaleTransition(
                f"job {job_id}: cannot {transition}: expected state {expected.value!r}{claim}, "
                f"found {found}"
                + (f" (SOP Instance UID {views[0].sop_instance_uid})" if views else "")
            )
        return views[0]

    def _update_delivery(
        self,
        conn: Connection,
        delivery_id: int,
        *,
        expected: DeliveryState,
        worker_id: str | None,
        transition: str,
        values: Mapping[str, Any],
    ) -> None:
        """Run one guarded UPDATE of a delivery; raise StaleTransition when it matches no row."""
        conditions = [_DELIVERIES.c.id == delivery_id, _DELIVERIES.c.state == expected]
        if worker_id is not None:
            conditions.append(_DELIVERIES.c.claimed_by == worker_id)
        result = conn.execute(update(_DELIVERIES).where(*conditions).values(**values))
        if result.rowcount != 1:
            views = self._delivery_views(conn, _DELIVERIES.c.id == delivery_id)
            found = (
                "no such delivery"
                if not views
                else f"job {views[0].job_id} to {views[0].destination!r} in state "
                f"'{views[0].state.value}' claimed by {views[0].claimed_by!r}"
            )
            claim = f" claimed by {worker_id!r}" if worker_id is not None else ""
            raise StaleTransition(
                f"delivery {delivery_id}: cannot {transition}: expected state "
                f"{expected.value!r}{claim}, found {found}"
            )

    def _lock_delivery_job(
        self, conn: Connection, delivery_id: int, transition: str
    ) -> DeliveryView:
        """Lock the job of a delivery (always job before delivery) and return the delivery."""
        job_id = conn.execute(
            select(_DELIVERIES.c.job_id).where(_DELIVERIES.c.id == delivery_id)
        ).scalar_one_or_none()
        if job_id is None:
            raise StaleTransition(f"delivery {delivery_id}: cannot {transition}: no such delivery")
        self._lock_job(conn, job_id)
        return self._delivery_views(conn, _DELIVERIES.c.id == delivery_id)[0]

    def _lock_job(self, conn: Connection, job_id: int) -> None:
        conn.execute(select(_JOBS.c.id).where(_JOBS.c.id == job_id).with_for_update(key_share=True))

    def _job_view_or_raise(self, conn: Connection, job_id: int, *, lock: bool = False) -> JobView:
        views = self._job_views(conn, _JOBS.c.id == job_id, lock=lock)
        if not views:
            raise JobNotFound(f"job {job_id}: no such job")
        return views[0]

    def _job_views(
        self,
        conn: Connection,
        condition: ColumnElement[bool] | None,
        *,
        order: Any = None,
        limit: int | None = None,
        lock: bool = False,
        skip_locked: bool = False,
    ) -> list[JobView]:
        statement = select(_JOBS)
        if condition is not None:
            statement = statement.where(condition)
        if order is not None:
            statement = statement.order_by(order)
        if limit is not None:
            statement = statement.limit(limit)
        if lock or skip_locked:
            statement = statement.with_for_update(skip_locked=skip_locked, key_share=True)
        return [_view(JobView, row) for row in conn.execute(statement).mappings()]

    def _delivery_views(
        self, conn: Connection, condition: ColumnElement[bool]
    ) -> list[DeliveryView]:
        statement = select(_DELIVERIES).where(condition).order_by(_DELIVERIES.c.id)
        return [_view(DeliveryView, row) for row in conn.execute(statement).mappings()]

    def _event(
        self,
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
        conn.execute(
            insert(_EVENTS).values(
                job_id=job_id,
                at=at,
                from_state=None if from_state is None else str(from_state),
                to_state=str(to_state),
                actor=actor,
                detail=detail,
                destination=destination,
            )
        )


def _blocked_by_earlier_delivery() -> ColumnElement[bool]:
    """True for a delivery that must wait: its destination is busy or owes an older job."""
    earlier = _DELIVERIES.alias("earlier")
    return exists(
        select(earlier.c.id).where(
            earlier.c.destination == _DELIVERIES.c.destination,
            earlier.c.id != _DELIVERIES.c.id,
            or_(
                earlier.c.state == DeliveryState.SENDING,
                and_(
                    earlier.c.state == DeliveryState.PENDING,
                    earlier.c.job_id < _DELIVERIES.c.job_id,
                ),
            ),
        )
    )


def _view(view_class: type[_ViewT], row: RowMapping) -> _ViewT:
    names = [f.name for f in fields(view_class)]  # type: ignore[arg-type]
    return view_class(**{name: row[name] for name in names})


def _utc(value: datetime | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"time must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC)


def _job_state(value: str) -> JobState:
    try:
        return JobState(value)
    except ValueError:
        allowed = ", ".join(state.value for state in JobState)
        raise ValueError(f"job state must be one of {allowed}, got {value!r}") from None


def _clip_error(error: str) -> str:
    text = error.strip() or "unspecified error"
    if len(text) <= MAX_ERROR_LENGTH:
        return text
    half = MAX_ERROR_LENGTH // 2 - 10
    return f"{text[:half]} [...] {text[-half:]}"


def _check_worker(worker_id: str) -> None:
    _check_text("worker_id", worker_id, WORKER_ID_LENGTH, None)


def _check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an int >= 1, got {limit!r}")


def _where(sop_instance_uid: str | None) -> str:
    return "" if sop_instance_uid is None else f" (SOP Instance UID {sop_instance_uid})"


def _check_text(name: str, value: str, max_length: int, sop_instance_uid: str | None) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {value!r}{_where(sop_instance_uid)}")
    if not value.strip() or len(value) > max_length:
        raise ValueError(
            f"{name} must be 1 to {max_length} characters and not blank, got {value!r}"
            f"{_where(sop_instance_uid)}"
        )
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValueError(
            f"{name} must not contain control characters, got {value!r}{_where(sop_instance_uid)}"
        )


def _check_uid(name: str, value: str, sop_instance_uid: str | None) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {value!r}{_where(sop_instance_uid)}")
    if len(value) > UID_LENGTH or _UID_PATTERN.fullmatch(value) is None:
        raise ValueError(
            f"{name} must be a DICOM UID (digits and dots, at most {UID_LENGTH} characters), "
            f"got {value!r}{_where(sop_instance_uid)}"
        )


def _check_ae_title(name: str, value: str, sop_instance_uid: str | None) -> None:
    _check_text(name, value, AE_TITLE_LENGTH, sop_instance_uid)
    if "\\" in value:
        raise ValueError(
            f"{name} must not contain a backslash, got {value!r}{_where(sop_instance_uid)}"
        )


def _check_relative_path(name: str, value: str, sop_instance_uid: str | None) -> None:
    _check_text(name, value, PATH_LENGTH, sop_instance_uid)
    posix = PurePosixPath(value)
    windows = PureWindowsPath(value)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or "\\" in value:
        raise ValueError(
            f"{name} must be a relative POSIX path inside the data directory, got {value!r}"
            f"{_where(sop_instance_uid)}"
        )
    if any(part in ("..", ".") for part in posix.parts) or value != posix.as_posix():
        raise ValueError(
            f"{name} must be a normalised relative path without '.' or '..', got {value!r}"
            f"{_where(sop_instance_uid)}"
        )
