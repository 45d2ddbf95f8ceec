"""Periodic housekeeping with APScheduler: heartbeats, recovery of stale claims, retention."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.exc import SQLAlchemyError

from pneumonode.queue.repository import JobRepository
from pneumonode.retention import PurgeReport, purge
from pneumonode.settings import Settings

LOGGER = logging.getLogger(__name__)

RETENTION_JOB_ID = "retention"
"""The id of the purge job in the scheduler."""


def requeue_stale(repository: JobRepository, stale_after_s: float) -> int:
    """Return expired claims (no heartbeat for ``stale_after_s``) to the queue."""
    cutoff = datetime.now(UTC) - timedelta(seconds=stale_after_s)
    count = repository.requeue_stale(cutoff)
    if count:
        LOGGER.warning("requeued %d stale claims (no heartbeat since %s)", count, cutoff)
    return count


def build_scheduler(
    settings: Settings,
    repository: JobRepository,
    heartbeats: Sequence[Callable[[], None]],
    on_requeued: Callable[[], None],
    on_purged: Callable[[PurgeReport], None] | None = None,
    clock: Callable[[], datetime] | None = None,
) -> BackgroundScheduler:
    """A scheduler (not started) with the node's periodic jobs.

    Parameters
    ----------
    settings:
        The node's settings: ``[worker]`` timings and ``[retention]``.
    repository:
        The job repository.
    heartbeats:
        Called every ``worker.heartbeat_s`` (workers' and senders' claim heartbeats).
    on_requeued:
        Called when stale claims went back to the queue (wakes the workers).
    on_purged:
        Called with what each retention run removed (metrics).
    clock:
        The current time for retention (tests inject one); default: the system clock.
    """
    scheduler = BackgroundScheduler(timezone=UTC)
    cfg = settings.worker

    def beat() -> None:
        for heartbeat in heartbeats:
            heartbeat()

    def recover() -> None:
        if requeue_stale(repository, cfg.stale_after_s):
            on_requeued()

    def retain() -> None:
        now = clock() if clock is not None else None
        try:
            report = purge(repository, settings.node.data_dir, settings.retention.days, now=now)
        except (SQLAlchemyError, OSError):
            LOGGER.exception("retention run failed; it is tried again at the next interval")
            return
        if on_purged is not None:
            on_purged(report)

    scheduler.add_job(
        beat, "interval", seconds=cfg.heartbeat_s, id="heartbeat", max_instances=1, coalesce=True
    )
    scheduler.add_job(
        recover,
        "interval",
        seconds=max(cfg.heartbeat_s, cfg.stale_after_s / 4),
        id="requeue-stale",
        max_instances=1,
        coalesce=True,
        next_run_time=datetime.now(UTC),
    )
    if settings.retention.days > 0:
        scheduler.add_job(
            retain,
            "interval",
            seconds=settings.retention.interval_s,
            id=RETENTION_JOB_ID,
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC)
            + timedelta(seconds=min(60.0, settings.retention.interval_s)),
        )
    return scheduler
