"""Wires the node together: listener, workers, senders, scheduler; signals and clean shutdown."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass, field
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler

from pneumonode import systemd
from pneumonode.dicom.intake import Intake
from pneumonode.dicom.scp import DicomServer
from pneumonode.inference.predictor import Predictor
from pneumonode.queue.db import create_schema, make_engine
from pneumonode.queue.repository import JobRepository
from pneumonode.scheduler import build_scheduler
from pneumonode.sender import Sender
from pneumonode.settings import Settings
from pneumonode.worker import Worker

LOGGER = logging.getLogger(__name__)


@dataclass
class _Threads:
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)


class Node:
    """A running pneumonode: build with settings, then :meth:`start` and :meth:`stop`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._work = _Threads()
        self._send = _Threads()
        self._job_wake = threading.Event()
        self._send_wake = threading.Event()
        self._server: DicomServer | None = None
        self._scheduler: BackgroundScheduler | None = None
        self.address: tuple[str, int] | None = None
        self.repository: JobRepository | None = None

    def start(self) -> tuple[str, int]:
        """Load the model, open the database, start listening and working.

        Raises
        ------
        pneumonode.inference.package.ModelPackageError
            When the model package cannot be loaded.
        OSError
            When the data folder or the port cannot be used.
        """
        cfg = self.settings
        data_dir = cfg.node.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        predictor = Predictor.load(cfg.model_path) if cfg.worker.enabled else None
        engine = make_engine(cfg.database_url)
        create_schema(engine)
        repo = JobRepository(engine)
        self.repository = repo
        intake = Intake(data_dir, repo, on_queued=self._job_wake.set)
        host = socket.gethostname()
        pid = os.getpid()
        workers: list[Worker] = []
        if predictor is not None:
            LOGGER.info("model %s (uid %s) loaded", predictor.card.display_name, predictor.card.uid)
            workers = [
                Worker(
                    cfg, repo, predictor, f"{host}:{pid}:w{i}", self._job_wake, self._send_wake.set
                )
                for i in range(cfg.worker.threads)
            ]
        senders = [
            Sender(cfg, repo, f"{host}:{pid}:s{i}", self._send_wake)
            for i in range(cfg.delivery.threads)
        ]
        heartbeats = [w.beat for w in workers] + [s.beat for s in senders]
        self._scheduler = build_scheduler(cfg, repo, heartbeats, self._wake_all)
        self._server = DicomServer(cfg, intake)
        self.address = self._server.start()
        for worker in workers:
            self._spawn(self._work, worker.run, worker.worker_id)
        for sender in senders:
            self._spawn(self._send, sender.run, sender.sender_id)
        self._scheduler.start()
        return self.address

    def _wake_all(self) -> None:
        self._job_wake.set()
        self._send_wake.set()

    @staticmethod
    def _spawn(group: _Threads, target: object, name: str) -> None:
        assert callable(target)
        thread = threading.Thread(target=target, args=(group.stop,), name=name, daemon=True)
        thread.start()
        group.threads.append(thread)

    def stop(self, timeout_s: float = 120.0) -> None:
        """Stop accepting, finish the jobs and sends in hand, then stop everything."""
        if self._server is not None:
            self._server.stop_accepting()
        self._work.stop.set()
        self._job_wake.set()
        for thread in self._work.threads:
            thread.join(timeout_s)
        self._send.stop.set()
        self._send_wake.set()
        for thread in self._send.threads:
            thread.join(timeout_s)
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def serve(settings: Settings) -> int:
    """Run the node until SIGTERM or SIGINT; returns the process exit code."""
    node = Node(settings)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        LOGGER.info("received %s: stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = node.start()
    systemd.notify(f"READY=1\nSTATUS=listening on {host}:{port}")
    watchdog = systemd.watchdog_interval_s()
    while not stopping.wait(watchdog if watchdog is not None else 3600):
        if watchdog is not None:
            systemd.notify("WATCHDOG=1")
    systemd.notify("STOPPING=1")
    node.stop()
    LOGGER.info("stopped")
    return 0
