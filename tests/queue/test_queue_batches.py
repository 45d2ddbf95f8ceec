"""Tests of the batch transitions (enqueue_many, reserve_result_uids_many,
finish_processing_many), on both databases: one transaction for many jobs, a stale or
faulty job reported for itself without failing the others."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, func, select

from pneumonode.queue.db import read_transaction
from pneumonode.queue.models import JobEvent, JobState
from pneumonode.queue.records import (
    FinishedJob,
    JobNotFound,
    NewJob,
    QueueError,
    StaleTransition,
)
from pneumonode.queue.repository import JobRepository
from pneumonode.queue.retry import RetryPolicy

T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
"""The kit fixture's default 'now'."""

POLICY = RetryPolicy(max_attempts=3, base_delay_s=60, max_delay_s=600)


def _claimed(kit, numbers: list[int], worker: str = "w1") -> list[int]:
    ids = [kit.enqueued(n) for n in numbers]
    claimed = kit.repo.claim_jobs(worker, limit=len(ids), now=T0)
    assert sorted(job.id for job in claimed) == sorted(ids)
    return ids


def _commits(repo: JobRepository) -> list[str]:
    """Record every COMMIT the engine sends from now on."""
    seen: list[str] = []
    event.listen(repo._engine, "commit", lambda conn: seen.append("commit"))
    return seen


def test_enqueue_many_records_each_instance_in_one_commit(kit) -> None:
    commits = _commits(kit.repo)
    results = kit.repo.enqueue_many([kit.new_job(n) for n in (1, 2, 3)], now=T0)
    assert len(commits) == 1
    assert [r.created for r in results] == [True, True, True]
    assert len({r.job_id for r in results}) == 3
    for n, result in zip((1, 2, 3), results, strict=True):
        job = kit.repo.get_job(result.job_id)
        assert job is not None
        assert (job.sop_instance_uid, job.state, job.spool_path) == (
            kit.new_job(n).sop_instance_uid, JobState.RECEIVED, f"spool/{n}.dcm")
        assert [e.to_state for e in kit.repo.events(result.job_id)] == ["received"]


def test_enqueue_many_treats_a_repeated_uid_as_a_duplicate_of_its_first_copy(kit) -> None:
    known = kit.enqueued(1)
    copy = NewJob(**{**kit.new_job(2).__dict__, "spool_path": "spool/2b.dcm"})
    results = kit.repo.enqueue_many(
        [kit.new_job(1), kit.new_job(2), copy, kit.new_job(3)], now=T0 + timedelta(seconds=1)
    )
    assert [(r.created, r.reopened) for r in results] == [
        (False, False), (True, False), (False, False), (True, False)]
    assert results[0].job_id == known and results[0].unused_spool_path == "spool/1.dcm"
    assert results[2].job_id == results[1].job_id
    assert results[2].unused_spool_path == "spool/2b.dcm"
    job = kit.repo.get_job(results[1].job_id)
    assert job is not None and job.spool_path == "spool/2.dcm"
    assert kit.repo.counts_by_state()["received"] == 3


def test_enqueue_many_reopens_a_failed_job_among_new_ones(kit) -> None:
    job_id = _claimed(kit, [1])[0]
    once = RetryPolicy(max_attempts=1, base_delay_s=60, max_delay_s=600)
    kit.repo.fail_job(job_id, "w1", "boom", once, now=T0)
    again = NewJob(**{**kit.new_job(1).__dict__, "spool_path": "spool/1b.dcm"})
    results = kit.repo.enqueue_many([kit.new_job(5), again], now=T0 + timedelta(seconds=1))
    assert results[0].created
    assert (results[1].job_id, results[1].reopened) == (job_id, True)
    job = kit.repo.get_job(job_id)
    assert job is not None and (job.state, job.spool_path) == (JobState.RECEIVED, "spool/1b.dcm")


def test_reserve_many_fixes_each_jobs_uids_once_in_one_commit(kit) -> None:
    ids = _claimed(kit, [1, 2])
    commits = _commits(kit.repo)
    first = kit.repo.reserve_result_uids_many({ids[0]: kit.uids(1), ids[1]: kit.uids(2)}, now=T0)
    assert len(commits) == 1
    assert first == {ids[0]: kit.uids(1), ids[1]: kit.uids(2)}
    again = kit.repo.reserve_result_uids_many(
        {ids[0]: kit.uids(1, 2), ids[1]: kit.uids(2, 2)}, now=T0)
    assert again == first  # a retried batch re-sends identical instances
    for job_id, n in zip(ids, (1, 2), strict=True):
        job = kit.repo.get_job(job_id)
        assert job is not None and job.result_uids == kit.uids(n)
        fixed = [e for e in kit.repo.events(job_id) if "result UIDs fixed" in e.detail]
        assert len(fixed) == 1


def test_reserve_many_reports_a_missing_job_and_reserves_the_others(kit) -> None:
    ids = _claimed(kit, [1])
    outcomes = kit.repo.reserve_result_uids_many({ids[0]: kit.uids(1), 999: kit.uids(9)})
    assert outcomes[ids[0]] == kit.uids(1)
    assert isinstance(outcomes[999], JobNotFound)
    job = kit.repo.get_job(ids[0])
    assert job is not None and job.result_uids == kit.uids(1)


def test_reserve_many_agrees_with_reserve_one(kit) -> None:
    ids = _claimed(kit, [1])
    one = kit.repo.reserve_result_uids(ids[0], kit.uids(1), now=T0)
    many = kit.repo.reserve_result_uids_many({ids[0]: kit.uids(1, 2)}, now=T0)
    assert many == {ids[0]: one}


def test_finish_many_records_every_job_of_the_batch_in_one_commit(kit) -> None:
    ids = _claimed(kit, [1, 2, 3])
    kit.repo.reserve_result_uids_many({i: kit.uids(n) for n, i in enumerate(ids, 1)}, now=T0)
    commits = _commits(kit.repo)
    outcomes = kit.repo.finish_processing_many(
        [
            FinishedJob(ids[0], kit.finding(1), (kit.target("pacs", 104), kit.target("viewer"))),
            FinishedJob(ids[1], kit.finding(2), (kit.target("pacs", 104),)),
            FinishedJob(ids[2], kit.finding(3)),
        ],
        "w1",
        now=T0 + timedelta(seconds=5),
    )
    assert len(commits) == 1
    assert outcomes == {ids[0]: None, ids[1]: None, ids[2]: None}
    states = [kit.repo.get_job(i).state for i in ids]
    assert states == [JobState.DELIVERING, JobState.DELIVERING, JobState.DONE]
    stored = kit.repo.get_job(ids[0])
    assert stored is not None
    assert (stored.claimed_by, stored.finding_score, stored.seg_path) == (
        None, 0.875, "out/1/seg.dcm")
    assert [(d.destination, d.state.value, d.port) for d in kit.repo.deliveries(ids[0])] == [
        ("pacs", "pending", 104), ("viewer", "pending", 11113)]
    assert [d.destination for d in kit.repo.deliveries(ids[1])] == ["pacs"]
    assert kit.repo.deliveries(ids[2]) == []
    tail = [(e.from_state, e.to_state, e.destination) for e in kit.repo.events(ids[0])][-3:]
    assert tail == [("processing", "delivering", None), (None, "pending", "pacs"),
                    (None, "pending", "viewer")]
    done = kit.repo.events(ids[2])[-1]
    assert (done.to_state, "no destinations" in done.detail) == ("done", True)


def test_finish_many_reports_a_stale_job_and_records_the_others(kit) -> None:
    ids = _claimed(kit, [1, 2, 3])
    kit.repo.reserve_result_uids_many({i: kit.uids(n) for n, i in enumerate(ids, 1)}, now=T0)
    # the middle job's claim was lost: recovered as stale and taken by another worker
    kit.repo.fail_job(ids[1], "w1", "wedged", POLICY, now=T0)
    retaken = kit.repo.claim_jobs("w2", limit=1, now=T0 + timedelta(hours=1))
    assert [j.id for j in retaken] == [ids[1]]
    events_before = len(kit.repo.events(ids[1]))
    outcomes = kit.repo.finish_processing_many(
        [FinishedJob(i, kit.finding(n), (kit.target("pacs"),)) for n, i in enumerate(ids, 1)],
        "w1",
    )
    assert outcomes[ids[0]] is None and outcomes[ids[2]] is None
    stale = outcomes[ids[1]]
    assert isinstance(stale, StaleTransition)
    assert f"job {ids[1]}" in str(stale) and "'w2'" in str(stale)
    held = kit.repo.get_job(ids[1])
    assert held is not None and (held.state, held.claimed_by) == (JobState.PROCESSING, "w2")
    assert kit.repo.deliveries(ids[1]) == []
    assert len(kit.repo.events(ids[1])) == events_before
    for i in (ids[0], ids[2]):
        job = kit.repo.get_job(i)
        assert job is not None and job.state is JobState.DELIVERING
        assert [d.destination for d in kit.repo.deliveries(i)] == ["pacs"]


def test_finish_many_reports_a_job_without_reserved_uids(kit) -> None:
    ids = _claimed(kit, [1, 2])
    kit.repo.reserve_result_uids(ids[1], kit.uids(2), now=T0)
    outcomes = kit.repo.finish_processing_many(
        [FinishedJob(ids[0], kit.finding(1)), FinishedJob(ids[1], kit.finding(2))], "w1")
    assert isinstance(outcomes[ids[0]], QueueError)
    assert "never reserved" in str(outcomes[ids[0]])
    assert outcomes[ids[1]] is None
    first = kit.repo.get_job(ids[0])
    assert first is not None and first.state is JobState.PROCESSING
    second = kit.repo.get_job(ids[1])
    assert second is not None and second.state is JobState.DONE


def test_finish_many_reports_a_missing_job(kit) -> None:
    ids = _claimed(kit, [1])
    kit.repo.reserve_result_uids(ids[0], kit.uids(1), now=T0)
    outcomes = kit.repo.finish_processing_many(
        [FinishedJob(999, kit.finding(9)), FinishedJob(ids[0], kit.finding(1))], "w1")
    assert isinstance(outcomes[999], StaleTransition) and "no such job" in str(outcomes[999])
    assert outcomes[ids[0]] is None


def test_finish_many_refuses_a_job_twice_and_duplicate_destinations(kit) -> None:
    ids = _claimed(kit, [1])
    kit.repo.reserve_result_uids(ids[0], kit.uids(1), now=T0)
    with pytest.raises(ValueError, match="unique"):
        kit.repo.finish_processing_many(
            [FinishedJob(ids[0], kit.finding(1)), FinishedJob(ids[0], kit.finding(1))], "w1")
    with pytest.raises(ValueError, match="unique"):
        FinishedJob(ids[0], kit.finding(1), (kit.target("pacs"), kit.target("pacs", 105)))
    job = kit.repo.get_job(ids[0])
    assert job is not None and job.state is JobState.PROCESSING
    with read_transaction(kit.repo._engine) as conn:
        count = conn.execute(select(func.count()).select_from(JobEvent)).scalar_one()
    assert count == 3  # received, claimed, UIDs fixed: nothing of the refused batch
