"""What the queue takes and gives: new jobs, results, targets, snapshots, errors, their checks."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import PurePosixPath, PureWindowsPath

from pneumonode.identifiers import ae_title_problem, uid_problem
from pneumonode.queue.models import (
    DESTINATION_LENGTH,
    HOST_LENGTH,
    PATH_LENGTH,
    WORKER_ID_LENGTH,
    DeliveryState,
    JobState,
)
from pneumonode.results import LEGACY_KINDS, ResultKind, decode_kinds

MAX_ERROR_LENGTH = 8000
"""Longest error text stored; longer texts keep their head and tail."""


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
            check_uid(f"NewJob.{name}", getattr(self, name), self.sop_instance_uid)
        check_ae_title("NewJob.calling_aet", self.calling_aet, self.sop_instance_uid)
        if self.peer_host is not None:
            check_text("NewJob.peer_host", self.peer_host, HOST_LENGTH, self.sop_instance_uid)
        if self.spool_path is not None:
            check_relative_path("NewJob.spool_path", self.spool_path, self.sop_instance_uid)
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
    """What :meth:`pneumonode.queue.jobs.JobTransitions.enqueue` did.

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
            check_uid(f"ResultUIDs.{f.name}", value, None)
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
        check_text("DeliveryTarget.destination", self.destination, DESTINATION_LENGTH, None)
        check_ae_title("DeliveryTarget.ae_title", self.ae_title, None)
        check_text("DeliveryTarget.host", self.host, HOST_LENGTH, None)
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
        check_uid("FindingRecord.model_uid", self.model_uid, None)
        paths = {"seg_path": self.seg_path, "sc_path": self.sc_path, "sr_path": self.sr_path}
        for name, path in paths.items():
            if path is not None:
                check_relative_path(f"FindingRecord.{name}", path, None)


@dataclass(frozen=True)
class FinishedJob:
    """One job of a batch whose processing ended: its finding and where its results go.

    Parameters
    ----------
    job_id:
        The job, ``processing`` under the worker's claim, its result UIDs reserved.
    finding:
        What processing found and where it wrote the outputs.
    targets:
        One per destination that takes the results (distinct destination names); empty when
        none does.
    """

    job_id: int
    finding: FindingRecord
    targets: tuple[DeliveryTarget, ...] = ()

    def __post_init__(self) -> None:
        names = [target.destination for target in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(
                f"FinishedJob: destination names must be unique, got {names} (job {self.job_id})"
            )


@dataclass(frozen=True)
class JobView:
    """A snapshot of one job row."""

    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    peer_host: str | None
    calling_aet: str
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
        uids = {f.name: getattr(self, f.name) for f in fields(ResultUIDs)}
        if None in uids.values():
            return None
        return ResultUIDs(**uids)

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


def utc(value: datetime | None) -> datetime:
    """``value`` in UTC, or the current UTC time for None; a naive time is refused."""
    if value is None:
        return datetime.now(UTC)
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"time must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC)


def job_state(value: str) -> JobState:
    """The job state named ``value``; a ValueError lists the states otherwise."""
    try:
        return JobState(value)
    except ValueError:
        allowed = ", ".join(state.value for state in JobState)
        raise ValueError(f"job state must be one of {allowed}, got {value!r}") from None


def clip_error(error: str) -> str:
    """An error text as stored: not blank, at most MAX_ERROR_LENGTH (head and tail kept)."""
    text = error.strip() or "unspecified error"
    if len(text) <= MAX_ERROR_LENGTH:
        return text
    half = MAX_ERROR_LENGTH // 2 - 10
    return f"{text[:half]} [...] {text[-half:]}"


def check_actor(actor: str, sop_instance_uid: str | None = None) -> None:
    """Refuse a worker id or actor name the event log cannot hold."""
    check_text("actor", actor, WORKER_ID_LENGTH, sop_instance_uid)


def check_worker(worker_id: str) -> None:
    """Refuse a worker id the claim columns cannot hold."""
    check_text("worker_id", worker_id, WORKER_ID_LENGTH, None)


def check_limit(limit: int) -> None:
    """Refuse a row limit that is not an int >= 1."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an int >= 1, got {limit!r}")


def _where(sop_instance_uid: str | None) -> str:
    return "" if sop_instance_uid is None else f" (SOP Instance UID {sop_instance_uid})"


def check_text(name: str, value: str, max_length: int, sop_instance_uid: str | None) -> None:
    """Refuse a text that is not a str of 1 to ``max_length`` characters without controls."""
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


def check_uid(name: str, value: str, sop_instance_uid: str | None) -> None:
    """Refuse a value that is not a DICOM UID (:func:`pneumonode.identifiers.uid_problem`)."""
    _refuse(name, value, uid_problem(value), sop_instance_uid)


def check_ae_title(name: str, value: str, sop_instance_uid: str | None) -> None:
    """Refuse a value that is not an AE title (:func:`pneumonode.identifiers.ae_title_problem`)."""
    _refuse(name, value, ae_title_problem(value), sop_instance_uid)


def _refuse(name: str, value: object, problem: str | None, sop_instance_uid: str | None) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {value!r}{_where(sop_instance_uid)}")
    if problem is not None:
        raise ValueError(f"{name} {problem}{_where(sop_instance_uid)}")


def check_relative_path(name: str, value: str, sop_instance_uid: str | None) -> None:
    """Refuse a path that is not normalised, relative and inside the data folder."""
    check_text(name, value, PATH_LENGTH, sop_instance_uid)
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
