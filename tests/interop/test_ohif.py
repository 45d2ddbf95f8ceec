"""OHIF 3.13 in Debian's headless Chromium opens our SEGs from Orthanc (DICOMweb), overlaid."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
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

pytestmark = pytest.mark.slow
# The viewport of OHIF's default layout in the 1400x900 window the script uses.
_VIEWPORT = (slice(60, 880), slice(300, 1100))


def _red_pixels(path: Path) -> int:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"no screenshot at {path}"
    blue, green, red = (image[_VIEWPORT][..., i].astype(int) for i in range(3))
    return int(np.count_nonzero((red > 180) & (red - green > 80) & (red - blue > 80)))


def test_ohif_opens_positive_and_empty_segs_over_their_radiographs(
    cases: dict[str, Case], orthanc: Orthanc, ohif_url: str, tmp_path: Path
) -> None:
    require_tool("chromium", "Debian package chromium")
    require_node_module("puppeteer-core")
    folder = artefact_dir()
    spec = []
    for case in cases.values():
        for path in (case.source, case.seg):
            assert orthanc.upload(path)["Status"] in ("Success", "AlreadyStored")
        spec.append(
            {
                "name": case.name,
                "study": case.study_uid,
                "series": case.seg_series_uid,
                "label": "Pneumothorax",
                "screenshot": str(folder / f"ohif-seg-{case.name}.png"),
            }
        )
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    run = run_node("ohif_open.mjs", ohif_url, str(tmp_path / "cases.json"), timeout=540)
    assert run.returncode == 0, run.stderr[-4000:]
    results = {r["name"]: r for r in map(json.loads, run.stdout.strip().splitlines())}
    assert set(results) == set(cases), run.stdout[-4000:]
    for name, result in results.items():
        seen = f"{name}: {json.dumps(result)[:3000]}"
        assert "error" not in result, seen
        assert result["pageErrors"] == [], seen
        assert not any("PixelMeasures" in e or "SpacingBetweenSlices" in e
                       for e in result["consoleErrors"]), seen  # fmt: skip
        assert result["failedRequests"] == [], seen  # every DICOMweb request answered
        assert result["prompted"] and result["listed"], seen
        if result["failed"]:  # OHIF's error boundary, not a page error: reported, see below
            note_artefact(f"OHIF showed 'Something went wrong' for {name} with the SEG listed "
                          f"(console: {result['consoleErrors'][:2]})")
    positive = folder / "ohif-seg-positive.png"
    assert _red_pixels(positive) > 2000  # the segment is drawn over the radiograph
    assert _red_pixels(folder / "ohif-seg-negative.png") < 200
    shown = folder / "ohif-seg-siim.png" if "siim" in cases else positive
    if "siim" in cases:
        assert _red_pixels(shown) > 1000
    note_artefact(f"OHIF screenshot of a positive SEG over its radiograph: {shown}")
    note_artefact(f"OHIF screenshots of every case: {folder}/ohif-seg-*.png")
