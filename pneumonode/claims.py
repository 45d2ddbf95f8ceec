"""The claims a worker or sender holds, kept alive by heartbeats until they are released."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pneumonode.queue.records import StaleTransition

LOGGER = logging.getLogger(__name__)


class HeldClaims:
    """Ids of the rows (jobs or deliveries) claimed by one thread, safe to read from another.

    Parameters
    ----------
    heartbeat:
        Refreshes the claim on one id; raises :class:`StaleTransition` when the row left the
        claimed state (finished, or the claim expired and someone else took it).
    """

    def __init__(self, heartbeat: Callable[[int], None]) -> None:
        self._heartbeat = heartbeat
        self._ids: set[int] = set()
        self._lock = threading.Lock()

    def hold(self, *ids: int) -> None:
        """Start heartbeating these ids."""
        with self._lock:
            self._ids.update(ids)

    def release(self, *ids: int) -> None:
        """Stop heartbeating these ids."""
        with self._lock:
            self._ids.difference_update(ids)

    def held(self) -> list[int]:
        """The ids held now, sorted."""
        with self._lock:
            return sorted(self._ids)

    def beat(self) -> None:
        """Refresh every held claim; a claim that is no longer ours is dropped, not an error."""
        with self._lock:
            held = list(self._ids)
        for row_id in held:
            try:
                self._heartbeat(row_id)
            except StaleTransition:
                LOGGER.debug("claim on %d is no longer ours", row_id)
                self.release(row_id)
