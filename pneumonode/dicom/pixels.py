"""Decode a single-frame grayscale radiograph into a display-ready float image in [0, 1].

The pipeline follows the DICOM grayscale rendering chain (PS3.3 C.11, PS3.4 N.2.1):

1. Refuse what the node cannot or must not decode (:class:`PixelError`), checking the header
   *before* any pixel data is decompressed: no Pixel Data, multi-frame, colour, a pixel matrix
   larger than ``max_pixels`` (a decompression bomb), or a transfer syntax without an installed
   decoder.
2. Decode: 8-bit JPEG Baseline frames with libjpeg-turbo (:mod:`pneumonode.dicom.frames`),
   anything else with pydicom's pixel handlers (pylibjpeg, openjpeg, pyjpegls, Pillow), which
   apply Bits Stored and Pixel Representation (signed data are sign-extended).
3. Modality LUT: Rescale Slope/Intercept or a Modality LUT Sequence
   (:func:`pydicom.pixels.apply_modality_lut`).
4. VOI, the first that applies:

   * a VOI LUT Sequence (its first item); the output is scaled by the LUT's own minimum and
     maximum entries, which tolerates LUT Descriptors that declare more bits than the data use
     (a malformed LUT is logged and skipped);
   * the first Window Center / Window Width pair, with VOI LUT Function ``LINEAR`` (default),
     ``LINEAR_EXACT`` or ``SIGMOID`` (PS3.3 C.11.2.1.2), computed directly into [0, 1];
   * no VOI at all (or a window of invalid width): 8-bit (or fewer) data without a rescale are
     mapped over their full stored range, ``value / (2**BitsStored - 1)``, the way such images
     (the SIIM challenge files among them) are displayed and were used for training; anything
     else gets a robust window between the 0.5th and 99.5th percentiles of the rescaled values.

5. MONOCHROME1 is inverted (``1 - value``) so that 0 is always black on display. Presentation
   LUT Shape is not applied a second time: for MONOCHROME1 its ``INVERSE`` is that same inversion.

Steps 3 to 5 map each stored value to one display value (the automatic window reads the image's
percentiles first), so for integer pixels they are computed in float64 once per value between
the image's minimum and maximum (at most 65536) and applied by one float32 look-up: the same
values, to the bit, as computing every pixel, in a fraction of the time and memory.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.encaps import generate_frames
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi

from pneumonode.dicom.codestream import CodestreamError, check_frame
from pneumonode.dicom.frames import FrameLayout, decode_frame

__all__ = ["DecodedImage", "PixelError", "decode"]

logger = logging.getLogger(__name__)

_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
_AUTO_PERCENTILES = (0.5, 99.5)
_AUTO_SAMPLE_LIMIT = 4_000_000
#: Integer images whose values span fewer than this are rendered through a table (16 bits).
_MAX_LUT_ENTRIES = 1 << 16

#: The rescaled values of the image's pixels sampled for the automatic window (see _render).
Sample = Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]
#: What pydicom raises for a malformed LUT (descriptor, data, VR): the LUT cannot be used.
_LUT_ERRORS = (
    AttributeError,
    IndexError,
    KeyError,
    NotImplementedError,
    TypeError,
    ValueError,
    struct.error,
)


class PixelError(ValueError):
    """The image cannot be decoded as a single-frame grayscale radiograph.

    The message is the reason a job ends ``skipped``; it names the rule, the offending value and
    the SOP Instance UID.
    """


@dataclass(frozen=True)
class DecodedImage:
    """A radiograph ready for display or inference.

    Attributes
    ----------
    image:
        ``float32`` array of shape (Rows, Columns) in [0, 1]; 0 is black on display, 1 white.
    pixel_spacing_mm:
        (row, column) spacing in millimetres from Pixel Spacing, else Imager Pixel Spacing, else
        None. Values that are not two positive finite numbers count as absent.
    """

    image: npt.NDArray[np.float32]
    pixel_spacing_mm: tuple[float, float] | None

    def __post_init__(self) -> None:
        if self.image.dtype != np.float32 or self.image.ndim != 2:
            raise ValueError(
                f"DecodedImage.image must be a 2-D float32 array, got "
                f"{self.image.dtype} {self.image.shape}"
            )

    def to_uint8(self) -> npt.NDArray[np.uint8]:
        """Return the image as 8-bit gray levels (0 black, 255 white).

        Returns
        -------
        numpy.ndarray
            ``uint8`` array of shape (Rows, Columns).
        """
        scaled: npt.NDArray[np.float32] = np.clip(self.image, 0.0, 1.0)
        np.multiply(scaled, np.float32(255.0), out=scaled)
        np.rint(scaled, out=scaled)
        return scaled.astype(np.uint8)


def decode(ds: pydicom.Dataset, *, max_pixels: int = 60_000_000) -> DecodedImage:
    """Decode the pixel data of a single-frame grayscale image into a display-ready image.

    Parameters
    ----------
    ds:
        The received dataset, with its file meta (Transfer Syntax UID).
    max_pixels:
        Largest Rows * Columns accepted; checked before anything is decompressed.

    Returns
    -------
    DecodedImage
        The image in [0, 1] (MONOCHROME1 inverted) and the pixel spacing.

    Raises
    ------
    PixelError
        When the dataset has no pixel data, is multi-frame, is not grayscale with one sample per
        pixel, is larger than ``max_pixels``, or its transfer syntax cannot be decoded.
    """
    uid = str(ds.get("SOPInstanceUID", "<no SOP Instance UID>"))
    _check_header(ds, uid, max_pixels)
    frame = _check_codestream(ds, uid)
    stored = _decode_stored(ds, uid, frame)
    if stored.dtype.kind in "iu" and stored.size:
        low, high = int(stored.min()), int(stored.max())
        if high - low < _MAX_LUT_ENTRIES:
            return DecodedImage(
                image=_render_through_table(stored, low, high, ds, uid),
                pixel_spacing_mm=_pixel_spacing(ds),
            )
    return DecodedImage(
        image=_render(stored, ds, uid, _own_sample),
        pixel_spacing_mm=_pixel_spacing(ds),
    )


def _sample_step(pixels: int) -> int:
    """Every how many rows and columns the automatic window samples an image of ``pixels``."""
    return max(1, math.isqrt(pixels // _AUTO_SAMPLE_LIMIT + 1))


def _own_sample(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The automatic window's sample when ``values`` are the image's own rescaled pixels."""
    step = _sample_step(values.size)
    return values[::step, ::step]


def _render_through_table(
    stored: npt.NDArray[Any], low: int, high: int, ds: pydicom.Dataset, uid: str
) -> npt.NDArray[np.float32]:
    """Render integer pixels by one look-up: the chain computed once per stored value.

    Every step of the chain maps one value to one value, except the automatic window, which
    reads percentiles of the image's own values (given to it from the image, not the table).
    The table holds, for each value from ``low`` to ``high``, exactly what the per-pixel
    computation gives, so the result is the same to the bit, at the cost of one gather.
    """
    domain = np.arange(low, high + 1, dtype=np.int64).astype(stored.dtype)
    step = _sample_step(stored.size)

    def image_sample(table: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        sample: npt.NDArray[np.float64] = table[_offsets(stored[::step, ::step], low)]
        return sample

    table = _render(domain, ds, uid, image_sample)
    if stored.dtype == np.uint8:  # OpenCV's look-up: a fraction of numpy's gather
        full = np.zeros(256, dtype=np.float32)
        full[low : high + 1] = table
        return np.asarray(cv2.LUT(np.ascontiguousarray(stored), full), dtype=np.float32)
    image: npt.NDArray[np.float32] = np.take(table, _offsets(stored, low))
    return image


def _offsets(stored: npt.NDArray[Any], low: int) -> npt.NDArray[Any]:
    """Indices into a table that starts at the stored value ``low``."""
    return stored if low == 0 else np.subtract(stored, low, dtype=np.int64)


def _render(
    stored: npt.NDArray[Any],
    ds: pydicom.Dataset,
    uid: str,
    image_sample: Sample,
) -> npt.NDArray[np.float32]:
    """Modality LUT, VOI and MONOCHROME1 on ``stored``, into float32 [0, 1].

    ``image_sample`` gives, from the rescaled ``stored`` values, the rescaled values of an
    evenly spread sample of the image's pixels (every ``step``-th row and column, see
    :func:`_sample_step`); only the automatic window reads it.
    """
    try:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    except (*_LUT_ERRORS, OverflowError) as exc:
        raise PixelError(
            f"rule: the Modality LUT must be usable; applying it failed "
            f"({type(exc).__name__}: {exc}) (SOP {uid})"
        ) from exc
    if not np.isfinite(values).all():
        raise PixelError(
            f"rule: rescaled pixel values must be finite; Rescale Slope "
            f"{str(ds.get('RescaleSlope', ''))[:32]!r} and Intercept "
            f"{str(ds.get('RescaleIntercept', ''))[:32]!r} overflow (SOP {uid})"
        )
    image = _apply_voi(values, ds, uid, image_sample)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        image = 1.0 - image
    if not np.isfinite(image).all():
        raise PixelError(f"rule: display values must be finite; the VOI made some NaN (SOP {uid})")
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _check_codestream(ds: pydicom.Dataset, uid: str) -> bytes | None:
    """Refuse compressed pixel data whose codestream declares another size than the header.

    Returns the frame's compressed bytes (None for native pixel data), checked.
    """
    syntax = _transfer_syntax(ds)
    if syntax is None or not syntax.is_encapsulated:
        return None
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except (StopIteration, ValueError, TypeError, struct.error) as exc:
        raise PixelError(
            f"rule: encapsulated pixel data must hold one frame; {type(exc).__name__}: {exc} "
            f"(SOP {uid})"
        ) from exc
    bits = _int_or_none(ds.get("BitsAllocated")) or 0
    try:
        check_frame(
            syntax,
            frame,
            int(ds.Rows),
            int(ds.Columns),
            int(ds.SamplesPerPixel),
            max(1, (bits + 7) // 8),
        )
    except CodestreamError as exc:
        raise PixelError(
            f"rule: the compressed frame must match the header; {exc} (SOP {uid})"
        ) from exc
    return frame


def _check_header(ds: pydicom.Dataset, uid: str, max_pixels: int) -> None:
    if "PixelData" not in ds:
        raise PixelError(f"rule: Pixel Data (7FE0,0010) is required; it is absent (SOP {uid})")
    frames = _int_or_none(ds.get("NumberOfFrames"))
    if frames is not None and frames > 1:
        raise PixelError(
            f"rule: single-frame images only; NumberOfFrames is {frames} (SOP {uid})"
        )
    samples = _int_or_none(ds.get("SamplesPerPixel"))
    if samples != 1:
        raise PixelError(f"rule: SamplesPerPixel must be 1; it is {samples} (SOP {uid})")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in _GRAYSCALE:
        raise PixelError(
            f"rule: PhotometricInterpretation must be MONOCHROME1 or MONOCHROME2; "
            f"it is {photometric!r} (SOP {uid})"
        )
    rows = _int_or_none(ds.get("Rows"))
    columns = _int_or_none(ds.get("Columns"))
    if not rows or not columns or rows < 1 or columns < 1:
        raise PixelError(
            f"rule: Rows and Columns must be positive; they are {rows} x {columns} (SOP {uid})"
        )
    if rows * columns > max_pixels:
        raise PixelError(
            f"rule: Rows*Columns must not exceed {max_pixels}; it is {rows}x{columns}="
            f"{rows * columns} (SOP {uid})"
        )
    syntax = _transfer_syntax(ds)
    if syntax is None:
        raise PixelError(f"rule: a Transfer Syntax UID is required in the file meta (SOP {uid})")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise PixelError(
            f"rule: transfer syntax must be decodable; no decoder for {syntax} (SOP {uid})"
        ) from exc
    if not decoder.is_available:
        raise PixelError(
            f"rule: transfer syntax must be decodable; no installed plugin decodes "
            f"{syntax} ({syntax.name}) (SOP {uid})"
        )


def _transfer_syntax(ds: pydicom.Dataset) -> pydicom.uid.UID | None:
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return pydicom.uid.UID(str(meta.TransferSyntaxUID))
    return None


def _decode_stored(ds: pydicom.Dataset, uid: str, frame: bytes | None) -> npt.NDArray[Any]:
    """The stored values of the one frame; ``frame`` is its compressed bytes, already checked."""
    syntax = _transfer_syntax(ds)
    if syntax is None:
        raise PixelError(f"rule: a Transfer Syntax UID is required in the file meta (SOP {uid})")
    if frame is not None:
        fast = decode_frame(syntax, frame, _frame_layout(ds))
        if fast is not None:
            return fast
    try:
        array, _ = get_decoder(syntax).as_array(ds, index=0)
    except (AttributeError, NotImplementedError, OSError, RuntimeError, ValueError) as exc:
        raise PixelError(
            f"rule: pixel data must decode; {syntax} ({syntax.name}) failed: {exc} (SOP {uid})"
        ) from exc
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise PixelError(
            f"rule: a 2-D pixel matrix is required; decoded shape is {array.shape} (SOP {uid})"
        )
    return array


def _frame_layout(ds: pydicom.Dataset) -> FrameLayout:
    return FrameLayout(
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        bits_allocated=_int_or_none(ds.get("BitsAllocated")) or 0,
        bits_stored=_int_or_none(ds.get("BitsStored")) or 0,
        signed=_int_or_none(ds.get("PixelRepresentation")) == 1,
    )


def _apply_voi(
    values: npt.NDArray[np.float64],
    ds: pydicom.Dataset,
    uid: str,
    image_sample: Sample,
) -> npt.NDArray[np.float64]:
    if ds.get("VOILUTSequence"):
        try:
            return _voi_lut(values, ds)
        except _LUT_ERRORS as exc:
            logger.warning(
                "SOP %s: VOI LUT Sequence unusable (%s); using the window or an automatic one",
                uid,
                exc,
            )
    window = _first_window(ds)
    if window is not None:
        center, width = window
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
        if function not in _VOI_FUNCTIONS:
            logger.warning(
                "SOP %s: VOILUTFunction %r is not LINEAR, LINEAR_EXACT or SIGMOID; using LINEAR",
                uid,
                function,
            )
            function = "LINEAR"
        if width >= 1.0 or (function != "LINEAR" and width > 0.0):
            return _window(values, center, width, function)
        logger.warning(
            "SOP %s: window width %s is invalid for %s; using an automatic window",
            uid,
            width,
            function,
        )
    return _auto_window(values, ds, image_sample)


def _voi_lut(values: npt.NDArray[np.float64], ds: pydicom.Dataset) -> npt.NDArray[np.float64]:
    item = ds.VOILUTSequence[0]
    entries_count, first_mapped = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
    domain = np.arange(first_mapped, first_mapped + entries_count, dtype=np.int64)
    entries = np.asarray(apply_voi(domain, ds, index=0), dtype=np.float64)
    indices = np.clip(np.rint(values) - first_mapped, 0, entries_count - 1).astype(np.int64)
    low, high = float(entries.min()), float(entries.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    mapped: npt.NDArray[np.float64] = (entries[indices] - low) / (high - low)
    return mapped


def _first_window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    center = _first_number(ds.get("WindowCenter"))
    width = _first_number(ds.get("WindowWidth"))
    if center is None or width is None:
        return None
    return center, width


def _window(
    values: npt.NDArray[np.float64], center: float, width: float, function: str
) -> npt.NDArray[np.float64]:
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -700.0, 700.0)))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width == 1.0:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _auto_window(
    values: npt.NDArray[np.float64],
    ds: pydicom.Dataset,
    image_sample: Sample,
) -> npt.NDArray[np.float64]:
    bits_stored = _int_or_none(ds.get("BitsStored")) or 0
    unsigned = _int_or_none(ds.get("PixelRepresentation")) in (0, None)
    no_rescale = (
        "ModalityLUTSequence" not in ds
        and float(ds.get("RescaleSlope", 1.0) or 1.0) == 1.0
        and float(ds.get("RescaleIntercept", 0.0) or 0.0) == 0.0
    )
    if 0 < bits_stored <= 8 and unsigned and no_rescale:
        return np.clip(values / float(2**bits_stored - 1), 0.0, 1.0)
    sample = image_sample(values)
    low, high = (float(p) for p in np.percentile(sample, _AUTO_PERCENTILES))
    if high <= low:
        low, high = float(sample.min()), float(sample.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = _positive_pair(ds.get(keyword))
        if spacing is not None:
            return spacing
    return None


def _positive_pair(value: object) -> tuple[float, float] | None:
    if value is None or isinstance(value, str | bytes):
        return None
    try:
        numbers = [float(v) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    if len(numbers) != 2 or not all(math.isfinite(v) and v > 0 for v in numbers):
        return None
    return numbers[0], numbers[1]


def _first_number(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int_or_none(value: object) -> int | None:
    if value is None or value == "":
        return None
    try:
        number: int = int(value)  # type: ignore[call-overload]
        return number
    except (TypeError, ValueError):
        return None
