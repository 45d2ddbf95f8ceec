"""A real PACS round trip: Orthanc C-STOREs SIIM images to pneumonode and gets SEG + SC back."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    PEER_ENV,
    SC_CLASS,
    SEG_CLASS,
    SIIM_DICOM,
    SR_CLASS,
    NodeProcess,
    free_port,
    make_tiny_package,
    port_open,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow


class Orthanc:
    def __init__(self, folder: Path, node_port: int) -> None:
        exe = shutil.which("Orthanc")
        if exe is None:
            pytest.skip("Orthanc not installed (Debian package orthanc; scripts/test installs it)")
        self.exe = exe
        self.http_port = free_port()
        self.dicom_port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "pneumonode-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {"pneumonode": ["PNEUMONODE", "127.0.0.1", node_port]},
            "DicomScuTimeout": 60,
            "Plugins": [],
        }))
        self.log = folder / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen([self.exe, str(self.config)], stdout=fh,
                                         stderr=subprocess.STDOUT, env=PEER_ENV)
        wait_for(lambda: port_open(self.http_port) and port_open(self.dicom_port), 60,
                 "Orthanc to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def raw(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}",
                                         data=body, method=method)
        with urllib.request.urlopen(request, timeout=120) as response:
            return bytes(response.read())

    def rest(self, method: str, path: str, body: bytes | None = None) -> Any:
        return json.loads(self.raw(method, path, body) or b"null")


@pytest.fixture
def siim() -> list[Path]:
    if not SIIM_DICOM.is_dir():
        pytest.skip(f"SIIM sample images not found at {SIIM_DICOM} (the shared test data)")
    return sorted(SIIM_DICOM.glob("*.dcm"))[:3]


@pytest.fixture
def orthanc_and_node(tmp_path: Path) -> Iterator[tuple[Orthanc, NodeProcess]]:
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port)
    config = write_config(tmp_path / "node.toml", port=node_port, data_dir=tmp_path / "data",
                          destinations=[("ORTHANC", "127.0.0.1", orthanc.dicom_port)])
    # A tiny untrained package: this test is about the PACS round trip, not the model.
    model = make_tiny_package(tmp_path / "model")
    node = NodeProcess(config, tmp_path / "node.log", env={
        "PNEUMONODE_MODEL__PATH": str(model), "PNEUMONODE_METRICS__PORT": str(free_port())})
    orthanc.start()
    try:
        node.start()
        yield orthanc, node
    finally:
        node.stop()
        orthanc.stop()


def test_orthanc_round_trip(siim: list[Path],
                            orthanc_and_node: tuple[Orthanc, NodeProcess]) -> None:
    orthanc, node = orthanc_and_node
    uploaded = [orthanc.rest("POST", "/instances", path.read_bytes()) for path in siim]
    studies = {u["ParentStudy"] for u in uploaded}
    answer = orthanc.rest("POST", "/modalities/pneumonode/store", json.dumps(
        {"Resources": [u["ID"] for u in uploaded], "Synchronous": True}).encode())
    assert answer["FailedInstancesCount"] == 0, answer

    def classes() -> list[str]:
        found = []
        for study in studies:
            for instance in orthanc.rest("GET", f"/studies/{study}/instances"):
                # metadata values are plain text, not JSON
                found.append(orthanc.raw(
                    "GET", f"/instances/{instance['ID']}/metadata/SopClassUid").decode())
        return found

    wait_for(lambda: len(classes()) >= 4 * len(siim), 300,
             "SEG, SC and SR of every image in Orthanc", step=1.0)
    time.sleep(1.0)
    found = classes()
    assert found.count(SEG_CLASS) == len(siim), found
    assert found.count(SC_CLASS) == 2 * len(siim), found  # the SIIM originals are SC too
    assert found.count(SR_CLASS) == len(siim), found  # the report, stored and listed
    for study in studies:
        instances = orthanc.rest("GET", f"/studies/{study}/instances")
        assert len(instances) == 4, f"study {study} holds {len(instances)} instances"
    assert {j["state"] for j in node.jobs()} == {"done"}
