"""Limits: associations, PDU size, instance size, free disk, pixel count and inference time."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import synthetic
from harness import free_port, storescu
from pynetdicom import AE

from pneumonode.dicom import pixels
from pneumonode.dicom.intake import Intake, Outcome, Status
from pneumonode.dicom.scp import MIB, VERIFICATION, DicomServer, InstanceLimits
from pneumonode.queue.db import create_schema, make_engine
from pneumonode.queue.repository import JobRepository
from pneumonode.settings import Settings
from pneumonode.worker import InferenceTimeout, Worker, run_with_time_limit


def _repo(tmp_path: Path) -> JobRepository:
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    create_schema(engine)
    return JobRepository(engine)


def _spooled(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "spool").rglob("*") if p.is_file()]


@pytest.fixture
def listener(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[int, JobRepository]]:
    port = free_port()
    node = {"port": port, "host": "127.0.0.1", "data_dir": tmp_path / "data", **request.param}
    repo = _repo(tmp_path)
    server = DicomServer(Settings(node=node), Intake(tmp_path / "data", repo))
    server.start()
    try:
        yield port, repo
    finally:
        server.shutdown()


def _associate(port: int, *contexts: str) -> Any:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for context in contexts or (VERIFICATION,):
        ae.add_requested_context(context)
    return ae.associate("127.0.0.1", port, ae_title="PNEUMONODE")


def _store(port: int, ds: pydicom.Dataset) -> int:
    assoc = _associate(port, str(ds.SOPClassUID))
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


@pytest.mark.parametrize("listener", [{"max_associations": 2}], indirect=True)
def test_association_beyond_max_associations_is_rejected(
    listener: tuple[int, JobRepository],
) -> None:
    port, _ = listener
    held = [_associate(port) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = _associate(port)
        assert third.is_rejected
        rsp = third.acceptor.primitive
        # rejected-transient, service provider (presentation), local limit exceeded
        assert (rsp.result, rsp.result_source, rsp.diagnostic) == (2, 3, 2)
    finally:
        for assoc in held:
            assoc.release()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        again = _associate(port)
        if again.is_established:
            again.release()
            return
        time.sleep(0.2)
    raise AssertionError("associations are accepted again once the held ones are released")


@pytest.mark.parametrize("listener", [{"max_pdu_length": 16384}], indirect=True)
def test_max_pdu_length_is_advertised_and_respected(
    tmp_path: Path, listener: tuple[int, JobRepository]
) -> None:
    port, repo = listener
    assoc = _associate(port)
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 16384
    assoc.release()
    big = synthetic.make_radiograph(rows=256, columns=256, seed=70)  # 128 KiB of pixels
    assert _store(port, big) == 0x0000
    other = synthetic.write(synthetic.make_radiograph(rows=256, columns=256, seed=71),
                            tmp_path / "big.dcm")
    out = storescu([other], port)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(repo.list_jobs()) == 2


@pytest.mark.parametrize("listener", [{"max_instance_mb": 1}], indirect=True)
def test_instance_over_max_instance_mb_is_refused_before_spooling(
    tmp_path: Path, listener: tuple[int, JobRepository]
) -> None:
    port, repo = listener
    large = synthetic.make_radiograph(rows=760, columns=760, seed=72)  # 1.1 MiB of pixels
    assert _store(port, large) == Status.OUT_OF_RESOURCES
    assert repo.list_jobs() == [] and _spooled(tmp_path / "data") == []
    assert _store(port, synthetic.make_radiograph(rows=600, columns=600, seed=73)) == 0x0000
    assert len(repo.list_jobs()) == 1


def test_low_disk_space_is_refused_with_out_of_resources(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    free_mb = shutil.disk_usage(tmp_path / "data").free // MIB
    port = free_port()
    settings = Settings(node={"port": port, "host": "127.0.0.1", "data_dir": tmp_path / "data",
                              "min_free_disk_mb": free_mb + 1024})
    repo = _repo(tmp_path)
    server = DicomServer(settings, Intake(tmp_path / "data", repo))
    server.start()
    try:
        assert _store(port, synthetic.make_radiograph(rows=32, columns=32)) == 0xA700
    finally:
        server.shutdown()
    assert repo.list_jobs() == [] and _spooled(tmp_path / "data") == []
    limits = InstanceLimits(tmp_path / "data", max_instance_bytes=MIB, min_free_disk_bytes=0)
    assert limits.refusal(MIB) is None and "node.max_instance_mb" in str(limits.refusal(MIB + 1))
    watermark = InstanceLimits(tmp_path / "data", MIB, (free_mb + 1024) * MIB)
    assert "under node.min_free_disk_mb" in str(watermark.refusal(10))


class FakePredictor:
    """Stands in for the model: ``analyse`` blocks until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def analyse(self, images: Sequence[Any], spacings: Sequence[Any]) -> list[Any]:
        self.calls += 1
        self.release.wait(30)
        raise RuntimeError("a released fake predictor has no findings")


def _queued_worker(tmp_path: Path, ds: pydicom.Dataset, **worker: object) -> tuple[
        Worker, JobRepository, FakePredictor, int]:
    data_dir = tmp_path / "data"
    repo = _repo(tmp_path)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    result = Intake(data_dir, repo).receive(buffer.getvalue(), "MODALITY", None)
    assert result.outcome == Outcome.QUEUED and result.job_id is not None
    settings = Settings(node={"data_dir": data_dir}, worker={"max_attempts": 1, **worker})
    predictor = FakePredictor()
    worker_ = Worker(settings, repo, predictor, "test:w0", threading.Event())  # type: ignore[arg-type]
    return worker_, repo, predictor, result.job_id


def test_pixel_count_is_checked_before_any_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = synthetic.make_radiograph(rows=32, columns=32, seed=74)
    ds.Rows = ds.Columns = 20000  # header of 400 M pixels; 2 KiB of pixel data

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("pixel data must not be decoded")

    monkeypatch.setattr(pixels, "_decode_stored", never)
    worker, repo, predictor, job_id = _queued_worker(tmp_path, ds)
    worker.process(worker.claim_batch())
    job = repo.get_job(job_id)
    assert job is not None and job.state == "skipped"
    assert "Rows*Columns must not exceed 60000000" in str(job.skip_reason)
    assert predictor.calls == 0


def test_hung_inference_fails_the_job_with_a_clear_error(tmp_path: Path) -> None:
    ds = synthetic.make_radiograph(rows=32, columns=32, seed=75)
    worker, repo, predictor, job_id = _queued_worker(tmp_path, ds, inference_timeout_s=0.3)
    started = time.monotonic()
    try:
        worker.process(worker.claim_batch())
    finally:
        predictor.release.set()
    assert time.monotonic() - started < 5
    job = repo.get_job(job_id)
    assert job is not None and job.state == "failed"
    assert job.last_error == "inference exceeded worker.inference_timeout_s (0.3 s)"
    assert worker.abandoned_inferences == 1


def test_time_limit_passes_results_and_errors_through() -> None:
    assert run_with_time_limit(lambda: 42, 5, "t") == 42
    with pytest.raises(ZeroDivisionError):
        run_with_time_limit(lambda: 1 // 0, 5, "t")
    with pytest.raises(InferenceTimeout, match=r"inference_timeout_s \(0.05 s\)"):
        run_with_time_limit(lambda: time.sleep(1), 0.05, "t")
