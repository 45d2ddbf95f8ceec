"""As a systemd service: the unit verifies, notify protocol, SIGHUP reload, SIGTERM drain."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import synthetic
from harness import REPO, NodeProcess, StoreSCP, free_port, storescu, wait_for
from service.nodekit import NotifySocket, http_get, service_config

from pneumonode.queue.db import make_engine
from pneumonode.queue.repository import JobRepository

pytestmark = pytest.mark.slow

UNIT = REPO / "deploy" / "pneumonode.service"


def _verify(unit: Path) -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    out = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    return (out.stdout + out.stderr).strip()


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify also checks that ExecStart exists: point it at this checkout's console script.
    console = Path(sys.executable).parent / "pneumonode"
    text = UNIT.read_text().replace("/opt/pneumonode/.venv/bin/pneumonode", str(console))
    assert str(console) in text
    for key in ("Type=notify", "WatchdogSec=", "StateDirectory=pneumonode", "ExecReload=",
                "ProtectSystem=strict", "NoNewPrivileges=yes", "Restart=on-failure"):
        assert key in text, key
    unit = tmp_path / "pneumonode.service"
    unit.write_text(text)
    assert _verify(unit) == ""
    broken = tmp_path / "broken" / "pneumonode.service"
    broken.parent.mkdir()
    broken.write_text(text.replace("Type=notify", "Type=notifyy"))
    assert "notifyy" in _verify(broken)


def _node(tmp_path: Path, model: Path, notify: NotifySocket | None = None,
          destinations: list[tuple[str, str, int]] | None = None,
          extra: str = "", env: dict[str, str] | None = None) -> tuple[NodeProcess, int, Path]:
    metrics_port = free_port()
    config = service_config(tmp_path / "node.toml", port=free_port(), data_dir=tmp_path / "data",
                            metrics_port=metrics_port, model=model,
                            destinations=destinations or [], extra=extra)
    environment = dict(env or {})
    if notify is not None:
        environment["NOTIFY_SOCKET"] = str(notify.path)
    return NodeProcess(config, tmp_path / "node.log", env=environment), metrics_port, config


def test_notify_ready_watchdog_reload_stopping(
    tmp_path: Path, tiny_model: Path, notify_socket: NotifySocket
) -> None:
    node, metrics_port, _ = _node(tmp_path, tiny_model, notify_socket,
                                  env={"WATCHDOG_USEC": "1000000"})
    node.start()
    try:
        ready = notify_socket.wait_for("READY=1", 60)
        assert any(line.startswith("STATUS=listening on 127.0.0.1:") for line in ready.splitlines())
        assert f"metrics on 127.0.0.1:{metrics_port}" in ready
        for _ in range(3):  # WATCHDOG_USEC=1 s: a ping every 0.5 s
            notify_socket.wait_for("WATCHDOG=1", 5)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        notify_socket.wait_for("RELOADING=1", 10)
        notify_socket.wait_for("READY=1", 10)
        node.proc.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING=1", 10)
        assert node.proc.wait(60) == 0, node.tail()
    finally:
        node.stop()
    reloading = next(m for m in notify_socket.messages if "RELOADING=1" in m)
    assert any(line.startswith("MONOTONIC_USEC=") for line in reloading.splitlines())


def _results(dest: StoreSCP) -> float:
    """Images whose results (SEG, SC and SR: three files each) reached ``dest``."""
    return len(dest.files()) / 3


def test_sighup_reloads_destinations_and_keeps_them_on_a_bad_file(
    tmp_path: Path, tiny_model: Path
) -> None:
    first = StoreSCP(tmp_path / "first", free_port(), "FIRST").start()
    second = StoreSCP(tmp_path / "second", free_port(), "SECOND").start()
    node, metrics_port, config = _node(tmp_path, tiny_model,
                                       destinations=[("FIRST", "127.0.0.1", first.port)])
    images = [synthetic.write(synthetic.make_radiograph(seed=60 + i, rows=96, columns=80),
                              tmp_path / f"{i}.dcm") for i in range(3)]
    node.start()
    try:
        assert storescu(images[:1], node.port).returncode == 0
        wait_for(lambda: _results(first) == 1, 60, "the first result at FIRST")
        good = config.read_text() + (
            f'[[destinations]]\nname = "second"\nae_title = "SECOND"\nhost = "127.0.0.1"\n'
            f"port = {second.port}\n"
        )
        config.write_text(good)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded: destinations dest0, second" in node.tail(), 20, "reload")
        assert storescu(images[1:2], node.port).returncode == 0
        wait_for(lambda: _results(first) == 2 and _results(second) == 1, 60,
                 "the second image at both destinations")
        config.write_text(good.replace(f"port = {second.port}", "port = 70000"))
        node.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in node.tail(), 20, "the refused reload")
        refused = [line for line in node.tail(200).splitlines() if "reload refused" in line]
        assert len(refused) == 1 and "70000" in refused[0], refused
        assert node.proc.poll() is None
        assert http_get(metrics_port, "/healthz")[0] == 200
        assert storescu(images[2:], node.port).returncode == 0
        wait_for(lambda: _results(first) == 3 and _results(second) == 2, 60,
                 "the third image at both destinations (the good configuration kept)")
    finally:
        assert node.stop() == 0, node.tail()
        first.stop()
        second.stop()


def test_sigterm_finishes_the_job_in_hand_and_exits_0(tmp_path: Path, tiny_model: Path) -> None:
    # A 4 s batch wait keeps the claimed job in hand long enough to send SIGTERM meanwhile.
    node, _, _ = _node(tmp_path, tiny_model, env={
        "PNEUMONODE_WORKER__BATCH_WAIT_MS": "4000", "PNEUMONODE_WORKER__BATCH_SIZE": "4"})
    image = synthetic.write(synthetic.make_radiograph(seed=70, rows=96, columns=80),
                            tmp_path / "in-hand.dcm")
    node.start()
    repo = JobRepository(make_engine(f"sqlite:///{tmp_path / 'data' / 'pneumonode.db'}"))
    try:
        assert storescu([image], node.port).returncode == 0
        wait_for(lambda: repo.counts_by_state()["processing"] == 1, 30, "the job to be claimed")
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert node.proc.wait(60) == 0, node.tail()
    finally:
        node.stop()
    job = repo.list_jobs()[0]
    assert job.state == "done", (job.state, node.tail())
    assert job.seg_path is not None and (tmp_path / "data" / job.seg_path).is_file()
    assert time.monotonic() - started < 30
    lines = node.log.read_text(errors="replace").splitlines()
    stopping = next(i for i, line in enumerate(lines) if "received SIGTERM: stopping" in line)
    processed = next(i for i, line in enumerate(lines) if f"job {job.id} processed" in line)
    assert stopping < processed, "SIGTERM came after the job was finished: nothing was in hand"
