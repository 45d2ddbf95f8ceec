"""systemd service notifications (READY, STOPPING, WATCHDOG, STATUS) over NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket

LOGGER = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send one sd_notify message; returns False when not running under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        LOGGER.warning("cannot notify systemd at NOTIFY_SOCKET: %s", exc)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Half the watchdog period systemd asked for (WATCHDOG_USEC), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
