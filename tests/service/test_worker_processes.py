"""Worker processes: the work is shared, metrics reach the node, a dead one is restarted, and
none outlives the node."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pydicom
import pytest
import synthetic
from harness import NodeProcess, StoreSCP, free_port, storescu, wait_for, write_config
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from pneumonode.settings import Settings
from pneumonode.worker_processes import inference_threads

pytestmark = pytest.mark.slow

IMAGES = 8


def _images(folder: Path, count: int, first_seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        synthetic.write(
            synthetic.make_radiograph(rows=128, columns=128, seed=first_seed + i),
            folder / f"{first_seed + i}.dcm",
        )
        for i in range(count)
    ]


def _child_pids(log: Path) -> list[int]:
    """Pids of the worker processes the node logged as started, in order."""
    text = log.read_text(errors="replace")
    return [int(pid) for pid in re.findall(r"worker process p\d+ started \(pid (\d+)\)", text)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead: its parent has not reaped it yet
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


@pytest.fixture
def node_with_processes(tmp_path: Path):
    dest = StoreSCP(tmp_path / "dest", free_port()).start()
    metrics_port = free_port()
    config = write_config(
        tmp_path / "node.toml",
        port=free_port(),
        data_dir=tmp_path / "data",
        destinations=[("DEST", "127.0.0.1", dest.port)],
        extra=f"[metrics]\nhost = \"127.0.0.1\"\nport = {metrics_port}\n",
    )
    node = NodeProcess(config, tmp_path / "node.log", env={
        "PNEUMONODE_WORKER__PROCESSES": "2",
        "PNEUMONODE_WORKER__BATCH_SIZE": "2",
        "PNEUMONODE_OUTPUT__SC_COMPRESSION": "jpeg-ls",  # the SC written and sent compressed
    }).start(timeout=180)
    try:
        yield node, dest, metrics_port
    finally:
        node.stop()
        dest.stop()


def test_two_processes_share_the_work_report_metrics_and_stop_cleanly(
    node_with_processes, tmp_path: Path
) -> None:
    node, dest, metrics_port = node_with_processes
    children = _child_pids(node.log)
    assert len(children) == 2 and all(_alive(pid) for pid in children)
    # the serving process itself never loads the model: the children do
    assert "model pneumonode" not in node.log.read_text().split("worker process p0 started")[0]

    result = storescu(_images(tmp_path / "in", IMAGES, 700), node.port)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: len(dest.files()) >= 3 * IMAGES, 180, "SEG + SC + SR of every image")

    jobs = node.jobs()
    assert len(jobs) == IMAGES and {j["state"] for j in jobs} == {"done"}
    # Which process processed each job: its log line names the worker (host:pid:pN...).
    processed = re.findall(r"\[[^:\]]+:(\d+):p\dw\d\] job (\d+) processed", node.log.read_text())
    assert sorted(int(job) for _, job in processed) == sorted(int(j["id"]) for j in jobs)
    by_process = Counter(int(pid) for pid, _ in processed)
    assert set(by_process) <= set(children)
    assert len(by_process) == 2, by_process  # both processes took jobs
    # output.sc_compression = "jpeg-ls": the SC arrives as written, in JPEG-LS Lossless
    syntaxes = Counter(
        str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        for p in dest.files()
    )
    assert syntaxes == {JPEGLSLossless: IMAGES, ExplicitVRLittleEndian: 2 * IMAGES}, syntaxes
    # the children's observations reach the node's /metrics
    assert _metric(metrics_port, 'pneumonode_jobs_processed_total{outcome="processed"}') == IMAGES
    assert _metric(metrics_port, "pneumonode_inference_seconds_count") >= IMAGES / 2

    assert node.stop() == 0
    for pid in children:
        wait_for(lambda pid=pid: not _alive(pid), 10, f"worker process {pid} to exit")
    assert "Traceback" not in node.log.read_text(errors="replace"), node.tail()


def test_a_killed_worker_process_is_restarted_and_none_outlives_a_killed_node(
    node_with_processes, tmp_path: Path
) -> None:
    node, dest, metrics_port = node_with_processes
    first, second = _child_pids(node.log)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(_child_pids(node.log)) == 3, 30, "a replacement worker process")
    replacement = _child_pids(node.log)[2]
    assert replacement not in (first, second)
    log = node.log.read_text()
    assert re.search(rf"ERROR .*worker process p0 \(pid {first}\) was killed by signal 9", log)
    assert _metric(metrics_port, 'pneumonode_workers_replaced_total{reason="died"}') == 1
    wait_for(lambda: log_has(node.log, f"worker process p0 ready (pid {replacement})"), 120,
             "the replacement to load the model")

    result = storescu(_images(tmp_path / "in", 4, 800), node.port)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: len(dest.files()) >= 12, 180, "results after the restart")
    assert {j["state"] for j in node.jobs()} == {"done"}

    # No worker process outlives a killed node (SIGKILL: it has no chance to stop them).
    running = [second, replacement]
    assert all(_alive(pid) for pid in running)
    node.kill()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in running) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in running)


def log_has(log: Path, text: str) -> bool:
    return text in log.read_text(errors="replace")


def test_a_model_that_cannot_load_stops_the_start_with_its_reason(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "card.json").write_text("{}")
    config = write_config(tmp_path / "node.toml", port=free_port(), data_dir=tmp_path / "data",
                          extra="[metrics]\nenabled = false\n")
    node = NodeProcess(config, tmp_path / "node.log", env={
        "PNEUMONODE_WORKER__PROCESSES": "1", "PNEUMONODE_MODEL__PATH": str(model)})
    with pytest.raises(AssertionError, match="node exited with 3"):
        node.start(timeout=180)
    assert "cannot load model" in node.log.read_text()


def test_inference_threads_share_the_cores_out() -> None:
    assert inference_threads(Settings(worker={"processes": 2}), cores=8) == 4
    assert inference_threads(Settings(worker={"processes": 4}), cores=2) == 1
    assert inference_threads(Settings(worker={"processes": 0}), cores=2) == 2
    assert inference_threads(Settings(worker={"processes": 2, "inference_threads": 3})) == 3
