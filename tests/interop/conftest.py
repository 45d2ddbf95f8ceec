"""Fixtures of the interop tests: result objects on disk, Orthanc with DICOMweb, OHIF served.

See :mod:`interop.support` for where the readers come from and where artefacts go.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pydicom
import pytest
import synthetic
from harness import free_port
from interop.support import (
    ARTEFACTS,
    OHIF_DIST,
    SIIM_DICOM,
    SIIM_MASKS,
    Case,
    OhifHandler,
    Orthanc,
    ohif_config,
    write_case,
)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """List the artefacts the interop tests saved."""
    if ARTEFACTS:
        terminalreporter.write_sep("-", "interop artefacts")
        for line in ARTEFACTS:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    """Positive and negative synthetic DX results, and a real SIIM positive when available."""
    root = tmp_path_factory.mktemp("interop-cases")
    rows, columns = 512, 448
    positive = synthetic.make_radiograph(rows=rows, columns=columns, seed=21)
    negative = synthetic.make_radiograph(rows=rows, columns=columns, seed=22, lesion=False)
    result = {
        "positive": write_case(
            "positive", positive, synthetic.lesion_mask(rows, columns), root / "positive"
        ),
        "negative": write_case(
            "negative", negative, np.zeros((rows, columns), dtype=bool), root / "negative"
        ),
    }
    if SIIM_DICOM.is_dir():
        import cv2

        masks = {
            path: cv2.imread(str(SIIM_MASKS / f"{path.stem}.png"), cv2.IMREAD_GRAYSCALE)
            for path in sorted(SIIM_DICOM.glob("*.dcm"))
        }
        masks = {path: mask > 0 for path, mask in masks.items() if mask is not None}
        if masks:  # the real positive with the largest pneumothorax
            path = max(masks, key=lambda p: int(masks[p].sum()))
            result["siim"] = write_case("siim", pydicom.dcmread(path), masks[path], root / "siim")
    return result


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A running Orthanc with DICOMweb (skips when Orthanc or its plugin is absent)."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ohif_url(orthanc: Orthanc) -> Iterator[str]:
    """OHIF 3.13 served on loopback in front of the Orthanc fixture (skips when not installed)."""
    if not (OHIF_DIST / "index.html").is_file():
        pytest.skip(f"OHIF's built app is absent from {OHIF_DIST} (scripts/test npm-packs it)")
    handler = type(
        "Handler",
        (OhifHandler,),
        {"orthanc_url": orthanc.url, "config": ohif_config()},
    )

    def factory(*args: Any, **kwargs: Any) -> OhifHandler:
        return handler(*args, directory=str(OHIF_DIST), **kwargs)  # type: ignore[no-any-return]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), factory)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


