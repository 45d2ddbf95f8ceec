"""Group commit for intake: instances that arrive together share one folder fsync and one commit.

Each association thread writes and fsyncs its own spool file, then hands its job to
:meth:`GroupCommit.commit`. The first thread to arrive while no group is being made durable
leads: it takes every job handed in so far, fsyncs their spool folders once, records the jobs
in one database transaction (one commit, one sync) and wakes the others. Threads that arrive
while a group is under way wait for it and form the next group. No thread waits for a timer:
alone, a thread leads a group of one at once.

Every thread returns only after its own job is durable (its file, its folder entry and its job
row), so a C-STORE is still answered success only after everything about it is on disk.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from pneumonode.datafolder import fsync_path
from pneumonode.queue.jobs import JobTransitions
from pneumonode.queue.records import EnqueueResult, NewJob, QueueError


class _Arrival:
    """One job handed in, and what became of it."""

    __slots__ = ("done", "error", "folder", "new", "result")

    def __init__(self, new: NewJob, folder: Path | None) -> None:
        self.new = new
        self.folder = folder
        self.done = False
        self.result: EnqueueResult | None = None
        self.error: BaseException | None = None

    def outcome(self) -> EnqueueResult:
        """The job's result, or the error that kept it from being recorded, raised."""
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class GroupCommit:
    """Makes the jobs of concurrent associations durable together.

    Parameters
    ----------
    repository:
        Where the jobs are recorded (:meth:`JobTransitions.enqueue_many`).
    """

    def __init__(self, repository: JobTransitions) -> None:
        self._repository = repository
        self._turn = threading.Condition(threading.Lock())
        self._waiting: list[_Arrival] = []
        self._leading = False

    def commit(self, new: NewJob, folder: Path | None) -> EnqueueResult:
        """Record ``new`` once ``folder`` (its spool file's folder) is fsynced.

        Parameters
        ----------
        new:
            The job of a received instance whose spool file is written, fsynced and renamed
            into ``folder``.
        folder:
            The folder to fsync before the job is recorded; None when nothing was spooled (an
            instance skipped at intake).

        Returns
        -------
        EnqueueResult
            What :meth:`JobTransitions.enqueue` returns for ``new``.

        Raises
        ------
        OSError
            When a folder of the group cannot be fsynced: no job of the group is recorded.
        sqlalchemy.exc.SQLAlchemyError, QueueError
            When this job cannot be recorded. A group whose transaction fails is recorded
            again job by job, so that one job's failure is that job's alone.
        """
        arrival = _Arrival(new, folder)
        with self._turn:
            self._waiting.append(arrival)
            while self._leading and not arrival.done:
                self._turn.wait()
            if arrival.done:
                return arrival.outcome()
            self._leading = True
            group, self._waiting = self._waiting, []
        try:
            self._make_durable(group)
        finally:
            with self._turn:
                for member in group:
                    if not member.done:  # the leader failed: none is left waiting forever
                        member.error = RuntimeError("group commit: the leading thread failed")
                        member.done = True
                self._leading = False
                self._turn.notify_all()
        return arrival.outcome()

    def _make_durable(self, group: Sequence[_Arrival]) -> None:
        """fsync the group's folders once, then record its jobs in one transaction."""
        try:
            for folder in {member.folder for member in group if member.folder is not None}:
                fsync_path(folder, directory=True)
        except OSError as exc:
            for member in group:
                member.error, member.done = exc, True
            return
        try:
            results = self._repository.enqueue_many([member.new for member in group])
        except (SQLAlchemyError, QueueError) as exc:  # each thread turns it into a status
            if len(group) == 1:
                group[0].error, group[0].done = exc, True
                return
            for member in group:
                self._record_alone(member)
            return
        for member, result in zip(group, results, strict=True):
            member.result, member.done = result, True

    def _record_alone(self, member: _Arrival) -> None:
        """Record one job of a failed group in a transaction of its own."""
        try:
            member.result = self._repository.enqueue_many([member.new])[0]
        except (SQLAlchemyError, QueueError) as exc:  # the member's thread turns it into a status
            member.error = exc
        member.done = True
