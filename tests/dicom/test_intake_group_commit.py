"""Intake's durability: the order of syncs before success, and the group commit that lets
concurrent associations share one folder fsync and one database commit."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import synthetic
from pydicom.uid import generate_uid
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from pneumonode.datafolder import write_durably
from pneumonode.dicom import group_commit
from pneumonode.dicom.group_commit import GroupCommit
from pneumonode.dicom.intake import Intake, Outcome, Status
from pneumonode.queue.db import create_schema, make_engine
from pneumonode.queue.records import NewJob
from pneumonode.queue.repository import JobRepository

WAIT_S = 30
"""Safety net for the waits on other threads (never reached when the code works)."""


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[JobRepository]:
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    create_schema(engine)
    yield JobRepository(engine)
    engine.dispose()


def _instance(seed: int) -> bytes:
    ds = synthetic.make_radiograph(rows=32, columns=32, seed=seed)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _commits(repo: JobRepository, log: list[str]) -> None:
    event.listen(repo._engine, "commit", lambda conn: log.append("commit"))


def _spool_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "spool").rglob("*") if p.is_file())


def test_success_only_after_file_folder_entry_and_job_row_are_durable(
    tmp_path: Path, repo: JobRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if target.is_dir():
            steps.append(f"fsync folder {target.name}")
        else:
            steps.append("fsync file " + ("partial" if target.name.endswith(".part") else "?"))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        steps.append("rename")
        real_replace(src, dst)

    data_dir = tmp_path / "data"
    intake = Intake(data_dir, repo)
    intake.receive(_instance(0), "A", None)  # today's spool folder exists from now on
    steps.clear()
    _commits(repo, steps)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    result = intake.receive(_instance(1), "A", None)
    assert result.status == Status.SUCCESS and result.outcome is Outcome.QUEUED
    day = next(p for p in (data_dir / "spool").iterdir() if p.name != "incoming").name
    assert steps == ["fsync file partial", "rename", f"fsync folder {day}", "commit"]


def test_folder_sync_failure_answers_out_of_resources_and_records_nothing(
    tmp_path: Path, repo: JobRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    intake = Intake(data_dir, repo)

    def failing(path: Path, *, directory: bool = False) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(group_commit, "fsync_path", failing)
    result = intake.receive(_instance(2), "A", None)
    assert (result.status, result.outcome) == (Status.OUT_OF_RESOURCES, Outcome.REFUSED)
    assert repo.list_jobs() == [] and _spool_files(data_dir) == []


class _GatedFolderSync:
    """Holds the first folder fsync until released, so that other threads queue behind it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, path: Path, *, directory: bool = False) -> None:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(WAIT_S)


def _queued(group: GroupCommit, count: int) -> bool:
    """Wait until ``count`` jobs wait for the next group (polled: nothing signals it)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        with group._turn:
            if len(group._waiting) == count:
                return True
        time.sleep(0.005)
    return False


def test_concurrent_associations_share_one_folder_sync_and_one_commit(
    tmp_path: Path, repo: JobRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    woken: list[int] = []
    intake = Intake(data_dir, repo, on_queued=lambda: woken.append(1))
    sync = _GatedFolderSync()
    monkeypatch.setattr(group_commit, "fsync_path", sync)
    commits: list[str] = []
    _commits(repo, commits)
    results: dict[int, object] = {}

    def receive(n: int) -> None:
        results[n] = intake.receive(_instance(10 + n), f"A{n}", None)

    first = threading.Thread(target=receive, args=(0,))
    first.start()
    assert sync.entered.wait(WAIT_S)  # the first leads a group of one, held in its fsync
    others = [threading.Thread(target=receive, args=(n,)) for n in (1, 2, 3)]
    for thread in others:
        thread.start()
    assert _queued(intake._group, 3)
    assert results == {} and commits == []  # nobody answered before its group is durable
    sync.release.set()
    for thread in [first, *others]:
        thread.join(WAIT_S)
    assert sorted(results) == [0, 1, 2, 3]
    assert all(r.status == Status.SUCCESS and r.outcome is Outcome.QUEUED  # type: ignore[attr-defined]
               for r in results.values())
    assert (sync.calls, len(commits)) == (2, 2)  # {0} then {1, 2, 3}
    jobs = repo.list_jobs()
    assert sorted(j.calling_aet for j in jobs) == ["A0", "A1", "A2", "A3"]
    assert all((data_dir / j.spool_path).is_file() for j in jobs if j.spool_path)
    assert len(_spool_files(data_dir)) == 4 and len(woken) == 4


def test_a_failing_job_fails_alone_and_its_group_is_recorded(
    tmp_path: Path, repo: JobRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = GroupCommit(repo)
    sync = _GatedFolderSync()
    monkeypatch.setattr(group_commit, "fsync_path", sync)
    real = repo.enqueue_many
    bad_uid = "1.2.826.0.1.3680043.10.99.666"

    def enqueue_many(news, now=None, *, actor="intake"):  # type: ignore[no-untyped-def]
        if any(new.sop_instance_uid == bad_uid for new in news):
            raise OperationalError("INSERT", {}, Exception("disk I/O error"))
        return real(news, now, actor=actor)

    monkeypatch.setattr(repo, "enqueue_many", enqueue_many)
    outcomes: dict[str, object] = {}

    def commit(uid: str) -> None:
        new = NewJob(uid, "1.2.840.10008.5.1.4.1.1.1", "1.2.3", "1.2.4", "A", None,
                     f"spool/{uid}.dcm")
        try:
            outcomes[uid] = group.commit(new, tmp_path)
        except OperationalError as exc:
            outcomes[uid] = exc

    uids = ["1.2.826.0.1.3680043.10.99.1", bad_uid, "1.2.826.0.1.3680043.10.99.2"]
    leader = threading.Thread(target=commit, args=("1.2.826.0.1.3680043.10.99.0",))
    leader.start()
    assert sync.entered.wait(WAIT_S)
    threads = [threading.Thread(target=commit, args=(uid,)) for uid in uids]
    for thread in threads:
        thread.start()
    assert _queued(group, 3)
    sync.release.set()
    for thread in [leader, *threads]:
        thread.join(WAIT_S)
    assert isinstance(outcomes[bad_uid], OperationalError)
    recorded = sorted(j.sop_instance_uid for j in repo.list_jobs())
    assert recorded == sorted(u for u in [*uids, "1.2.826.0.1.3680043.10.99.0"] if u != bad_uid)


def test_a_duplicate_within_one_group_is_acknowledged_once(
    tmp_path: Path, repo: JobRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    intake = Intake(data_dir, repo)
    sync = _GatedFolderSync()
    monkeypatch.setattr(group_commit, "fsync_path", sync)
    same = _instance(20)
    results: list[object] = []
    lock = threading.Lock()

    def receive(data: bytes) -> None:
        result = intake.receive(data, "A", None)
        with lock:
            results.append(result)

    leader = threading.Thread(target=receive, args=(_instance(21),))
    leader.start()
    assert sync.entered.wait(WAIT_S)
    copies = [threading.Thread(target=receive, args=(same,)) for _ in range(2)]
    for thread in copies:
        thread.start()
    assert _queued(intake._group, 2)
    sync.release.set()
    for thread in [leader, *copies]:
        thread.join(WAIT_S)
    outcomes = sorted(r.outcome.name for r in results)  # type: ignore[attr-defined]
    assert outcomes == ["DUPLICATE", "QUEUED", "QUEUED"]
    assert all(r.status == Status.SUCCESS for r in results)  # type: ignore[attr-defined]
    assert len(repo.list_jobs()) == 2
    assert len(_spool_files(data_dir)) == 2  # the duplicate's copy removed


def test_pydicom_reads_what_the_group_spooled(tmp_path: Path, repo: JobRepository) -> None:
    data_dir = tmp_path / "data"
    raw = _instance(30)
    result = Intake(data_dir, repo).receive(raw, "A", None)
    job = repo.get_job(result.job_id)  # type: ignore[arg-type]
    assert job is not None and job.spool_path is not None
    assert (data_dir / job.spool_path).read_bytes() == raw
    assert pydicom.dcmread(data_dir / job.spool_path).SOPInstanceUID == job.sop_instance_uid


def test_write_durably_makes_the_new_folder_its_partial_file_lies_in(tmp_path: Path) -> None:
    # the worker writes results/<job>/seg.dcm through results/<job>/seg.dcm.part
    final = tmp_path / "results" / "000000007" / "seg.dcm"
    partial = final.with_name("seg.dcm.part")
    write_durably(final, lambda path: path.write_bytes(b"DICM"), partial)
    assert final.read_bytes() == b"DICM" and not partial.exists()
