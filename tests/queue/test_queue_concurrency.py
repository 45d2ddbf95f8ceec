"""Tests that concurrent workers never share a claim or create a job twice, on both databases."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from pneumonode.queue.models import JobState

T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
"""The kit fixture's default 'now'."""

THREADS = 4


def run_threads(target: Callable[[int], None], count: int = THREADS) -> None:
    """Run ``target(index)`` in ``count`` threads and re-raise the first error any of them hit."""
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            target(index)
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a worker thread hung"
    if errors:
        raise errors[0]


def test_each_of_200_jobs_is_claimed_exactly_once(kit) -> None:
    ids = {kit.enqueued(n) for n in range(200)}
    claims: list[list[int]] = [[] for _ in range(THREADS)]
    start = threading.Barrier(THREADS)

    def worker(index: int) -> None:
        start.wait()
        while batch := kit.repo.claim_jobs(f"host:1:{index}", limit=3, now=T0):
            claims[index].extend(job.id for job in batch)
            time.sleep(0.001)  # as a worker does between batches: the others get their turn

    run_threads(worker)
    everything = [job_id for batch in claims for job_id in batch]
    assert Counter(everything).most_common(1)[0][1] == 1
    assert set(everything) == ids
    assert kit.repo.counts_by_state()["processing"] == 200
    assert sum(1 for batch in claims if batch) >= 2, "the claims were not concurrent"
    for job in kit.repo.list_jobs(limit=200):
        assert job.attempts == 1
        assert job.claimed_by is not None and job.id in claims[int(job.claimed_by.split(":")[2])]


def test_concurrent_enqueues_of_one_uid_make_one_job(kit) -> None:
    rounds = 15
    results: dict[int, list[tuple[int, bool]]] = defaultdict(list)
    lock = threading.Lock()
    barriers = [threading.Barrier(2) for _ in range(rounds)]

    def sender(index: int) -> None:
        for n in range(rounds):
            barriers[n].wait()
            result = kit.repo.enqueue(kit.new_job(n), now=T0)
            with lock:
                results[n].append((result.job_id, result.created))

    run_threads(sender, count=2)
    for n in range(rounds):
        (first_id, first_created), (second_id, second_created) = results[n]
        assert first_id == second_id
        assert sorted([first_created, second_created]) == [False, True]
        assert len(kit.repo.events(first_id)) == 1
    assert kit.repo.counts_by_state()["received"] == rounds


def test_concurrent_senders_keep_each_destination_serial_and_ordered(kit) -> None:
    destinations = ("pacs", "viewer", "archive")
    job_ids = [kit.delivering(n, destinations) for n in range(20)]
    claim_order: dict[str, list[int]] = defaultdict(list)
    in_flight: set[str] = set()
    overlaps: list[str] = []
    lock = threading.Lock()
    now = T0 + timedelta(seconds=1)

    def sender(index: int) -> None:
        worker = f"host:2:{index}"
        idle = 0
        while idle < 50:
            batch = kit.repo.claim_deliveries(worker, limit=2, now=now)
            if not batch:
                idle += 1
                if kit.repo.counts_by_state()["delivering"] == 0:
                    return
                continue
            idle = 0
            with lock:
                for delivery in batch:
                    if delivery.destination in in_flight:
                        overlaps.append(delivery.destination)
                    in_flight.add(delivery.destination)
                    claim_order[delivery.destination].append(delivery.job_id)
            for delivery in batch:
                with lock:
                    in_flight.discard(delivery.destination)
                kit.repo.delivery_succeeded(delivery.id, worker, now=now)

    run_threads(sender)
    assert overlaps == []
    for destination in destinations:
        assert claim_order[destination] == job_ids
    assert kit.repo.counts_by_state()["done"] == len(job_ids)
    assert kit.repo.delivery_counts_by_state()["done"] == len(job_ids) * len(destinations)
    assert all(
        kit.repo.get_job(job_id).state is JobState.DONE  # type: ignore[union-attr]
        for job_id in job_ids
    )
