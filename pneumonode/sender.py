"""Delivery loop: sends each job's result objects to its destinations, in order, with retries."""

from __future__ import annotations

import logging
import ssl
import threading
from datetime import UTC, datetime

from pneumonode.claims import HeldClaims
from pneumonode.dicom.scu import Remote, SendError, Timeouts, store
from pneumonode.dicom.tls import TlsError, client_context
from pneumonode.observer import NodeObserver, NullObserver
from pneumonode.queue.deliveries import DeliveryTransitions
from pneumonode.queue.records import DeliveryView
from pneumonode.routing import configured_route
from pneumonode.settings import Settings

LOGGER = logging.getLogger(__name__)


def configured_remote(settings: Settings, destination: str) -> Remote | None:
    """The address ``settings`` give a delivery's destination name, or None when not configured."""
    route = configured_route(settings, destination)
    return None if route is None else Remote(route.ae_title, route.host, route.port)


def uses_tls(settings: Settings, destination: str) -> bool:
    """Whether deliveries to ``destination`` (a delivery name) use TLS."""
    route = configured_route(settings, destination)
    return route is not None and route.tls


def _tls_needed(settings: Settings) -> bool:
    return any(d.tls for d in settings.destinations) or any(p.tls for p in settings.peers)


class Sender:
    """One sending thread; several may run, per-destination order is kept by the repository.

    Raises
    ------
    pneumonode.dicom.tls.TlsError
        When a destination or peer uses TLS and the ``[tls]`` files cannot be used.
    """

    def __init__(
        self,
        settings: Settings,
        repository: DeliveryTransitions,
        sender_id: str,
        wake: threading.Event,
        observer: NodeObserver | None = None,
    ) -> None:
        self._settings = settings
        self._observer: NodeObserver = observer or NullObserver()
        self._repo = repository
        self.sender_id = sender_id
        self._wake = wake
        d = settings.delivery
        self._policy = d.retry_policy()
        self._timeouts = Timeouts(
            acse=d.acse_timeout_s, dimse=d.dimse_timeout_s, network=d.network_timeout_s
        )
        self._claims = HeldClaims(
            lambda delivery_id: self._repo.heartbeat_delivery(delivery_id, self.sender_id)
        )
        self._lock = threading.Lock()
        self._tls = (settings.tls, client_context(settings.tls) if _tls_needed(settings) else None)

    def _tls_for(self, settings: Settings, destination: str) -> ssl.SSLContext | None:
        """The client TLS context for a destination, rebuilt when reloaded ``[tls]`` changed."""
        if not uses_tls(settings, destination):
            return None
        cfg, context = self._tls
        if context is None or cfg != settings.tls:
            context = client_context(settings.tls)
            self._tls = (settings.tls, context)
        return context

    def reload(self, settings: Settings) -> None:
        """Send to the destination addresses of these settings from the next send on."""
        with self._lock:
            self._settings = settings

    def beat(self) -> None:
        """Refresh the heartbeat of the deliveries in hand (see :class:`HeldClaims`)."""
        self._claims.beat()

    def _idle_wait(self) -> None:
        poll = self._settings.worker.poll_s
        due = self._repo.next_due()
        if due is not None:
            poll = min(poll, max(0.05, (due - datetime.now(UTC)).total_seconds()))
        self._wake.wait(poll)
        self._wake.clear()

    def run(self, stop: threading.Event) -> None:
        """Send until ``stop`` is set; a send in progress is finished first."""
        while not stop.is_set():
            deliveries = self._repo.claim_deliveries(self.sender_id, limit=1)
            if not deliveries:
                self._idle_wait()
                continue
            for delivery in deliveries:
                self.send(delivery)

    def send(self, delivery: DeliveryView) -> None:
        """Send one job's SEG and overlay to one destination and record the outcome."""
        self._claims.hold(delivery.id)
        try:
            error = self._attempt(delivery)
        finally:
            self._claims.release(delivery.id)
        if error is None:
            self._repo.delivery_succeeded(delivery.id, self.sender_id)
            self._observer.delivered(delivery.destination, delivery.job_id)
            LOGGER.info("job %d delivered to %s", delivery.job_id, delivery.destination)
            return
        after = self._repo.delivery_failed(delivery.id, self.sender_id, error, self._policy)
        self._observer.delivery_failed(delivery.destination, final=after.state == "failed")
        LOGGER.warning(
            "job %d delivery to %s failed (attempt %d): %s; now %s",
            delivery.job_id,
            delivery.destination,
            delivery.attempts,
            error,
            after.state,
        )
        if after.state == "pending":
            self._wake.set()

    def _attempt(self, delivery: DeliveryView) -> str | None:
        job = self._repo.get_job(delivery.job_id)
        if job is None:
            return f"job {delivery.job_id} no longer exists"
        relative = [job.result_path(kind) for kind in delivery.kinds]
        if None in relative:
            missing = [k.value for k, r in zip(delivery.kinds, relative, strict=True) if r is None]
            return f"job {delivery.job_id} has no {', '.join(missing).upper()} result to send"
        data_dir = self._settings.node.data_dir
        paths = [data_dir / r for r in relative if r is not None]
        remote = self._remote(delivery)
        with self._lock:
            settings = self._settings
        try:
            tls = self._tls_for(settings, delivery.destination)
        except TlsError as exc:
            return f"cannot use TLS for {remote}: {exc}"
        try:
            outcomes = store(paths, settings.sender_ae_title, remote, self._timeouts, tls=tls)
        except SendError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot read result files: {exc}"
        except Exception as exc:  # any other send failure is retried with backoff
            LOGGER.exception("job %d: sending to %s failed", delivery.job_id, remote)
            return f"{type(exc).__name__}: {exc}"
        refused = [o for o in outcomes if not o.ok]
        if refused:
            return "; ".join(
                f"{remote} answered 0x{o.status:04X} for {o.sop_instance_uid}" for o in refused
            )
        return None

    def _remote(self, delivery: DeliveryView) -> Remote:
        """The destination's address in the settings in force, else the one recorded.

        After a reload (SIGHUP) that moved a destination, queued results follow it.
        """
        with self._lock:
            settings = self._settings
        recorded = Remote(delivery.ae_title, delivery.host, delivery.port)
        current = configured_remote(settings, delivery.destination)
        if current is None or current == recorded:
            return recorded
        LOGGER.info(
            "job %d: destination %s is now configured at %s (queued for %s)",
            delivery.job_id,
            delivery.destination,
            current,
            recorded,
        )
        return current
