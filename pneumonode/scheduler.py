"""Periodic housekeeping with APScheduler: heartbeats, recovery of stale claims, retention."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.exc import SQLAlchemyError

from pneumonode.queue.admin import QueueAdmin
from pneumonode.retention import PurgeReport, purge
from pneumonode.settings import Settings

LOGGER = logging.getLogger(__name__)

RETENTION_JOB_ID = "retention"
"""The id of the purge job in the scheduler."""


def requeue_stale(repository: QueueAdmin, settings: Settings) -> int:
    """Return expired claims (no heartbeat for ``worker.stale_after_s``) to the queue.

    A claim expires when its worker or sender died or wedged on it. Each such claim counted as
    an attempt, so the retry budgets of ``[worker]`` and ``[delivery]`` apply: an image that
    kills or hangs its worker every time ends ``failed`` with the reason instead of looping.
    """
    cutoff = datetime.now(UTC) - timedelta(seconds=settings.worker.stale_after_s)
    count = repository.requeue_stale(
        cutoff,
        policy=settings.worker.retry_policy(),
        delivery_policy=settings.delivery.retry_policy(),
    )
    if count:
        LOGGER.warning("took back %d stale claims (no heartbeat since %s)", count, cutoff)
    return count


def build_scheduler(
    settings: Settings,
    repository: QueueAdmin,
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
        if requeue_stale(repository, settings):
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
