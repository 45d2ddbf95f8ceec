"""Inference worker: claims jobs, decodes, predicts, writes SEG + overlay, queues deliveries."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, TypeVar

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid
from sqlalchemy.exc import SQLAlchemyError

from pneumonode.claims import HeldClaims
from pneumonode.datafolder import PARTIAL_SUFFIX, fsync_path, result_path, write_whole
from pneumonode.dicom.instance import read_instance
from pneumonode.dicom.pixels import DecodedImage, PixelError, decode
from pneumonode.findings import Finding
from pneumonode.observer import NodeObserver, NullObserver
from pneumonode.outputs.overlay import build_overlay
from pneumonode.outputs.seg import build_segmentation
from pneumonode.outputs.sr import build_report
from pneumonode.queue.jobs import JobTransitions
from pneumonode.queue.records import (
    FindingRecord,
    FinishedJob,
    JobView,
    QueueError,
    ResultUIDs,
    StaleTransition,
)
from pneumonode.results import ResultKind
from pneumonode.routing import delivery_targets
from pneumonode.settings import Settings

if TYPE_CHECKING:  # the serving process of a node with worker processes never loads Keras
    from pneumonode.inference.predictor import Predictor

LOGGER = logging.getLogger(__name__)

_T = TypeVar("_T")


def _write_results(data_dir: Path, files: dict[PurePosixPath, Dataset]) -> None:
    """Write one job's result objects so that each is whole or absent after a power cut.

    Each is written to a partial file, fsynced and renamed (:func:`write_whole`); their folder
    is then fsynced once for all of them, before the job records their paths.
    """
    folders = set()
    for relative, ds in files.items():
        path = data_dir / relative
        write_whole(
            path,
            lambda partial, ds=ds: ds.save_as(partial, enforce_file_format=True),  # type: ignore[misc]
            path.with_name(path.name + PARTIAL_SUFFIX),
        )
        folders.add(path.parent)
    for folder in folders:
        fsync_path(folder, directory=True)


_SC_SYNTAX = {"none": ExplicitVRLittleEndian, "jpeg-ls": JPEGLSLossless}
"""The SC's transfer syntax for each ``output.sc_compression``."""


def _relative(paths: dict[ResultKind, PurePosixPath], kind: ResultKind) -> str | None:
    return str(paths[kind]) if kind in paths else None


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
        repository: JobTransitions,
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
        self._policy = settings.worker.retry_policy()
        self._claims = HeldClaims(lambda job_id: self._repo.heartbeat_job(job_id, self.worker_id))
        self._lock = threading.Lock()
        self._busy_since: float | None = None
        #: Inference threads left running after a timeout (they cannot be killed).
        self.abandoned_inferences = 0

    def reload(self, settings: Settings) -> None:
        """Use these settings (new destinations and peers) for the jobs finished from now on."""
        with self._lock:
            self._settings = settings

    def wake(self) -> None:
        """Stop waiting for new jobs now (used when stopping)."""
        self._wake.set()

    def beat(self) -> None:
        """Refresh the heartbeat of every job this worker holds (see :class:`HeldClaims`)."""
        self._claims.beat()

    def _release(self, job_id: int) -> None:
        self._claims.release(job_id)

    def run(self, stop: threading.Event) -> None:
        """Process jobs until ``stop`` is set; the job batch in hand is always finished.

        Nothing a job does ends this loop: an unexpected error while claiming is logged and
        retried after ``worker.poll_s``; one while processing a batch fails the jobs of that
        batch still in hand (each with the error, within its retry budget) and the loop goes on.
        """
        while not stop.is_set():
            try:
                jobs = self.claim_batch()
            except Exception:  # database trouble: the loop must outlive it
                LOGGER.exception("worker %s: cannot claim jobs; trying again", self.worker_id)
                self._observer.worker_error("claim")
                stop.wait(self._settings.worker.poll_s)
                continue
            if not jobs:
                self._wake.wait(self._settings.worker.poll_s)
                self._wake.clear()
                continue
            self._busy_since = time.monotonic()
            try:
                self.process(jobs)
            except Exception as exc:  # a failure no stage contained: fail the batch, go on
                LOGGER.exception(
                    "worker %s: unexpected error on jobs %s", self.worker_id, [j.id for j in jobs]
                )
                self._observer.worker_error("batch")
                for job in jobs:
                    self._fail(job, f"worker error: {type(exc).__name__}: {exc}", quiet=True)
            finally:
                self._busy_since = None

    def busy_for(self) -> float:
        """Seconds this worker has spent on its current batch (0 when idle)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def held_jobs(self) -> list[int]:
        """The ids of the jobs this worker holds now."""
        return self._claims.held()

    def abandon(self) -> None:
        """Stop heartbeating every claim: they expire and are retried within their budget.

        Called when this worker's thread died or wedged and a new worker replaces it.
        """
        self._claims.release(*self._claims.held())

    def claim_batch(self) -> list[JobView]:
        """Claim up to ``batch_size`` jobs, waiting briefly for more when only a few are ready."""
        cfg = self._settings.worker
        jobs = self._repo.claim_jobs(self.worker_id, limit=cfg.batch_size)
        # held (heartbeated) from the moment they are claimed: a claim left without heartbeat
        # while waiting for more jobs would expire and be requeued under the worker's feet
        self._claims.hold(*(j.id for j in jobs))
        if jobs and len(jobs) < cfg.batch_size and cfg.batch_wait_ms > 0:
            time.sleep(cfg.batch_wait_ms / 1000)
            more = self._repo.claim_jobs(self.worker_id, limit=cfg.batch_size - len(jobs))
            self._claims.hold(*(j.id for j in more))
            jobs += more
        return jobs

    def process(self, jobs: Sequence[JobView]) -> None:
        """Run claimed jobs through decode, inference, outputs and delivery queueing."""
        try:
            prepared = [p for p in (self._prepare(job) for job in jobs) if p is not None]
            self.process_prepared(prepared)
        finally:
            self._claims.release(*(j.id for j in jobs))

    def process_prepared(self, prepared: Sequence[_Prepared]) -> None:
        """Infer a batch of decoded images and finish each job.

        When the model fails on a batch of several images, each is analysed on its own, so
        that one image never fails the others.
        """
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
        except Exception as exc:  # the model failed on this batch
            if len(prepared) > 1:
                LOGGER.warning(
                    "inference failed for jobs %s (%s); analysing them one by one",
                    [p.job.id for p in prepared],
                    type(exc).__name__,
                )
                for p in prepared:
                    self.process_prepared([p])
                return
            LOGGER.exception("inference failed for job %d", prepared[0].job.id)
            self._fail(prepared[0].job, f"inference failed: {type(exc).__name__}: {exc}")
            return
        self._finish_batch(list(zip(prepared, findings, strict=True)))

    def _prepare(self, job: JobView) -> _Prepared | None:
        """Read and decode one job's image; a job that cannot be read never joins the batch."""
        if job.spool_path is None:
            self._fail(job, "job has no spool file")
            return None
        try:
            source = read_instance(self._data_dir / job.spool_path)
        except Exception as exc:  # the spool file is unreadable: this job fails, not the batch
            LOGGER.exception("job %d: cannot read its spool file", job.id)
            self._fail(job, f"cannot read spool file {job.spool_path}: {type(exc).__name__}: {exc}")
            return None
        try:
            image = decode(source, max_pixels=self._settings.worker.max_pixels)
        except PixelError as exc:
            self._skip(job, str(exc))
            return None
        except Exception as exc:  # an undecodable image is retried, then fails with the reason
            LOGGER.exception("job %d: decoding failed", job.id)
            self._fail(job, f"decoding failed: {type(exc).__name__}: {exc}")
            return None
        return _Prepared(job, source, image)

    def _skip(self, job: JobView, reason: str) -> None:
        try:
            self._repo.skip_job(job.id, self.worker_id, reason)
        except (QueueError, SQLAlchemyError) as exc:
            LOGGER.error("job %d: cannot record the skip (%s); its claim will expire", job.id, exc)
            return
        finally:
            self._release(job.id)
        self._observer.job_processed("skipped")
        LOGGER.info("job %d skipped: %s", job.id, reason)

    def _fail(self, job: JobView, error: str, *, quiet: bool = False) -> None:
        """Record a failed attempt; never raises (the claim then expires and is retried)."""
        try:
            after = self._repo.fail_job(job.id, self.worker_id, error, self._policy)
        except StaleTransition:
            if not quiet:
                LOGGER.warning("job %d: no longer held by %s; not failed", job.id, self.worker_id)
            self._release(job.id)
            return
        except (QueueError, SQLAlchemyError) as exc:
            LOGGER.error(
                "job %d: cannot record the failure (%s); its claim will expire", job.id, exc
            )
            self._release(job.id)
            return
        self._release(job.id)
        self._observer.job_processed("failed" if after.state == "failed" else "retry")
        LOGGER.warning(
            "job %d attempt %d failed (%s): now %s", job.id, job.attempts, error, after.state
        )

    def _finish_batch(self, results: Sequence[tuple[_Prepared, Finding]]) -> None:
        """Write every job's outputs and record them: one transaction for the batch's result
        UIDs, one for its findings and deliveries. A job that fails fails alone."""
        if not results:
            return
        proposed = {
            p.job.id: ResultUIDs(
                seg_series_uid=generate_uid(),
                seg_sop_uid=generate_uid(),
                sc_series_uid=generate_uid(),
                sc_sop_uid=generate_uid(),
                sr_series_uid=generate_uid(),
                sr_sop_uid=generate_uid(),
            )
            for p, _ in results
        }
        try:
            reserved = self._repo.reserve_result_uids_many(proposed, actor=self.worker_id)
        except (QueueError, SQLAlchemyError) as exc:
            LOGGER.error("jobs %s: cannot reserve result UIDs: %s", list(proposed), exc)
            for p, _ in results:
                self._fail(p.job, f"reserving result UIDs failed: {type(exc).__name__}: {exc}")
            return
        with self._lock:
            settings = self._settings
        finished: list[tuple[_Prepared, Finding, FinishedJob]] = []
        for p, finding in results:
            uids = reserved.get(p.job.id)
            if not isinstance(uids, ResultUIDs):
                LOGGER.error("job %d: cannot reserve result UIDs: %s", p.job.id, uids)
                self._fail(p.job, f"reserving result UIDs failed: {uids}")
                continue
            item = self._write_outputs(p, finding, uids, settings)
            if item is not None:
                finished.append((p, finding, item))
        if not finished:
            return
        try:
            outcomes = self._repo.finish_processing_many(
                [item for _, _, item in finished], self.worker_id
            )
        except (QueueError, SQLAlchemyError) as exc:
            LOGGER.error("jobs %s: cannot record their results: %s", [p.job.id for p, _, _ in
                                                                      finished], exc)
            for p, _, _ in finished:
                self._fail(p.job, f"recording results failed: {type(exc).__name__}: {exc}")
            return
        delivering = False
        for p, finding, item in finished:
            outcome = outcomes.get(p.job.id)
            if isinstance(outcome, StaleTransition):
                LOGGER.warning(
                    "job %d: no longer held by %s; its results are not recorded",
                    p.job.id,
                    self.worker_id,
                )
                self._release(p.job.id)
                continue
            if outcome is not None:
                LOGGER.error("job %d: cannot record its results: %s", p.job.id, outcome)
                self._fail(p.job, f"recording results failed: {outcome}")
                continue
            self._release(p.job.id)
            self._observer.job_processed("processed")
            delivering = delivering or bool(item.targets)
            LOGGER.info(
                "job %d processed: pneumothorax %s (score %.3f), %d deliveries",
                p.job.id,
                "present" if finding.present else "absent",
                finding.score,
                len(item.targets),
            )
        if delivering and self._on_delivering is not None:
            self._on_delivering()

    def _write_outputs(
        self, p: _Prepared, finding: Finding, uids: ResultUIDs, settings: Settings
    ) -> FinishedJob | None:
        """Build and write one job's results; on failure the job fails (None is returned)."""
        job = p.job
        card = self._predictor.card
        made = settings.output.kinds()
        paths: dict[ResultKind, PurePosixPath] = {}
        try:
            objects: dict[ResultKind, Dataset] = {}
            seg = None
            if ResultKind.SEG in made:
                seg = objects[ResultKind.SEG] = build_segmentation(
                    p.source,
                    finding,
                    card,
                    series_instance_uid=uids.seg_series_uid,
                    sop_instance_uid=uids.seg_sop_uid,
                )
            if ResultKind.SC in made:
                objects[ResultKind.SC] = build_overlay(
                    p.source,
                    p.image,
                    finding,
                    card,
                    series_instance_uid=uids.sc_series_uid,
                    sop_instance_uid=uids.sc_sop_uid,
                    transfer_syntax_uid=_SC_SYNTAX[settings.output.sc_compression],
                )
            if ResultKind.SR in made:
                assert seg is not None, "settings: output.sr needs output.seg"
                objects[ResultKind.SR] = build_report(
                    p.source,
                    finding,
                    card,
                    seg,
                    series_instance_uid=uids.sr_series_uid,
                    sop_instance_uid=uids.sr_sop_uid,
                )
            for kind in objects:
                paths[kind] = result_path(job.id, kind)
            _write_results(self._data_dir, {paths[kind]: ds for kind, ds in objects.items()})
        except Exception as exc:  # output building or writing failed: retry the job
            LOGGER.exception("job %d: writing results failed", job.id)
            self._fail(job, f"writing results failed: {type(exc).__name__}: {exc}")
            return None
        record = FindingRecord(
            present=finding.present,
            score=finding.score,
            area_mm2=finding.area_mm2,
            model_uid=card.uid,
            seg_path=_relative(paths, ResultKind.SEG),
            sc_path=_relative(paths, ResultKind.SC),
            sr_path=_relative(paths, ResultKind.SR),
        )
        targets = delivery_targets(
            settings, job.calling_aet, positive=finding.present, made=tuple(paths)
        )
        return FinishedJob(job.id, record, tuple(targets))
