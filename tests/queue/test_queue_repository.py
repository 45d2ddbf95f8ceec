"""Tests of every job and delivery transition in pneumonode.queue.repository, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, func, select

from pneumonode.queue.db import read_transaction, write_transaction
from pneumonode.queue.models import Delivery, DeliveryState, Job, JobEvent, JobState
from pneumonode.queue.records import (
    DeliveryTarget,
    FindingRecord,
    JobNotFound,
    NewJob,
    NotRetryable,
    QueueError,
    ResultUIDs,
    StaleTransition,
)
from pneumonode.queue.retry import RetryPolicy

T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
"""The kit fixture's default 'now'."""

POLICY = RetryPolicy(max_attempts=3, base_delay_s=60, max_delay_s=600)


def seconds(n: float) -> datetime:
    return T0 + timedelta(seconds=n)


def transitions(repo, job_id: int) -> list[tuple[str | None, str, str | None]]:
    return [(e.from_state, e.to_state, e.destination) for e in repo.events(job_id)]


# --- intake -------------------------------------------------------------------------------


def test_enqueue_creates_a_due_received_job_and_its_event(kit) -> None:
    result = kit.repo.enqueue(kit.new_job(1), now=T0)
    assert result.created
    job = kit.repo.get_job(result.job_id)
    assert job is not None
    assert (job.state, job.attempts, job.next_attempt_at, job.received_at) == (
        JobState.RECEIVED,
        0,
        T0,
        T0,
    )
    assert job.sop_instance_uid == "1.2.826.0.1.3680043.10.99.1"
    assert (job.calling_aet, job.peer_host, job.spool_path) == (
        "MODALITY",
        "127.0.0.1",
        "spool/1.dcm",
    )
    (event,) = kit.repo.events(job.id)
    assert (event.from_state, event.to_state, event.actor, event.at) == (
        None,
        "received",
        "intake",
        T0,
    )


def test_duplicate_sop_instance_uid_is_acknowledged_without_writing(kit) -> None:
    first = kit.repo.enqueue(kit.new_job(1), now=T0)
    again = NewJob(**{**kit.new_job(1).__dict__, "spool_path": "spool/other.dcm"})
    second = kit.repo.enqueue(again, now=seconds(5))
    assert (second.job_id, second.created) == (first.job_id, False)
    job = kit.repo.get_job(first.job_id)
    assert job is not None and job.spool_path == "spool/1.dcm" and job.updated_at == T0
    assert len(kit.repo.events(first.job_id)) == 1
    assert kit.repo.counts_by_state()["received"] == 1


def test_enqueue_of_a_known_uid_leaves_the_transaction_usable(kit) -> None:
    # the UID conflict is decided at the INSERT (ON CONFLICT DO NOTHING): on PostgreSQL a
    # failed INSERT would abort the transaction and lose the jobs enqueued with it
    first = kit.repo.enqueue(kit.new_job(1), now=T0)
    results = kit.repo.enqueue_many([kit.new_job(1), kit.new_job(2)], now=seconds(1))
    assert [(r.job_id == first.job_id, r.created) for r in results] == [(True, False),
                                                                         (False, True)]
    assert len(kit.repo.events(first.job_id)) == 1
    assert kit.repo.counts_by_state()["received"] == 2


def test_skip_at_intake_records_the_reason_and_is_never_claimed(kit) -> None:
    new = kit.new_job(1, skip_reason="Modality CT is not CR or DX", spool=False)
    job_id = kit.repo.enqueue(new, now=T0).job_id
    job = kit.repo.get_job(job_id)
    assert job is not None
    assert (job.state, job.skip_reason, job.spool_path) == (
        JobState.SKIPPED,
        "Modality CT is not CR or DX",
        None,
    )
    (event,) = kit.repo.events(job_id)
    assert (event.from_state, event.to_state) == (None, "skipped")
    assert "Modality CT" in event.detail
    assert kit.repo.claim_jobs("w1", limit=5, now=seconds(60)) == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sop_instance_uid", "1.2.3/../../etc", "DICOM UID"),
        ("sop_instance_uid", "1." + "2" * 70, "at most 64"),
        ("study_instance_uid", "", "DICOM UID"),
        ("calling_aet", "A" * 17, "1 to 16"),
        ("calling_aet", "BAD\\AE", "backslash"),
        ("spool_path", "/abs/path.dcm", "relative"),
        ("spool_path", "spool/../../x.dcm", "'..'"),
        ("spool_path", None, "skipped at intake"),
    ],
)
def test_new_job_refuses_invalid_fields(field: str, value: str | None, message: str) -> None:
    base = {
        "sop_instance_uid": "1.2.3.4",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.1",
        "calling_aet": "MODALITY",
        "peer_host": None,
        "spool_path": "spool/a.dcm",
    }
    base[field] = value
    with pytest.raises(ValueError, match=message) as caught:
        NewJob(**base)  # type: ignore[arg-type]
    if field != "sop_instance_uid":
        assert "1.2.3.4" in str(caught.value)


def test_result_records_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="distinct"):
        ResultUIDs("1.2.1", "1.2.1", "1.2.3", "1.2.4", "1.2.5", "1.2.6")
    with pytest.raises(ValueError, match="port"):
        DeliveryTarget("pacs", "PACS", "127.0.0.1", 70000)
    with pytest.raises(ValueError, match="score"):
        FindingRecord(True, 1.5, None, "1.2.3", "out/s.dcm", "out/c.dcm")
    with pytest.raises(ValueError, match="relative"):
        FindingRecord(True, 0.5, None, "1.2.3", "/tmp/s.dcm", "out/c.dcm")


# --- processing ---------------------------------------------------------------------------


def test_claim_takes_the_oldest_due_jobs_and_marks_them(kit) -> None:
    ids = [kit.enqueued(n, now=seconds(n)) for n in range(1, 5)]
    claimed = kit.repo.claim_jobs("host:1:main", limit=2, now=seconds(10))
    assert [job.id for job in claimed] == ids[:2]
    for job in claimed:
        assert (job.state, job.attempts, job.claimed_by, job.heartbeat_at) == (
            JobState.PROCESSING,
            1,
            "host:1:main",
            seconds(10),
        )
        assert transitions(kit.repo, job.id)[-1] == ("received", "processing", None)
        assert kit.repo.events(job.id)[-1].actor == "host:1:main"
    assert kit.repo.counts_by_state()["processing"] == 2
    assert kit.repo.counts_by_state()["received"] == 2


def test_claim_ignores_jobs_not_yet_due(kit) -> None:
    kit.enqueued(1, now=seconds(100))
    assert kit.repo.claim_jobs("w1", now=seconds(99)) == []
    assert len(kit.repo.claim_jobs("w1", now=seconds(100))) == 1


def test_claim_limit_must_be_positive(kit) -> None:
    with pytest.raises(ValueError, match="limit"):
        kit.repo.claim_jobs("w1", limit=0)


def test_heartbeat_moves_the_heartbeat_of_the_claimer_only(kit) -> None:
    job = kit.processing(1)
    kit.repo.heartbeat_job(job.id, "w1", now=seconds(30))
    stored = kit.repo.get_job(job.id)
    assert stored is not None and stored.heartbeat_at == seconds(30)
    with pytest.raises(StaleTransition, match=f"job {job.id}: cannot heartbeat"):
        kit.repo.heartbeat_job(job.id, "w2", now=seconds(31))
    with pytest.raises(StaleTransition, match="no such job"):
        kit.repo.heartbeat_job(9999, "w1")


def test_result_uids_are_fixed_the_first_time(kit) -> None:
    job = kit.processing(1)
    first = kit.repo.reserve_result_uids(job.id, kit.uids(1, generation=1), now=T0)
    second = kit.repo.reserve_result_uids(job.id, kit.uids(1, generation=2), now=seconds(1))
    assert first == kit.uids(1, generation=1)
    assert second == first
    stored = kit.repo.get_job(job.id)
    assert stored is not None and stored.result_uids == first
    fixed = [e for e in kit.repo.events(job.id) if e.detail.startswith("result UIDs fixed")]
    assert len(fixed) == 1
    with pytest.raises(JobNotFound):
        kit.repo.reserve_result_uids(9999, kit.uids(2))


def test_a_retried_job_reuses_its_first_result_uids(kit) -> None:
    job = kit.processing(1)
    first = kit.repo.reserve_result_uids(job.id, kit.uids(1, generation=1), now=T0)
    kit.repo.fail_job(job.id, "w1", "inference crashed", POLICY, now=T0)
    (again,) = kit.repo.claim_jobs("w2", now=seconds(60))
    assert again.id == job.id and again.attempts == 2
    assert kit.repo.reserve_result_uids(job.id, kit.uids(1, generation=2)) == first


def test_finish_with_destinations_creates_pending_deliveries(kit) -> None:
    job = kit.processing(1)
    kit.repo.reserve_result_uids(job.id, kit.uids(1), now=T0)
    targets = [kit.target("pacs", 104), kit.target("viewer", 11114)]
    kit.repo.finish_processing(job.id, "w1", kit.finding(1), targets, now=seconds(5))
    stored = kit.repo.get_job(job.id)
    assert stored is not None
    assert (stored.state, stored.claimed_by, stored.heartbeat_at) == (
        JobState.DELIVERING,
        None,
        None,
    )
    assert (stored.finding_present, stored.finding_score, stored.finding_area_mm2) == (
        True,
        0.875,
        1234.5,
    )
    assert (stored.model_uid, stored.seg_path, stored.sc_path) == (
        "1.2.826.0.1.3680043.10.95.1",
        "out/1/seg.dcm",
        "out/1/sc.dcm",
    )
    deliveries = kit.repo.deliveries(job.id)
    assert [(d.destination, d.ae_title, d.host, d.port) for d in deliveries] == [
        ("pacs", "PACS", "127.0.0.1", 104),
        ("viewer", "VIEWER", "127.0.0.1", 11114),
    ]
    assert all(d.state is DeliveryState.PENDING and d.attempts == 0 for d in deliveries)
    assert all(d.next_attempt_at == seconds(5) for d in deliveries)
    assert transitions(kit.repo, job.id)[-3:] == [
        ("processing", "delivering", None),
        (None, "pending", "pacs"),
        (None, "pending", "viewer"),
    ]


def test_finish_without_destinations_ends_done_and_says_so(kit) -> None:
    job = kit.processing(1)
    kit.repo.reserve_result_uids(job.id, kit.uids(1), now=T0)
    kit.repo.finish_processing(job.id, "w1", kit.finding(1), [], now=T0)
    stored = kit.repo.get_job(job.id)
    assert stored is not None and stored.state is JobState.DONE
    assert kit.repo.deliveries(job.id) == []
    last = kit.repo.events(job.id)[-1]
    assert (last.from_state, last.to_state) == ("processing", "done")
    assert "no destinations" in last.detail


def test_finish_needs_reserved_result_uids(kit) -> None:
    job = kit.processing(1)
    with pytest.raises(QueueError, match="never reserved"):
        kit.repo.finish_processing(job.id, "w1", kit.finding(1), [kit.target("pacs")])
    stored = kit.repo.get_job(job.id)
    assert stored is not None and stored.state is JobState.PROCESSING


def test_finish_by_another_worker_is_stale_and_writes_nothing(kit) -> None:
    job = kit.processing(1)
    kit.repo.reserve_result_uids(job.id, kit.uids(1), now=T0)
    events_before = len(kit.repo.events(job.id))
    with pytest.raises(StaleTransition) as caught:
        kit.repo.finish_processing(job.id, "w2", kit.finding(1), [kit.target("pacs")])
    message = str(caught.value)
    assert f"job {job.id}" in message and "'processing'" in message and "finish" in message
    assert kit.repo.deliveries(job.id) == []
    assert len(kit.repo.events(job.id)) == events_before
    stored = kit.repo.get_job(job.id)
    assert stored is not None and stored.state is JobState.PROCESSING


def test_finish_refuses_duplicate_destination_names(kit) -> None:
    job = kit.processing(1)
    kit.repo.reserve_result_uids(job.id, kit.uids(1), now=T0)
    with pytest.raises(ValueError, match="unique"):
        kit.repo.finish_processing(
            job.id, "w1", kit.finding(1), [kit.target("pacs"), kit.target("pacs", 105)]
        )


def test_skip_ends_the_job_with_its_reason(kit) -> None:
    job = kit.processing(1)
    kit.repo.skip_job(job.id, "w1", "BodyPartExamined is KNEE", now=seconds(3))
    stored = kit.repo.get_job(job.id)
    assert stored is not None
    assert (stored.state, stored.skip_reason, stored.claimed_by) == (
        JobState.SKIPPED,
        "BodyPartExamined is KNEE",
        None,
    )
    last = kit.repo.events(job.id)[-1]
    assert (last.from_state, last.to_state, last.detail, last.actor) == (
        "processing",
        "skipped",
        "BodyPartExamined is KNEE",
        "w1",
    )


def test_fail_backs_off_then_gives_up_after_the_budget(kit) -> None:
    job = kit.processing(1)
    after_first = kit.repo.fail_job(job.id, "w1", "decode error", POLICY, now=seconds(10))
    assert (after_first.state, after_first.next_attempt_at, after_first.last_error) == (
        JobState.RECEIVED,
        seconds(70),
        "decode error",
    )
    assert after_first.claimed_by is None
    assert kit.repo.claim_jobs("w1", now=seconds(69)) == []
    (second,) = kit.repo.claim_jobs("w1", now=seconds(70))
    after_second = kit.repo.fail_job(second.id, "w1", "decode error 2", POLICY, now=seconds(80))
    assert after_second.next_attempt_at == seconds(200)
    (third,) = kit.repo.claim_jobs("w1", now=seconds(200))
    assert third.attempts == 3
    final = kit.repo.fail_job(third.id, "w1", "decode error 3", POLICY, now=seconds(210))
    assert (final.state, final.last_error, final.attempts) == (
        JobState.FAILED,
        "decode error 3",
        3,
    )
    assert kit.repo.claim_jobs("w1", now=seconds(10_000)) == []
    states = [(e.from_state, e.to_state) for e in kit.repo.events(job.id)]
    assert states == [
        (None, "received"),
        ("received", "processing"),
        ("processing", "received"),
        ("received", "processing"),
        ("processing", "received"),
        ("received", "processing"),
        ("processing", "failed"),
    ]
    assert "gave up after 3 attempts" in kit.repo.events(job.id)[-1].detail


@pytest.mark.parametrize(
    "action",
    ["finish", "skip", "fail", "heartbeat"],
)
def test_job_transitions_from_the_wrong_state_raise_stale(kit, action: str) -> None:
    job_id = kit.enqueued(1)
    with pytest.raises(StaleTransition) as caught:
        if action == "finish":
            kit.repo.finish_processing(job_id, "w1", kit.finding(1), [])
        elif action == "skip":
            kit.repo.skip_job(job_id, "w1", "reason")
        elif action == "fail":
            kit.repo.fail_job(job_id, "w1", "error", POLICY)
        else:
            kit.repo.heartbeat_job(job_id, "w1")
    message = str(caught.value)
    assert f"job {job_id}" in message
    assert "expected state 'processing'" in message
    assert "found state 'received'" in message
    assert "1.2.826.0.1.3680043.10.99.1" in message
    stored = kit.repo.get_job(job_id)
    assert stored is not None and stored.state is JobState.RECEIVED
    assert len(kit.repo.events(job_id)) == 1


# --- deliveries ---------------------------------------------------------------------------


def test_claimed_delivery_is_sending_with_an_event(kit) -> None:
    job_id = kit.delivering(1)
    (delivery,) = kit.repo.claim_deliveries("s1", limit=5, now=seconds(1))
    assert (delivery.job_id, delivery.state, delivery.attempts, delivery.claimed_by) == (
        job_id,
        DeliveryState.SENDING,
        1,
        "s1",
    )
    assert delivery.heartbeat_at == seconds(1)
    assert transitions(kit.repo, job_id)[-1] == ("pending", "sending", "pacs")


def test_one_destination_gets_its_deliveries_one_at_a_time_in_job_order(kit) -> None:
    first = kit.delivering(1)
    second = kit.delivering(2)
    (claimed,) = kit.repo.claim_deliveries("s1", limit=5, now=seconds(1))
    assert claimed.job_id == first
    assert kit.repo.claim_deliveries("s2", limit=5, now=seconds(2)) == []
    kit.repo.delivery_succeeded(claimed.id, "s1", now=seconds(3))
    (following,) = kit.repo.claim_deliveries("s2", limit=5, now=seconds(4))
    assert following.job_id == second


def test_a_delivery_waiting_for_its_backoff_holds_back_later_ones(kit) -> None:
    first = kit.delivering(1)
    kit.delivering(2)
    (claimed,) = kit.repo.claim_deliveries("s1", now=seconds(1))
    waiting = kit.repo.delivery_failed(claimed.id, "s1", "connection refused", POLICY, seconds(2))
    assert (waiting.state, waiting.next_attempt_at, waiting.last_error) == (
        DeliveryState.PENDING,
        seconds(62),
        "connection refused",
    )
    assert kit.repo.claim_deliveries("s1", limit=5, now=seconds(30)) == []
    assert kit.repo.next_due(now=seconds(30), jobs=False) == seconds(62)
    (retried,) = kit.repo.claim_deliveries("s1", limit=5, now=seconds(62))
    assert (retried.job_id, retried.attempts) == (first, 2)


def test_destinations_do_not_wait_for_each_other(kit) -> None:
    first = kit.delivering(1, ("pacs", "viewer"))
    second = kit.delivering(2, ("pacs", "viewer"))
    claimed = kit.repo.claim_deliveries("s1", limit=10, now=seconds(1))
    assert sorted((d.job_id, d.destination) for d in claimed) == [
        (first, "pacs"),
        (first, "viewer"),
    ]
    by_destination = {d.destination: d for d in claimed}
    kit.repo.delivery_succeeded(by_destination["viewer"].id, "s1", now=seconds(2))
    (next_viewer,) = kit.repo.claim_deliveries("s1", limit=10, now=seconds(3))
    assert (next_viewer.job_id, next_viewer.destination) == (second, "viewer")


def test_a_failed_delivery_does_not_block_its_destination(kit) -> None:
    kit.delivering(1)
    second = kit.delivering(2)
    one_shot = RetryPolicy(max_attempts=1, base_delay_s=1, max_delay_s=1)
    (claimed,) = kit.repo.claim_deliveries("s1", now=seconds(1))
    failed = kit.repo.delivery_failed(
        claimed.id, "s1", "association rejected", one_shot, seconds(2)
    )
    assert failed.state is DeliveryState.FAILED
    (following,) = kit.repo.claim_deliveries("s1", now=seconds(3))
    assert following.job_id == second


def test_job_is_done_only_when_every_delivery_is_done(kit) -> None:
    job_id = kit.delivering(1, ("pacs", "viewer"))
    pacs, viewer = sorted(
        kit.repo.claim_deliveries("s1", limit=5, now=seconds(1)), key=lambda d: d.destination
    )
    kit.repo.delivery_succeeded(pacs.id, "s1", now=seconds(2))
    job = kit.repo.get_job(job_id)
    assert job is not None and job.state is JobState.DELIVERING
    kit.repo.delivery_succeeded(viewer.id, "s1", now=seconds(3))
    job = kit.repo.get_job(job_id)
    assert job is not None and job.state is JobState.DONE
    assert transitions(kit.repo, job_id)[-3:] == [
        ("sending", "done", pacs.destination),
        ("sending", "done", viewer.destination),
        ("delivering", "done", None),
    ]


def test_job_fails_with_the_reason_when_a_delivery_gives_up(kit) -> None:
    job_id = kit.delivering(1, ("pacs", "viewer"))
    one_shot = RetryPolicy(max_attempts=1, base_delay_s=1, max_delay_s=1)
    claimed = {d.destination: d for d in kit.repo.claim_deliveries("s1", limit=5, now=seconds(1))}
    kit.repo.delivery_failed(claimed["pacs"].id, "s1", "status 0xA700", one_shot, seconds(2))
    job = kit.repo.get_job(job_id)
    assert job is not None and job.state is JobState.DELIVERING
    kit.repo.delivery_succeeded(claimed["viewer"].id, "s1", now=seconds(3))
    job = kit.repo.get_job(job_id)
    assert job is not None and job.state is JobState.FAILED
    assert job.last_error == "delivery to pacs failed after 1 attempts: status 0xA700"
    last = kit.repo.events(job_id)[-1]
    assert (last.from_state, last.to_state) == ("delivering", "failed")
    assert "status 0xA700" in last.detail


def test_delivery_backs_off_then_gives_up_and_fails_the_job(kit) -> None:
    job_id = kit.delivering(1)
    moments = [seconds(1), seconds(61 + 1), seconds(62 + 120 + 1)]
    for attempt, moment in enumerate(moments, start=1):
        (delivery,) = kit.repo.claim_deliveries("s1", now=moment)
        assert delivery.attempts == attempt
        after = kit.repo.delivery_failed(delivery.id, "s1", f"timeout {attempt}", POLICY, moment)
    assert after.state is DeliveryState.FAILED
    job = kit.repo.get_job(job_id)
    assert job is not None and job.state is JobState.FAILED
    assert job.last_error is not None and "timeout 3" in job.last_error
    assert kit.repo.claim_deliveries("s1", now=seconds(100_000)) == []


def test_delivery_transitions_check_state_and_claimer(kit) -> None:
    kit.delivering(1)
    (delivery,) = kit.repo.claim_deliveries("s1", now=seconds(1))
    with pytest.raises(StaleTransition, match=f"delivery {delivery.id}: cannot succeed"):
        kit.repo.delivery_succeeded(delivery.id, "other", now=seconds(2))
    with pytest.raises(StaleTransition, match="cannot heartbeat"):
        kit.repo.heartbeat_delivery(delivery.id, "other", now=seconds(2))
    kit.repo.heartbeat_delivery(delivery.id, "s1", now=seconds(2))
    (stored,) = [d for d in kit.repo.deliveries(delivery.job_id) if d.id == delivery.id]
    assert stored is not None and stored.heartbeat_at == seconds(2)
    kit.repo.delivery_succeeded(delivery.id, "s1", now=seconds(3))
    with pytest.raises(StaleTransition, match="expected state 'sending'"):
        kit.repo.delivery_failed(delivery.id, "s1", "late", POLICY, seconds(4))
    with pytest.raises(StaleTransition, match="no such delivery"):
        kit.repo.delivery_succeeded(9999, "s1")


# --- expired claims -----------------------------------------------------------------------


def test_requeue_stale_takes_back_expired_claims_only(kit) -> None:
    stale = kit.processing(1, now=T0)
    fresh_id = kit.enqueued(2, now=T0)
    (fresh,) = kit.repo.claim_jobs("w2", now=seconds(100))
    assert fresh.id == fresh_id
    count = kit.repo.requeue_stale(stale_before=seconds(50), now=seconds(120))
    assert count == 1
    requeued = kit.repo.get_job(stale.id)
    assert requeued is not None
    assert (requeued.state, requeued.claimed_by, requeued.next_attempt_at) == (
        JobState.RECEIVED,
        None,
        seconds(120),
    )
    last = kit.repo.events(stale.id)[-1]
    assert (last.from_state, last.to_state, last.actor) == ("processing", "received", "scheduler")
    assert "claim expired" in last.detail
    still = kit.repo.get_job(fresh.id)
    assert still is not None and still.state is JobState.PROCESSING
    with pytest.raises(StaleTransition):
        kit.repo.finish_processing(stale.id, "w1", kit.finding(1), [])


def test_requeue_stale_takes_back_expired_deliveries(kit) -> None:
    job_id = kit.delivering(1)
    (delivery,) = kit.repo.claim_deliveries("s1", now=seconds(1))
    assert kit.repo.requeue_stale(stale_before=seconds(1), now=seconds(2)) == 0
    assert kit.repo.requeue_stale(stale_before=seconds(60), now=seconds(61)) == 1
    (stored,) = [d for d in kit.repo.deliveries(delivery.job_id) if d.id == delivery.id]
    assert stored is not None
    assert (stored.state, stored.claimed_by, stored.next_attempt_at) == (
        DeliveryState.PENDING,
        None,
        seconds(61),
    )
    last = kit.repo.events(job_id)[-1]
    assert (last.from_state, last.to_state, last.destination) == ("sending", "pending", "pacs")
    assert "claim expired" in last.detail
    (again,) = kit.repo.claim_deliveries("s2", now=seconds(61))
    assert (again.id, again.attempts) == (delivery.id, 2)


def test_requeue_stale_with_a_policy_fails_work_that_keeps_dying(kit) -> None:
    one_shot = RetryPolicy(max_attempts=1, base_delay_s=1, max_delay_s=1)
    job = kit.processing(1)
    assert kit.repo.requeue_stale(seconds(60), now=seconds(61), policy=one_shot) == 1
    stored = kit.repo.get_job(job.id)
    assert stored is not None and stored.state is JobState.FAILED
    assert stored.last_error is not None and "claim expired" in stored.last_error


# --- operator retry -----------------------------------------------------------------------


def test_retry_of_a_job_that_failed_processing_starts_it_afresh(kit) -> None:
    one_shot = RetryPolicy(max_attempts=1, base_delay_s=1, max_delay_s=1)
    job = kit.processing(1)
    uids = kit.repo.reserve_result_uids(job.id, kit.uids(1), now=T0)
    kit.repo.fail_job(job.id, "w1", "model missing", one_shot, now=seconds(1))
    retried = kit.repo.retry(job.id, now=seconds(500))
    assert (retried.state, retried.attempts, retried.next_attempt_at) == (
        JobState.RECEIVED,
        0,
        seconds(500),
    )
    assert retried.result_uids == uids
    last = kit.repo.events(job.id)[-1]
    assert (last.from_state, last.to_state, last.actor) == ("failed", "received", "operator")
    (claimed,) = kit.repo.claim_jobs("w1", now=seconds(500))
    assert (claimed.id, claimed.attempts) == (job.id, 1)


def test_retry_of_a_job_skipped_during_processing_reprocesses_it(kit) -> None:
    job = kit.processing(1)
    kit.repo.skip_job(job.id, "w1", "not a chest radiograph", now=seconds(1))
    retried = kit.repo.retry(job.id, now=seconds(2))
    assert (retried.state, retried.skip_reason) == (JobState.RECEIVED, None)


def test_retry_of_a_job_skipped_at_intake_is_refused(kit) -> None:
    new = kit.new_job(1, skip_reason="multi-frame", spool=False)
    job_id = kit.repo.enqueue(new, now=T0).job_id
    with pytest.raises(NotRetryable, match="no copy was kept; ask the sender"):
        kit.repo.retry(job_id)


def test_retry_after_failed_delivery_resends_without_reprocessing(kit) -> None:
    one_shot = RetryPolicy(max_attempts=1, base_delay_s=1, max_delay_s=1)
    job_id = kit.delivering(1, ("pacs", "viewer"))
    claimed = {d.destination: d for d in kit.repo.claim_deliveries("s1", limit=5, now=seconds(1))}
    kit.repo.delivery_failed(claimed["pacs"].id, "s1", "refused", one_shot, seconds(2))
    kit.repo.delivery_succeeded(claimed["viewer"].id, "s1", now=seconds(2))
    failed_job = kit.repo.get_job(job_id)
    assert failed_job is not None and failed_job.state is JobState.FAILED
    retried = kit.repo.retry(job_id, now=seconds(300))
    assert retried.state is JobState.DELIVERING
    assert retried.attempts == failed_job.attempts
    by_destination = {d.destination: d for d in kit.repo.deliveries(job_id)}
    assert (by_destination["pacs"].state, by_destination["pacs"].attempts) == (
        DeliveryState.PENDING,
        0,
    )
    assert by_destination["viewer"].state is DeliveryState.DONE
    assert kit.repo.claim_jobs("w1", now=seconds(300)) == []
    (resend,) = kit.repo.claim_deliveries("s1", limit=5, now=seconds(300))
    assert resend.destination == "pacs"
    kit.repo.delivery_succeeded(resend.id, "s1", now=seconds(301))
    done = kit.repo.get_job(job_id)
    assert done is not None and done.state is JobState.DONE
    assert ("failed", "pending", "pacs") in transitions(kit.repo, job_id)
    assert ("failed", "delivering", None) in transitions(kit.repo, job_id)


def test_retry_of_a_delivering_job_requeues_only_its_failed_deliveries(kit) -> None:
    one_shot = RetryPolicy(max_attempts=1, base_delay_s=1, max_delay_s=1)
    job_id = kit.delivering(1, ("pacs", "viewer"))
    claimed = {d.destination: d for d in kit.repo.claim_deliveries("s1", limit=5, now=seconds(1))}
    kit.repo.delivery_failed(claimed["pacs"].id, "s1", "refused", one_shot, seconds(2))
    retried = kit.repo.retry(job_id, now=seconds(3))
    assert retried.state is JobState.DELIVERING
    by_destination = {d.destination: d for d in kit.repo.deliveries(job_id)}
    assert by_destination["pacs"].state is DeliveryState.PENDING
    assert by_destination["viewer"].state is DeliveryState.SENDING


@pytest.mark.parametrize("state", ["received", "processing", "done"])
def test_retry_refuses_jobs_with_nothing_to_retry(kit, state: str) -> None:
    if state == "received":
        job_id = kit.enqueued(1)
    elif state == "processing":
        job_id = kit.processing(1).id
    else:
        job_id = kit.processing(1).id
        kit.repo.reserve_result_uids(job_id, kit.uids(1))
        kit.repo.finish_processing(job_id, "w1", kit.finding(1), [])
    with pytest.raises(NotRetryable, match=f"got {state}"):
        kit.repo.retry(job_id)
    with pytest.raises(JobNotFound, match="job 9999"):
        kit.repo.retry(9999)


# --- queries ------------------------------------------------------------------------------


def test_lookups_listing_and_counts(kit) -> None:
    ids = [kit.enqueued(n, now=seconds(n)) for n in range(1, 4)]
    kit.repo.claim_jobs("w1", now=seconds(10))
    assert kit.repo.get_job(9999) is None
    found = kit.repo.find_job("1.2.826.0.1.3680043.10.99.2")
    assert found is not None and found.id == ids[1]
    assert kit.repo.find_job("1.2.3.4.5") is None
    assert [j.id for j in kit.repo.list_jobs()] == ids[::-1]
    assert [j.id for j in kit.repo.list_jobs(limit=2)] == ids[:0:-1]
    assert [j.id for j in kit.repo.list_jobs(state="processing")] == [ids[0]]
    with pytest.raises(ValueError, match="job state must be one of"):
        kit.repo.list_jobs(state="bogus")
    assert kit.repo.counts_by_state() == {
        "received": 2,
        "processing": 1,
        "delivering": 0,
        "done": 0,
        "skipped": 0,
        "failed": 0,
    }


def test_next_due_reports_the_earliest_claimable_time(kit) -> None:
    assert kit.repo.next_due(now=T0) is None
    kit.enqueued(1, now=seconds(40))
    kit.enqueued(2, now=seconds(20))
    assert kit.repo.next_due(now=T0) == seconds(20)
    assert kit.repo.next_due(now=seconds(30)) == seconds(30)
    assert kit.repo.next_due(now=T0, jobs=False) is None


def test_events_and_deliveries_are_removed_with_their_job(kit, engine) -> None:
    job_id = kit.delivering(1)
    with read_transaction(engine) as conn:
        assert conn.execute(select(func.count()).select_from(JobEvent)).scalar_one() > 0
        assert conn.execute(select(func.count()).select_from(Delivery)).scalar_one() == 1
    with write_transaction(engine) as conn:
        conn.execute(delete(Job).where(Job.id == job_id))
    with read_transaction(engine) as conn:
        assert conn.execute(select(func.count()).select_from(JobEvent)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(Delivery)).scalar_one() == 0
