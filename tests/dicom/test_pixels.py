"""Tests of pneumonode.dicom.pixels: rescale, VOI, MONOCHROME1, bit depths, syntaxes, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import synthetic
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from pneumonode.dicom.pixels import DecodedImage, PixelError, decode


def _linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _roundtrip(ds: Dataset, path: Path) -> Dataset:
    return pydicom.dcmread(synthetic.write(ds, path))


def test_modality_rescale_is_applied_before_the_window() -> None:
    ds = synthetic.make_radiograph(
        modality="CR", sop_class_uid=synthetic.CR_STORAGE, rows=64, columns=80,
        rescale=(2.0, -100.0), window=False,
    )  # fmt: skip
    ds.WindowCenter, ds.WindowWidth = "3000", "5000"
    values = ds.pixel_array.astype(np.float64) * 2.0 - 100.0
    decoded = decode(ds)
    np.testing.assert_allclose(decoded.image, _linear(values, 3000.0, 5000.0), atol=1e-6)
    assert decoded.image.dtype == np.float32


def test_linear_window_clips_to_black_and_white() -> None:
    ds = synthetic.make_radiograph(rows=96, columns=96)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    decoded = decode(ds)
    expected = _linear(ds.pixel_array.astype(np.float64), center, width)
    np.testing.assert_allclose(decoded.image, expected, atol=1e-6)
    assert decoded.image.min() == 0.0 and decoded.image.max() == 1.0


def test_multi_valued_window_uses_the_first_pair() -> None:
    ds = synthetic.make_radiograph(rows=64, columns=64)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    single = decode(ds).image
    ds.WindowCenter = [f"{center:.1f}", "100"]
    ds.WindowWidth = [f"{width:.1f}", "50"]
    np.testing.assert_array_equal(decode(ds).image, single)


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_function_is_honoured(function: str) -> None:
    ds = synthetic.make_radiograph(rows=64, columns=64)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    ds.VOILUTFunction = function
    values = ds.pixel_array.astype(np.float64)
    if function == "LINEAR_EXACT":
        expected = np.clip((values - center) / width + 0.5, 0.0, 1.0)
    else:
        expected = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    np.testing.assert_allclose(decode(ds).image, expected, atol=1e-6)


def test_voi_lut_sequence_wins_over_the_window(tmp_path: Path) -> None:
    ds = synthetic.make_radiograph(rows=64, columns=64, bits_stored=12)
    lut = np.rint(np.sqrt(np.arange(4096) / 4095.0) * 65535.0).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new("LUTData", "US", lut.tolist())
    item.LUTExplanation = "square root"
    ds.VOILUTSequence = [item]
    decoded = decode(_roundtrip(ds, tmp_path / "lut.dcm"))
    expected = lut[ds.pixel_array].astype(np.float64) / 65535.0
    np.testing.assert_allclose(decoded.image, expected, atol=1e-6)


def test_malformed_voi_lut_falls_back_to_the_window(caplog: pytest.LogCaptureFixture) -> None:
    ds = synthetic.make_radiograph(rows=32, columns=32, bits_stored=12)
    windowed = decode(ds).image
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 9]  # 9 bits per entry is not allowed
    item.add_new("LUTData", "US", list(range(4096)))
    ds.VOILUTSequence = [item]
    np.testing.assert_array_equal(decode(ds).image, windowed)
    assert any("VOI LUT Sequence unusable" in r.getMessage() for r in caplog.records)


def test_monochrome1_16bit_dx_is_inverted_so_lungs_are_dark() -> None:
    m1 = synthetic.make_dx_monochrome1_16bit(rows=128, columns=128)
    m2 = synthetic.make_radiograph(rows=128, columns=128, bits_stored=16, seed=16)
    stored = m1.pixel_array
    lungs = synthetic.lesion_mask(128, 128)
    mediastinum = np.zeros((128, 128), dtype=bool)
    mediastinum[40:70, 60:68] = True
    assert stored[lungs].mean() > stored[mediastinum].mean()  # stored: air is bright
    decoded = decode(m1).image
    assert decoded[lungs].mean() < 0.2 < 0.8 < decoded[mediastinum].mean()  # shown: air dark
    assert np.abs(decoded - decode(m2).image).max() < 2e-4


def test_signed_pixels_decode_like_unsigned() -> None:
    unsigned = synthetic.make_radiograph(rows=64, columns=64, seed=3)
    signed = synthetic.make_radiograph(rows=64, columns=64, seed=3, signed=True)
    assert signed.pixel_array.min() < 0
    np.testing.assert_allclose(decode(signed).image, decode(unsigned).image, atol=1e-6)
    signed_auto = synthetic.make_radiograph(rows=64, columns=64, seed=3, signed=True, window=False)
    unsigned_auto = synthetic.make_radiograph(rows=64, columns=64, seed=3, window=False)
    np.testing.assert_allclose(decode(signed_auto).image, decode(unsigned_auto).image, atol=1e-6)


def test_non_square_image_keeps_its_shape_and_spacing() -> None:
    ds = synthetic.make_radiograph(rows=300, columns=500, pixel_spacing=(0.25, 0.15))
    decoded = decode(ds)
    assert decoded.image.shape == (300, 500)
    assert decoded.pixel_spacing_mm == (0.25, 0.15)
    lesion = synthetic.lesion_mask(300, 500)
    assert decoded.image[lesion].mean() < decoded.image[~lesion].mean()


def test_no_voi_8bit_maps_the_stored_range_and_deeper_data_get_a_percentile_window() -> None:
    eight = synthetic.make_radiograph(rows=64, columns=64, bits_stored=8, window=False)
    np.testing.assert_allclose(decode(eight).image, eight.pixel_array / 255.0, atol=1e-6)
    twelve = synthetic.make_radiograph(rows=64, columns=64, bits_stored=12, window=False)
    image = decode(twelve).image
    assert image.min() == 0.0 and image.max() == 1.0
    saturated = np.mean((image == 0.0) | (image == 1.0))
    assert 0.005 <= saturated <= 0.03  # about 0.5 % at each end


def test_pixel_spacing_preference_and_invalid_values() -> None:
    ds = synthetic.make_radiograph(rows=32, columns=32, pixel_spacing=(0.2, 0.2))
    ds.ImagerPixelSpacing = ["0.3", "0.3"]
    assert decode(ds).pixel_spacing_mm == (0.2, 0.2)
    ds.PixelSpacing = ["0", "0"]
    assert decode(ds).pixel_spacing_mm == (0.3, 0.3)
    del ds.ImagerPixelSpacing
    assert decode(ds).pixel_spacing_mm is None
    imager = synthetic.make_radiograph(
        rows=32, columns=32, pixel_spacing=(0.1, 0.12), spacing_attribute="ImagerPixelSpacing"
    )
    assert "PixelSpacing" not in imager
    assert decode(imager).pixel_spacing_mm == (0.1, 0.12)
    assert decode(synthetic.make_radiograph(rows=32, columns=32, pixel_spacing=None)) \
        .pixel_spacing_mm is None


@pytest.mark.parametrize("syntax", synthetic.LOSSLESS_SYNTAXES, ids=lambda uid: uid.name)
@pytest.mark.parametrize("kind", ["dx12", "mono1_16", "signed"])
def test_each_lossless_syntax_decodes_to_the_uncompressed_image(
    syntax: pydicom.uid.UID, kind: str, tmp_path: Path
) -> None:
    if kind == "dx12":
        ds = synthetic.make_radiograph(rows=96, columns=80)
    elif kind == "mono1_16":
        ds = synthetic.make_dx_monochrome1_16bit(rows=96, columns=80)
    else:
        ds = synthetic.make_radiograph(rows=96, columns=80, signed=True)
    reference = decode(ds).image
    compressed = _roundtrip(synthetic.compress(ds, syntax), tmp_path / "c.dcm")
    assert compressed.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(decode(compressed).image, reference)


def _pydicom_data(name: str) -> Path:
    from pydicom.data import get_testdata_file

    try:
        found = get_testdata_file(name)
    except (OSError, ValueError) as exc:
        pytest.skip(f"pydicom-data file {name} unavailable: {exc}")
    if found is None:
        pytest.skip(f"pydicom-data file {name} is not installed (pip install pydicom-data)")
    return Path(str(found))


def test_real_monochrome1_cr_uncompressed_and_j2k_lossless_decode_alike() -> None:
    uncompressed = pydicom.dcmread(_pydicom_data("RG1_UNCR.dcm"))
    j2k = pydicom.dcmread(_pydicom_data("RG1_J2KR.dcm"))
    assert uncompressed.PhotometricInterpretation == "MONOCHROME1"
    a, b = decode(uncompressed), decode(j2k)
    assert a.image.shape == (1955, 1841)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.pixel_spacing_mm is None  # Pixel Spacing 0\0 is no spacing
    rows, columns = a.image.shape
    band = slice(int(rows * 0.35), int(rows * 0.55))
    lungs = np.concatenate(
        [a.image[band, int(columns * 0.2) : int(columns * 0.35)].ravel(),
         a.image[band, int(columns * 0.65) : int(columns * 0.8)].ravel()]
    )  # fmt: skip
    mediastinum = a.image[band, int(columns * 0.45) : int(columns * 0.55)]
    stored = uncompressed.pixel_array
    assert stored[band, int(columns * 0.2) : int(columns * 0.35)].mean() > stored[
        band, int(columns * 0.45) : int(columns * 0.55)
    ].mean()  # stored MONOCHROME1: lungs bright
    assert lungs.mean() + 0.15 < mediastinum.mean()  # displayed: lungs dark


def test_siim_jpeg_baseline_files_decode_to_1024_squares(shared_data: Path) -> None:
    files = sorted((shared_data / "siim-sample" / "dicom").glob("*.dcm"))
    assert len(files) == 10
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        decoded = decode(ds)
        assert decoded.image.shape == (1024, 1024), path.name
        spacing = decoded.pixel_spacing_mm
        assert spacing is not None and 0.13 < spacing[0] < 0.2, path.name
        turbo = get_decoder(JPEGBaseline8Bit).as_array(ds, index=0, decoding_plugin="pillow")[0]
        np.testing.assert_array_equal(decoded.image, (turbo / 255.0).astype(np.float32))
        default = ds.pixel_array  # pydicom's first plugin: pylibjpeg-libjpeg (IJG libjpeg)
        differ = np.abs(np.rint(decoded.image * 255.0) - default) > 0
        np.testing.assert_allclose(decoded.image, default / 255.0, atol=1.0 / 255.0 + 1e-6)
        assert differ.mean() < 0.05, path.name  # IDCT rounding, on a few percent of pixels


def test_to_uint8_maps_black_and_white_to_0_and_255() -> None:
    image = DecodedImage(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), None)
    np.testing.assert_array_equal(image.to_uint8(), [[0, 128, 255]])
    with pytest.raises(ValueError, match="float32"):
        DecodedImage(np.zeros((2, 2), dtype=np.float64), None)  # type: ignore[arg-type]


def _refused(ds: Dataset, match: str, **kw: int) -> str:
    with pytest.raises(PixelError, match=match) as info:
        decode(ds, **kw)
    message = str(info.value)
    assert str(ds.SOPInstanceUID) in message
    return message


def test_refuses_missing_pixel_data() -> None:
    ds = synthetic.make_radiograph(rows=32, columns=32)
    del ds.PixelData
    _refused(ds, "Pixel Data")


def test_refuses_multi_frame() -> None:
    ds = synthetic.make_radiograph(rows=32, columns=32, number_of_frames=2)
    _refused(ds, "NumberOfFrames is 2")


def test_single_frame_with_number_of_frames_1_is_accepted() -> None:
    ds = synthetic.make_radiograph(rows=32, columns=40, number_of_frames=1)
    assert decode(ds).image.shape == (32, 40)


def test_refuses_colour() -> None:
    ds = synthetic.make_radiograph(rows=32, columns=32, bits_stored=8)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    _refused(ds, "SamplesPerPixel must be 1; it is 3")
    ds = synthetic.make_radiograph(rows=32, columns=32, bits_stored=8)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    _refused(ds, "PALETTE COLOR")


def test_refuses_too_many_pixels_before_decoding() -> None:
    ds = synthetic.make_radiograph(rows=32, columns=32)
    ds.Rows, ds.Columns = 40000, 40000  # a bomb: the pixel data are far too short to decode
    message = _refused(ds, r"Rows\*Columns must not exceed 60000000")
    assert "40000x40000" in message
    small = synthetic.make_radiograph(rows=32, columns=32)
    _refused(small, "must not exceed 1000", max_pixels=1000)


def test_refuses_a_transfer_syntax_without_decoder() -> None:
    ds = synthetic.make_radiograph(rows=32, columns=32)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2
    _refused(ds, "1.2.840.10008.1.2.4.100")


def test_refuses_corrupt_compressed_data(tmp_path: Path) -> None:
    ds = synthetic.compress(
        synthetic.make_radiograph(rows=64, columns=64), pydicom.uid.JPEG2000Lossless
    )
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    _refused(ds, "compressed frame must match the header")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = b"\x00" * 10
    _refused(ds, "failed")
