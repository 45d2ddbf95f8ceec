"""SEG, SC overlay and SR for synthetic and real sources: dciodvfy clean, read back by highdicom."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
import synthetic
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumonode.dicom.pixels import decode
from pneumonode.findings import Finding
from pneumonode.inference.card import ModelCard
from pneumonode.outputs.overlay import build_overlay
from pneumonode.outputs.seg import build_segmentation
from pneumonode.outputs.sr import build_report

CREATED = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456)


def _synthetic_cases() -> dict[str, Callable[[], Dataset]]:
    return {
        "dx-12bit": lambda: synthetic.make_radiograph(rows=256, columns=256),
        "dx-16bit-monochrome1": lambda: synthetic.make_dx_monochrome1_16bit(
            rows=256, columns=256
        ),
        "cr-non-square": lambda: synthetic.make_radiograph(
            modality="CR", sop_class_uid=synthetic.CR_STORAGE, rows=200, columns=331,
            rescale=(2.0, -10.0), seed=5,
        ),
        "sc-cr-8bit-odd": lambda: synthetic.make_radiograph(
            modality="CR", sop_class_uid=synthetic.SC_STORAGE, rows=97, columns=61,
            bits_stored=8, window=False, pixel_spacing=None, seed=6,
        ),
    }


def _check_pair(
    source: Dataset,
    mask: np.ndarray,
    card: ModelCard,
    make_finding: Callable[..., Finding],
    check: Callable[[Path], str],
    folder: Path,
) -> None:
    image = decode(source)
    finding = make_finding(mask, image)
    uids = {
        k: str(generate_uid())
        for k in ("seg_series", "seg_sop", "sc_series", "sc_sop", "sr_series", "sr_sop")
    }
    seg = build_segmentation(
        source, finding, card,
        series_instance_uid=uids["seg_series"], sop_instance_uid=uids["seg_sop"],
        created=CREATED,
    )  # fmt: skip
    sc = build_overlay(
        source, image, finding, card,
        series_instance_uid=uids["sc_series"], sop_instance_uid=uids["sc_sop"],
        created=CREATED,
    )  # fmt: skip
    sr = build_report(
        source, finding, card, seg,
        series_instance_uid=uids["sr_series"], sop_instance_uid=uids["sr_sop"], created=CREATED,
    )  # fmt: skip
    seg_path, sc_path, sr_path = folder / "seg.dcm", folder / "sc.dcm", folder / "sr.dcm"
    pydicom.dcmwrite(seg_path, seg, enforce_file_format=True)
    pydicom.dcmwrite(sc_path, sc, enforce_file_format=True)
    pydicom.dcmwrite(sr_path, sr, enforce_file_format=True)
    check(seg_path)
    check(sc_path)
    check(sr_path)

    back = hd.seg.segread(seg_path)
    assert back.SOPInstanceUID == uids["seg_sop"]
    assert back.SeriesInstanceUID == uids["seg_series"]
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert (back.Rows, back.Columns) == (source.Rows, source.Columns)
    assert back.number_of_frames == 1
    assert [uid for _, _, uid in back.get_source_image_uids()] == [source.SOPInstanceUID]
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[1]
    )
    np.testing.assert_array_equal(pixels[0, :, :, 0].astype(bool), mask.astype(bool))

    overlay = hd.imread(sc_path)
    raw = pydicom.dcmread(sc_path)
    assert raw.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert raw.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert raw.StudyInstanceUID == source.StudyInstanceUID
    assert raw.SeriesInstanceUID == uids["sc_series"]
    assert raw.BodyPartExamined == "CHEST"
    assert raw.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert raw.get("StudyDescription") == source.get("StudyDescription")
    assert raw.Columns == source.Columns and raw.Rows > source.Rows
    assert overlay.pixel_array.shape == (raw.Rows, raw.Columns, 3)
    picture = overlay.pixel_array[raw.Rows - source.Rows :]
    gray = image.to_uint8()
    untouched = ~cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    np.testing.assert_array_equal(picture[untouched][:, 0], gray[untouched])
    if finding.present:
        inside = cv2.erode(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        if inside.any():
            tint = picture[inside].astype(int)
            assert (tint[:, 0] > tint[:, 1]).all()  # the mask is tinted red


@pytest.mark.parametrize("case", list(_synthetic_cases()))
@pytest.mark.parametrize("positive", [True, False], ids=["positive", "negative"])
def test_synthetic_sources(
    case: str,
    positive: bool,
    demo_card: ModelCard,
    make_finding: Callable[..., Finding],
    assert_dciodvfy_clean: Callable[[Path], str],
    tmp_path: Path,
) -> None:
    source = _synthetic_cases()[case]()
    source = pydicom.dcmread(synthetic.write(source, tmp_path / "source.dcm"))
    mask = synthetic.lesion_mask(source.Rows, source.Columns) & positive
    _check_pair(source, mask, demo_card, make_finding, assert_dciodvfy_clean, tmp_path)


def test_real_monochrome1_cr_from_pydicom_data(
    real_card: ModelCard,
    make_finding: Callable[..., Finding],
    assert_dciodvfy_clean: Callable[[Path], str],
    tmp_path: Path,
) -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_J2KR.dcm")
    if path is None:
        pytest.skip("pydicom-data's RG1_J2KR.dcm is not installed (pip install pydicom-data)")
    source = pydicom.dcmread(str(path))
    mask = np.zeros((source.Rows, source.Columns), dtype=bool)
    mask[300:700, 200:420] = True
    _check_pair(source, mask, real_card, make_finding, assert_dciodvfy_clean, tmp_path)


def _siim_files() -> list[str]:
    folder = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "siim-sample"
    return sorted(p.stem for p in (folder / "dicom").glob("*.dcm"))


@pytest.mark.parametrize("sop_uid", _siim_files() or ["absent"])
def test_siim_sample_files(
    sop_uid: str,
    shared_data: Path,
    demo_card: ModelCard,
    make_finding: Callable[..., Finding],
    assert_dciodvfy_clean: Callable[[Path], str],
    tmp_path: Path,
) -> None:
    folder = shared_data / "siim-sample"
    dicom_path = folder / "dicom" / f"{sop_uid}.dcm"
    if not dicom_path.exists():
        pytest.skip(f"SIIM sample {dicom_path} is absent")
    source = pydicom.dcmread(dicom_path)
    mask = cv2.imread(str(folder / "masks" / f"{sop_uid}.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert mask.shape == (1024, 1024)
    _check_pair(source, mask, demo_card, make_finding, assert_dciodvfy_clean, tmp_path)
