"""Tests of the TID 1500 measurement report: content, references, dciodvfy, DCMTK and highdicom."""

from __future__ import annotations

import datetime
import shutil
import subprocess
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import synthetic
from pydicom.dataset import Dataset

from pneumonode.dicom.pixels import decode
from pneumonode.findings import Finding
from pneumonode.inference.card import ModelCard
from pneumonode.outputs.seg import build_segmentation
from pneumonode.outputs.sr import build_report

CREATED = datetime.datetime(2024, 1, 2, 3, 4, 5)
SEG_UID = "1.2.826.0.1.3680043.8.498.66.2"
SR_SERIES_UID = "1.2.826.0.1.3680043.8.498.66.3"
SR_UID = "1.2.826.0.1.3680043.8.498.66.4"


def _build(
    source: Dataset,
    card: ModelCard,
    make_finding: Callable[..., Finding],
    *,
    positive: bool = True,
    created: datetime.datetime | None = CREATED,
) -> tuple[Finding, Dataset, Dataset]:
    mask = synthetic.lesion_mask(int(source.Rows), int(source.Columns)) & positive
    finding = make_finding(mask, decode(source))
    seg = build_segmentation(
        source, finding, card,
        series_instance_uid="1.2.826.0.1.3680043.8.498.66.1", sop_instance_uid=SEG_UID,
        created=created,
    )  # fmt: skip
    sr = build_report(
        source, finding, card, seg,
        series_instance_uid=SR_SERIES_UID, sop_instance_uid=SR_UID, created=created,
    )  # fmt: skip
    return finding, seg, sr


def _write(ds: Dataset, path: Path) -> Path:
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _group(path: Path) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    report = hd.sr.srread(path).content
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1
    return groups[0]


def _dsrdump(path: Path) -> str:
    exe = shutil.which("dsrdump")
    if exe is None:
        pytest.skip("dsrdump not installed (Debian package dcmtk; scripts/test installs it)")
    out = subprocess.run(
        [exe, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    problems = [line for line in out.stderr.splitlines() if line[:2] in ("E:", "W:", "F:")]
    assert not problems, out.stderr
    return out.stdout


@pytest.mark.parametrize("positive", [True, False], ids=["positive", "negative"])
def test_report_states_finding_area_score_algorithm_and_references(
    positive: bool,
    demo_card: ModelCard,
    make_finding: Callable[..., Finding],
    assert_dciodvfy_clean: Callable[[Path], str],
    tmp_path: Path,
) -> None:
    source = synthetic.make_radiograph(rows=96, columns=80, pixel_spacing=(0.15, 0.2))
    finding, _, sr = _build(source, demo_card, make_finding, positive=positive)
    path = _write(sr, tmp_path / "sr.dcm")
    assert_dciodvfy_clean(path)
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID == SR_SERIES_UID and back.SOPInstanceUID == SR_UID
    assert back.PatientID == source.PatientID and back.AccessionNumber == source.AccessionNumber
    assert "NOT FOR DIAGNOSTIC USE" in back.SeriesDescription and "DEMO" in back.SeriesDescription
    assert back.CompletionFlag == "PARTIAL" and back.VerificationFlag == "UNVERIFIED"
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {source.SOPInstanceUID, SEG_UID}

    group = _group(path)
    assert group.finding_type.value == "36118008"
    assert group.tracking_identifier == "pneumothorax"
    segment = group.referenced_segment
    assert segment.referenced_sop_instance_uid == SEG_UID
    assert segment.referenced_segment_numbers == [1]
    evaluations = {q.name.value: q.value.value for q in group.get_qualitative_evaluations()}
    assert evaluations["36118008"] == ("52101004" if positive else "272519000")
    measurements = {m.name.value: m for m in group.get_measurements()}
    assert measurements["42798000"].unit.value == "mm2"
    assert measurements["42798000"].value == pytest.approx(finding.area_mm2, rel=1e-6)
    assert measurements["122157"].value == pytest.approx(finding.score, rel=1e-6)
    assert (finding.area_mm2 or 0) > 0 if positive else finding.area_mm2 == 0

    text = _dsrdump(path)
    assert "Imaging Measurement Report" in text
    assert demo_card.name in text and "Artificial Intelligence" in text
    assert ("Present" if positive else "Absent") in text
    assert "Referenced Segment" in text and "Source Image for Segmentation" in text


def test_source_image_is_in_the_image_library_and_the_segment_reference(
    real_card: ModelCard, make_finding: Callable[..., Finding], tmp_path: Path
) -> None:
    source = synthetic.make_radiograph(rows=64, columns=64)
    _, _, sr = _build(source, real_card, make_finding)
    path = _write(sr, tmp_path / "sr.dcm")
    referenced = set()

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            for ref in item.get("ReferencedSOPSequence", []):
                referenced.add((item.ConceptNameCodeSequence[0].CodeMeaning,
                                ref.ReferencedSOPInstanceUID))  # fmt: skip
            walk(item.get("ContentSequence", []))

    walk(pydicom.dcmread(path).ContentSequence)
    assert ("Source", source.SOPInstanceUID) in referenced  # the Image Library entry
    assert ("Source Image for Segmentation", source.SOPInstanceUID) in referenced
    assert ("Referenced Segment", SEG_UID) in referenced


def test_without_pixel_spacing_the_area_is_left_out(
    real_card: ModelCard,
    make_finding: Callable[..., Finding],
    assert_dciodvfy_clean: Callable[[Path], str],
    tmp_path: Path,
) -> None:
    source = synthetic.make_radiograph(
        modality="CR", sop_class_uid=synthetic.SC_STORAGE, rows=64, columns=64,
        pixel_spacing=None,
    )  # fmt: skip
    finding, _, sr = _build(source, real_card, make_finding)
    assert finding.area_mm2 is None
    path = _write(sr, tmp_path / "sr.dcm")
    assert_dciodvfy_clean(path)
    names = {m.name.value for m in _group(path).get_measurements()}
    assert names == {"122157"}
    _dsrdump(path)


def test_rebuild_with_the_same_uids_is_identical(
    real_card: ModelCard, make_finding: Callable[..., Finding]
) -> None:
    source = synthetic.make_radiograph(rows=48, columns=48)

    def encoded() -> bytes:
        buffer = BytesIO()
        pydicom.dcmwrite(buffer, _build(source, real_card, make_finding)[2],
                         enforce_file_format=True)  # fmt: skip
        return buffer.getvalue()

    assert encoded() == encoded()


def test_a_seg_of_another_image_is_refused_naming_the_sop(
    real_card: ModelCard, make_finding: Callable[..., Finding]
) -> None:
    source = synthetic.make_radiograph(rows=32, columns=32)
    other = synthetic.make_radiograph(rows=32, columns=32, seed=9)
    finding, seg, _ = _build(other, real_card, make_finding)
    with pytest.raises(ValueError, match=str(source.SOPInstanceUID)):
        build_report(
            source, finding, real_card, seg,
            series_instance_uid=SR_SERIES_UID, sop_instance_uid=SR_UID,
        )  # fmt: skip
    wrong = Finding(mask=np.zeros((16, 32), dtype=bool), present=False, score=0.1, area_mm2=0)
    _, seg, _ = _build(source, real_card, make_finding)
    with pytest.raises(ValueError, match=str(source.SOPInstanceUID)):
        build_report(
            source, wrong, real_card, seg,
            series_instance_uid=SR_SERIES_UID, sop_instance_uid=SR_UID,
        )  # fmt: skip
