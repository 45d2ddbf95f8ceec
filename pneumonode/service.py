"""Wires the node together: listener, workers, senders, scheduler, metrics; signals and shutdown."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine

from pneumonode import systemd
from pneumonode.dicom.intake import Intake
from pneumonode.dicom.scp import DicomServer
from pneumonode.health import Health, database_problem
from pneumonode.http import HttpEndpoint
from pneumonode.metrics import NodeMetrics
from pneumonode.queue import migrate
from pneumonode.queue.db import make_engine
from pneumonode.queue.repository import JobRepository
from pneumonode.retention import PurgeReport
from pneumonode.scheduler import build_scheduler
from pneumonode.sender import Sender
from pneumonode.settings import ConfigError, Settings
from pneumonode.worker import Worker
from pneumonode.worker_processes import WorkerProcesses
from pneumonode.workerpool import WorkerThreads, wedged_after_s

LOGGER = logging.getLogger(__name__)

RELOADABLE = ("destinations", "peers")
"""Top-level settings that SIGHUP applies without a restart."""


@dataclass
class _Threads:
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)


class Node:
    """A running pneumonode: build with settings, then :meth:`start` and :meth:`stop`.

    Parameters
    ----------
    settings:
        The configuration.
    clock:
        The current time for retention; tests inject one.
    """

    def __init__(self, settings: Settings, clock: Callable[[], datetime] | None = None) -> None:
        self.settings = settings
        self._clock = clock
        self._send = _Threads()
        self._job_wake = threading.Event()
        self._send_wake = threading.Event()
        self._lock = threading.Lock()
        self._server: DicomServer | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._http: HttpEndpoint | None = None
        self._engine: Engine | None = None
        self._pool: WorkerThreads | None = None
        self._processes: WorkerProcesses | None = None
        self._senders: list[Sender] = []
        self._listening = False
        self._stopping = False
        self.address: tuple[str, int] | None = None
        self.http_address: tuple[str, int] | None = None
        self.repository: JobRepository | None = None
        self.metrics: NodeMetrics | None = None

    def start(self) -> tuple[str, int]:
        """Load the model, open and migrate the database, start listening and working.

        Raises
        ------
        pneumonode.inference.card.ModelPackageError
            When the model package cannot be loaded.
        pneumonode.queue.migrate.SchemaError
            When a PostgreSQL database needs ``pneumonode db upgrade``.
        sqlalchemy.exc.SQLAlchemyError
            When the database cannot be reached.
        OSError
            When the data folder or the DICOM port cannot be used.

        What was started before a failure is stopped again before the exception propagates.
        """
        try:
            return self._start()
        except BaseException:
            self.stop(timeout_s=5.0)
            raise

    def _start(self) -> tuple[str, int]:
        cfg = self.settings
        data_dir = cfg.node.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(cfg.database_url)
        self._engine = engine
        revision = migrate.prepare_schema(engine)
        LOGGER.info("queue database %s at schema revision %s", engine.dialect.name, revision)
        repo = JobRepository(engine)
        self.repository = repo
        metrics = NodeMetrics(repo)
        self.metrics = metrics
        wake: Callable[[], None] = self._job_wake.set
        host = socket.gethostname()
        pid = os.getpid()
        if cfg.worker.enabled and cfg.worker.processes > 0:
            processes = WorkerProcesses(cfg, metrics, self._send_wake.set)
            self._processes = processes
            processes.start()
            wake = processes.wake
        elif cfg.worker.enabled:
            from pneumonode.inference.predictor import Predictor

            predictor = Predictor.load(cfg.model_path)
            LOGGER.info("model %s (uid %s) loaded", predictor.card.display_name, predictor.card.uid)

            def make_worker(name: str) -> Worker:
                return Worker(
                    self.settings,
                    repo,
                    predictor,
                    f"{host}:{pid}:{name}",
                    self._job_wake,
                    self._send_wake.set,
                    observer=metrics,
                )

            self._pool = WorkerThreads(
                cfg.worker.threads, make_worker, metrics, lambda: self.wedged_after_s()
            )
        intake = Intake(data_dir, repo, wake, metrics)
        self._senders = [
            Sender(cfg, repo, f"{host}:{pid}:s{i}", self._send_wake, observer=metrics)
            for i in range(cfg.delivery.threads)
        ]
        self._scheduler = build_scheduler(
            cfg,
            repo,
            [self._beat, self._supervise],
            self._wake_all,
            on_purged=self._purged,
            clock=self._clock,
        )
        self._server = DicomServer(cfg, intake)
        self.address = self._server.start()
        for warning in cfg.warnings():
            LOGGER.warning("%s", warning)
        for line in describe_destinations(cfg):
            LOGGER.info("%s", line)
        self._listening = True
        if self._pool is not None:
            self._pool.start()
        for sender in self._senders:
            self._spawn(self._send, sender.run, sender.sender_id)
        self._scheduler.start()
        if cfg.metrics.enabled:
            self._start_http()
        return self.address

    def _start_http(self) -> None:
        assert self.metrics is not None
        endpoint = HttpEndpoint(
            self.settings.metrics.host,
            self.settings.metrics.port,
            self.metrics.registry,
            self.health,
        )
        try:
            self.http_address = endpoint.start()
        except OSError as exc:
            LOGGER.error(
                "metrics.port: cannot serve /metrics and /healthz on %s:%d (%s); the node runs "
                "without them",
                self.settings.metrics.host,
                self.settings.metrics.port,
                exc.strerror or exc,
            )
            return
        self._http = endpoint

    def _beat(self) -> None:
        """Refresh the claims of the current workers and senders (replaced ones excluded)."""
        if self._pool is not None:
            self._pool.beat()
        with self._lock:
            beats = [s.beat for s in self._senders]
        for beat in beats:
            beat()

    def _supervise(self) -> None:
        self.supervise()

    def wedged_after_s(self) -> float:
        """Seconds on one batch after which a worker counts as wedged."""
        return wedged_after_s(self.settings)

    def supervise(self) -> list[str]:
        """Replace every worker thread of this process that died or wedged; returns their ids.

        See :meth:`pneumonode.workerpool.WorkerThreads.supervise`. Worker processes supervise
        their own threads, and the serving process restarts a worker process that exits
        (:class:`pneumonode.worker_processes.WorkerProcesses`).
        """
        with self._lock:
            if self._stopping or self._pool is None:
                return []
        return self._pool.supervise()

    @property
    def worker_threads(self) -> list[Worker]:
        """The workers running as threads of this process (none with worker processes)."""
        return [] if self._pool is None else list(self._pool.workers)

    @property
    def worker_processes(self) -> WorkerProcesses | None:
        """The worker processes, when ``worker.processes`` > 0."""
        return self._processes

    def _purged(self, report: PurgeReport) -> None:
        if self.metrics is not None:
            self.metrics.purged(report.jobs, report.files)

    def _wake_all(self) -> None:
        self._job_wake.set()
        self._send_wake.set()

    @classmethod
    def _spawn(cls, group: _Threads, target: object, name: str) -> None:
        group.threads.append(cls._start_thread(group, target, name))

    @staticmethod
    def _start_thread(group: _Threads, target: object, name: str) -> threading.Thread:
        assert callable(target)
        thread = threading.Thread(target=target, args=(group.stop,), name=name, daemon=True)
        thread.start()
        return thread

    def threads_problem(self) -> str | None:
        """Why the workers, senders or scheduler are not all running, or None."""
        dead = [t.name for t in self._send.threads if not t.is_alive()]
        if dead:
            return f"threads stopped: {', '.join(dead)}"
        for problem in (
            None if self._pool is None else self._pool.problem(),
            None if self._processes is None else self._processes.problem(),
        ):
            if problem is not None:
                return problem
        if self._scheduler is None or not self._scheduler.running:
            return "housekeeping scheduler not running"
        return None

    def health(self) -> Health:
        """Listening, database reachable, workers alive: each check with its reason."""
        reasons: list[str] = []
        listening = self._listening and not self._stopping
        if not listening:
            reasons.append(
                "listening: stopping, no longer accepting associations"
                if self._stopping
                else "listening: the DICOM listener is not running"
            )
        db = "database: not opened" if self._engine is None else database_problem(self._engine)
        if db is not None:
            reasons.append(db)
        threads = self.threads_problem()
        if threads is not None and not self._stopping:
            reasons.append(f"workers: {threads}")
        workers_ok = threads is None or self._stopping
        node = self.settings.node
        details = {
            "ae_title": node.ae_title,
            "dicom": None if self.address is None else f"{self.address[0]}:{self.address[1]}",
            "workers": self._worker_count(),
            "senders": len(self._senders),
            "destinations": [d.name for d in self.settings.destinations],
        }
        return Health(
            checks={"listening": listening, "database": db is None, "workers": workers_ok},
            reasons=tuple(reasons),
            details=details,
        )

    def _worker_count(self) -> int:
        if self._processes is not None:
            return self._processes.count() * self.settings.worker.threads
        return 0 if self._pool is None else len(self._pool.workers)

    def reload(self, new: Settings) -> tuple[str, ...]:
        """Adopt the destinations and peers of ``new`` without a restart.

        Workers use them for jobs finished from now on; senders send queued results to a
        destination's new address. Other changed settings need a restart and are ignored.

        Returns
        -------
        tuple of str
            The names of the changed settings that were ignored.
        """
        with self._lock:
            old = self.settings
            ignored = tuple(
                name
                for name in type(old).model_fields
                if name not in RELOADABLE and getattr(new, name) != getattr(old, name)
            )
            merged = old.model_copy(update={name: getattr(new, name) for name in RELOADABLE})
            self.settings = merged
            if self._pool is not None:
                self._pool.reload(merged)
            if self._processes is not None:
                self._processes.reload(merged)
            for sender in self._senders:
                sender.reload(merged)
            if self._server is not None:
                self._server.reload_access(merged)
        return ignored

    def stop(self, timeout_s: float = 120.0) -> None:
        """Stop accepting, finish the jobs and sends in hand, then stop everything."""
        self._stopping = True
        if self._server is not None:
            self._server.stop_accepting()
        self._listening = False
        if self._pool is not None:
            self._pool.stop(timeout_s)
        if self._processes is not None:
            self._processes.stop(timeout_s)
        self._send.stop.set()
        self._send_wake.set()
        for thread in self._send.threads:
            thread.join(timeout_s)
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if self._http is not None:
            self._http.stop()
            self._http = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._engine is not None:
            self._engine.dispose()


def describe_destinations(settings: Settings) -> list[str]:
    """One line per destination: where it is and what it gets (logged at start and reload)."""
    lines = []
    for d in settings.destinations:
        kinds = [k.value.upper() for k in settings.output.kinds() if k in d.objects]
        lines.append(
            f"destination {d.name}: {d.ae_title}@{d.host}:{d.port}{' (TLS)' if d.tls else ''} "
            f"gets {'+'.join(kinds)}{', positive findings only' if d.only_positive else ''}"
        )
    if settings.delivery.return_to_sender:
        lines.append("results also go back to the sender when it is a [[peers]] entry")
    return lines


@dataclass
class _Signals:
    """What the signal handlers asked for; the main loop acts on it."""

    wake: threading.Event = field(default_factory=threading.Event)
    stop: bool = False
    reload: bool = False


def _status(node: Node) -> str:
    host, port = node.address or ("?", 0)
    names = ", ".join(d.name for d in node.settings.destinations) or "none"
    text = f"STATUS=listening on {host}:{port}; destinations: {names}"
    if node.http_address is not None:
        text += f"; metrics on {node.http_address[0]}:{node.http_address[1]}"
    return text


def _reload(node: Node, loader: Callable[[], Settings]) -> None:
    systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        new = loader()
    except ConfigError as exc:
        LOGGER.error("reload refused, keeping the running configuration: %s", exc)
    else:
        ignored = node.reload(new)
        names = ", ".join(d.name for d in node.settings.destinations) or "none"
        LOGGER.info("reloaded: destinations %s; %d peers", names, len(node.settings.peers))
        if ignored:
            LOGGER.warning(
                "reload: changes to %s need a restart and were not applied", ", ".join(ignored)
            )
    systemd.notify("READY=1\n" + _status(node))


def serve(settings: Settings, loader: Callable[[], Settings] | None = None) -> int:
    """Run the node until SIGTERM or SIGINT; returns the process exit code.

    Parameters
    ----------
    settings:
        The configuration to start with.
    loader:
        Reads the configuration again on SIGHUP (the same file and environment); without
        it SIGHUP is logged and ignored.

    Under systemd (``NOTIFY_SOCKET``) the node says READY once it listens, RELOADING/READY
    around a reload, STOPPING on shutdown, and pings the watchdog (``WATCHDOG_USEC``) only
    while its workers, senders and scheduler run, so that systemd restarts a wedged node.
    """
    node = Node(settings)
    signals = _Signals()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        LOGGER.info("received %s: stopping", signal.Signals(signum).name)
        signals.stop = True
        signals.wake.set()

    def on_reload(signum: int, frame: FrameType | None) -> None:
        signals.reload = True
        signals.wake.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_reload)
    node.start()
    systemd.notify("READY=1\n" + _status(node))
    watchdog = systemd.watchdog_interval_s()
    next_ping = time.monotonic()
    while True:
        wait = 3600.0 if watchdog is None else max(0.0, next_ping - time.monotonic())
        signals.wake.wait(wait)
        signals.wake.clear()
        if signals.stop:
            break
        if signals.reload:
            signals.reload = False
            if loader is None:
                LOGGER.warning("SIGHUP: no configuration source to reload from; ignored")
            else:
                _reload(node, loader)
        if watchdog is not None and time.monotonic() >= next_ping:
            next_ping = time.monotonic() + watchdog
            problem = node.threads_problem()
            if problem is None:
                systemd.notify("WATCHDOG=1")
            else:
                LOGGER.error("not pinging the systemd watchdog: %s", problem)
    systemd.notify("STOPPING=1\nSTATUS=stopping: finishing the work in hand")
    node.stop()
    LOGGER.info("stopped")
    return 0
