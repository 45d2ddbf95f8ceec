"""Periodic housekeeping with APScheduler: heartbeats and recovery of stale claims."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from pneumonode.queue.repository import JobRepository
from pneumonode.settings import Settings

LOGGER = logging.getLogger(__name__)


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
) -> BackgroundScheduler:
    """A scheduler (not started) with the node's periodic jobs."""
    scheduler = BackgroundScheduler(timezone=UTC)
    cfg = settings.worker

    def beat() -> None:
        for heartbeat in heartbeats:
            heartbeat()

    def recover() -> None:
        if requeue_stale(repository, cfg.stale_after_s):
            on_requeued()

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
    return scheduler
