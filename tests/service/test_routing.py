"""After a reload, queued results follow a destination to its new address; peers by AE title."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import synthetic
from harness import StoreSCP, free_port

from pneumonode.dicom.scu import Remote
from pneumonode.queue.db import make_engine
from pneumonode.queue.migrate import upgrade
from pneumonode.queue.records import DeliveryTarget, FindingRecord, NewJob, ResultUIDs
from pneumonode.queue.repository import JobRepository
from pneumonode.sender import Sender, configured_remote
from pneumonode.settings import Settings

T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def _settings(data: Path, port: int) -> Settings:
    return Settings(
        node={"data_dir": data},
        delivery={"acse_timeout_s": 2, "network_timeout_s": 2, "dimse_timeout_s": 5},
        destinations=[{"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": port}],
    )


def test_configured_remote_finds_destinations_and_peers() -> None:
    settings = Settings(
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "pacs.example", "port": 104}],
        peers=[{"ae_title": "CR1", "host": "10.0.0.5", "port": 4006}],
    )
    assert configured_remote(settings, "pacs") == Remote("PACS", "pacs.example", 104)
    assert configured_remote(settings, "peer:CR1") == Remote("CR1", "10.0.0.5", 4006)
    assert configured_remote(settings, "gone") is None
    assert configured_remote(settings, "peer:CR2") is None


def test_a_queued_delivery_goes_to_the_reloaded_address(tmp_path: Path) -> None:
    data = tmp_path / "data"
    engine = make_engine(f"sqlite:///{data / 'pneumonode.db'}")
    upgrade(engine)
    repo = JobRepository(engine)
    results = []
    for name, seed in (("seg.dcm", 1), ("overlay.dcm", 2)):
        path = data / "results" / "000000001" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        results.append(synthetic.write(synthetic.make_radiograph(seed=seed, rows=32, columns=32),
                                       path))
    job_id = repo.enqueue(NewJob("1.2.3.7", DX, "1.2.3", "1.2.3.4", "CR1", None,
                                 "spool/x.dcm"), now=T0).job_id
    repo.claim_jobs("w", now=T0)
    repo.reserve_result_uids(job_id, ResultUIDs(*(f"1.2.9.{i}" for i in range(1, 7))))
    dead = free_port()  # where the destination was when the job was processed
    repo.finish_processing(
        job_id, "w",
        FindingRecord(present=False, score=0.1, area_mm2=None, model_uid="2.25.1",
                      seg_path="results/000000001/seg.dcm",
                      sc_path="results/000000001/overlay.dcm"),
        [DeliveryTarget(destination="pacs", ae_title="DEST", host="127.0.0.1", port=dead)],
        now=T0,
    )
    dest = StoreSCP(tmp_path / "dest", free_port()).start()
    try:
        sender = Sender(_settings(data, dead), repo, "s0", threading.Event())
        sender.reload(_settings(data, dest.port))  # SIGHUP: the PACS moved
        [delivery] = repo.claim_deliveries("s0")
        assert delivery.port == dead  # the row keeps the address it was queued for
        sender.send(delivery)
    finally:
        dest.stop()
    assert repo.get_job(job_id).state == "done"
    assert len(dest.files()) == 2
