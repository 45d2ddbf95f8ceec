"""Operator resend, routed deliveries, SR result UIDs, errors cleared once a delivery succeeds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pneumonode.queue.models import DeliveryState, JobState
from pneumonode.queue.records import DeliveryTarget, NotRetryable
from pneumonode.queue.retry import RetryPolicy
from pneumonode.results import ResultKind

T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
Kit = Any  # the queue suite's conftest fixture (tests/queue/conftest.py)


def seconds(n: float) -> datetime:
    return T0 + timedelta(seconds=n)


def test_a_done_job_is_resent_with_the_same_results_to_a_new_destination(kit: Kit) -> None:
    job_id = kit.delivering(1, ("pacs",))
    (delivery,) = kit.repo.claim_deliveries("s1", now=seconds(1))
    kit.repo.delivery_succeeded(delivery.id, "s1", now=seconds(2))
    before = kit.repo.get_job(job_id)
    assert before is not None and before.state is JobState.DONE
    worklist = DeliveryTarget("worklist", "WORKLIST", "127.0.0.1", 11114, (ResultKind.SR,))
    after = kit.repo.resend(job_id, [kit.target("pacs"), worklist], now=seconds(10))
    assert after.state is JobState.DELIVERING and after.result_uids == before.result_uids
    deliveries = {d.destination: d for d in kit.repo.deliveries(job_id)}
    assert {n: (d.state, d.attempts) for n, d in deliveries.items()} == {
        "pacs": (DeliveryState.PENDING, 0),
        "worklist": (DeliveryState.PENDING, 0),
    }
    assert deliveries["worklist"].kinds == (ResultKind.SR,)
    assert deliveries["pacs"].kinds == (ResultKind.SEG, ResultKind.SC)
    details = [e.detail for e in kit.repo.events(job_id)]
    assert "resend SR to WORKLIST@127.0.0.1:11114" in details


def test_resend_needs_results_and_refuses_a_delivery_being_sent(kit: Kit) -> None:
    sent = kit.delivering(2, ("pacs",))
    job_id = kit.enqueued(1)
    with pytest.raises(NotRetryable, match="resend needs results"):
        kit.repo.resend(job_id, [kit.target("pacs")])
    kit.repo.claim_deliveries("s1", now=seconds(1))
    with pytest.raises(NotRetryable, match="being sent now"):
        kit.repo.resend(sent, [kit.target("pacs")])
    with pytest.raises(NotRetryable, match="distinct destinations"):
        kit.repo.resend(sent, [])


def test_an_old_error_is_cleared_once_the_delivery_succeeds(kit: Kit) -> None:
    policy = RetryPolicy(max_attempts=1, base_delay_s=1, max_delay_s=1)
    job_id = kit.delivering(1, ("pacs",))
    (delivery,) = kit.repo.claim_deliveries("s1", now=seconds(1))
    kit.repo.delivery_failed(delivery.id, "s1", "PACS down", policy, now=seconds(2))
    failed = kit.repo.get_job(job_id)
    assert failed is not None and failed.state is JobState.FAILED and failed.last_error
    kit.repo.retry(job_id, now=seconds(3))
    (again,) = kit.repo.claim_deliveries("s1", now=seconds(4))
    kit.repo.delivery_succeeded(again.id, "s1", now=seconds(5))
    done = kit.repo.get_job(job_id)
    assert done is not None and done.state is JobState.DONE and done.last_error is None
    (stored,) = kit.repo.deliveries(job_id)
    assert stored.state is DeliveryState.DONE and stored.last_error is None


def test_sr_uids_are_added_to_a_job_whose_seg_and_sc_uids_were_fixed_before(kit: Kit) -> None:
    job = kit.processing(1)
    first = kit.repo.reserve_result_uids(job.id, kit.uids(1))
    again = kit.repo.reserve_result_uids(job.id, kit.uids(1, generation=2))
    assert again == first and first.sr_sop_uid.endswith(".6")
