"""Worker threads of one process: started, heartbeated, replaced when they die or wedge.

Used by the serving process when ``worker.processes = 0`` and by every worker process
(:mod:`pneumonode.worker_processes`) otherwise: the same supervision in both places.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pneumonode.observer import NodeObserver, NullObserver
from pneumonode.settings import Settings
from pneumonode.worker import Worker

LOGGER = logging.getLogger(__name__)


def wedged_after_s(settings: Settings) -> float:
    """Seconds on one batch after which a worker counts as wedged."""
    cfg = settings.worker
    return cfg.inference_timeout_s + cfg.stale_after_s


class WorkerThreads:
    """``worker.threads`` workers, each on its own thread, made by ``make_worker(name)``.

    Parameters
    ----------
    make_worker:
        Builds a worker with the given short name (``w0``, ``w0.1`` for its first replacement).
    observer:
        Told when a worker is replaced.
    wedged_after:
        Returns the seconds after which a busy worker counts as wedged.
    """

    def __init__(
        self,
        count: int,
        make_worker: Callable[[str], Worker],
        observer: NodeObserver | None = None,
        wedged_after: Callable[[], float] | None = None,
    ) -> None:
        self._make = make_worker
        self._observer: NodeObserver = observer or NullObserver()
        self._wedged_after = wedged_after or (lambda: float("inf"))
        self.stop_event = threading.Event()
        self.workers: list[Worker] = [make_worker(f"w{i}") for i in range(count)]
        self.threads: list[threading.Thread] = []
        self._generation = 0
        self._lock = threading.Lock()
        self._stopping = False

    def start(self) -> None:
        """Start one thread per worker."""
        with self._lock:
            self.threads = [self._thread(w) for w in self.workers]

    def _thread(self, worker: Worker) -> threading.Thread:
        thread = threading.Thread(
            target=worker.run, args=(self.stop_event,), name=worker.worker_id, daemon=True
        )
        thread.start()
        return thread

    def beat(self) -> None:
        """Refresh the claims of the current workers (replaced ones excluded)."""
        with self._lock:
            workers = list(self.workers)
        for worker in workers:
            worker.beat()

    def reload(self, settings: Settings) -> None:
        """Give every worker new settings (destinations, peers)."""
        with self._lock:
            for worker in self.workers:
                worker.reload(settings)

    def supervise(self) -> list[str]:
        """Replace every worker thread that died or wedged; returns the ids replaced.

        A replaced worker stops heartbeating its claims, so they expire and are retried within
        their retry budget (:func:`pneumonode.scheduler.requeue_stale`): a job that kills or
        wedges its worker every time ends ``failed``. A wedged thread cannot be killed; it is
        left behind, and whatever it does later is refused by the queue (its claims are gone).
        """
        replaced: list[str] = []
        with self._lock:
            if self._stopping:
                return replaced
            limit = self._wedged_after()
            for index, (worker, thread) in enumerate(zip(self.workers, self.threads, strict=True)):
                if not thread.is_alive():
                    reason, detail = "died", "its thread ended"
                elif worker.busy_for() > limit:
                    reason = "wedged"
                    detail = (
                        f"busy {worker.busy_for():.0f} s on jobs {worker.held_jobs()}, over "
                        f"worker.inference_timeout_s + worker.stale_after_s ({limit:g} s)"
                    )
                else:
                    continue
                held = worker.held_jobs()
                worker.abandon()
                self._generation += 1
                new = self._make(f"w{index}.{self._generation}")
                LOGGER.error(
                    "worker %s %s (%s); its jobs %s will be retried within their budget; "
                    "replaced by %s",
                    worker.worker_id,
                    reason,
                    detail,
                    held or "none",
                    new.worker_id,
                )
                self.workers[index] = new
                self.threads[index] = self._thread(new)
                self._observer.worker_replaced(reason)
                replaced.append(worker.worker_id)
        return replaced

    def problem(self) -> str | None:
        """Why a worker thread is not running or is wedged, or None."""
        with self._lock:
            dead = [t.name for t in self.threads if not t.is_alive()]
            if dead:
                return f"threads stopped: {', '.join(dead)}"
            limit = self._wedged_after()
            wedged = [w.worker_id for w in self.workers if w.busy_for() > limit]
        if wedged:
            return f"workers wedged on one batch for over {limit:g} s: " + ", ".join(wedged)
        return None

    def request_stop(self) -> None:
        """Ask every worker to stop after the batch in hand (returns at once)."""
        with self._lock:
            self._stopping = True
        self.stop_event.set()
        for worker in self.workers:
            worker.wake()

    def alive(self) -> bool:
        """Whether a worker thread still runs."""
        with self._lock:
            return any(t.is_alive() for t in self.threads)

    def stop(self, timeout_s: float) -> None:
        """Let each worker finish the batch in hand, then return (waits ``timeout_s`` each)."""
        self.request_stop()
        with self._lock:
            threads = list(self.threads)
        for thread in threads:
            thread.join(timeout_s)
