"""Orthanc 1.10 (Debian) stores and lists the SEG, SC and SR, and serves them over DICOMweb."""

from __future__ import annotations

import json
import urllib.request

import pydicom
import pytest
from interop.support import Case, Orthanc

pytestmark = pytest.mark.slow


def test_orthanc_stores_and_lists_seg_sc_and_sr(
    cases: dict[str, Case], orthanc: Orthanc
) -> None:
    case = cases["positive"]
    for path in (case.source, case.seg, case.sc, case.sr):
        answer = orthanc.upload(path)
        assert answer["Status"] in ("Success", "AlreadyStored"), answer
    studies = orthanc.rest("POST", "/tools/find", json.dumps({
        "Level": "Series", "Query": {"StudyInstanceUID": case.study_uid}, "Expand": True,
    }).encode())  # fmt: skip
    modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in studies)
    assert modalities == ["DX", "OT", "SEG", "SR"], modalities
    request = urllib.request.Request(
        f"{orthanc.url}/dicom-web/studies/{case.study_uid}/series/{case.sr_series_uid}/metadata",
        headers={"Accept": "application/dicom+json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        metadata = json.loads(response.read())
    assert len(metadata) == 1
    sr = pydicom.Dataset.from_json(metadata[0])
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    assert sr.CompletionFlag == "PARTIAL"
