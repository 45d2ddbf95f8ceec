"""Access control: the calling-AE allowlist bound to each peer's source address (IPv4 and IPv6),
rejected with "calling AE title not recognized", against DCMTK storescu and pynetdicom."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import synthetic
from harness import free_port, storescu
from pynetdicom import AE

from pneumonode.dicom.access import (
    REJECT_CALLING_AE,
    AccessPolicy,
    handle_requested,
    resolve_host,
)
from pneumonode.dicom.intake import Intake
from pneumonode.dicom.scp import VERIFICATION, DicomServer
from pneumonode.queue.db import create_schema, make_engine
from pneumonode.queue.repository import JobRepository
from pneumonode.settings import ConfigError, Settings, load_settings

PEERS = [
    {"ae_title": "PEER4", "host": "127.0.0.1", "port": 104},
    {"ae_title": "PEER6", "host": "::1", "port": 104},
    {"ae_title": "BYNAME", "host": "localhost", "port": 104},
    {"ae_title": "FARAWAY", "host": "192.0.2.10", "port": 104},
]


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_policy_allowlist_and_peer_addresses() -> None:
    anyone = AccessPolicy()
    assert anyone.refusal("WHOEVER", "10.0.0.1") is None
    listed = AccessPolicy(["CR1", "PACS "])
    assert listed.refusal("PACS", "10.0.0.1") is None
    assert "not in node.allowed_calling_aets" in str(listed.refusal("CR2", "10.0.0.1"))
    bound = AccessPolicy((), {"CR1": frozenset({_ip("10.0.0.5"), _ip("fd00::5")})})
    assert bound.refusal("CR1", "10.0.0.5") is None
    assert bound.refusal("CR1", "::ffff:10.0.0.5") is None, "IPv4-mapped IPv6 is the IPv4 peer"
    assert bound.refusal("CR1", "fd00::5") is None
    assert "not from its [[peers]] host" in str(bound.refusal("CR1", "10.0.0.6"))
    assert "not a [[peers]] entry" in str(bound.refusal("CR2", "10.0.0.5"))
    assert bound.refusal("CR1", "not-an-address") is not None


def test_peer_hosts_resolve_once_at_start() -> None:
    assert resolve_host("127.0.0.1") == {_ip("127.0.0.1")}
    assert resolve_host("::1") == {_ip("::1")}
    assert _ip("127.0.0.1") in resolve_host("localhost")
    assert resolve_host("no-such-host.invalid") == frozenset()
    asked: list[str] = []

    def resolver(host: str) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        asked.append(host)
        return frozenset({_ip("10.1.1.1")})

    settings = Settings(node={"check_peer_host": True}, peers=PEERS)
    policy = AccessPolicy.from_settings(settings, resolve=resolver)
    assert asked == [p["host"] for p in PEERS]
    assert policy.refusal("PEER4", "10.1.1.1") is None
    assert asked == [p["host"] for p in PEERS], "no lookup per association"


def test_check_peer_host_needs_peers(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[node]\ncheck_peer_host = true\n")
    with pytest.raises(ConfigError, match=r"check_peer_host = true needs at least one \[\[peers"):
        load_settings(path)


def test_request_that_cannot_be_checked_is_rejected() -> None:
    calls: list[object] = []

    class Broken(AccessPolicy):
        def refusal(self, calling_aet: str, address: str) -> str | None:
            raise RuntimeError("resolver exploded")

    requestor = SimpleNamespace(address="10.0.0.1",
                                primitive=SimpleNamespace(calling_ae_title="CR1"))
    assoc = SimpleNamespace(
        requestor=requestor,
        acse=SimpleNamespace(send_reject=lambda *rsd: calls.append(rsd)),
        kill=lambda: calls.append("kill"),
    )
    handle_requested(SimpleNamespace(assoc=assoc), Broken())  # type: ignore[arg-type]
    assert calls == [REJECT_CALLING_AE, "kill"]


@pytest.fixture
def bound_listener(tmp_path: Path) -> Iterator[tuple[int, JobRepository]]:
    port = free_port()
    settings = Settings(node={"port": port, "host": "::", "data_dir": tmp_path / "data",
                              "check_peer_host": True}, peers=PEERS)
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    create_schema(engine)
    repo = JobRepository(engine)
    server = DicomServer(settings, Intake(tmp_path / "data", repo))
    server.start()
    try:
        yield port, repo
    finally:
        server.shutdown()


def _echo_from(host: str, port: int, calling: str) -> tuple[bool, tuple[int, int, int] | None]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(host, port, ae_title="PNEUMONODE")
    if assoc.is_established:
        assoc.release()
        return True, None
    rsp = assoc.acceptor.primitive
    return False, (None if rsp is None else (rsp.result, rsp.result_source, rsp.diagnostic))


def test_storescu_peers_bound_to_their_hosts(
    tmp_path: Path, bound_listener: tuple[int, JobRepository], caplog: pytest.LogCaptureFixture
) -> None:
    port, repo = bound_listener
    caplog.set_level(logging.WARNING, logger="pneumonode.dicom.scp")
    files = [synthetic.write(synthetic.make_radiograph(rows=32, columns=32, seed=60 + i),
                             tmp_path / f"{i}.dcm") for i in range(3)]
    ok = storescu(files[:1], port, aet="PEER4")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    by_name = storescu(files[1:2], port, aet="BYNAME")
    assert by_name.returncode == 0, by_name.stdout + by_name.stderr
    for calling in ("FARAWAY", "STRANGER", "PEER6"):
        out = storescu(files[2:], port, aet=calling)
        assert out.returncode != 0
        assert "calling ae title not recognized" in (out.stdout + out.stderr).lower(), calling
    assert sorted(j.calling_aet for j in repo.list_jobs()) == ["BYNAME", "PEER4"]
    assert "'FARAWAY' connected from" in caplog.text
    assert "'STRANGER' is not a [[peers]] entry" in caplog.text


def test_ipv6_peers_bound_to_their_hosts(bound_listener: tuple[int, JobRepository]) -> None:
    port, _ = bound_listener
    assert _echo_from("::1", port, "PEER6") == (True, None)
    localhost_has_v6 = _ip("::1") in resolve_host("localhost")  # depends on /etc/hosts
    assert _echo_from("::1", port, "BYNAME")[0] is localhost_has_v6
    assert _echo_from("::1", port, "PEER4") == (False, REJECT_CALLING_AE)
    assert _echo_from("127.0.0.1", port, "PEER4") == (True, None)


def test_reloaded_peers_apply_to_new_associations(tmp_path: Path) -> None:
    port = free_port()
    before = Settings(node={"port": port, "host": "127.0.0.1", "data_dir": tmp_path / "data",
                            "check_peer_host": True}, peers=PEERS)
    server = DicomServer(before, Intake(tmp_path / "data", JobRepository(
        _schema(make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")))))
    server.start()
    try:
        assert _echo_from("127.0.0.1", port, "NEWCOMER")[0] is False
        after = before.model_copy(update={"peers": Settings(peers=[
            *PEERS, {"ae_title": "NEWCOMER", "host": "127.0.0.1", "port": 104}]).peers})
        server.reload_access(after)
        assert _echo_from("127.0.0.1", port, "NEWCOMER") == (True, None)
    finally:
        server.shutdown()


def _schema(engine: Any) -> Any:
    create_schema(engine)
    return engine
