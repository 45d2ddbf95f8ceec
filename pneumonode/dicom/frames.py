"""Decode one compressed frame with the fastest library at hand, or say that pydicom must.

pydicom picks its decoder by plugin order, not by speed: for JPEG Baseline it takes
pylibjpeg-libjpeg (the IJG reference library, about 4 times slower than libjpeg-turbo), and for
JPEG 2000 its plugin machinery costs as much again as OpenJPEG itself. Here:

* JPEG Baseline (8-bit, one component): libjpeg-turbo through ``cv2.imdecode``, the same
  library as pydicom's Pillow plugin and bit-identical to it. It differs from pylibjpeg-libjpeg
  by at most one gray level on a few percent of the pixels, the IDCT rounding latitude that
  ISO 10918-1 gives every decoder.
* JPEG 2000 (lossless or not): OpenJPEG through ``openjpeg.decode``, the library pydicom's
  pylibjpeg plugin calls, so the values are identical, when the codestream's precision and
  signedness are the header's (otherwise pydicom's own corrections are needed).

Anything else, or anything these decoders do not return at exactly the header's size and type
(a truncated JPEG, which libjpeg-turbo would pad with gray, included), is left to pydicom
(``None``). The frame's size has been checked against the header before (``codestream.py``):
nothing here allocates more than the header allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from openjpeg.utils import decode as openjpeg_decode
from openjpeg.utils import get_parameters as openjpeg_parameters
from pydicom import uid as pduid

__all__ = ["FrameLayout", "decode_frame"]

_J2K = frozenset({pduid.JPEG2000Lossless, pduid.JPEG2000})
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
        uint8 (JPEG Baseline), or the integer type of Bits Allocated and Pixel Representation
        (JPEG 2000); None when this module does not decode such a frame.
    """
    if syntax == pduid.JPEGBaseline8Bit:
        return _jpeg_baseline(frame, layout)
    if syntax in _J2K:
        return _jpeg2000(frame, layout)
    return None


def _jpeg_baseline(frame: bytes, layout: FrameLayout) -> npt.NDArray[Any] | None:
    if layout.bits_allocated != 8 or layout.signed:
        return None
    if not frame.rstrip(b"\x00").endswith(_EOI):  # cut short: pydicom's decoder refuses it
        return None
    array = cv2.imdecode(np.frombuffer(frame, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    return _as_header_says(array, layout, np.dtype(np.uint8))


def _jpeg2000(frame: bytes, layout: FrameLayout) -> npt.NDArray[Any] | None:
    if layout.bits_allocated not in (8, 16):
        return None
    try:
        parameters = openjpeg_parameters(frame)
    except (RuntimeError, ValueError, OSError):
        return None
    if (
        parameters["samples_per_pixel"] != 1
        or parameters["precision"] != layout.bits_stored
        or bool(parameters["is_signed"]) != layout.signed
        or parameters["precision"] > layout.bits_allocated
    ):
        return None
    try:
        array = openjpeg_decode(frame)
    except (RuntimeError, ValueError, OSError):
        return None
    kind = "i" if layout.signed else "u"
    return _as_header_says(array, layout, np.dtype(f"{kind}{layout.bits_allocated // 8}"))


def _as_header_says(
    array: npt.NDArray[Any] | None, layout: FrameLayout, dtype: np.dtype[Any]
) -> npt.NDArray[Any] | None:
    if array is None or array.shape != (layout.rows, layout.columns):
        return None
    if array.dtype != dtype:
        return None
    return array
