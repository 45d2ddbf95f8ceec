"""Inference worker: claims jobs, decodes, predicts, writes SEG + overlay, queues deliveries."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

from pneumonode.claims import HeldClaims
from pneumonode.dicom.pixels import DecodedImage, PixelError, decode
from pneumonode.durable import fsync_path
from pneumonode.findings import Finding
from pneumonode.inference.predictor import Predictor
from pneumonode.observer import NodeObserver, NullObserver
from pneumonode.outputs.overlay import build_overlay
from pneumonode.outputs.seg import build_segmentation
from pneumonode.queue.repository import (
    DeliveryTarget,
    FindingRecord,
    JobRepository,
    JobView,
    ResultUIDs,
)
from pneumonode.queue.retry import RetryPolicy
from pneumonode.settings import Settings

LOGGER = logging.getLogger(__name__)

_T = TypeVar("_T")


def delivery_targets(settings: Settings, calling_aet: str) -> list[DeliveryTarget]:
    """Where a job's results go: every configured destination, plus the sender if asked."""
    targets = [
        DeliveryTarget(destination=d.name, ae_title=d.ae_title, host=d.host, port=d.port)
        for d in settings.destinations
    ]
    if settings.delivery.return_to_sender:
        peer = settings.peer(calling_aet)
        if peer is None:
            LOGGER.warning(
                "return_to_sender is on but calling AE %r has no [[peers]] entry", calling_aet
            )
        else:
            targets.append(
                DeliveryTarget(
                    destination=f"peer:{peer.ae_title}",
                    ae_title=peer.ae_title,
                    host=peer.host,
                    port=peer.port,
                )
            )
    return targets


def _write_durably(path: Path, ds: Dataset) -> None:
    """Write a DICOM file via a temporary name, fsync, rename: never a half-written result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    ds.save_as(tmp, enforce_file_format=True)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent, directory=True)


class InferenceTimeout(RuntimeError):
    """An inference ran longer than ``worker.inference_timeout_s``."""


def run_with_time_limit(call: Callable[[], _T], limit_s: float, name: str) -> _T:
    """Return ``call()``, or raise :class:`InferenceTimeout` once it has run ``limit_s`` seconds.

    The call runs in a new daemon thread. A Python thread cannot be killed, so after a timeout
    that thread is left to finish (or hang) on its own and its result is dropped; being a daemon
    it never holds up the process exit. The worker that called counts it and carries on.

    Parameters
    ----------
    call:
        What to run (the batch inference).
    limit_s:
        Seconds to wait for it.
    name:
        Name of the thread, for logs and stack dumps.

    Returns
    -------
    object
        What ``call`` returned; an exception it raised is raised here.
    """
    outcome: Future[_T] = Future()

    def target() -> None:
        if not outcome.set_running_or_notify_cancel():
            return
        try:
            outcome.set_result(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which decides
            outcome.set_exception(exc)

    threading.Thread(target=target, name=name, daemon=True).start()
    try:
        return outcome.result(timeout=limit_s)
    except FutureTimeout:
        raise InferenceTimeout(
            f"inference exceeded worker.inference_timeout_s ({limit_s:g} s)"
        ) from None


@dataclass
class _Prepared:
    job: JobView
    source: Dataset
    image: DecodedImage


class Worker:
    """One inference thread. Several may run; each claims its own jobs.

    Parameters
    ----------
    settings, repository, predictor:
        The node's configuration, job repository and loaded model.
    worker_id:
        Unique name of this worker (host:pid:name), recorded on claims.
    wake:
        Set by intake when a job is queued.
    on_delivering:
        Called after a job's deliveries are queued, to wake the senders.
    observer:
        Told about each inference and each processing outcome (metrics).
    """

    def __init__(
        self,
        settings: Settings,
        repository: JobRepository,
        predictor: Predictor,
        worker_id: str,
        wake: threading.Event,
        on_delivering: Callable[[], None] | None = None,
        observer: NodeObserver | None = None,
    ) -> None:
        self._settings = settings
        self._repo = repository
        self._predictor = predictor
        self.worker_id = worker_id
        self._wake = wake
        self._on_delivering = on_delivering
        self._observer: NodeObserver = observer or NullObserver()
        self._data_dir = settings.node.data_dir
        self._policy = RetryPolicy(
            max_attempts=settings.worker.max_attempts,
            base_delay_s=settings.worker.retry_base_delay_s,
            max_delay_s=settings.worker.retry_max_delay_s,
        )
        self._claims = HeldClaims(lambda job_id: self._repo.heartbeat_job(job_id, self.worker_id))
        self._lock = threading.Lock()
        #: Inference threads left running after a timeout (they cannot be killed).
        self.abandoned_inferences = 0

    def reload(self, settings: Settings) -> None:
        """Use these settings (new destinations and peers) for the jobs finished from now on."""
        with self._lock:
            self._settings = settings

    def beat(self) -> None:
        """Refresh the heartbeat of every job this worker holds (see :class:`HeldClaims`)."""
        self._claims.beat()

    def _release(self, job_id: int) -> None:
        self._claims.release(job_id)

    def run(self, stop: threading.Event) -> None:
        """Process jobs until ``stop`` is set; the job batch in hand is always finished."""
        while not stop.is_set():
            jobs = self.claim_batch()
            if not jobs:
                self._wake.wait(self._settings.worker.poll_s)
                self._wake.clear()
                continue
            self.process(jobs)

    def claim_batch(self) -> list[JobView]:
        """Claim up to ``batch_size`` jobs, waiting briefly for more when only a few are ready."""
        cfg = self._settings.worker
        jobs = self._repo.claim_jobs(self.worker_id, limit=cfg.batch_size)
        if jobs and len(jobs) < cfg.batch_size and cfg.batch_wait_ms > 0:
            time.sleep(cfg.batch_wait_ms / 1000)
            jobs += self._repo.claim_jobs(self.worker_id, limit=cfg.batch_size - len(jobs))
        self._claims.hold(*(j.id for j in jobs))
        return jobs

    def process(self, jobs: Sequence[JobView]) -> None:
        """Run claimed jobs through decode, inference, outputs and delivery queueing."""
        try:
            prepared = [p for p in (self._prepare(job) for job in jobs) if p is not None]
            if not prepared:
                return
            limit_s = self._settings.worker.inference_timeout_s
            try:
                started = time.monotonic()
                findings = run_with_time_limit(
                    lambda: self._predictor.analyse(
                        [p.image.image for p in prepared],
                        [p.image.pixel_spacing_mm for p in prepared],
                    ),
                    limit_s,
                    f"{self.worker_id}:inference",
                )
                self._observer.inference_done(len(prepared), time.monotonic() - started)
            except InferenceTimeout as exc:
                self.abandoned_inferences += 1
                LOGGER.error(
                    "jobs %s: %s; its thread cannot be stopped and is abandoned (%d so far); "
                    "the jobs will retry",
                    [p.job.id for p in prepared],
                    exc,
                    self.abandoned_inferences,
                )
                for p in prepared:
                    self._fail(p.job, str(exc))
                return
            except Exception as exc:  # the model failed: every job of the batch retries
                LOGGER.exception("inference failed for jobs %s", [p.job.id for p in prepared])
                for p in prepared:
                    self._fail(p.job, f"inference failed: {type(exc).__name__}: {exc}")
                return
            for p, finding in zip(prepared, findings, strict=True):
                self._finish(p, finding)
        finally:
            self._claims.release(*(j.id for j in jobs))

    def _prepare(self, job: JobView) -> _Prepared | None:
        if job.spool_path is None:
            self._fail(job, "job has no spool file")
            return None
        path = self._data_dir / job.spool_path
        try:
            source = dcmread(path)
        except (OSError, InvalidDicomError) as exc:
            self._fail(job, f"cannot read spool file {job.spool_path}: {exc}")
            return None
        try:
            image = decode(source, max_pixels=self._settings.worker.max_pixels)
        except PixelError as exc:
            LOGGER.info("job %d skipped: %s", job.id, exc)
            self._repo.skip_job(job.id, self.worker_id, str(exc))
            self._observer.job_processed("skipped")
            return None
        except Exception as exc:  # an undecodable image is retried, then fails with the reason
            LOGGER.exception("job %d: decoding failed", job.id)
            self._fail(job, f"decoding failed: {type(exc).__name__}: {exc}")
            return None
        return _Prepared(job, source, image)

    def _fail(self, job: JobView, error: str) -> None:
        after = self._repo.fail_job(job.id, self.worker_id, error, self._policy)
        self._release(job.id)
        self._observer.job_processed("failed" if after.state == "failed" else "retry")
        LOGGER.warning(
            "job %d attempt %d failed (%s): now %s", job.id, job.attempts, error, after.state
        )

    def _finish(self, p: _Prepared, finding: Finding) -> None:
        job = p.job
        card = self._predictor.card
        try:
            uids = self._repo.reserve_result_uids(
                job.id,
                ResultUIDs(
                    seg_series_uid=generate_uid(),
                    seg_sop_uid=generate_uid(),
                    sc_series_uid=generate_uid(),
                    sc_sop_uid=generate_uid(),
                ),
            )
            seg = build_segmentation(
                p.source,
                finding,
                card,
                series_instance_uid=uids.seg_series_uid,
                sop_instance_uid=uids.seg_sop_uid,
            )
            overlay = build_overlay(
                p.source,
                p.image,
                finding,
                card,
                series_instance_uid=uids.sc_series_uid,
                sop_instance_uid=uids.sc_sop_uid,
            )
            rel = Path("results") / f"{job.id:09d}"
            seg_rel, sc_rel = rel / "seg.dcm", rel / "overlay.dcm"
            _write_durably(self._data_dir / seg_rel, seg)
            _write_durably(self._data_dir / sc_rel, overlay)
        except Exception as exc:  # output building or writing failed: retry the job
            LOGGER.exception("job %d: writing results failed", job.id)
            self._fail(job, f"writing results failed: {type(exc).__name__}: {exc}")
            return
        record = FindingRecord(
            present=finding.present,
            score=finding.score,
            area_mm2=finding.area_mm2,
            model_uid=card.uid,
            seg_path=str(seg_rel),
            sc_path=str(sc_rel),
        )
        with self._lock:
            settings = self._settings
        targets = delivery_targets(settings, job.calling_aet)
        self._repo.finish_processing(job.id, self.worker_id, record, targets)
        self._release(job.id)
        self._observer.job_processed("processed")
        LOGGER.info(
            "job %d processed: pneumothorax %s (score %.3f), %d deliveries",
            job.id,
            "present" if finding.present else "absent",
            finding.score,
            len(targets),
        )
        if targets and self._on_delivering is not None:
            self._on_delivering()
