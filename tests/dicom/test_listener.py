"""The DICOM listener against DCMTK storescu: syntaxes, SOP classes, AE titles, TCP_NODELAY."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
import synthetic
from harness import free_port, storescu
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pneumonode.dicom.intake import Intake
from pneumonode.dicom.scp import (
    ACCEPTED_SOP_CLASSES,
    DicomServer,
    decodable_transfer_syntaxes,
    handle_conn_open,
)
from pneumonode.queue.db import create_schema, make_engine
from pneumonode.queue.repository import JobRepository
from pneumonode.settings import Settings

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[int, JobRepository, Path]]:
    port = free_port()
    settings = Settings(
        node={"port": port, "host": "127.0.0.1", "data_dir": tmp_path / "data",
              "allowed_calling_aets": ["MODALITY", "PACS"]},
    )
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    create_schema(engine)
    repo = JobRepository(engine)
    server = DicomServer(settings, Intake(tmp_path / "data", repo))
    server.start()
    try:
        yield port, repo, tmp_path / "data"
    finally:
        server.shutdown()


def test_every_lossless_syntax_is_accepted_and_spooled_as_received(
    tmp_path: Path, listener: tuple[int, JobRepository, Path]
) -> None:
    port, repo, data_dir = listener
    files = []
    syntaxes = list(dict.fromkeys([*synthetic.LOSSLESS_SYNTAXES, DeflatedExplicitVRLittleEndian,
                                   ImplicitVRLittleEndian]))
    for i, syntax in enumerate(syntaxes):
        ds = synthetic.make_radiograph(rows=64, columns=64, seed=100 + i)
        if syntax == ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
        else:
            ds = synthetic.compress(ds, syntax)
        files.append(synthetic.write(ds, tmp_path / f"{i}.dcm"))
    out = storescu(files, port)
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = repo.list_jobs(limit=100)
    assert len(jobs) == len(syntaxes)
    stored = {
        str(pydicom.dcmread(data_dir / j.spool_path, stop_before_pixels=True)
            .file_meta.TransferSyntaxUID)
        for j in jobs if j.spool_path
    }
    # a deflated data set is spooled inflated, as the Explicit VR Little Endian it is (PS3.5 A.5)
    assert stored == {str(s) for s in syntaxes if s != DeflatedExplicitVRLittleEndian} | {
        str(ExplicitVRLittleEndian)
    }


def test_transfer_syntaxes_cover_the_installed_decoders() -> None:
    offered = set(decodable_transfer_syntaxes())
    for name in ("JPEGBaseline8Bit", "JPEGLossless", "JPEGLosslessSV1", "JPEGLSLossless",
                 "JPEG2000Lossless", "JPEG2000", "RLELossless", "DeflatedExplicitVRLittleEndian"):
        assert getattr(pydicom.uid, name) in offered, name


def test_ct_is_refused_at_negotiation(
    tmp_path: Path, listener: tuple[int, JobRepository, Path]
) -> None:
    port, repo, _ = listener
    ds = synthetic.make_radiograph(rows=32, columns=32, modality="CT",
                                   sop_class_uid=CT_IMAGE_STORAGE)
    out = storescu([synthetic.write(ds, tmp_path / "ct.dcm")], port)
    assert out.returncode != 0
    assert "presentation context" in (out.stdout + out.stderr).lower()
    assert repo.list_jobs() == []
    assert CT_IMAGE_STORAGE not in ACCEPTED_SOP_CLASSES


def test_unknown_calling_ae_is_rejected(
    tmp_path: Path, listener: tuple[int, JobRepository, Path]
) -> None:
    port, repo, _ = listener
    ds = synthetic.make_radiograph(rows=32, columns=32)
    out = storescu([synthetic.write(ds, tmp_path / "a.dcm")], port, aet="INTRUDER")
    assert out.returncode != 0
    assert "calling ae title not recognized" in (out.stdout + out.stderr).lower()
    assert repo.list_jobs() == []


def test_wrong_called_ae_is_rejected(
    tmp_path: Path, listener: tuple[int, JobRepository, Path]
) -> None:
    port, repo, _ = listener
    ds = synthetic.make_radiograph(rows=32, columns=32)
    out = storescu([synthetic.write(ds, tmp_path / "a.dcm")], port, aec="SOMEONE")
    assert out.returncode != 0
    assert "called ae title not recognized" in (out.stdout + out.stderr).lower()
    assert repo.list_jobs() == []


def test_connection_handler_sets_tcp_nodelay() -> None:
    with socket.create_server(("127.0.0.1", 0)) as tcp:
        client = socket.create_connection(tcp.getsockname())
        accepted, _ = tcp.accept()
        with client, accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
            transport = SimpleNamespace(socket=accepted)
            event = SimpleNamespace(assoc=SimpleNamespace(dul=SimpleNamespace(socket=transport)))
            handle_conn_open(event)  # type: ignore[arg-type]
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
