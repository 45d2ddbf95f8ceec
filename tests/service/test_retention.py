"""Retention: finished jobs lose their files and rows after the period, never before delivery."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pneumonode.queue.db import make_engine
from pneumonode.queue.migrate import upgrade
from pneumonode.queue.records import DeliveryTarget, FindingRecord, NewJob, ResultUIDs
from pneumonode.queue.repository import JobRepository
from pneumonode.retention import PurgeReport, purge
from pneumonode.scheduler import RETENTION_JOB_ID, build_scheduler
from pneumonode.settings import Settings

T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
CR = "1.2.840.10008.5.1.4.1.1.1"
PACS = DeliveryTarget(destination="pacs", ae_title="PACS", host="127.0.0.1", port=104)


class Site:
    """A data folder and its queue, with jobs made through the repository's transitions."""

    def __init__(self, root: Path) -> None:
        self.data = root / "data"
        engine = make_engine(f"sqlite:///{self.data / 'pneumonode.db'}")
        upgrade(engine)
        self.repo = JobRepository(engine)

    def file(self, relative: str, age: timedelta = timedelta(0)) -> str:
        path = self.data / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"DICM")
        stamp = (T0 - age).timestamp()
        os.utime(path, (stamp, stamp))
        return relative

    def job(self, n: int, *, deliver: bool = True, sent: bool = True) -> int:
        spool = self.file(f"spool/20240301/{n}.dcm")
        job_id = self.repo.enqueue(NewJob(f"1.2.3.{n}", CR, "1.2.3", "1.2.3.4", "CR1", None,
                                          spool), now=T0).job_id
        self.repo.claim_jobs("w", now=T0)
        base = f"1.2.826.0.1.3680043.10.96.{n}"
        self.repo.reserve_result_uids(
            job_id, ResultUIDs(*(f"{base}.{i}" for i in range(1, 7))), now=T0)
        seg = self.file(f"results/{job_id:09d}/seg.dcm")
        sc = self.file(f"results/{job_id:09d}/overlay.dcm")
        finding = FindingRecord(present=False, score=0.1, area_mm2=None, model_uid="2.25.1",
                                seg_path=seg, sc_path=sc)
        self.repo.finish_processing(job_id, "w", finding, [PACS] if deliver else [], now=T0)
        if deliver and sent:
            [delivery] = self.repo.claim_deliveries("s", now=T0)
            self.repo.delivery_succeeded(delivery.id, "s", now=T0)
        return job_id


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_files_and_rows_go_after_the_period_not_before(site: Site) -> None:
    job_id = site.job(1)
    assert purge(site.repo, site.data, days=30, now=T0 + timedelta(days=29)) == PurgeReport(0, 0)
    assert (site.data / "spool/20240301/1.dcm").is_file()
    report = purge(site.repo, site.data, days=30, now=T0 + timedelta(days=31))
    assert report == PurgeReport(jobs=1, files=3)
    assert site.repo.get_job(job_id) is None
    assert not (site.data / "spool/20240301").exists()
    assert not (site.data / f"results/{job_id:09d}").exists()


def test_a_job_still_delivering_keeps_everything(site: Site) -> None:
    job_id = site.job(1, sent=False)
    report = purge(site.repo, site.data, days=1, now=T0 + timedelta(days=400))
    assert report == PurgeReport(jobs=0, files=0)
    job = site.repo.get_job(job_id)
    assert job is not None and job.state == "delivering"
    for relative in (job.spool_path, job.seg_path, job.sc_path):
        assert relative is not None and (site.data / relative).is_file()


def test_zero_days_keeps_everything_forever(site: Site) -> None:
    site.job(1)
    site.file("spool/19990101/orphan.dcm", age=timedelta(days=9000))
    assert purge(site.repo, site.data, days=0, now=T0 + timedelta(days=9000)) == PurgeReport(0, 0)
    assert (site.data / "spool/19990101/orphan.dcm").is_file()
    with pytest.raises(ValueError, match="retention days"):
        purge(site.repo, site.data, days=-1)


def test_orphan_spool_files_of_old_days_and_stale_partials_go(site: Site) -> None:
    kept = site.job(1, sent=False)  # a retained job in the same old day folder
    old_orphan = site.file("spool/20240301/orphan.dcm")
    recent_orphan = site.file("spool/20240405/in-flight.dcm")
    partial = site.file("spool/incoming/crashed.dcm.part", age=timedelta(days=1))
    report = purge(site.repo, site.data, days=30, now=T0 + timedelta(days=35))
    assert report == PurgeReport(jobs=0, files=2)
    assert not (site.data / old_orphan).exists() and not (site.data / partial).exists()
    assert (site.data / recent_orphan).is_file()
    assert (site.data / "spool/20240301/1.dcm").is_file() and site.repo.get_job(kept)


def test_the_scheduler_runs_the_purge_with_the_node_clock(site: Site) -> None:
    job_id = site.job(1)
    settings = Settings(node={"data_dir": site.data},
                        retention={"days": 30, "interval_s": 0.2})
    reports: list[PurgeReport] = []
    ran = threading.Event()

    def on_purged(report: PurgeReport) -> None:
        reports.append(report)
        ran.set()

    scheduler = build_scheduler(settings, site.repo, [], lambda: None, on_purged=on_purged,
                                clock=lambda: T0 + timedelta(days=31))
    assert scheduler.get_job(RETENTION_JOB_ID) is not None
    scheduler.start()
    try:
        assert ran.wait(20), "the retention job did not run"
    finally:
        scheduler.shutdown(wait=True)
    assert reports[0] == PurgeReport(jobs=1, files=3)
    assert site.repo.get_job(job_id) is None


def test_no_retention_job_when_keeping_forever(site: Site) -> None:
    settings = Settings(node={"data_dir": site.data}, retention={"days": 0})
    scheduler = build_scheduler(settings, site.repo, [], lambda: None)
    assert scheduler.get_job(RETENTION_JOB_ID) is None
