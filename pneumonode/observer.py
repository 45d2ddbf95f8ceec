"""What intake, workers and senders report as they work: the observer interface they call."""

from __future__ import annotations

from typing import Protocol


class NodeObserver(Protocol):
    """Receives one call per event; implementations must be thread-safe and never raise.

    The node's metrics implement it (:class:`pneumonode.metrics.NodeMetrics`); code that
    needs no observation passes :class:`NullObserver`.
    """

    def image_received(self, outcome: str) -> None:
        """A C-STORE was answered: ``queued``, ``skipped``, ``duplicate``, ``refused`` or
        ``error``."""

    def inference_done(self, images: int, seconds: float) -> None:
        """One model call over a batch of ``images`` images took ``seconds``."""

    def job_processed(self, outcome: str) -> None:
        """A processing attempt ended: ``processed``, ``skipped``, ``retry`` or ``failed``."""

    def delivered(self, destination: str, job_id: int) -> None:
        """A job's results were accepted by a destination."""

    def delivery_failed(self, destination: str, final: bool) -> None:
        """A send to a destination failed; ``final`` when no retry is left."""

    def worker_error(self, stage: str) -> None:
        """A worker caught an unexpected error in ``stage`` (``claim``, ``batch``) and went on."""

    def worker_replaced(self, reason: str) -> None:
        """A worker thread that ``died`` or ``wedged`` was replaced by a new one."""


class NullObserver:
    """An observer that ignores everything."""

    def image_received(self, outcome: str) -> None:
        """Ignore."""

    def inference_done(self, images: int, seconds: float) -> None:
        """Ignore."""

    def job_processed(self, outcome: str) -> None:
        """Ignore."""

    def delivered(self, destination: str, job_id: int) -> None:
        """Ignore."""

    def delivery_failed(self, destination: str, final: bool) -> None:
        """Ignore."""

    def worker_error(self, stage: str) -> None:
        """Ignore."""

    def worker_replaced(self, reason: str) -> None:
        """Ignore."""
