"""A minimal pynetdicom C-STORE receiver (reference for ingest): raw bytes to a file, no fsync."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.events import Event

DX_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.7",
)
UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


def _nodelay(event: Event) -> None:
    transport = event.assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _store(event: Event, folder: Path) -> int:
    request: Any = event.request
    name = str(request.AffectedSOPInstanceUID)
    (folder / f"{name}.raw").write_bytes(request.DataSet.getvalue())
    return 0x0000


def main(argv: list[str] | None = None) -> int:
    """Listen on loopback ``port`` as BARE and write each received data set into ``folder``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--max-pdu", type=int, default=65536)
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = args.max_pdu
    for sop_class in DX_CLASSES:
        ae.add_supported_context(sop_class, list(UNCOMPRESSED))
    ae.start_server(
        ("127.0.0.1", args.port),
        block=True,
        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay), (evt.EVT_C_STORE, _store, [args.folder])],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
