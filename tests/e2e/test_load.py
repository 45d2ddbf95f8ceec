"""Load: 8 concurrent DCMTK storescu senders with 100 images each; nothing acknowledged is lost."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
import synthetic
from harness import (
    NodeProcess,
    StoreSCP,
    free_port,
    make_tiny_package,
    storescu,
    wait_for,
    write_config,
)

from pneumonode.queue.db import make_engine
from pneumonode.queue.repository import JobRepository

pytestmark = pytest.mark.slow
SENDERS = 8
PER_SENDER = 100


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def test_eight_concurrent_senders(tmp_path: Path) -> None:
    package = make_tiny_package(tmp_path / "model")
    batches = []
    for s in range(SENDERS):
        folder = tmp_path / f"sender{s}"
        folder.mkdir()
        batches.append([
            synthetic.write(synthetic.make_radiograph(seed=10_000 + s * 1000 + i, rows=64,
                                                      columns=64), folder / f"{i:03d}.dcm")
            for i in range(PER_SENDER)
        ])
    dest = StoreSCP(tmp_path / "dest", free_port()).start()
    port = free_port()
    config = write_config(tmp_path / "node.toml", port=port, data_dir=tmp_path / "data",
                          destinations=[("DEST", "127.0.0.1", dest.port)],
                          extra="")
    node = NodeProcess(config, tmp_path / "node.log",
                       env={"PNEUMONODE_MODEL__PATH": str(package),
                            "PNEUMONODE_WORKER__BATCH_SIZE": "8"}).start()
    repo = JobRepository(make_engine(f"sqlite:///{tmp_path / 'data' / 'pneumonode.db'}"))
    total = SENDERS * PER_SENDER
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(SENDERS) as pool:
            results: list[subprocess.CompletedProcess[str]] = list(
                pool.map(lambda files: storescu(files, port), batches))
        received_s = time.monotonic() - started
        for result in results:
            assert result.returncode == 0, result.stdout + result.stderr
        wait_for(lambda: repo.counts_by_state().get("done", 0) == total, 600,
                 f"{total} jobs done", step=1.0)
        done_s = time.monotonic() - started
        assert node.proc is not None
        rss = peak_rss_mb(node.proc.pid)
        wait_for(lambda: len(dest.files()) >= 3 * total, 60, "every result at storescp")
    finally:
        node.stop()
        dest.stop()
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for files in batches for p in files}
    assert {j.sop_instance_uid for j in repo.list_jobs(limit=2 * total)} == sent
    assert len(dest.files()) == 3 * total  # SEG, SC and SR of each image
    print(f"\nload: {SENDERS} senders x {PER_SENDER} images: all {total} acknowledged in "
          f"{received_s:.1f} s, all processed and delivered in {done_s:.1f} s, "
          f"node peak RSS {rss:.0f} MiB")
