"""Retention: removes finished jobs, their spool and result files, and orphan spool files."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath

from pneumonode.datafolder import (
    PARTIAL_SUFFIX,
    incoming_dir,
    is_result_folder,
    is_spool_day,
    spool_day,
    spool_dir,
)
from pneumonode.queue.admin import QueueAdmin
from pneumonode.queue.records import JobView

LOGGER = logging.getLogger(__name__)

PURGE_BATCH = 200
"""Jobs deleted per transaction."""

@dataclass(frozen=True)
class PurgeReport:
    """What one retention run removed."""

    jobs: int
    files: int


class _FileRemover:
    """Deletes files below the data folder, counting them; refuses paths that leave it."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir.absolute()
        self.removed = 0

    def remove(self, relative: str) -> None:
        parts = PurePosixPath(relative).parts
        if PurePosixPath(relative).is_absolute() or ".." in parts or not parts:
            raise ValueError(f"retention: path {relative!r} lies outside the data folder")
        path = self.root / relative
        try:
            path.unlink()
        except FileNotFoundError:
            return
        self.removed += 1
        parent = path.parent
        if parent != self.root and is_result_folder(parent):
            try:
                parent.rmdir()
            except OSError:
                LOGGER.debug("retention: results folder %s not empty, kept", parent)

    def remove_job_files(self, jobs: Sequence[JobView]) -> None:
        for job in jobs:
            for relative in (job.spool_path, job.seg_path, job.sc_path, job.sr_path):
                if relative is not None:
                    self.remove(relative)


def _older_than(path: Path, cutoff: datetime) -> bool:
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return False
    return datetime.fromtimestamp(mtime, UTC) < cutoff


def _sweep_spool(repository: QueueAdmin, remover: _FileRemover, cutoff: datetime) -> None:
    """Remove spool files no job refers to, from days before the cutoff, and stale partials.

    They are left by a crash between the spool write and the job commit, or by a duplicate
    whose removal failed. Files of days before the cutoff are past the race with intake.
    """
    spool = spool_dir(remover.root)
    if not spool.is_dir():
        return
    incoming = incoming_dir(remover.root)
    if incoming.is_dir():
        for partial in incoming.glob(f"*{PARTIAL_SUFFIX}"):
            if _older_than(partial, cutoff):
                remover.remove(str(partial.relative_to(remover.root)))
    cutoff_day = spool_day(cutoff)
    for day in sorted(spool.iterdir()):
        if not day.is_dir() or not is_spool_day(day.name):
            continue
        if day.name >= cutoff_day:
            continue
        files = [str(p.relative_to(remover.root)) for p in day.iterdir() if p.is_file()]
        referenced = repository.referenced_paths(files)
        for relative in files:
            if relative not in referenced:
                remover.remove(relative)
        try:
            day.rmdir()
        except OSError:
            LOGGER.debug("retention: spool folder %s still holds files of retained jobs", day)


def purge(
    repository: QueueAdmin,
    data_dir: Path,
    days: int,
    now: datetime | None = None,
    *,
    batch: int = PURGE_BATCH,
) -> PurgeReport:
    """Remove what the retention period no longer keeps.

    Finished jobs (``done``, ``skipped``, ``failed``) whose last transition is more than
    ``days`` days old lose their spool file and results, then their rows (job, deliveries,
    events); a job with a delivery still pending or sending is never touched. Spool files that
    no job refers to, from days before the cutoff, go as well.

    Parameters
    ----------
    repository:
        The job repository.
    data_dir:
        The node's data folder, holding ``spool/`` and ``results/``.
    days:
        The retention period; 0 keeps everything forever (nothing is done).
    now:
        The current time (timezone-aware); injected by tests.
    batch:
        Jobs deleted per transaction.

    Returns
    -------
    PurgeReport
        How many jobs and files were removed.
    """
    if isinstance(days, bool) or not isinstance(days, int) or days < 0:
        raise ValueError(f"retention days must be an int >= 0, got {days!r}")
    if days == 0:
        return PurgeReport(jobs=0, files=0)
    at = datetime.now(UTC) if now is None else now
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"retention: now must be timezone-aware, got naive {at.isoformat()}")
    cutoff = at - timedelta(days=days)
    remover = _FileRemover(data_dir)
    jobs = 0
    while True:
        deleted = repository.purge_finished(
            cutoff, limit=batch, before_delete=remover.remove_job_files
        )
        jobs += len(deleted)
        if len(deleted) < batch:
            break
    _sweep_spool(repository, remover, cutoff)
    report = PurgeReport(jobs=jobs, files=remover.removed)
    if jobs or remover.removed:
        LOGGER.info(
            "retention (%d days): removed %d jobs and %d files finished before %s",
            days,
            jobs,
            remover.removed,
            cutoff.isoformat(timespec="seconds"),
        )
    return report
