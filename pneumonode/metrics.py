"""Prometheus metrics of one node: counters and histograms it observes, queue gauges from the DB."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from sqlalchemy.exc import SQLAlchemyError

from pneumonode.queue.reads import QueueReads

LOGGER = logging.getLogger(__name__)

INFERENCE_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Histogram buckets (seconds) for the model call."""

END_TO_END_BUCKETS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
"""Histogram buckets (seconds) from an image's receipt to its results at a destination."""


class QueueCollector:
    """Gauges read from the job database at each scrape: jobs and deliveries by state, depth.

    With several nodes on one database every node reports the same, global values.
    """

    def __init__(self, repository: QueueReads) -> None:
        self._repository = repository

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: the registry must not query the database at registration."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Query the database; when it cannot be read, only ``pneumonode_database_up 0``."""
        up = GaugeMetricFamily(
            "pneumonode_database_up", "1 when the job database answered this scrape, else 0"
        )
        try:
            jobs = self._repository.counts_by_state()
            deliveries = self._repository.delivery_counts_by_state()
            oldest = self._repository.oldest_unfinished_received_at()
        except SQLAlchemyError as exc:
            LOGGER.warning("metrics: job database unreachable: %s", type(exc).__name__)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        by_state = GaugeMetricFamily(
            "pneumonode_jobs", "Jobs in the database by state", labels=["state"]
        )
        for state, count in sorted(jobs.items()):
            by_state.add_metric([state], float(count))
        yield by_state
        delivery_states = GaugeMetricFamily(
            "pneumonode_deliveries", "Deliveries in the database by state", labels=["state"]
        )
        for state, count in sorted(deliveries.items()):
            delivery_states.add_metric([state], float(count))
        yield delivery_states
        depth = GaugeMetricFamily(
            "pneumonode_queue_depth",
            "Work waiting: jobs received and not yet claimed (queue=jobs), deliveries pending "
            "(queue=deliveries)",
            labels=["queue"],
        )
        depth.add_metric(["jobs"], float(jobs.get("received", 0)))
        depth.add_metric(["deliveries"], float(deliveries.get("pending", 0)))
        yield depth
        age = GaugeMetricFamily(
            "pneumonode_oldest_unfinished_job_age_seconds",
            "Age of the oldest job not yet done, skipped or failed (0 when there is none)",
        )
        seconds = 0.0 if oldest is None else (datetime.now(UTC) - oldest).total_seconds()
        age.add_metric([], max(0.0, seconds))
        yield age


class NodeMetrics:
    """The node's Prometheus metrics in a registry it owns; also its :class:`NodeObserver`.

    Parameters
    ----------
    repository:
        The job repository, read at each scrape for the queue gauges and used to find when a
        delivered job was received (end-to-end latency).
    """

    def __init__(self, repository: QueueReads) -> None:
        self._repository = repository
        self.registry = CollectorRegistry()
        self.images_received = Counter(
            "pneumonode_images_received",
            "C-STORE requests answered, by what intake did with the image",
            ["outcome"],
            registry=self.registry,
        )
        self.jobs_processed = Counter(
            "pneumonode_jobs_processed",
            "Processing attempts ended by this node: processed (results written), skipped, "
            "retry (failed, will be retried), failed (gave up)",
            ["outcome"],
            registry=self.registry,
        )
        self.results_delivered = Counter(
            "pneumonode_results_delivered",
            "Jobs whose results (SEG + overlay) a destination accepted",
            ["destination"],
            registry=self.registry,
        )
        self.delivery_failures = Counter(
            "pneumonode_delivery_failures",
            "Failed sends to a destination; final=true when no retry is left",
            ["destination", "final"],
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "pneumonode_inference_seconds",
            "Model call time seen by each image (its batch's duration, once per image)",
            buckets=INFERENCE_BUCKETS_S,
            registry=self.registry,
        )
        self.end_to_end_seconds = Histogram(
            "pneumonode_end_to_end_seconds",
            "From an image's receipt to its results accepted by a destination",
            buckets=END_TO_END_BUCKETS_S,
            registry=self.registry,
        )
        self.retention_purged = Counter(
            "pneumonode_retention_purged",
            "Finished jobs (what=jobs) and files (what=files) removed after the retention period",
            ["what"],
            registry=self.registry,
        )
        self.worker_errors = Counter(
            "pneumonode_worker_errors",
            "Unexpected errors a worker caught and survived, by stage (claim, batch)",
            ["stage"],
            registry=self.registry,
        )
        self.workers_replaced = Counter(
            "pneumonode_workers_replaced",
            "Worker threads replaced because they died or wedged",
            ["reason"],
            registry=self.registry,
        )
        for stage in ("claim", "batch"):
            self.worker_errors.labels(stage)
        for reason in ("died", "wedged"):
            self.workers_replaced.labels(reason)
        for outcome in ("queued", "skipped", "duplicate", "refused", "error"):
            self.images_received.labels(outcome)
        for outcome in ("processed", "skipped", "retry", "failed"):
            self.jobs_processed.labels(outcome)
        for what in ("jobs", "files"):
            self.retention_purged.labels(what)
        self.registry.register(QueueCollector(repository))

    def image_received(self, outcome: str) -> None:
        """Count one answered C-STORE."""
        self.images_received.labels(outcome).inc()

    def inference_done(self, images: int, seconds: float) -> None:
        """Record one model call over ``images`` images."""
        for _ in range(images):
            self.inference_seconds.observe(seconds)

    def job_processed(self, outcome: str) -> None:
        """Count one processing outcome."""
        self.jobs_processed.labels(outcome).inc()

    def delivered(self, destination: str, job_id: int) -> None:
        """Count a delivery and record the job's end-to-end latency."""
        self.results_delivered.labels(destination).inc()
        try:
            job = self._repository.get_job(job_id)
        except SQLAlchemyError as exc:
            LOGGER.warning("metrics: cannot read job %d for its latency: %s", job_id, exc)
            return
        if job is not None:
            latency = (datetime.now(UTC) - job.received_at).total_seconds()
            self.end_to_end_seconds.observe(max(0.0, latency))

    def delivery_failed(self, destination: str, final: bool) -> None:
        """Count a failed send."""
        self.delivery_failures.labels(destination, "true" if final else "false").inc()

    def worker_error(self, stage: str) -> None:
        """Count an error a worker survived."""
        self.worker_errors.labels(stage).inc()

    def worker_replaced(self, reason: str) -> None:
        """Count a replaced worker thread."""
        self.workers_replaced.labels(reason).inc()

    def purged(self, jobs: int, files: int) -> None:
        """Count what a retention run removed."""
        self.retention_purged.labels("jobs").inc(jobs)
        self.retention_purged.labels("files").inc(files)
