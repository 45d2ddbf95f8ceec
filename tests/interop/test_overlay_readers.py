"""The overlay in JPEG-LS Lossless: Orthanc previews it, OHIF shows it as the uncompressed one."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from interop.support import (
    Case,
    Orthanc,
    artefact_dir,
    note_artefact,
    require_node_module,
    require_tool,
    run_node,
)
from pydicom.uid import JPEGLSLossless

pytestmark = pytest.mark.slow
# The viewport of OHIF's default layout in the 1400x900 window the script uses.
_VIEWPORT = (slice(60, 880), slice(300, 1100))


def _picture_patch(shot: np.ndarray, half: int = 120) -> np.ndarray:
    """A square of the screenshot around the middle of the drawn picture, above any toast."""
    upper = shot[: shot.shape[0] * 3 // 4]
    rows, columns = np.nonzero(upper > 40)
    assert rows.size > 0, "no picture in the screenshot"
    row = int(np.clip(np.median(rows), half, upper.shape[0] - half))
    column = int(np.clip(np.median(columns), half, upper.shape[1] - half))
    patch = upper[row - half : row + half, column - half : column + half]
    assert patch.std() > 10  # structure to match, not a flat area
    return np.ascontiguousarray(patch)


def _preview(orthanc: Orthanc, path: Path) -> np.ndarray:
    """Orthanc's PNG rendering of an uploaded instance, as RGB."""
    instance = orthanc.upload(path)
    assert instance["Status"] in ("Success", "AlreadyStored"), instance
    with urllib.request.urlopen(
        f"{orthanc.url}/instances/{instance['ID']}/preview", timeout=60
    ) as response:
        assert response.headers["Content-Type"] == "image/png"
        png = np.frombuffer(response.read(), dtype=np.uint8)
    image = cv2.imdecode(png, cv2.IMREAD_COLOR)
    assert image is not None, f"Orthanc's preview of {path.name} is not a PNG"
    return np.asarray(image[..., ::-1])


def test_orthanc_previews_the_jpeg_ls_overlay_pixel_for_pixel(
    cases: dict[str, Case], orthanc: Orthanc
) -> None:
    for case in cases.values():
        assert pydicom.dcmread(case.sc_jls).file_meta.TransferSyntaxUID == JPEGLSLossless
        pixels = pydicom.dcmread(case.sc).pixel_array
        np.testing.assert_array_equal(_preview(orthanc, case.sc_jls), pixels, err_msg=case.name)
        np.testing.assert_array_equal(_preview(orthanc, case.sc), pixels, err_msg=case.name)


def test_ohif_shows_the_jpeg_ls_overlay_as_the_uncompressed_one(
    cases: dict[str, Case], orthanc: Orthanc, ohif_url: str, tmp_path: Path
) -> None:
    require_tool("chromium", "Debian package chromium")
    require_node_module("puppeteer-core")
    case = cases["positive"]
    folder = artefact_dir()
    spec = []
    for name, path, series in (
        ("sc-raw", case.sc, case.sc_series_uid),
        ("sc-jpeg-ls", case.sc_jls, case.sc_jls_series_uid),
    ):
        assert orthanc.upload(path)["Status"] in ("Success", "AlreadyStored")
        spec.append({
            "name": name, "study": case.study_uid, "series": series, "prompt": False,
            "label": str(pydicom.dcmread(path, stop_before_pixels=True).SeriesDescription)[:24],
            "screenshot": str(folder / f"ohif-{name}.png"),
        })  # fmt: skip
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    run = run_node("ohif_open.mjs", ohif_url, str(tmp_path / "cases.json"), timeout=400)
    assert run.returncode == 0, run.stderr[-4000:]
    results = {r["name"]: r for r in map(json.loads, run.stdout.strip().splitlines())}
    assert set(results) == {"sc-raw", "sc-jpeg-ls"}, run.stdout[-4000:]
    for name, result in results.items():
        seen = f"{name}: {json.dumps(result)[:3000]}"
        assert "error" not in result, seen
        assert result["pageErrors"] == [], seen
        assert result["failedRequests"] == [], seen
        assert not any("decode" in e.lower() or "codec" in e.lower()
                       for e in result["consoleErrors"]), seen  # fmt: skip
        assert result["listed"], seen
        if result["failed"]:
            note_artefact(f"OHIF showed 'Something went wrong' for {name} "
                          f"(console: {result['consoleErrors'][:2]})")
    shots = {}
    for name in ("sc-raw", "sc-jpeg-ls"):
        shot = cv2.imread(str(folder / f"ohif-{name}.png"), cv2.IMREAD_GRAYSCALE)
        assert shot is not None
        shots[name] = np.ascontiguousarray(shot[_VIEWPORT])
    assert (shots["sc-jpeg-ls"] > 40).mean() > 0.1, "OHIF drew no image for the JPEG-LS overlay"
    # The image sits wherever OHIF's layout puts it (its side panels open or not), and OHIF's
    # notifications (the thumbnail IMAGE_LOAD_ERROR toast, see test_ohif.py) may cover the lower
    # viewport: a patch of the raw overlay's picture is looked for in the JPEG-LS screenshot.
    patch = _picture_patch(shots["sc-raw"])
    match = cv2.matchTemplate(shots["sc-jpeg-ls"], patch, cv2.TM_CCOEFF_NORMED)
    assert float(match.max()) > 0.95, f"best match {float(match.max()):.3f}"
    note_artefact(f"OHIF screenshots of the overlay, raw and JPEG-LS: {folder}/ohif-sc-*.png")
