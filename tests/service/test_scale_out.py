"""Scale-out: three node processes share one PostgreSQL queue and one spool; nothing is lost."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
import synthetic
from harness import REPO, NodeProcess, free_port, require, wait_for
from service.nodekit import UniqueStoreSCP, service_config
from sqlalchemy import func, select

from pneumonode.queue import migrate
from pneumonode.queue.db import make_engine
from pneumonode.queue.models import JobEvent
from pneumonode.queue.repository import JobRepository

pytestmark = pytest.mark.slow

IMAGES = 300
NODES = 3
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pneumonode", *args], capture_output=True, text=True,
        cwd=REPO, timeout=120, env={**os.environ, "PNEUMONODE_DATABASE__URL": url},
    )


def test_three_nodes_process_300_images_exactly_once(
    tmp_path: Path, tiny_model: Path, pg_database: str
) -> None:
    upgraded = _cli(pg_database, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"upgraded from (empty) to {migrate.head_revision()}" in upgraded.stdout
    images = tmp_path / "images"
    images.mkdir()
    sent: list[Path] = [
        synthetic.write(synthetic.make_radiograph(seed=1000 + i, rows=64, columns=64),
                        images / f"{i:03d}.dcm")
        for i in range(IMAGES)
    ]
    sent_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sent}
    dest = UniqueStoreSCP(tmp_path / "dest", free_port()).start()
    shared = tmp_path / "shared-data"
    nodes = []
    for n in range(NODES):
        config = service_config(
            tmp_path / f"node{n}.toml", port=free_port(), data_dir=shared,
            metrics_port=free_port(), model=tiny_model, database_url=pg_database,
            destinations=[("DEST", "127.0.0.1", dest.port)],
            extra="[retention]\ndays = 0\n",
        )
        nodes.append(NodeProcess(config, tmp_path / f"node{n}.log", env={
            "PNEUMONODE_WORKER__BATCH_SIZE": "8",
            # pynetdicom 3.0.4 now and then loses a C-STORE response under load (its reactor
            # takes it); the send then waits for the DIMSE timeout and is retried.
            "PNEUMONODE_DELIVERY__DIMSE_TIMEOUT_S": "3",
        }))
    engine = make_engine(pg_database)
    repo = JobRepository(engine)
    try:
        with ThreadPoolExecutor(NODES) as pool:  # the three start (import TensorFlow) at once
            list(pool.map(lambda node: node.start(), nodes))
        storescu = require("storescu")
        senders = [
            subprocess.Popen(
                [storescu, "-aec", "PNEUMONODE", "-aet", f"MODALITY{n}", "127.0.0.1",
                 str(node.port), *map(str, sent[n::NODES])],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
            for n, node in enumerate(nodes)
        ]
        for proc in senders:
            output, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, output
        wait_for(lambda: repo.counts_by_state()["done"] == IMAGES, 150,
                 f"{IMAGES} jobs done", step=1.0)
        wait_for(lambda: len(dest.files()) >= 3 * IMAGES, 30, "every result at storescp")
    finally:
        codes = [node.stop() for node in nodes]
        dest.stop()
    assert codes == [0] * NODES, [node.tail() for node in nodes]

    counts = repo.counts_by_state()
    assert counts["done"] == IMAGES and sum(counts.values()) == IMAGES, counts
    jobs = repo.list_jobs(limit=10 * IMAGES)
    assert {j.sop_instance_uid for j in jobs} == sent_uids
    assert {j.attempts for j in jobs} == {1}
    with engine.connect() as conn:
        claims = conn.execute(
            select(JobEvent.job_id, func.count(), func.min(JobEvent.actor))
            .where(
                JobEvent.from_state == "received",
                JobEvent.to_state == "processing",
                JobEvent.destination.is_(None),
            )
            .group_by(JobEvent.job_id)
        ).all()
    assert len(claims) == IMAGES and {count for _, count, _ in claims} == {1}
    processed_by = Counter(actor.rsplit(":", 1)[0] for _, _, actor in claims)
    assert len(processed_by) >= 2, processed_by  # the work was shared, not done by one node

    # Every image has one SEG, SC and SR, under the UIDs fixed on its job: 900 distinct UIDs.
    headers = {}
    copies: Counter[str] = Counter()
    for path in dest.files():
        header = pydicom.dcmread(path, stop_before_pixels=True)
        headers[str(header.SOPInstanceUID)] = header
        copies[str(header.SOPInstanceUID)] += 1
    recorded = {uid for j in jobs for uid in (j.seg_sop_uid, j.sc_sop_uid, j.sr_sop_uid)}
    assert set(headers) == recorded and len(recorded) == 3 * IMAGES
    classes = Counter(str(h.SOPClassUID) for h in headers.values())
    assert classes == {SEG_CLASS: IMAGES, SC_CLASS: IMAGES, SR_CLASS: IMAGES}, classes
    sources = {
        str(h.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID)
        for h in headers.values() if str(h.SOPClassUID) == SEG_CLASS
    }
    assert sources == sent_uids
    # A second copy (same UID) only comes from a send retried after a lost response.
    resent_jobs = {j.id for j in jobs for d in repo.deliveries(j.id) if d.attempts > 1}
    for uid, count in copies.items():
        if count > 1:
            job = next(j for j in jobs if uid in (j.seg_sop_uid, j.sc_sop_uid, j.sr_sop_uid))
            assert job.id in resent_jobs, f"{uid} arrived {count} times, sent once"
    for node in nodes:
        assert "Traceback" not in node.log.read_text(errors="replace"), node.tail()
