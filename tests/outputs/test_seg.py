"""Tests of the Segmentation builder: codes, identification, empty SEG, determinism, hygiene."""

from __future__ import annotations

import datetime
import logging
import warnings
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

CREATED = datetime.datetime(2024, 1, 2, 3, 4, 5)


def _build(
    source: Dataset,
    card: ModelCard,
    make_finding: Callable[..., Finding],
    *,
    positive: bool = True,
    sop_uid: str = "1.2.826.0.1.3680043.8.498.77.2",
    created: datetime.datetime | None = CREATED,
    **kw: object,
) -> hd.seg.Segmentation:
    mask = synthetic.lesion_mask(source.Rows, source.Columns) & positive
    return build_segmentation(
        source,
        make_finding(mask, decode(source)),
        card,
        series_instance_uid="1.2.826.0.1.3680043.8.498.77.1",
        sop_instance_uid=sop_uid,
        created=created,
        **kw,  # type: ignore[arg-type]
    )


def _bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def test_one_binary_pneumothorax_segment_with_the_model_as_algorithm(
    demo_card: ModelCard, make_finding: Callable[..., Finding]
) -> None:
    seg = _build(synthetic.make_radiograph(rows=64, columns=64), demo_card, make_finding)
    assert seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    assert len(seg.SegmentSequence) == 1
    segment = seg.SegmentSequence[0]
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
    assert (kind.CodeValue, kind.CodingSchemeDesignator) == ("36118008", "SCT")
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == demo_card.name
    assert algorithm.AlgorithmVersion == demo_card.version
    family = algorithm.AlgorithmFamilyCodeSequence[0]
    assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
    assert demo_card.uid in algorithm.AlgorithmParameters


def test_contributing_equipment_names_the_model(
    real_card: ModelCard, make_finding: Callable[..., Finding]
) -> None:
    seg = _build(synthetic.make_radiograph(rows=64, columns=64), real_card, make_finding)
    models = [
        item for item in seg.ContributingEquipmentSequence
        if item.get("ManufacturerModelName") == real_card.name
    ]  # fmt: skip
    assert len(models) == 1
    model = models[0]
    assert model.Manufacturer == real_card.manufacturer
    assert model.SoftwareVersions == real_card.version
    assert model.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert model.ContributionDateTime == pydicom.valuerep.DT(CREATED)


def test_series_description_says_ai_not_diagnostic_and_demo(
    demo_card: ModelCard, real_card: ModelCard, make_finding: Callable[..., Finding]
) -> None:
    source = synthetic.make_radiograph(rows=64, columns=64)
    demo = _build(source, demo_card, make_finding).SeriesDescription
    real = _build(source, real_card, make_finding).SeriesDescription
    for text in (demo, real):
        assert text.startswith("AI ") and "NOT FOR DIAGNOSTIC USE" in text and len(text) <= 64
    assert "DEMO" in demo and "DEMO" not in real


def test_same_study_new_series_and_source_reference(
    real_card: ModelCard, make_finding: Callable[..., Finding]
) -> None:
    source = synthetic.make_radiograph(rows=64, columns=48)
    seg = _build(source, real_card, make_finding, series_number=42)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SeriesInstanceUID not in (source.SeriesInstanceUID, "")
    assert seg.SeriesNumber == 42
    assert seg.PatientID == source.PatientID
    assert seg.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_negative_image_gives_a_valid_seg_with_one_empty_frame(
    real_card: ModelCard, make_finding: Callable[..., Finding], tmp_path: Path
) -> None:
    source = synthetic.make_radiograph(rows=64, columns=64)
    seg = _build(source, real_card, make_finding, positive=False)
    path = tmp_path / "seg.dcm"
    pydicom.dcmwrite(path, seg, enforce_file_format=True)
    back = hd.seg.segread(path)
    assert back.number_of_frames == 1
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[1]
    )
    assert pixels.shape == (1, 64, 64, 1) and not pixels.any()


def test_rebuild_with_the_same_uids_is_identical(
    real_card: ModelCard, make_finding: Callable[..., Finding]
) -> None:
    source = synthetic.make_radiograph(rows=80, columns=64)
    first = _bytes(_build(source, real_card, make_finding))
    assert first == _bytes(_build(source, real_card, make_finding))
    undated = [_build(source, real_card, make_finding, created=None) for _ in range(2)]
    assert undated[0].PixelData == undated[1].PixelData
    assert undated[0].SOPInstanceUID == undated[1].SOPInstanceUID
    other = _build(source, real_card, make_finding, sop_uid="1.2.826.0.1.3680043.8.498.77.3")
    assert other.DimensionOrganizationSequence[0].DimensionOrganizationUID != pydicom.dcmread(
        BytesIO(first)
    ).DimensionOrganizationSequence[0].DimensionOrganizationUID


def test_projection_geometry_describes_the_pixel_grid_without_frame_of_reference(
    real_card: ModelCard, make_finding: Callable[..., Finding], tmp_path: Path
) -> None:
    source = synthetic.make_radiograph(rows=64, columns=48, pixel_spacing=(0.15, 0.2))
    source.FrameOfReferenceUID = pydicom.uid.generate_uid()
    seg = _build(source, real_card, make_finding)
    assert list(seg.PatientOrientation) == ["L", "F"]
    assert "FrameOfReferenceUID" not in seg
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.15, 0.2]
    assert float(measures.SliceThickness) == 1.0
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in orientation] == [1, 0, 0, 0, 1, 0]
    assert len(seg.PerFrameFunctionalGroupsSequence) == 1
    frame = seg.PerFrameFunctionalGroupsSequence[0]
    assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == [0, 0, 0]
    assert "DerivationImageSequence" in frame  # the normative pixel-to-pixel link stays
    path = tmp_path / "seg.dcm"
    pydicom.dcmwrite(path, seg, enforce_file_format=True)
    back = hd.seg.segread(path)  # highdicom reads the Pixel Measures back
    assert back.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness == 1.0
    source.PatientOrientation = ["X", "Y"]
    assert _build(source, real_card, make_finding).PatientOrientation in ("", [], None)


def test_spacing_falls_back_to_imager_pixel_spacing_then_nominal(
    real_card: ModelCard, make_finding: Callable[..., Finding]
) -> None:
    source = synthetic.make_radiograph(rows=32, columns=32, pixel_spacing=None)
    source.ImagerPixelSpacing = [0.3, 0.25]
    seg = _build(source, real_card, make_finding)
    spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == [0.3, 0.25]
    del source.ImagerPixelSpacing
    seg = _build(source, real_card, make_finding)
    spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == [1.0, 1.0]


def test_content_description_keeps_the_warning_and_creator_is_named(
    demo_card: ModelCard, real_card: ModelCard, make_finding: Callable[..., Finding]
) -> None:
    source = synthetic.make_radiograph(rows=32, columns=32)
    long_card = demo_card.model_copy(update={"name": "n" * 64, "version": "v" * 64})
    for card in (real_card, long_card):
        seg = _build(source, card, make_finding)
        text = seg.ContentDescription
        assert len(text) <= 64 and text.endswith("NOT FOR DIAGNOSTIC USE")
        assert ("(DEMO)" in text) == card.demo
        assert str(seg.ContentCreatorName) == "pneumonode^AI"


def test_invalid_patient_age_is_dropped_and_a_valid_one_kept(
    real_card: ModelCard, make_finding: Callable[..., Finding]
) -> None:
    source = synthetic.make_radiograph(rows=32, columns=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that "38" is no Age String: the point
        source.PatientAge = "38"
    assert "PatientAge" not in _build(source, real_card, make_finding)
    source.PatientAge = "038Y"
    assert _build(source, real_card, make_finding).PatientAge == "038Y"


def test_mask_of_the_wrong_shape_is_refused_naming_the_sop(
    real_card: ModelCard,
) -> None:
    source = synthetic.make_radiograph(rows=32, columns=32)
    finding = Finding(mask=np.zeros((16, 32), dtype=bool), present=False, score=0.0, area_mm2=0)
    with pytest.raises(ValueError, match=str(source.SOPInstanceUID)):
        build_segmentation(
            source, finding, real_card, series_instance_uid="1.2.3", sop_instance_uid="1.2.4"
        )


def test_device_serial_is_written(
    real_card: ModelCard, make_finding: Callable[..., Finding]
) -> None:
    source = synthetic.make_radiograph(rows=32, columns=32)
    assert _build(source, real_card, make_finding, device_serial="NODE-7").DeviceSerialNumber \
        == "NODE-7"
    assert _build(source, real_card, make_finding).DeviceSerialNumber == "unconfigured"


def test_no_patient_name_reaches_warnings_or_logs(
    real_card: ModelCard,
    make_finding: Callable[..., Finding],
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = synthetic.make_radiograph(rows=32, columns=32)
    source.PatientName = "Secretname"
    source.ReferringPhysicianName = "Otherdoctor"
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        seg = _build(source, real_card, make_finding)
    assert seg.PatientName == "Secretname"  # the object keeps the patient's name...
    texts = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [t for t in texts if "Secretname" in t or "Otherdoctor" in t]  # ...logs do not
