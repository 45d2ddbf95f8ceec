"""Crash safety: SIGKILL the node at chosen and random points of a 100-image stream.

After each restart every acknowledged image must end with exactly one set of result UIDs, and
those results (and no others) must reach the destination.
"""

from __future__ import annotations

import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import synthetic
from harness import (
    PEER_ENV,
    NodeProcess,
    StoreSCP,
    free_port,
    make_tiny_package,
    require,
    storescu,
    wait_for,
    write_config,
)

from pneumonode.queue.db import make_engine
from pneumonode.queue.repository import JobRepository

pytestmark = pytest.mark.slow
N_IMAGES = 100


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_package(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("stream")
    return [
        synthetic.write(synthetic.make_radiograph(seed=1000 + i, rows=96, columns=80),
                        folder / f"{i:03d}.dcm")
        for i in range(N_IMAGES)
    ]


class Rig:
    """One node configuration, its database seen from the test, and a destination port."""

    def __init__(self, tmp_path: Path, package: Path) -> None:
        self.tmp = tmp_path
        self.port = free_port()
        self.dest_port = free_port()
        self.dest = StoreSCP(tmp_path / "dest", self.dest_port)
        self.config = write_config(tmp_path / "node.toml", port=self.port,
                                   data_dir=tmp_path / "data",
                                   destinations=[("DEST", "127.0.0.1", self.dest_port)])
        self.env = {"PNEUMONODE_MODEL__PATH": str(package)}
        self.node: NodeProcess | None = None
        self.restarts = 0
        self._repo: JobRepository | None = None

    @property
    def repo(self) -> JobRepository:
        if self._repo is None:
            db = self.tmp / "data" / "pneumonode.db"
            self._repo = JobRepository(make_engine(f"sqlite:///{db}"))
        return self._repo

    def start_node(self) -> NodeProcess:
        self.node = NodeProcess(self.config, self.tmp / "node.log", env=self.env).start()
        return self.node

    def kill_node(self) -> None:
        assert self.node is not None
        self.node.kill()
        self.restarts += 1

    def states(self) -> dict[str, int]:
        if not (self.tmp / "data" / "pneumonode.db").exists():
            return {}
        return {state: n for state, n in self.repo.counts_by_state().items() if n}

    def deliveries_sending(self) -> bool:
        return any(d.state == "sending" for j in self.repo.list_jobs(limit=1000)
                   for d in self.repo.deliveries(j.id))

    def send_async(self, files: list[Path]) -> subprocess.Popen[str]:
        exe = require("storescu")
        return subprocess.Popen(
            [exe, "-aet", "MODALITY", "-aec", "PNEUMONODE", "127.0.0.1", str(self.port),
             *map(str, files)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=PEER_ENV)

    def finish(self, stream: list[Path]) -> None:
        """Restart if needed, re-send everything (a sender retries what failed), then verify."""
        if self.node is None or self.node.proc is None or self.node.proc.poll() is not None:
            self.start_node()
        if self.dest.proc is None:
            self.dest.start()
        resend = storescu(stream, self.port)
        assert resend.returncode == 0, resend.stdout + resend.stderr
        assert self.node is not None
        wait_for(lambda: self.states() == {"done": N_IMAGES}, 240,
                 f"{N_IMAGES} jobs done (now {self.states()})", step=0.5)
        wait_for(lambda: len(self.dest.files()) >= 3 * N_IMAGES, 60, "all results at storescp")
        time.sleep(1.0)
        self.node.stop()
        self.dest.stop()
        self.verify(stream)

    def verify(self, stream: list[Path]) -> None:
        sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in stream}
        jobs = self.repo.list_jobs(limit=10 * N_IMAGES)
        assert {j.sop_instance_uid for j in jobs} == sources
        assert len(jobs) == N_IMAGES, "one job per image, duplicates acknowledged without a job"
        expected = {u for j in jobs for u in (j.seg_sop_uid, j.sc_sop_uid, j.sr_sop_uid)}
        assert None not in expected and len(expected) == 3 * N_IMAGES
        received = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                    for p in self.dest.files()]
        assert sorted(received) == sorted(expected), "results under other UIDs reached the PACS"
        print(f"\n{N_IMAGES} acknowledged, {len(received) // 3} delivered, "
              f"0 duplicates, 0 lost, {self.restarts} kills")


@pytest.fixture
def rig(tmp_path: Path, package: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path, package)
    yield rig
    if rig.node is not None:
        rig.node.stop()
    rig.dest.stop()


def test_kill_during_receive(rig: Rig, stream: list[Path]) -> None:
    rig.dest.start()
    rig.start_node()
    sender = rig.send_async(stream)
    wait_for(lambda: sum(rig.states().values()) >= 20, 120, "20 images received")
    rig.kill_node()
    sender.wait(60)
    rig.finish(stream)


def test_kill_during_inference(rig: Rig, stream: list[Path]) -> None:
    rig.dest.start()
    rig.start_node()
    sender = rig.send_async(stream)
    wait_for(lambda: rig.states().get("processing", 0) > 0 and rig.states().get("done", 0) > 5,
             120, "a job in processing after some are done", step=0.02)
    rig.kill_node()
    sender.wait(60)
    rig.finish(stream)


def test_kill_between_outputs_and_sending(rig: Rig, stream: list[Path]) -> None:
    rig.start_node()  # destination down: results wait in `delivering`
    sent = storescu(stream, rig.port)
    assert sent.returncode == 0
    wait_for(lambda: rig.states().get("delivering", 0) >= 30, 120, "30 jobs with results written")
    rig.kill_node()
    rig.finish(stream)


def test_kill_during_sending(rig: Rig, stream: list[Path]) -> None:
    hang = socket.create_server(("127.0.0.1", rig.dest_port))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def swallow() -> None:  # accepts and never answers: the send hangs until its ACSE timeout
        hang.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(hang.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=swallow, daemon=True)
    thread.start()
    try:
        rig.start_node()
        sent = storescu(stream[:10], rig.port)
        assert sent.returncode == 0
        wait_for(rig.deliveries_sending, 120, "a delivery in `sending`", step=0.05)
        rig.kill_node()
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        hang.close()
    rig.finish(stream)


def test_kill_at_random_points(rig: Rig, stream: list[Path]) -> None:
    rng = random.Random(20261126)
    rig.dest.start()
    for _ in range(3):
        rig.start_node()
        sender = rig.send_async(stream)
        time.sleep(rng.uniform(0.5, 6.0))
        rig.kill_node()
        sender.wait(60)
    rig.finish(stream)


