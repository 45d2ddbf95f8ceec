"""Helpers for the service tests: node configs, the metrics endpoint, a notify socket."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from harness import PEER_ENV, StoreSCP, port_open, require, wait_for, write_config


def service_config(
    path: Path,
    *,
    port: int,
    data_dir: Path,
    metrics_port: int,
    model: Path,
    destinations: Sequence[tuple[str, str, int]] = (),
    database_url: str | None = None,
    extra: str = "",
) -> Path:
    """A test node configuration with the metrics endpoint, the model and the database."""
    lines = [
        "[metrics]",
        'host = "127.0.0.1"',
        f"port = {metrics_port}",
        "[model]",
        f'path = "{model}"',
    ]
    if database_url is not None:
        lines += ["[database]", f'url = "{database_url}"']
    return write_config(
        path,
        port=port,
        data_dir=data_dir,
        destinations=destinations,
        extra="\n".join(lines) + "\n" + extra,
    )


def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET a path from a node's metrics endpoint on loopback: (status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def metric_value(
    exposition: str, name: str, labels: str = "", default: float | None = None
) -> float:
    """The value of one sample in a Prometheus text exposition (``labels`` as printed).

    Without a ``default`` a missing sample fails the test.
    """
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in exposition.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == wanted:
            return float(value)
    if default is not None:
        return default
    raise AssertionError(f"no sample {wanted} in the exposition")


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="pn-notify-", dir="/tmp"))
        self.path = self.folder / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[str] = []

    def wait_for(self, field: str, timeout: float) -> str:
        """Receive messages until one has the line ``field``; returns that message."""
        self.sock.settimeout(timeout)
        while True:
            try:
                message = self.sock.recv(4096).decode("utf-8")
            except TimeoutError as exc:
                raise AssertionError(
                    f"no {field} from the node within {timeout} s; got {self.messages}"
                ) from exc
            self.messages.append(message)
            if field in message.splitlines():
                return message

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)
        self.folder.rmdir()


class UniqueStoreSCP(StoreSCP):
    """DCMTK storescp writing every received instance to its own file (``+uf``).

    The default names files after the SOP Instance UID, so a duplicate would overwrite its
    twin and go unseen; with unique names every copy stays countable.
    """

    def start(self) -> UniqueStoreSCP:
        exe = require("storescp")
        self.log = self.folder.parent / f"storescp-{self.port}.log"
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [exe, "-aet", self.ae_title, "-od", str(self.folder), "+xa", "+uf",
                 str(self.port)],
                stdout=fh, stderr=subprocess.STDOUT, env=PEER_ENV,
            )
        wait_for(lambda: port_open(self.port), 20, "storescp to listen")
        return self
