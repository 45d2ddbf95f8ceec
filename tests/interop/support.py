"""Helpers of the interop tests: result objects on disk, the npm readers, Orthanc, OHIF's server.

The objects are built once per session by the node's own builders from a synthetic DX (positive
and negative) and, when the shared data are there, a real SIIM radiograph. The third-party
readers come from ``tests/interop/js`` (``scripts/test`` installs them with npm: node_modules
and OHIF's built ``dist/`` from ``npm pack @ohif/app``); each test skips with the reason when
its reader is absent. Artefacts (the OHIF screenshots) go to ``build/test-artefacts/interop``
(or ``$PNEUMONODE_TEST_ARTEFACTS``), printed at the end of the run.
"""

from __future__ import annotations

import datetime
import http.server
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import synthetic
from harness import PEER_ENV, free_port, port_open, wait_for
from pydicom.uid import JPEGLSLossless, generate_uid

from pneumonode.dicom.pixels import decode
from pneumonode.findings import Finding
from pneumonode.inference.card import InputSpec, ModelCard, TrainingInfo
from pneumonode.outputs.overlay import build_overlay
from pneumonode.outputs.seg import build_segmentation
from pneumonode.outputs.sr import build_report

REPO = Path(__file__).resolve().parents[2]
JS = Path(__file__).resolve().parent / "js"
OHIF_DIST = JS / "ohif" / "dist"
SIIM_DICOM = REPO.parent / "shared" / "data" / "siim-sample" / "dicom"
SIIM_MASKS = REPO.parent / "shared" / "data" / "siim-sample" / "masks"
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")
CREATED = datetime.datetime(2024, 6, 7, 8, 9, 10)
ARTEFACTS: list[str] = []


@dataclass(frozen=True)
class Case:
    """One analysed image and its results, written to files."""

    name: str
    source: Path
    seg: Path
    sc: Path
    sr: Path
    mask: np.ndarray
    study_uid: str
    seg_series_uid: str
    sr_series_uid: str
    sc_jls: Path  # the same overlay in JPEG-LS Lossless, in a series of its own
    sc_series_uid: str
    sc_jls_series_uid: str


def artefact_dir() -> Path:
    """Where tests leave files for people to look at (created on demand)."""
    folder = Path(os.environ.get("PNEUMONODE_TEST_ARTEFACTS", REPO / "build" / "test-artefacts"))
    path = folder / "interop"
    path.mkdir(parents=True, exist_ok=True)
    return path


def note_artefact(text: str) -> None:
    """Say where an artefact is, in the terminal summary."""
    ARTEFACTS.append(text)


def card() -> ModelCard:
    return ModelCard(
        name="attention-unet-interop",
        version="1.0.0",
        uid="1.2.826.0.1.3680043.8.498.4.5.6",
        variant="attention_unet",
        demo=True,
        input=InputSpec(size=256),
        training=TrainingInfo(recipe="interop", data="synthetic", epochs=1),
        intended_use="interop tests only",
    )


def write_case(name: str, source: pydicom.Dataset, mask: np.ndarray, folder: Path) -> Case:
    folder.mkdir(parents=True, exist_ok=True)
    source_path = folder / "source.dcm"
    if getattr(source, "filename", None):
        shutil.copyfile(str(source.filename), source_path)
    else:
        synthetic.write(source, source_path)
    source = pydicom.dcmread(source_path)
    image = decode(source)
    spacing = image.pixel_spacing_mm
    area = None if spacing is None else float(mask.sum() * spacing[0] * spacing[1])
    present = bool(mask.any())
    finding = Finding(mask=mask, present=present, score=0.91 if present else 0.04, area_mm2=area)
    model = card()
    uids = {
        k: str(generate_uid())
        for k in ("seg", "seg_sop", "sc", "sc_sop", "sr", "sr_sop", "sc_jls", "sc_jls_sop")
    }
    seg = build_segmentation(
        source, finding, model, series_instance_uid=uids["seg"],
        sop_instance_uid=uids["seg_sop"], created=CREATED,
    )  # fmt: skip
    sc = build_overlay(
        source, image, finding, model, series_instance_uid=uids["sc"],
        sop_instance_uid=uids["sc_sop"], created=CREATED,
    )  # fmt: skip
    sc_jls = build_overlay(
        source, image, finding, model, series_instance_uid=uids["sc_jls"],
        sop_instance_uid=uids["sc_jls_sop"], created=CREATED,
        transfer_syntax_uid=JPEGLSLossless,
    )  # fmt: skip
    sr = build_report(
        source, finding, model, seg, series_instance_uid=uids["sr"],
        sop_instance_uid=uids["sr_sop"], created=CREATED,
    )  # fmt: skip
    paths = {}
    for kind, dataset in (("seg", seg), ("sc", sc), ("sr", sr), ("sc_jls", sc_jls)):
        paths[kind] = folder / f"{kind}.dcm"
        pydicom.dcmwrite(paths[kind], dataset, enforce_file_format=True)
    return Case(
        name=name, source=source_path, seg=paths["seg"], sc=paths["sc"], sr=paths["sr"],
        mask=mask, study_uid=str(source.StudyInstanceUID), seg_series_uid=uids["seg"],
        sr_series_uid=uids["sr"], sc_jls=paths["sc_jls"], sc_series_uid=uids["sc"],
        sc_jls_series_uid=uids["sc_jls"],
    )  # fmt: skip


def require_tool(name: str, package: str) -> str:
    """Path of an executable, or skip naming what provides it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed ({package}; scripts/test installs it)")
    return path


def require_node_module(module: str) -> Path:
    """``tests/interop/js/node_modules/<module>``, or skip saying how to install it."""
    require_tool("node", "Node.js, Debian package nodejs")
    path = JS / "node_modules" / module
    if not path.is_dir():
        pytest.skip(f"npm package {module} not installed in {JS} (scripts/test runs npm ci there)")
    return path


class Orthanc:
    """Orthanc 1.10 with the DICOMweb plugin, HTTP on a high loopback port, no DICOM server."""

    def __init__(self, folder: Path) -> None:
        self.exe = require_tool("Orthanc", "Debian package orthanc")
        plugin = ORTHANC_PLUGINS / "libOrthancDicomWeb.so"
        if not plugin.exists():
            pytest.skip(
                f"{plugin} absent (Debian package orthanc-dicomweb; scripts/test installs it)"
            )
        self.http_port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "pneumonode-interop",
                    "StorageDirectory": str(folder / "storage"),
                    "IndexDirectory": str(folder / "storage"),
                    "HttpPort": self.http_port,
                    "DicomPort": free_port(),
                    "DicomServerEnabled": False,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "Plugins": [str(plugin)],
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                }
            )
        )
        self.log = folder / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.exe, str(self.config)], stdout=log, stderr=subprocess.STDOUT, env=PEER_ENV
            )
        wait_for(lambda: port_open(self.http_port), 60, "Orthanc to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def rest(self, method: str, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def upload(self, path: Path) -> dict[str, Any]:
        answer: dict[str, Any] = self.rest("POST", "/instances", path.read_bytes())
        return answer


def ohif_config() -> bytes:
    """OHIF's app-config.js: one DICOMweb source, the same origin (proxied to Orthanc)."""
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": False,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": {
                    "friendlyName": "Orthanc (pneumonode interop)",
                    "name": "orthanc",
                    "wadoUriRoot": "/wado",
                    "qidoRoot": "/dicom-web",
                    "wadoRoot": "/dicom-web",
                    "qidoSupportsIncludeField": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "bulkDataURI": {"enabled": True},
                    "omitQuotationForMultipartRequest": True,
                },
            }
        ],
    }
    return f"window.config = {json.dumps(config)};\n".encode()


class OhifHandler(http.server.SimpleHTTPRequestHandler):
    """OHIF's dist with the single-page fallback; /dicom-web and /wado proxied to Orthanc."""

    orthanc_url = ""
    config = b""

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith(("/dicom-web/", "/wado")):
            self._proxy()
            return
        if path == "/app-config.js":
            self._send(200, "application/javascript", self.config)
            return
        if not (OHIF_DIST / path.lstrip("/")).is_file():
            self.path = "/index.html"
        super().do_GET()

    def do_POST(self) -> None:
        self._proxy()

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "content-type")}
        request = urllib.request.Request(
            self.orthanc_url + self.path, data=body, method=self.command, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, payload = response.status, response.read()
                content_type = response.headers.get("Content-Type", "application/octet-stream")
        except urllib.error.HTTPError as error:
            status, payload = error.code, error.read()
            content_type = error.headers.get("Content-Type", "text/plain")
        self._send(status, content_type, payload)


def run_node(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a script of ``tests/interop/js`` with node, from that folder."""
    node = require_tool("node", "Node.js, Debian package nodejs")
    return subprocess.run(
        [node, str(JS / script), *args], cwd=JS, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
