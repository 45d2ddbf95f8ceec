"""Decode one compressed frame with the fastest library at hand, or say that pydicom must.

pydicom picks its decoder by plugin order, not by speed: for JPEG Baseline it takes
pylibjpeg-libjpeg (the IJG reference library, about 5 times slower than libjpeg-turbo). Here an
8-bit, one-component JPEG Baseline frame is decoded by libjpeg-turbo through ``cv2.imdecode``,
the library of pydicom's Pillow plugin and bit-identical to it. It differs from
pylibjpeg-libjpeg by at most one gray level on a few percent of the pixels, the IDCT rounding
latitude that ISO 10918-1 gives every decoder.

JPEG 2000 stays with pydicom: its plugin costs nothing measurable over calling OpenJPEG directly,
and OpenCV's OpenJPEG is no faster (``benchmarks/stages.py``, 2048 px lossless). Anything else,
or a frame libjpeg-turbo does not return at exactly the header's size and type (a truncated
JPEG, which it would pad with gray, included), is left to pydicom (``None``). The frame's size
has been checked against the header before (``codestream.py``): nothing here allocates more
than the header allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from pydicom import uid as pduid

__all__ = ["FrameLayout", "decode_frame"]

_EOI = b"\xff\xd9"


@dataclass(frozen=True)
class FrameLayout:
    """What the header says one frame holds (one sample per pixel)."""

    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    signed: bool


def decode_frame(
    syntax: str, frame: bytes, layout: FrameLayout
) -> npt.NDArray[Any] | None:
    """The frame's stored values as a (Rows, Columns) array, or None: decode it with pydicom.

    Parameters
    ----------
    syntax:
        The transfer syntax UID.
    frame:
        The frame's compressed bytes, their size already checked against the header.
    layout:
        Rows, Columns, Bits Allocated, Bits Stored and Pixel Representation of the header.

    Returns
    -------
    numpy.ndarray or None
        uint8 (JPEG Baseline); None when this module does not decode such a frame.
    """
    if syntax == pduid.JPEGBaseline8Bit:
        return _jpeg_baseline(frame, layout)
    return None


def _jpeg_baseline(frame: bytes, layout: FrameLayout) -> npt.NDArray[Any] | None:
    if layout.bits_allocated != 8 or layout.signed:
        return None
    if not frame.rstrip(b"\x00").endswith(_EOI):  # cut short: decoded by pydicom, as before
        return None
    array = cv2.imdecode(np.frombuffer(frame, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    return _as_header_says(array, layout, np.dtype(np.uint8))


def _as_header_says(
    array: npt.NDArray[Any] | None, layout: FrameLayout, dtype: np.dtype[Any]
) -> npt.NDArray[Any] | None:
    if array is None or array.shape != (layout.rows, layout.columns):
        return None
    if array.dtype != dtype:
        return None
    return array
