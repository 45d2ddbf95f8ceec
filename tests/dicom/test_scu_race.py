"""Sending many instances over one association never loses a C-STORE response.

Guards the pynetdicom reactor race worked around in ``pneumonode.dicom.reactor``: without the
workaround about 2 in 1000 responses were taken by the reactor here, and the send waited out its
DIMSE timeout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import synthetic
from harness import StoreSCP, free_port

from pneumonode.dicom.scu import Remote, Timeouts, store


def test_thousand_stores_all_answered(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = [synthetic.write(synthetic.make_radiograph(rows=8, columns=8, seed=i),
                             tmp_path / f"{i}.dcm") for i in range(100)]
    dest = StoreSCP(tmp_path / "dest", free_port()).start()
    caplog.set_level(logging.WARNING, logger="pynetdicom")
    try:
        outcomes = []
        for _ in range(10):
            outcomes += store(files, "RACE", Remote("DEST", "127.0.0.1", dest.port),
                              Timeouts(acse=5, dimse=3, network=5))
    finally:
        dest.stop()
    assert len(outcomes) == 1000
    assert all(o.ok for o in outcomes)
    assert not [r for r in caplog.records if "unexpected" in r.getMessage()]
