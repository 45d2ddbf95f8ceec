"""Repository queries for retention and metrics: purge of finished jobs, paths still in use."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from pneumonode.queue.db import read_transaction
from pneumonode.queue.models import Delivery, JobEvent, JobState
from pneumonode.queue.retry import RetryPolicy

T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
LATER = T0 + timedelta(days=31)
ONCE = RetryPolicy(max_attempts=1, base_delay_s=1, max_delay_s=1)


def _rows(engine, model, job_id: int) -> int:
    with read_transaction(engine) as conn:
        return int(conn.execute(
            select(func.count()).select_from(model).where(model.job_id == job_id)
        ).scalar_one())


def _done(kit, n: int) -> int:
    job_id = kit.delivering(n)
    [delivery] = kit.repo.claim_deliveries("s1", now=T0)
    kit.repo.delivery_succeeded(delivery.id, "s1", now=T0)
    return job_id


def test_finished_jobs_go_with_their_deliveries_and_events(kit, engine) -> None:
    done = _done(kit, 1)
    skipped = kit.repo.enqueue(kit.new_job(2, skip_reason="not chest"), now=T0).job_id
    failed = kit.processing(3)
    kit.repo.fail_job(failed.id, "w1", "broken", ONCE, now=T0)
    waiting = kit.enqueued(4)
    assert kit.repo.purge_finished(T0, limit=10) == []  # nothing ended before T0
    purged = kit.repo.purge_finished(LATER, limit=10)
    assert sorted(j.id for j in purged) == sorted([done, skipped, failed.id])
    assert {j.state for j in purged} == {JobState.DONE, JobState.SKIPPED, JobState.FAILED}
    for job_id in (done, skipped, failed.id):
        assert kit.repo.get_job(job_id) is None
        assert _rows(engine, Delivery, job_id) == _rows(engine, JobEvent, job_id) == 0
    assert kit.repo.get_job(waiting) is not None


def test_a_job_is_never_purged_while_a_delivery_may_happen(kit) -> None:
    job_id = kit.delivering(1, destinations=("pacs", "viewer"))
    first = kit.repo.claim_deliveries("s1", limit=2, now=T0)
    kit.repo.delivery_succeeded(first[0].id, "s1", now=T0)
    assert kit.repo.purge_finished(LATER) == []
    kit.repo.delivery_failed(first[1].id, "s1", "down", ONCE, now=T0)
    assert kit.repo.get_job(job_id).state == JobState.FAILED
    kit.repo.retry(job_id, now=T0)  # operator: send again; the job is delivering once more
    assert kit.repo.purge_finished(LATER) == []
    kit.processing(10)
    kit.enqueued(11)
    assert kit.repo.purge_finished(LATER + timedelta(days=365)) == []


def test_purge_runs_the_file_hook_first_and_keeps_rows_when_it_fails(kit) -> None:
    job_id = _done(kit, 1)
    seen: list[int] = []

    def refuse(jobs) -> None:
        seen.extend(j.id for j in jobs)
        raise OSError("read-only file system")

    with pytest.raises(OSError, match="read-only"):
        kit.repo.purge_finished(LATER, before_delete=refuse)
    assert seen == [job_id] and kit.repo.get_job(job_id) is not None


def test_purge_takes_at_most_limit_jobs_oldest_first(kit) -> None:
    ids = [_done(kit, n) for n in range(1, 5)]
    assert [j.id for j in kit.repo.purge_finished(LATER, limit=3)] == ids[:3]
    assert [j.id for j in kit.repo.purge_finished(LATER, limit=3)] == ids[3:]
    with pytest.raises(ValueError, match="limit"):
        kit.repo.purge_finished(LATER, limit=0)


def test_referenced_paths_and_oldest_unfinished(kit) -> None:
    assert kit.repo.oldest_unfinished_received_at() is None
    kit.delivering(1)
    kit.enqueued(2, now=T0 + timedelta(hours=1))
    assert kit.repo.oldest_unfinished_received_at() == T0
    found = kit.repo.referenced_paths(["spool/1.dcm", "out/1/seg.dcm", "spool/9.dcm"])
    assert found == {"spool/1.dcm", "out/1/seg.dcm"}
