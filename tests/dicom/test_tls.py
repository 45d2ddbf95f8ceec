"""DICOM TLS: the listener with client-certificate verification, and sending results over TLS,
against pynetdicom and DCMTK (storescu/storescp +tls), with certificates made at test time."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import synthetic
from dicom.pki import Pki
from harness import PEER_ENV, free_port, port_open, require, wait_for

from pneumonode.dicom.intake import Intake
from pneumonode.dicom.scp import DicomServer
from pneumonode.dicom.scu import Remote, SendError, echo, store
from pneumonode.dicom.tls import TlsError, client_context, server_context
from pneumonode.queue.db import create_schema, make_engine
from pneumonode.queue.records import DeliveryTarget, FindingRecord, NewJob, ResultUIDs
from pneumonode.queue.repository import JobRepository
from pneumonode.sender import Sender, uses_tls
from pneumonode.settings import ConfigError, Settings, TlsSettings, load_settings


@dataclass
class Listener:
    port: int
    repo: JobRepository
    server: DicomServer


def _repo(tmp_path: Path) -> JobRepository:
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    create_schema(engine)
    return JobRepository(engine)


@pytest.fixture
def tls_listener(tmp_path: Path, pki: Pki) -> Iterator[Listener]:
    port = free_port()
    settings = Settings(
        node={"port": port, "host": "127.0.0.1", "data_dir": tmp_path / "data"},
        delivery={"network_timeout_s": 5.0, "acse_timeout_s": 5.0},
        tls={"enabled": True, "certificate": pki.server_cert, "private_key": pki.server_key,
             "ca_certificates": pki.ca, "require_client_certificate": True},
    )
    repo = _repo(tmp_path)
    server = DicomServer(settings, Intake(tmp_path / "data", repo))
    server.start()
    try:
        yield Listener(port, repo, server)
    finally:
        server.shutdown()


def _client(pki: Pki, *, with_cert: bool = True, ca: Path | None = None) -> ssl.SSLContext:
    cfg = TlsSettings(
        ca_certificates=ca or pki.ca,
        certificate=pki.client_cert if with_cert else None,
        private_key=pki.client_key if with_cert else None,
    )
    return client_context(cfg)


def _image(tmp_path: Path, seed: int) -> Path:
    return synthetic.write(synthetic.make_radiograph(rows=32, columns=32, seed=seed),
                           tmp_path / f"img{seed}.dcm")


def _storescu(pki: Pki, port: int, path: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    exe = require("storescu")
    return subprocess.run(
        [exe, *tls, "-aet", "MODALITY", "-aec", "PNEUMONODE", "127.0.0.1", str(port), str(path)],
        capture_output=True, text=True, env=PEER_ENV, timeout=60,
    )


def test_contexts_follow_bcp195(pki: Pki) -> None:
    required = server_context(TlsSettings(certificate=pki.server_cert, private_key=pki.server_key,
                                          ca_certificates=pki.ca,
                                          require_client_certificate=True))
    optional = server_context(TlsSettings(certificate=pki.server_cert,
                                          private_key=pki.server_key, ca_certificates=pki.ca))
    anonymous = server_context(TlsSettings(certificate=pki.server_cert,
                                           private_key=pki.server_key))
    client = _client(pki)
    assert (required.verify_mode, optional.verify_mode, anonymous.verify_mode) == (
        ssl.CERT_REQUIRED, ssl.CERT_OPTIONAL, ssl.CERT_NONE)
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    for context in (required, client):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        suites = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert suites and all("GCM" in c["name"] and ("ECDHE" in c["name"] or "DHE" in c["name"])
                              for c in suites)
        assert context.cert_store_stats()["x509_ca"] == 1, "only the configured CA is trusted"


def test_pynetdicom_echo_and_store_over_tls(
    tmp_path: Path, pki: Pki, tls_listener: Listener
) -> None:
    remote = Remote("PNEUMONODE", "127.0.0.1", tls_listener.port)
    assert echo("MODALITY", remote, tls=_client(pki)) == 0
    outcomes = store([_image(tmp_path, 1)], "MODALITY", remote, tls=_client(pki))
    assert [o.status for o in outcomes] == [0]
    assert len(tls_listener.repo.list_jobs()) == 1


def test_dcmtk_storescu_over_tls(tmp_path: Path, pki: Pki, tls_listener: Listener) -> None:
    out = _storescu(pki, tls_listener.port, _image(tmp_path, 2),
                    "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = tls_listener.repo.list_jobs()
    assert [j.calling_aet for j in jobs] == ["MODALITY"]


@pytest.mark.parametrize("who", ["no certificate", "certificate from an unknown CA", "plain TCP"])
def test_untrusted_clients_are_refused(
    tmp_path: Path, pki: Pki, tls_listener: Listener, who: str
) -> None:
    tls_args = {
        "no certificate": ["+tla", "+cf", str(pki.ca)],
        "certificate from an unknown CA": ["+tls", str(pki.rogue_key), str(pki.rogue_cert),
                                           "+cf", str(pki.ca)],
        "plain TCP": [],
    }[who]
    out = _storescu(pki, tls_listener.port, _image(tmp_path, 3), *tls_args)
    assert out.returncode != 0, out.stdout + out.stderr
    assert tls_listener.repo.list_jobs() == []
    remote = Remote("PNEUMONODE", "127.0.0.1", tls_listener.port)
    if who == "no certificate":
        with pytest.raises(SendError, match="TLS handshake failed"):
            echo("MODALITY", remote, tls=_client(pki, with_cert=False))
    assert echo("MODALITY", remote, tls=_client(pki)) == 0, "the listener keeps serving"


def test_silent_client_does_not_stall_the_tls_listener(pki: Pki, tls_listener: Listener) -> None:
    """The handshake runs in the connection's thread, so a peer that connects and says nothing
    does not keep the listener from accepting (pynetdicom alone handshakes in the accept loop)."""
    silent = socket.create_connection(("127.0.0.1", tls_listener.port))
    try:
        remote = Remote("PNEUMONODE", "127.0.0.1", tls_listener.port)
        answers: list[int] = []
        thread = threading.Thread(target=lambda: answers.append(
            echo("MODALITY", remote, tls=_client(pki))), daemon=True)
        thread.start()
        thread.join(4)
        assert answers == [0]
    finally:
        silent.close()


class TlsStoreSCP:
    """DCMTK storescp with +tls, requiring a client certificate from ``ca``."""

    def __init__(self, folder: Path, pki: Pki) -> None:
        self.folder = folder
        self.port = free_port()
        folder.mkdir(parents=True)
        self.log = folder.parent / "storescp-tls.log"
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [require("storescp"), "+tls", str(pki.server_key), str(pki.server_cert),
                 "+cf", str(pki.ca), "-aet", "DEST", "-od", str(folder), str(self.port)],
                stdout=fh, stderr=subprocess.STDOUT, env=PEER_ENV,
            )
        wait_for(lambda: port_open(self.port), 20, "storescp +tls to listen")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def _delivering_job(repo: JobRepository, data_dir: Path, target: DeliveryTarget) -> int:
    source = synthetic.make_radiograph(rows=32, columns=32, seed=11)
    job_id = repo.enqueue(NewJob(
        sop_instance_uid=str(source.SOPInstanceUID), sop_class_uid=str(source.SOPClassUID),
        study_instance_uid=str(source.StudyInstanceUID),
        series_instance_uid=str(source.SeriesInstanceUID), calling_aet="MODALITY",
        peer_host=None, spool_path="spool/source.dcm")).job_id
    [job] = repo.claim_jobs("w", limit=1)
    repo.reserve_result_uids(job.id, ResultUIDs(*(f"1.2.3.{i}" for i in range(1, 7))))
    results = Path("results") / f"{job_id:09d}"
    for i, name in enumerate(("seg.dcm", "overlay.dcm")):
        synthetic.write(synthetic.make_radiograph(rows=16, columns=16, seed=20 + i),
                        data_dir / results / name)
    repo.finish_processing(job.id, "w", FindingRecord(
        present=False, score=0.1, area_mm2=None, model_uid="2.25.1",
        seg_path=str(results / "seg.dcm"), sc_path=str(results / "overlay.dcm")), [target])
    return job_id


def test_node_sends_results_over_tls_to_storescp(tmp_path: Path, pki: Pki) -> None:
    dest = TlsStoreSCP(tmp_path / "dest", pki)
    try:
        settings = Settings(
            node={"data_dir": tmp_path / "data"},
            tls={"certificate": pki.server_cert, "private_key": pki.server_key,
                 "ca_certificates": pki.ca},
            destinations=[{"name": "pacs", "ae_title": "DEST", "host": "localhost",
                           "port": dest.port, "tls": True}],
        )
        assert uses_tls(settings, "pacs") and not uses_tls(settings, "other")
        repo = _repo(tmp_path)
        job_id = _delivering_job(repo, tmp_path / "data",
                                 DeliveryTarget("pacs", "DEST", "localhost", dest.port))
        sender = Sender(settings, repo, "s0", threading.Event())
        [delivery] = repo.claim_deliveries("s0", limit=1)
        sender.send(delivery)
        [after] = repo.deliveries(job_id)
        assert after.state == "done", after.last_error
        received = sorted(p for p in (tmp_path / "dest").iterdir() if p.is_file())
        assert len(received) == 2
        assert {str(pydicom.dcmread(p).SeriesInstanceUID) for p in received} == {
            str(synthetic.make_radiograph(rows=16, columns=16, seed=20 + i).SeriesInstanceUID)
            for i in range(2)}
        with pytest.raises(SendError, match="TLS handshake failed"):
            echo("PNEUMONODE", Remote("DEST", "localhost", dest.port),
                 tls=_client(pki, ca=pki.rogue_cert))
    finally:
        dest.stop()


def test_tls_configuration_errors_name_the_key(tmp_path: Path, pki: Pki) -> None:
    missing = tmp_path / "absent.pem"
    with pytest.raises(TlsError, match=r"tls\.certificate: no such file"):
        server_context(TlsSettings(certificate=missing, private_key=pki.server_key))
    with pytest.raises(TlsError, match=r"tls\.ca_certificates: .* no usable PEM"):
        client_context(TlsSettings(ca_certificates=pki.server_key))
    with pytest.raises(TlsError, match="cannot use"):
        server_context(TlsSettings(certificate=pki.server_cert, private_key=pki.client_key))
    cases = {
        "[tls]\nenabled = true\n": "enabled = true needs certificate and private_key",
        f'[tls]\ncertificate = "{pki.server_cert}"\n': "certificate and private_key go together",
        "[tls]\nrequire_client_certificate = true\n": "needs ca_certificates",
        '[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 1\ntls = true\n':
            "tls.ca_certificates is needed to verify TLS destinations: p",
    }
    for text, message in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_settings(path)
