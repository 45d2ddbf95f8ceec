"""Durable intake: spool + job row, duplicates, skips, and failure statuses."""

from __future__ import annotations

import errno
import os
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import synthetic
from hostile.corpus import raw_element, spliced
from pydicom.filereader import read_dataset
from sqlalchemy.exc import OperationalError

from pneumonode.dicom.instance import spool_file_bytes
from pneumonode.dicom.intake import (
    MAX_SEQUENCE_DEPTH,
    Intake,
    Outcome,
    Status,
    skip_reason,
    unreadable_element,
)
from pneumonode.identifiers import is_valid_uid
from pneumonode.queue.db import create_schema, make_engine
from pneumonode.queue.repository import JobRepository


@pytest.fixture
def repo(tmp_path: Path) -> JobRepository:
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    create_schema(engine)
    return JobRepository(engine)


def encoded(ds: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def spool_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "spool").rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        ({"Modality": "CT"}, "modality 'CT' is not CR or DX"),
        ({"Modality": ""}, "modality '(absent)' is not CR or DX"),
        ({"BodyPartExamined": "HEAD"}, "body part examined 'HEAD' is not chest"),
        ({"BodyPartExamined": "chest"}, None),
        ({"NumberOfFrames": 3}, "multi-frame image (3 frames)"),
    ],
)
def test_skip_reason(changes: dict[str, object], expected: str | None) -> None:
    ds = synthetic.make_radiograph(rows=32, columns=32)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    reason = skip_reason(ds)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(expected)


def test_skip_reason_without_pixel_data() -> None:
    ds = synthetic.make_radiograph(rows=32, columns=32)
    del ds.PixelData
    assert skip_reason(ds) == "no pixel data"


@pytest.mark.parametrize(
    ("uid", "valid"),
    [("1.2.840.10008.1.2", True), ("1.2.3.0", True), ("1.02.3", False), ("1..2", False),
     ("1.2.a", False), ("../../etc", False), ("1." + "2" * 63, False), ("", False), (None, False)],
)
def test_uid_validation(uid: object, valid: bool) -> None:
    assert is_valid_uid(uid) is valid


def test_receive_writes_exact_bytes_and_one_job(tmp_path: Path, repo: JobRepository) -> None:
    woken = []
    intake = Intake(tmp_path / "data", repo, on_queued=lambda: woken.append(1))
    ds = synthetic.make_radiograph(rows=64, columns=48)
    raw = encoded(ds)
    result = intake.receive(raw, "MODALITY", "127.0.0.1")
    assert (result.status, result.outcome) == (Status.SUCCESS, Outcome.QUEUED)
    job = repo.get_job(result.job_id)
    assert job is not None and job.state == "received" and job.calling_aet == "MODALITY"
    assert job.spool_path is not None
    assert (tmp_path / "data" / job.spool_path).read_bytes() == raw
    assert woken == [1]
    assert [p.suffix for p in spool_files(tmp_path / "data")] == [".dcm"]


def test_duplicate_is_acknowledged_without_second_job(tmp_path: Path, repo: JobRepository) -> None:
    intake = Intake(tmp_path / "data", repo)
    ds = synthetic.make_radiograph(rows=32, columns=32)
    first = intake.receive(encoded(ds), "A", None)
    second = intake.receive(encoded(ds), "B", None)
    assert second.status == Status.SUCCESS and second.outcome == Outcome.DUPLICATE
    assert second.job_id == first.job_id
    assert len(repo.list_jobs()) == 1
    assert len(spool_files(tmp_path / "data")) == 1


def test_not_a_chest_radiograph_is_acknowledged_and_skipped(
    tmp_path: Path, repo: JobRepository
) -> None:
    intake = Intake(tmp_path / "data", repo)
    ds = synthetic.make_radiograph(rows=32, columns=32, body_part="KNEE")
    result = intake.receive(encoded(ds), "A", None)
    assert result.status == Status.SUCCESS and result.outcome == Outcome.SKIPPED
    job = repo.get_job(result.job_id)
    assert job is not None and job.state == "skipped"
    assert job.skip_reason == "body part examined 'KNEE' is not chest"
    assert spool_files(tmp_path / "data") == []


def test_invalid_uid_cannot_be_understood(tmp_path: Path, repo: JobRepository) -> None:
    intake = Intake(tmp_path / "data", repo)
    ds = synthetic.make_radiograph(rows=32, columns=32)
    ds.SOPInstanceUID = "1.2.3/../../x"
    result = intake.receive(encoded(ds), "A", None)
    assert result.status == Status.CANNOT_UNDERSTAND
    assert repo.list_jobs() == [] and spool_files(tmp_path / "data") == []


def test_disk_full_answers_out_of_resources_and_records_nothing(
    tmp_path: Path, repo: JobRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    intake = Intake(tmp_path / "data", repo)
    ds = synthetic.make_radiograph(rows=32, columns=32)

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("pneumonode.dicom.intake.os.write", full)
    result = intake.receive(encoded(ds), "A", None)
    assert result.status == Status.OUT_OF_RESOURCES
    assert repo.list_jobs() == [] and spool_files(tmp_path / "data") == []


def test_database_down_answers_out_of_resources_and_removes_spool_file(
    tmp_path: Path, repo: JobRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    intake = Intake(tmp_path / "data", repo)
    ds = synthetic.make_radiograph(rows=32, columns=32)

    def down(*args: object, **kwargs: object) -> None:
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(repo, "enqueue_many", down)
    result = intake.receive(encoded(ds), "A", None)
    assert result.status == Status.OUT_OF_RESOURCES
    assert spool_files(tmp_path / "data") == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"SpecificCharacterSet": "ISO_IR 999"}, "specific character set 'ISO_IR 999' is not"),
        ({"SpecificCharacterSet": ["", "ISO 2022 IR 87"]}, None),
        ({"RescaleSlope": "NaN"}, "RescaleSlope 'NaN' is not a finite number"),
        ({"RescaleIntercept": "-inf"}, "RescaleIntercept '-inf' is not a finite number"),
        ({"PixelData": b""}, "no pixel data"),
    ],
)
def test_skip_reason_for_unusable_headers(changes: dict[str, object], expected: str | None) -> None:
    ds = synthetic.make_radiograph(rows=16, columns=16)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    reason = skip_reason(ds)
    assert reason == expected if expected is None else str(reason).startswith(expected)


def _parsed(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` as the listener sees it: read back from its encoding, values not yet converted."""
    return pydicom.dcmread(BytesIO(encoded(ds)))


def test_unreadable_elements_are_refused_without_their_value(
    tmp_path: Path, repo: JobRepository
) -> None:
    intake = Intake(tmp_path / "data", repo)
    assert unreadable_element(_parsed(synthetic.make_radiograph(rows=16, columns=16))) is None
    wrong_vr = synthetic.make_radiograph(rows=16, columns=16, seed=1)
    data = spliced(wrong_vr, {0x00100010: raw_element(0x00100010, "UL", b"SECRET^NAMEX")})
    header = read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True)
    reason = unreadable_element(header)
    assert reason == "element (0010,0010) has VR UL; the standard's is PN"
    result = intake.receive(spool_file_bytes(data, wrong_vr.file_meta, 1 << 30), "A", None)
    assert result.status == Status.CANNOT_UNDERSTAND and "SECRET" not in str(result.reason)
    assert result.reason == "element (0010,0010) has VR UL; the standard's is PN"
    odd = spliced(wrong_vr, {0x00280010: raw_element(0x00280010, "US", b"\x10\x00\x00")})
    header = read_dataset(BytesIO(odd), is_implicit_VR=False, is_little_endian=True)
    assert unreadable_element(header) == (
        "element (0028,0010) cannot be read as US (BytesLengthException)")
    deep = synthetic.make_radiograph(rows=16, columns=16, seed=2)
    item = pydicom.Dataset()
    for _ in range(MAX_SEQUENCE_DEPTH + 1):
        outer = pydicom.Dataset()
        outer.ContentSequence = [item]
        item = outer
    deep.ContentSequence = [item]
    assert "nested more than" in str(unreadable_element(_parsed(deep)))
    assert repo.list_jobs() == [] and spool_files(tmp_path / "data") == []
