"""Tests of the fast decode path: frames decoded without pydicom's plugins, rendered by a table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import synthetic
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.decoders.base import Decoder, get_decoder
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

from pneumonode.dicom import pixels
from pneumonode.dicom.frames import FrameLayout, decode_frame
from pneumonode.dicom.pixels import decode


def _siim(shared_data: Path) -> list[Path]:
    files = sorted((shared_data / "siim-sample" / "dicom").glob("*.dcm"))
    assert len(files) == 10
    return files


def _no_pydicom_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> Any:
        raise AssertionError("pydicom's decoder ran")

    monkeypatch.setattr(Decoder, "as_array", refuse)


def _per_pixel(ds: Dataset) -> np.ndarray:
    """The rendering chain computed pixel by pixel in float64 (the reference of the table)."""
    stored = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, index=0)[0]
    return pixels._render(stored, ds, str(ds.SOPInstanceUID), pixels._own_sample)


def test_siim_jpeg_frames_decode_with_libjpeg_turbo_not_pydicom(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = [pydicom.dcmread(path) for path in _siim(shared_data)]
    turbo = [
        get_decoder(JPEGBaseline8Bit).as_array(ds, index=0, decoding_plugin="pillow")[0]
        for ds in datasets
    ]
    _no_pydicom_decoder(monkeypatch)
    for ds, expected in zip(datasets, turbo, strict=True):
        np.testing.assert_array_equal(decode(ds).image, (expected / 255.0).astype(np.float32))


def test_other_syntaxes_are_left_to_pydicom() -> None:
    ds = synthetic.compress(synthetic.make_radiograph(rows=48, columns=40), JPEG2000Lossless)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert decode_frame(JPEG2000Lossless, frame, FrameLayout(48, 40, 16, 12, False)) is None


def test_a_cut_jpeg_is_left_to_pydicom_as_before(shared_data: Path) -> None:
    ds = pydicom.dcmread(_siim(shared_data)[0])
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    cut = frame[: len(frame) // 2]
    layout = FrameLayout(1024, 1024, 8, 8, False)
    assert decode_frame(JPEGBaseline8Bit, cut, layout) is None
    assert decode_frame(JPEGBaseline8Bit, frame, layout) is not None
    assert decode_frame(JPEGBaseline8Bit, frame, FrameLayout(1024, 1000, 8, 8, False)) is None
    ds.PixelData = encapsulate([cut])
    np.testing.assert_array_equal(decode(ds).image, _per_pixel(ds))


def _with_voi_lut(ds: Dataset) -> Dataset:
    lut = np.rint(np.sqrt(np.arange(4096) / 4095.0) * 65535.0).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new("LUTData", "US", lut.tolist())
    ds.VOILUTSequence = [item]
    return ds


def _without_window(ds: Dataset) -> Dataset:
    del ds.WindowCenter, ds.WindowWidth
    return ds


def _sigmoid(ds: Dataset) -> Dataset:
    ds.VOILUTFunction = "SIGMOID"
    return ds


def _eight_bit_allocated(window: bool) -> Dataset:
    """8 bits allocated, values from 20 to 200 (the table starts above 0)."""
    ds = synthetic.make_radiograph(rows=70, columns=90, bits_stored=8, window=window)
    stored = np.clip(ds.pixel_array, 20, 200).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OB"
    return ds


CASES = {
    "window": lambda: synthetic.make_radiograph(rows=70, columns=90),
    "rescale": lambda: synthetic.make_radiograph(rows=70, columns=90, rescale=(0.37, -120.5)),
    "signed": lambda: synthetic.make_radiograph(rows=70, columns=90, signed=True),
    "monochrome1": lambda: synthetic.make_dx_monochrome1_16bit(rows=70, columns=90),
    "voi-lut": lambda: _with_voi_lut(synthetic.make_radiograph(rows=70, columns=90)),
    "auto-window": lambda: _without_window(synthetic.make_radiograph(rows=70, columns=90)),
    "auto-8bit": lambda: _without_window(
        synthetic.make_radiograph(rows=70, columns=90, bits_stored=8)
    ),
    "sigmoid": lambda: _sigmoid(synthetic.make_radiograph(rows=70, columns=90)),
    "uint8-window": lambda: _eight_bit_allocated(window=True),
    "uint8-full-range": lambda: _eight_bit_allocated(window=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_table_renders_each_pixel_exactly_as_the_per_pixel_chain(case: str) -> None:
    ds = CASES[case]()
    decoded = decode(ds).image
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, _per_pixel(ds))
    assert np.ptp(decoded) > 0.1  # a real picture, not a constant


def test_the_automatic_window_reads_the_image_not_the_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ds = _without_window(synthetic.make_radiograph(rows=64, columns=64))
    stored = ds.pixel_array.copy()
    stored[:, :32] = 4000  # half the image at one high value: the percentiles move
    stored[:, 32:] = stored[:, 32:] // 8
    ds.PixelData = stored.tobytes()
    decoded = decode(ds).image
    np.testing.assert_array_equal(decoded, _per_pixel(ds))
    assert decoded[:, :32].min() == 1.0  # the high half is white at the 99.5th percentile
