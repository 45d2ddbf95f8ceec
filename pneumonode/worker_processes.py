"""Worker processes: inference and result building beside the listener, one model per process.

With ``worker.processes = N`` (N >= 1) the serving process keeps the DICOM listener, the
senders, the scheduler and the metrics endpoint, and N child processes each load the model and
run ``worker.threads`` workers (:class:`pneumonode.workerpool.WorkerThreads`). Python stages
(decoding, pre- and post-processing, SEG/SC/SR building, writing) then use every core, not one
GIL, and receiving never waits behind inference: the children run at a lower CPU priority
(``worker.nice``) and TensorFlow in each uses ``worker.inference_threads`` threads (default: the
cores shared out between the processes).

What crosses the process boundary is small: a wake-up event when intake queues a job, a stop
event, settings on SIGHUP, and from the children their observations (metrics), a wake-up for
the senders, readiness and problems. Jobs themselves go through the queue database, as between
nodes that share one: a child that dies holding claims is the same as a node that crashed
(its claims expire after ``worker.stale_after_s`` and are retried within their budget).

Nothing is shared that a killed child could leave locked: every child has its own channels
(a socket pair whose one byte wakes it, a pipe for stop and reload, a pipe for what it reports),
never a shared lock, semaphore or queue. A process killed inside ``Event.set`` or
``Queue.put`` would hold that lock for ever, and the listener would hang on the next image.

A child dies with the serving process (``PR_SET_PDEATHSIG`` on Linux, a watch on the parent
otherwise), so a killed node leaves no worker behind processing jobs. Children are started and
restarted by one long-lived manager thread of the serving process, since the death signal is
tied to the thread that started the child.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from pneumonode.inference.card import ModelPackageError
from pneumonode.observer import NodeObserver
from pneumonode.settings import Settings

LOGGER = logging.getLogger(__name__)

EXIT_MODEL = 3
"""Exit code of a worker process that cannot load the model."""

READY_TIMEOUT_S = 600.0
"""How long the serving process waits for its worker processes to load the model at start."""

_RELAYED = frozenset(
    {
        "image_received",
        "inference_done",
        "job_processed",
        "delivered",
        "delivery_failed",
        "worker_error",
        "worker_replaced",
    }
)
"""Observer calls a child may relay to the serving process's observer (the metrics)."""

_PR_SET_PDEATHSIG = 1


def inference_threads(settings: Settings, cores: int | None = None) -> int:
    """Threads each worker process's model may use: the setting, or the cores shared out."""
    cfg = settings.worker
    if cfg.inference_threads > 0:
        return cfg.inference_threads
    return max(1, (cores or os.cpu_count() or 1) // max(1, cfg.processes))


class WorkerProcessError(RuntimeError):
    """A worker process could not start (other than a model that cannot be loaded)."""


@dataclass
class _Slot:
    """One worker process position (``p0``, ``p1``...) and what is known of its process."""

    index: int
    process: BaseProcess | None = None
    ready: bool = False
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    problem: str | None = None
    fatal: str | None = None
    wake: socket.socket | None = None  # one byte wakes the child (never blocks the writer)
    control: Connection | None = None  # stop and reload, to the child
    reports: Connection | None = None  # observations, readiness, problems, from the child

    def close_channels(self) -> None:
        """Close the serving process's ends of this slot's channels."""
        for channel in (self.wake, self.control, self.reports):
            if channel is not None:
                with contextlib.suppress(OSError):
                    channel.close()
        self.wake = self.control = self.reports = None


class WorkerProcesses:
    """The serving process's side: start, watch, restart and stop the worker processes.

    Parameters
    ----------
    settings:
        The configuration (``worker.processes`` children are run).
    observer:
        Receives the observations the children relay (the node's metrics).
    on_delivering:
        Called when a child has queued deliveries (wakes the senders).
    log_level:
        The children log at this level, to the same standard error.
    """

    def __init__(
        self,
        settings: Settings,
        observer: NodeObserver,
        on_delivering: Any,
        log_level: int | None = None,
    ) -> None:
        self._settings = settings
        self._observer = observer
        self._on_delivering = on_delivering
        self._log_level = logging.getLogger().level if log_level is None else log_level
        self._ctx = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i) for i in range(settings.worker.processes)]
        self._lock = threading.Condition()
        self._stopping = False
        self._running = False  # every child was ready once: from now on exits are restarted
        self._stop_deadline = 0.0
        self._manager: threading.Thread | None = None
        self._drain: threading.Thread | None = None
        self._drain_wake_r, self._drain_wake_w = multiprocessing.Pipe(duplex=False)
        self.restarts = 0

    # -- start ---------------------------------------------------------------------------------

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start every worker process and wait until each has loaded the model.

        Raises
        ------
        ModelPackageError
            When a worker process cannot load the model package.
        WorkerProcessError
            When a worker process fails otherwise, exits, or is not ready in ``timeout_s``.
        """
        self._drain = threading.Thread(target=self._drain_events, name="worker-events", daemon=True)
        self._drain.start()
        self._manager = threading.Thread(target=self._manage, name="worker-processes", daemon=True)
        self._manager.start()
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                failed = [s for s in self._slots if s.fatal is not None]
                if failed:
                    slot = failed[0]
                    assert slot.fatal is not None
                    if slot.fatal.startswith("model: "):
                        raise ModelPackageError(slot.fatal.removeprefix("model: "))
                    raise WorkerProcessError(f"worker process p{slot.index}: {slot.fatal}")
                if all(s.ready for s in self._slots):
                    self._running = True
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkerProcessError(
                        f"worker processes not ready after {timeout_s:g} s (loading the model)"
                    )
                self._lock.wait(min(left, 0.5))

    def _spawn(self, slot: _Slot) -> None:
        """Start the process of ``slot`` (called on the manager thread only)."""
        wake, child_wake = socket.socketpair()
        wake.setblocking(False)
        child_control, control = self._ctx.Pipe(duplex=False)  # (reader, writer)
        reports, child_reports = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=child_main,
            args=(
                slot.index,
                self._settings,
                child_wake,
                child_control,
                child_reports,
                os.getpid(),
                self._log_level,
            ),
            name=f"pneumonode-worker-p{slot.index}",
            daemon=False,
        )
        process.start()
        for end in (child_wake, child_control, child_reports):
            end.close()  # the child has its own copies
        slot.wake, slot.control, slot.reports = wake, control, reports
        slot.process = process
        slot.ready = False
        slot.started_at = time.monotonic()
        LOGGER.info("worker process p%d started (pid %s)", slot.index, process.pid)
        self._poke_drain()

    def _manage(self) -> None:
        """Start the children, restart any that exits, and at stop wait for them to end.

        This thread must outlive the children: the kernel's parent-death signal is tied to the
        thread that started a child, so it is this thread, not the process, that they die with.
        """
        with self._lock:
            for slot in self._slots:
                self._spawn(slot)
        while True:
            with self._lock:
                if self._stopping:
                    break
                sentinels = [s.process.sentinel for s in self._slots if s.process is not None]
            multiprocessing.connection.wait(sentinels, timeout=0.5)
            with self._lock:
                if self._stopping:
                    break
                now = time.monotonic()
                for slot in self._slots:
                    if slot.process is not None and not slot.process.is_alive():
                        self._exited(slot, now)
                    if slot.process is None and slot.fatal is None and now >= slot.restart_at:
                        self._spawn(slot)
                self._lock.notify_all()
        self._wait_for_children()

    def _wait_for_children(self) -> None:
        """Wait until every child has finished its batch and exited; kill one that is late."""
        for slot in self._slots:
            process = slot.process
            if process is None:
                continue
            process.join(max(0.0, self._stop_deadline - time.monotonic()))
            if process.is_alive():
                LOGGER.error("worker process p%d did not stop in time; killing it", slot.index)
                process.kill()
                process.join(5)

    def _exited(self, slot: _Slot, now: float) -> None:
        """Record that the process of ``slot`` ended unexpectedly and plan its restart."""
        assert slot.process is not None
        code = slot.process.exitcode
        pid = slot.process.pid
        slot.process.join(0)
        slot.process.close()
        slot.process = None
        slot.close_channels()
        killed = code is not None and code < 0
        how = f"was killed by signal {-(code or 0)}" if killed else f"exited ({code})"
        lived = now - slot.started_at
        slot.failures = slot.failures + 1 if lived < 60 else 1
        delay = min(60.0, 2.0 ** (slot.failures - 1)) if slot.failures > 1 else 0.0
        slot.restart_at = now + delay
        slot.ready = False
        slot.problem = f"worker process p{slot.index} (pid {pid}) {how}"
        if not self._running:  # at start: start() reports it and the node does not start
            slot.fatal = slot.fatal or slot.problem
            return
        self.restarts += 1
        self._observer.worker_replaced("died")
        LOGGER.error(
            "worker process p%d (pid %s) %s after %.0f s; the jobs it held are retried within "
            "their budget once their claims expire (worker.stale_after_s); restarting it%s",
            slot.index,
            pid,
            how,
            lived,
            f" in {delay:.0f} s" if delay else "",
        )

    def _poke_drain(self) -> None:
        """Make the relay thread look again at which children it reads from."""
        with contextlib.suppress(OSError):
            self._drain_wake_w.send_bytes(b"")

    def _drain_events(self) -> None:
        """Apply what the children report: observations, sender wake-ups, readiness, problems."""
        while True:
            with self._lock:
                readers = {s.reports: s for s in self._slots if s.reports is not None}
                if self._stopping and not readers:
                    return
            ready = multiprocessing.connection.wait([self._drain_wake_r, *readers], timeout=1.0)
            for conn in ready:
                if conn is self._drain_wake_r:
                    with contextlib.suppress(EOFError, OSError):
                        conn.recv_bytes()
                    continue
                slot = readers[conn]  # type: ignore[index]
                assert isinstance(conn, Connection)
                try:
                    message = conn.recv()
                except (EOFError, OSError, ValueError, TypeError, AttributeError, ImportError):
                    # the child ended (or died mid-message): nothing more to read from it
                    with self._lock:
                        if slot.reports is conn:
                            with contextlib.suppress(OSError):
                                conn.close()
                            slot.reports = None
                    continue
                except Exception:
                    LOGGER.exception("worker process p%d: unreadable report", slot.index)
                    continue
                self._apply(message)

    def _apply(self, message: Any) -> None:
        if not isinstance(message, tuple) or not message:
            return
        kind = message[0]
        try:
            if kind == "observe" and message[1] in _RELAYED:
                getattr(self._observer, message[1])(*message[2])
            elif kind == "delivering":
                self._on_delivering()
            elif kind in ("ready", "status", "fatal"):
                self._slot_message(message)
        except Exception:  # a malformed message must not end the relay
            LOGGER.exception("worker processes: cannot apply %r", kind)

    def _slot_message(self, message: tuple[Any, ...]) -> None:
        kind, index = message[0], message[1]
        with self._lock:
            slot = self._slots[index]
            if kind == "ready":
                slot.ready = True
                slot.problem = None
                LOGGER.info("worker process p%d ready (pid %s)", index, message[2])
            elif kind == "status":
                slot.problem = message[2]
            elif kind == "fatal":
                slot.problem = message[2]
                if not self._running:
                    slot.fatal = message[2]  # at start: the node refuses to start
                else:
                    LOGGER.error("worker process p%d: %s", index, message[2])
            self._lock.notify_all()

    # -- while running -------------------------------------------------------------------------

    def wake(self) -> None:
        """Tell the children a job was queued; never blocks (a wake already pending is enough)."""
        for slot in self._slots:
            sock = slot.wake
            if sock is not None:
                with contextlib.suppress(OSError):  # full (a wake is pending) or closed
                    sock.send(b"w")

    def reload(self, settings: Settings) -> None:
        """Send new settings (destinations, peers) to every child, for jobs finished from now."""
        with self._lock:
            self._settings = settings
            for slot in self._slots:
                if slot.control is not None and slot.process is not None:
                    with contextlib.suppress(OSError):
                        slot.control.send(("reload", settings))

    def problem(self) -> str | None:
        """Why a worker process is not running or reports trouble, or None."""
        with self._lock:
            problems = [
                s.problem or f"worker process p{s.index} is not running"
                for s in self._slots
                if s.process is None or s.problem
            ]
            starting = [
                f"p{s.index}" for s in self._slots if s.process is not None and not s.ready
            ]
        if starting and not problems:
            return None  # a restarted child loading its model is not yet a problem
        return "; ".join(problems) if problems else None

    def pids(self) -> list[int]:
        """Process ids of the running children."""
        with self._lock:
            return [s.process.pid for s in self._slots if s.process is not None and s.process.pid]

    def count(self) -> int:
        """How many worker processes the node runs."""
        return len(self._slots)

    # -- stop ----------------------------------------------------------------------------------

    def stop(self, timeout_s: float) -> None:
        """Let each child finish the batch in hand and exit; kill one that does not in time."""
        with self._lock:
            self._stopping = True
            self._stop_deadline = time.monotonic() + timeout_s
            self._lock.notify_all()
        for slot in self._slots:
            if slot.control is not None:
                with contextlib.suppress(OSError):
                    slot.control.send(("stop",))
        self.wake()
        if self._manager is not None:
            self._manager.join(timeout_s + 10)
        if self._drain is not None:
            self._drain.join(5)  # reads what the children reported until their pipes close
        with self._lock:
            for slot in self._slots:
                if slot.process is not None:
                    slot.process.close()
                    slot.process = None
                slot.close_channels()
        self._poke_drain()


# -- the child's side --------------------------------------------------------------------------


class _Reports:
    """The child's end of its report pipe, safe to use from several threads."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, *message: Any) -> None:
        """Send one report; never raises (the serving process may be gone)."""
        with self._lock, contextlib.suppress(Exception):
            self._conn.send(message)


class SocketWake:
    """A wake-up with the ``wait``/``set``/``clear`` of :class:`threading.Event`, fed by a socket.

    The serving process writes a byte to ``sock`` when it queues a job; :meth:`set` (used when
    stopping) wakes the waiters of this process through a socket pair of its own.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._remote = sock
        self._remote.setblocking(False)
        self._local_r, self._local_w = socket.socketpair()
        self._local_r.setblocking(False)
        self._local_w.setblocking(False)
        self._set = False

    def set(self) -> None:
        """Wake every waiter of this process."""
        self._set = True
        with contextlib.suppress(OSError):
            self._local_w.send(b"s")

    def is_set(self) -> bool:
        """Whether a wake is pending."""
        if self._set:
            return True
        readable, _, _ = select.select([self._remote, self._local_r], [], [], 0)
        return bool(readable)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until woken or ``timeout`` seconds; True when woken."""
        if self._set:
            return True
        readable, _, _ = select.select([self._remote, self._local_r], [], [], timeout)
        return bool(readable) or self._set

    def clear(self) -> None:
        """Forget the wakes received so far (the local one set by :meth:`set` stays)."""
        for sock in (self._remote, self._local_r):
            with contextlib.suppress(OSError):
                while sock.recv(4096):
                    pass


class RelayObserver:
    """The observer of a worker process: each call is sent to the serving process."""

    def __init__(self, reports: _Reports) -> None:
        self._reports = reports

    def _send(self, name: str, *args: Any) -> None:
        self._reports.send("observe", name, args)

    def image_received(self, outcome: str) -> None:
        """Relay."""
        self._send("image_received", outcome)

    def inference_done(self, images: int, seconds: float) -> None:
        """Relay."""
        self._send("inference_done", images, seconds)

    def job_processed(self, outcome: str) -> None:
        """Relay."""
        self._send("job_processed", outcome)

    def delivered(self, destination: str, job_id: int) -> None:
        """Relay."""
        self._send("delivered", destination, job_id)

    def delivery_failed(self, destination: str, final: bool) -> None:
        """Relay."""
        self._send("delivery_failed", destination, final)

    def worker_error(self, stage: str) -> None:
        """Relay."""
        self._send("worker_error", stage)

    def worker_replaced(self, reason: str) -> None:
        """Relay."""
        self._send("worker_replaced", reason)


def _die_with_parent(parent_pid: int) -> None:
    """End this process when the serving process ends, however it ends."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)

    def watch() -> None:  # where the death signal is not available
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def child_main(
    index: int,
    settings: Settings,
    wake_sock: socket.socket,
    control: Connection,
    reports_conn: Connection,
    parent_pid: int,
    log_level: int,
) -> None:
    """Body of worker process ``p{index}``: load the model, run workers until told to stop."""
    _die_with_parent(parent_pid)
    stop = threading.Event()

    def on_term(signum: int, frame: object) -> None:  # systemd signals the whole unit
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the parent decides
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads arrive from the parent
    cfg = settings.worker
    with contextlib.suppress(OSError):
        os.nice(cfg.nice)
    threads = str(inference_threads(settings))
    for name in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS"):
        os.environ[name] = threads
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1" if threads == "1" else "2")

    from pneumonode.cli.common import configure_logging, import_keras

    configure_logging(logging.getLevelName(log_level))
    import_keras(verbose=log_level <= logging.DEBUG)
    reports = _Reports(reports_conn)
    code = _run_child(index, settings, SocketWake(wake_sock), control, reports, stop)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no atexit handlers of libraries inherited through imports


def _run_child(
    index: int,
    settings: Settings,
    wake: SocketWake,
    control: Connection,
    reports: _Reports,
    stop: threading.Event,
) -> int:
    from pneumonode.inference.predictor import Predictor
    from pneumonode.queue.db import make_engine
    from pneumonode.queue.repository import JobRepository
    from pneumonode.worker import Worker
    from pneumonode.workerpool import WorkerThreads, wedged_after_s

    try:
        predictor = Predictor.load(settings.model_path)
    except ModelPackageError as exc:
        reports.send("fatal", index, f"model: {exc}")
        return EXIT_MODEL
    except Exception as exc:  # noqa: BLE001 - reported to the serving process, then exit
        reports.send("fatal", index, f"cannot load the model: {type(exc).__name__}: {exc}")
        return 1
    try:
        engine = make_engine(settings.database_url)
    except Exception as exc:  # noqa: BLE001
        reports.send("fatal", index, f"cannot open the database: {type(exc).__name__}: {exc}")
        return 1
    repo = JobRepository(engine)
    observer = RelayObserver(reports)
    host, pid = socket.gethostname(), os.getpid()
    current = {"settings": settings}

    def make_worker(name: str) -> Worker:
        return Worker(
            current["settings"],
            repo,
            predictor,
            f"{host}:{pid}:p{index}{name}",
            wake,  # type: ignore[arg-type]  # the wait/set/clear of threading.Event
            lambda: reports.send("delivering"),
            observer=observer,
        )

    pool = WorkerThreads(
        settings.worker.threads,
        make_worker,
        observer,
        lambda: wedged_after_s(current["settings"]),
    )
    pool.start()
    LOGGER.info(
        "worker process p%d: model %s (uid %s) loaded; %d worker thread(s), %s inference "
        "thread(s), nice %d",
        index,
        predictor.card.display_name,
        predictor.card.uid,
        settings.worker.threads,
        os.environ["TF_NUM_INTRAOP_THREADS"],
        os.nice(0),
    )
    reports.send("ready", index, pid)
    heartbeat_s = settings.worker.heartbeat_s
    next_beat = time.monotonic() + heartbeat_s
    reported: str | None = None
    while not stop.is_set():
        try:
            if control.poll(0.5):
                message = control.recv()
                if message[0] == "stop":
                    break
                if message[0] == "reload":
                    current["settings"] = message[1]
                    pool.reload(message[1])
        except (EOFError, OSError):
            break  # the serving process is gone or closed the channel: stop
        if time.monotonic() >= next_beat:
            next_beat = time.monotonic() + heartbeat_s
            pool.beat()
            pool.supervise()
            problem = pool.problem()
            if problem != reported:
                reported = problem
                reports.send("status", index, None if problem is None else f"p{index}: {problem}")
    # Finish the batch in hand, heartbeating its claims meanwhile (as the scheduler of the
    # serving process does for its own workers until they stop).
    pool.request_stop()
    deadline = time.monotonic() + current["settings"].worker.inference_timeout_s
    while pool.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
        if time.monotonic() >= next_beat:
            next_beat = time.monotonic() + heartbeat_s
            pool.beat()
    engine.dispose()
    return 0
