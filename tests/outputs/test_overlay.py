"""Tests of the secondary-capture overlay: banner text, drawing, header, determinism."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
import synthetic
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pneumonode.dicom.pixels import DecodedImage, decode
from pneumonode.findings import Finding
from pneumonode.inference.card import ModelCard
from pneumonode.outputs.overlay import banner_lines, build_overlay, render_overlay

CREATED = datetime.datetime(2024, 1, 2, 3, 4, 5)


def _finding(present: bool, area: float | None, shape: tuple[int, int] = (64, 64)) -> Finding:
    mask = synthetic.lesion_mask(*shape) & present
    return Finding(mask=mask, present=present, score=0.934 if present else 0.071, area_mm2=area)


def test_banner_lines_state_finding_model_and_warning(
    demo_card: ModelCard, real_card: ModelCard
) -> None:
    positive = banner_lines(_finding(True, 1234.4), real_card)
    threshold = f"(decision threshold {real_card.thresholds.top:.2f})"
    assert positive == [
        f"Pneumothorax suspected, score 0.93, area 1234 mm2 {threshold}",
        "Model: attention-unet-test 1.2.3",
        "AI-generated - NOT FOR DIAGNOSTIC USE",
    ]
    no_spacing = banner_lines(_finding(True, None), real_card)[0]
    assert f"area {_finding(True, None).area_pixels} pixels" in no_spacing
    negative = banner_lines(_finding(False, 0.0), demo_card)
    assert negative[0].startswith("No pneumothorax detected")
    assert "(DEMO)" in negative[1] and negative[2].endswith("DEMO MODEL")


def test_render_tints_and_outlines_the_mask_and_leaves_the_rest(real_card: ModelCard) -> None:
    source = synthetic.make_radiograph(rows=256, columns=192)
    image = decode(source)
    mask = synthetic.lesion_mask(256, 192)
    finding = Finding(mask=mask, present=True, score=0.9, area_mm2=10.0)
    rgb = render_overlay(image, finding, real_card)
    banner_height = rgb.shape[0] - 256
    assert rgb.dtype == np.uint8 and rgb.shape[1:] == (192, 3) and banner_height > 0
    picture, banner = rgb[banner_height:], rgb[:banner_height]
    gray = image.to_uint8()
    near = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    for channel in range(3):
        np.testing.assert_array_equal(picture[~near][:, channel], gray[~near])
    inside = cv2.erode(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    tinted = picture[inside].astype(int)
    assert (tinted[:, 0] > tinted[:, 2]).all()
    yellow = (picture[..., 0] > 200) & (picture[..., 1] > 180) & (picture[..., 2] < 80)
    assert yellow[near & ~inside].sum() > 50  # the outline
    assert len(np.unique(banner.reshape(-1, 3), axis=0)) > 10  # text was drawn


def test_negative_render_is_the_plain_windowed_image(real_card: ModelCard) -> None:
    image = decode(synthetic.make_radiograph(rows=64, columns=64))
    rgb = render_overlay(image, _finding(False, 0.0), real_card)
    picture = rgb[rgb.shape[0] - 64 :]
    for channel in range(3):
        np.testing.assert_array_equal(picture[..., channel], image.to_uint8())


def _build(
    source: Dataset, card: ModelCard, make_finding: Callable[..., Finding], **kw: object
) -> hd.sc.SCImage:
    image = decode(source)
    finding = make_finding(synthetic.lesion_mask(source.Rows, source.Columns), image)
    args: dict[str, object] = {
        "series_instance_uid": "1.2.826.0.1.3680043.8.498.88.1",
        "sop_instance_uid": "1.2.826.0.1.3680043.8.498.88.2",
        "created": CREATED,
    }
    args.update(kw)
    return build_overlay(source, image, finding, card, **args)  # type: ignore[arg-type]


def test_header_same_study_new_series_chest_not_diagnostic(
    demo_card: ModelCard, make_finding: Callable[..., Finding], tmp_path: Path
) -> None:
    source = synthetic.make_radiograph(rows=128, columns=96, pixel_spacing=(0.15, 0.2))
    sc = _build(source, demo_card, make_finding)
    path = tmp_path / "sc.dcm"
    pydicom.dcmwrite(path, sc, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID == "1.2.826.0.1.3680043.8.498.88.1"
    assert back.SeriesNumber == 9902
    assert back.StudyDescription == source.StudyDescription
    assert back.PatientID == source.PatientID and back.PatientName == source.PatientName
    assert back.AccessionNumber == source.AccessionNumber
    assert back.BodyPartExamined == "CHEST"
    assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
    assert [float(v) for v in back.PixelSpacing] == [0.15, 0.2]
    assert list(back.PatientOrientation) == ["L", "F"]
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    description = back.SeriesDescription
    assert "overlay" in description and "NOT FOR DIAGNOSTIC USE" in description
    assert "DEMO" in description
    assert back.ContentDate == "20240102" and back.InstanceCreationTime == "030405"


def test_lossy_source_marks_the_overlay_lossy(
    real_card: ModelCard, make_finding: Callable[..., Finding]
) -> None:
    source = synthetic.make_radiograph(rows=64, columns=64)
    assert _build(source, real_card, make_finding).get("LossyImageCompression") != "01"
    source.LossyImageCompression = "01"
    source.LossyImageCompressionMethod = "ISO_10918_1"
    sc = _build(source, real_card, make_finding)
    assert sc.LossyImageCompression == "01"
    assert sc.LossyImageCompressionMethod == "ISO_10918_1"


def test_rebuild_with_the_same_uids_is_identical(
    real_card: ModelCard, make_finding: Callable[..., Finding]
) -> None:
    source = synthetic.make_radiograph(rows=96, columns=64)

    def encoded(sc: hd.sc.SCImage) -> bytes:
        buffer = BytesIO()
        pydicom.dcmwrite(buffer, sc, enforce_file_format=True)
        return buffer.getvalue()

    assert encoded(_build(source, real_card, make_finding)) == encoded(
        _build(source, real_card, make_finding)
    )
    undated = [_build(source, real_card, make_finding, created=None) for _ in range(2)]
    assert undated[0].PixelData == undated[1].PixelData


def test_shapes_that_do_not_match_the_source_are_refused(
    real_card: ModelCard,
) -> None:
    source = synthetic.make_radiograph(rows=32, columns=32)
    image = DecodedImage(np.zeros((32, 16), dtype=np.float32), None)
    finding = Finding(mask=np.zeros((32, 16), dtype=bool), present=False, score=0.0, area_mm2=0)
    with pytest.raises(ValueError, match=str(source.SOPInstanceUID)):
        build_overlay(
            source, image, finding, real_card, series_instance_uid="1.2.3", sop_instance_uid="1.2.4"
        )


def test_the_fill_is_the_exact_blend_of_each_pixel_with_the_fill_colour(
    real_card: ModelCard,
) -> None:
    source = synthetic.make_radiograph(rows=256, columns=192)
    image = decode(source)
    mask = synthetic.lesion_mask(256, 192)
    rgb = render_overlay(image, Finding(mask=mask, present=True, score=0.9, area_mm2=1.0),
                         real_card)  # fmt: skip
    picture = rgb[rgb.shape[0] - 256 :]
    inside = cv2.erode(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    gray = image.to_uint8()[inside].astype(np.float64)[:, np.newaxis]
    expected = np.rint(gray * 0.65 + np.array([255.0, 32.0, 32.0]) * 0.35).astype(np.uint8)
    assert len(np.unique(gray)) > 20  # many gray levels under the fill
    np.testing.assert_array_equal(picture[inside], expected)
