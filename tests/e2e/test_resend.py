"""Routing and recovery with real peers: each storescp gets its objects; the operator resends."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pydicom
import pytest
import synthetic
from harness import (
    SC_CLASS,
    SEG_CLASS,
    SR_CLASS,
    NodeProcess,
    StoreSCP,
    free_port,
    storescu,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow


def _classes(dest: StoreSCP) -> Counter[str]:
    return Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID)
                   for p in dest.files())


def test_each_destination_gets_its_objects_and_a_done_job_can_be_resent(tmp_path: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs", free_port(), "PACS").start()
    old = StoreSCP(tmp_path / "old", free_port(), "OLDPACS").start()
    port = free_port()
    routing = (
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        f"port = {pacs.port}\n"
        f'[[destinations]]\nname = "old-pacs"\nae_title = "OLDPACS"\nhost = "127.0.0.1"\n'
        f'port = {old.port}\nobjects = ["sc", "sr"]\n'
    )
    config = write_config(tmp_path / "node.toml", port=port, data_dir=tmp_path / "data",
                          extra=routing)
    node = NodeProcess(config, tmp_path / "node.log").start()
    images = [synthetic.write(synthetic.make_radiograph(seed=90 + i, rows=128, columns=112),
                              tmp_path / f"in{i}.dcm") for i in range(2)]
    try:
        assert storescu(images, port).returncode == 0
        wait_for(lambda: {j["state"] for j in node.jobs()} == {"done"} and len(node.jobs()) == 2,
                 240, "both jobs done")
        assert _classes(pacs) == {SEG_CLASS: 2, SC_CLASS: 2, SR_CLASS: 2}
        assert _classes(old) == {SC_CLASS: 2, SR_CLASS: 2}  # no SEG for a PACS without SEG
        log = node.log.read_text(errors="replace")
        assert "destination old-pacs: OLDPACS@127.0.0.1" in log and "gets SC+SR" in log

        job = next(j for j in node.jobs() if j["id"] == 1)
        expected = {job["seg_sop_uid"], job["sc_sop_uid"], job["sr_sop_uid"]}
        for path in pacs.files():  # the PACS lost what it had
            path.unlink()
        resent = node.cli("jobs", "resend", "1", "--to", "pacs")
        assert resent.returncode == 0, resent.stdout + resent.stderr
        assert "job 1: done -> delivering, resending to pacs (SEG+SC+SR)" in resent.stdout
        wait_for(lambda: len(pacs.files()) == 3, 120, "the resent results at the PACS")
        received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                    for p in pacs.files()}
        assert received == expected  # the same instances, not new ones
        wait_for(lambda: {j["state"] for j in node.jobs()} == {"done"}, 60, "job 1 done again")
        assert len(old.files()) == 4  # the other destination got nothing more

        unknown = node.cli("jobs", "resend", "1", "--to", "nowhere")
        assert unknown.returncode == 1 and "not a configured destination" in unknown.stderr
        nothing = node.cli("jobs", "resend")
        assert nothing.returncode == 1 and "name the jobs to resend" in nothing.stderr
    finally:
        assert node.stop() == 0, node.tail()
        pacs.stop()
        old.stop()
