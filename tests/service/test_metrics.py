"""Observability: Prometheus /metrics, /healthz and `pneumonode status`, scraped from real nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import synthetic
from harness import REPO, NodeProcess, StoreSCP, free_port, storescu, wait_for
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from service.nodekit import http_get, metric_value, service_config
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from pneumonode.health import Health
from pneumonode.http import HttpEndpoint
from pneumonode.metrics import NodeMetrics
from pneumonode.queue.db import make_engine
from pneumonode.queue.migrate import SchemaError, upgrade
from pneumonode.queue.records import NewJob
from pneumonode.queue.repository import JobRepository
from pneumonode.service import Node
from pneumonode.settings import load_settings

DX = "1.2.840.10008.5.1.4.1.1.1.1"


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pneumonode", "--config", str(config), *args],
        capture_output=True, text=True, cwd=REPO, timeout=120, env=dict(os.environ),
    )


def _scrape(port: int) -> str:
    status, body = http_get(port, "/metrics")
    assert status == 200
    return body.decode("utf-8")


@pytest.mark.slow
def test_a_running_node_reports_metrics_health_and_status(
    tmp_path: Path, tiny_model: Path
) -> None:
    dest = StoreSCP(tmp_path / "dest", free_port()).start()
    metrics_port = free_port()
    config = service_config(tmp_path / "node.toml", port=free_port(), data_dir=tmp_path / "data",
                            metrics_port=metrics_port, model=tiny_model,
                            destinations=[("DEST", "127.0.0.1", dest.port)])
    chest = [synthetic.write(synthetic.make_radiograph(seed=80 + i, rows=96, columns=80),
                             tmp_path / f"chest{i}.dcm") for i in range(3)]
    knee = synthetic.write(
        synthetic.make_radiograph(seed=90, rows=64, columns=64, body_part="KNEE"),
        tmp_path / "knee.dcm")
    late = synthetic.write(synthetic.make_radiograph(seed=91, rows=96, columns=80),
                           tmp_path / "late.dcm")
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        assert storescu([*chest, knee], node.port).returncode == 0
        assert storescu(chest[:1], node.port).returncode == 0  # the same instance again
        wait_for(lambda: len(dest.files()) == 9, 60, "3 results (SEG, SC, SR) at storescp")
        wait_for(lambda: metric_value(_scrape(metrics_port), "pneumonode_jobs",
                                      'state="done"') == 3, 20, "3 jobs done")
        scraped = _scrape(metrics_port)
        families = {f.name for f in text_string_to_metric_families(scraped)}
        assert {"pneumonode_images_received", "pneumonode_jobs_processed",
                "pneumonode_results_delivered", "pneumonode_delivery_failures",
                "pneumonode_inference_seconds", "pneumonode_end_to_end_seconds",
                "pneumonode_jobs", "pneumonode_deliveries", "pneumonode_queue_depth"} <= families
        received = "pneumonode_images_received_total"
        assert metric_value(scraped, received, 'outcome="queued"') == 3
        assert metric_value(scraped, received, 'outcome="skipped"') == 1
        assert metric_value(scraped, received, 'outcome="duplicate"') == 1
        assert metric_value(scraped, "pneumonode_jobs_processed_total",
                            'outcome="processed"') == 3
        assert metric_value(scraped, "pneumonode_results_delivered_total",
                            'destination="dest0"') == 3
        assert metric_value(scraped, "pneumonode_inference_seconds_count") == 3
        assert metric_value(scraped, "pneumonode_end_to_end_seconds_count") == 3
        assert metric_value(scraped, "pneumonode_end_to_end_seconds_sum") > 0
        assert metric_value(scraped, "pneumonode_jobs", 'state="skipped"') == 1
        assert metric_value(scraped, "pneumonode_deliveries", 'state="done"') == 3
        assert metric_value(scraped, "pneumonode_queue_depth", 'queue="jobs"') == 0
        assert metric_value(scraped, "pneumonode_database_up") == 1

        status, body = http_get(metrics_port, "/healthz")
        health = json.loads(body)
        assert status == 200 and health["status"] == "ok", health
        assert health["checks"] == {"listening": True, "database": True, "workers": True}
        assert http_get(metrics_port, "/nothing")[0] == 404

        shown = _cli(config, "status")
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "node:        ok" in shown.stdout
        assert "done 3" in shown.stdout and "skipped 1" in shown.stdout
        report = json.loads(_cli(config, "status", "--json").stdout)
        assert report["jobs"]["done"] == 3 and report["health"]["status"] == "ok"

        dest.stop()  # the destination goes away: the next delivery fails and waits
        assert storescu([late], node.port).returncode == 0
        wait_for(lambda: metric_value(_scrape(metrics_port), "pneumonode_delivery_failures_total",
                                      'destination="dest0",final="false"', default=0) >= 1,
                 60, "a counted delivery failure")
        scraped = _scrape(metrics_port)
        assert metric_value(scraped, "pneumonode_jobs", 'state="delivering"') == 1
        assert metric_value(scraped, "pneumonode_oldest_unfinished_job_age_seconds") > 0
    finally:
        assert node.stop() == 0, node.tail()
        dest.stop()
    after = _cli(config, "status")
    assert after.returncode == 1
    assert "not reachable" in after.stdout and "delivering 1" in after.stdout


@pytest.mark.slow
def test_healthz_503_when_the_database_goes_away(
    tmp_path: Path, tiny_model: Path, pg_database: str
) -> None:
    metrics_port = free_port()
    config = service_config(tmp_path / "node.toml", port=free_port(), data_dir=tmp_path / "data",
                            metrics_port=metrics_port, model=tiny_model,
                            database_url=pg_database)
    # A shared database is never migrated by a node: it refuses to start until `db upgrade`.
    with pytest.raises(SchemaError, match="run `pneumonode db upgrade`"):
        Node(load_settings(config)).start()
    refused = _cli(config, "jobs", "list")
    assert refused.returncode == 5, refused.stderr
    assert "run `pneumonode db upgrade`" in refused.stderr.splitlines()[-1]
    assert _cli(config, "db", "upgrade").returncode == 0
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        wait_for(lambda: http_get(metrics_port, "/healthz")[0] == 200, 30, "healthy")
        admin = create_engine(make_url(pg_database).set(database="postgres"),
                              isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            name = make_url(pg_database).database
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
        status, body = http_get(metrics_port, "/healthz")
        health = json.loads(body)
        assert status == 503, health
        assert health["checks"]["database"] is False and health["checks"]["listening"] is True
        assert any(r.startswith("database unreachable") for r in health["reasons"]), health
        assert metric_value(_scrape(metrics_port), "pneumonode_database_up") == 0
        shown = _cli(config, "status")
        assert shown.returncode == 1
        assert "unhealthy" in shown.stdout and "database unreachable" in shown.stdout
    finally:
        assert node.stop() == 0, node.tail()


def _repository(tmp_path: Path) -> JobRepository:
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    upgrade(engine)
    return JobRepository(engine)


def test_metrics_are_per_node_and_count_what_they_observe(tmp_path: Path) -> None:
    repo = _repository(tmp_path)
    first, second = NodeMetrics(repo), NodeMetrics(repo)
    first.image_received("queued")
    first.inference_done(4, 0.2)
    first.job_processed("retry")
    first.delivery_failed("pacs", final=True)
    first.purged(jobs=2, files=5)
    job = repo.enqueue(NewJob("1.2.3.1", DX, "1.2.3", "1.2.3.4", "CR1", None, "spool/a.dcm"),
                       now=datetime.now(UTC) - timedelta(seconds=30)).job_id
    first.delivered("pacs", job)
    one = generate_latest(first.registry).decode()
    two = generate_latest(second.registry).decode()
    assert metric_value(one, "pneumonode_images_received_total", 'outcome="queued"') == 1
    assert metric_value(two, "pneumonode_images_received_total", 'outcome="queued"') == 0
    assert metric_value(one, "pneumonode_inference_seconds_count") == 4
    assert metric_value(one, "pneumonode_jobs_processed_total", 'outcome="retry"') == 1
    assert metric_value(one, "pneumonode_delivery_failures_total",
                        'destination="pacs",final="true"') == 1
    assert metric_value(one, "pneumonode_retention_purged_total", 'what="files"') == 5
    assert 29 < metric_value(one, "pneumonode_end_to_end_seconds_sum") < 120
    assert metric_value(one, "pneumonode_queue_depth", 'queue="jobs"') == 1
    assert metric_value(one, "pneumonode_oldest_unfinished_job_age_seconds") >= 29


def test_queue_gauges_say_database_down_instead_of_failing(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    upgrade(engine)
    metrics = NodeMetrics(JobRepository(engine))
    (tmp_path / "q.db").unlink()
    (tmp_path / "q.db").mkdir()  # the file is now a folder: every connection fails
    engine.dispose()
    scraped = generate_latest(metrics.registry).decode()
    assert metric_value(scraped, "pneumonode_database_up") == 0
    assert "pneumonode_jobs{" not in scraped


def test_endpoint_answers_503_with_the_reasons() -> None:
    verdict = Health(checks={"listening": True, "database": True, "workers": False},
                     reasons=("workers: threads stopped: host:1:w0",))
    endpoint = HttpEndpoint("127.0.0.1", 0, CollectorRegistry(), lambda: verdict)
    _, port = endpoint.start()
    try:
        status, body = http_get(port, "/healthz")
    finally:
        endpoint.stop()
    assert status == 503
    assert json.loads(body) == {
        "status": "unhealthy",
        "checks": {"listening": True, "database": True, "workers": False},
        "reasons": ["workers: threads stopped: host:1:w0"],
    }


def test_a_failing_check_needs_a_reason() -> None:
    with pytest.raises(ValueError, match="needs a reason"):
        Health(checks={"database": False})
