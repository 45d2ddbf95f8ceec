"""The image size a compressed frame declares inside its codestream, read before decoding it.

The header's Rows and Columns say nothing binding about what a decoder will allocate: a JPEG
2000 codestream of 144 bytes can declare 30000 x 30000 pixels, and the decoder allocates and
fills all of them before anyone compares. :func:`check_frame` reads the size the codestream
itself declares (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ, the RLE segment runs) and refuses a
frame whose size differs from the header's, so that decoding never allocates more than the
header, already checked against ``worker.max_pixels``, allows.
"""

from __future__ import annotations

import struct

from pydicom import uid as pduid

__all__ = ["CodestreamError", "check_frame"]

_JPEG = frozenset(
    {
        pduid.JPEGBaseline8Bit,
        pduid.JPEGExtended12Bit,
        pduid.JPEGLossless,
        pduid.JPEGLosslessSV1,
        pduid.JPEGLSLossless,
        pduid.JPEGLSNearLossless,
    }
)
_J2K = frozenset(
    {
        pduid.JPEG2000Lossless,
        pduid.JPEG2000,
        pduid.HTJ2KLossless,
        pduid.HTJ2KLosslessRPCL,
        pduid.HTJ2K,
    }
)
#: Start-of-frame markers of ISO 10918-1 (C0-CF without DHT C4, JPG C8, DAC CC) and JPEG-LS F7.
_SOF = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
#: Markers that stand alone, without a length field (TEM, RSTn, SOI, EOI).
_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


class CodestreamError(ValueError):
    """The compressed frame declares another image than the header, or cannot be parsed."""


def check_frame(
    syntax: str, frame: bytes, rows: int, columns: int, samples: int, bytes_per_sample: int
) -> None:
    """Refuse a compressed frame whose codestream declares another size than the header.

    Parameters
    ----------
    syntax:
        The transfer syntax UID; native (uncompressed) and deflated syntaxes pass unchecked:
        their size is their length.
    frame:
        The frame's compressed bytes (its fragments joined).
    rows, columns, samples, bytes_per_sample:
        What the header declares.

    Raises
    ------
    CodestreamError
        With the declared and the header's sizes.
    """
    if syntax in _JPEG:
        height, width, components = _jpeg_size(frame)
    elif syntax in _J2K:
        height, width, components = _j2k_size(frame)
    elif syntax == pduid.RLELossless:
        _check_rle(frame, rows * columns, samples * bytes_per_sample)
        return
    else:
        return
    if (height, width, components) != (rows, columns, samples):
        raise CodestreamError(
            f"the codestream declares {height} x {width} x {components} samples, the header "
            f"{rows} x {columns} x {samples}"
        )


def _jpeg_size(data: bytes) -> tuple[int, int, int]:
    """(height, width, components) from the first SOF segment of a JPEG or JPEG-LS stream."""
    if data[:2] != b"\xff\xd8":
        raise CodestreamError("the JPEG codestream does not start with SOI")
    offset = 2
    end = len(data)
    while offset + 4 <= end:
        if data[offset] != 0xFF:
            raise CodestreamError(f"the JPEG codestream has no marker at byte {offset}")
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte before a marker
            offset += 1
            continue
        if marker in _STANDALONE:
            offset += 2
            continue
        (length,) = struct.unpack_from(">H", data, offset + 2)
        if marker in _SOF:
            if offset + 10 > end or length < 8:
                raise CodestreamError("the JPEG frame header is cut short")
            height, width = struct.unpack_from(">HH", data, offset + 5)
            if height == 0:
                raise CodestreamError("the JPEG frame header defers its height (DNL)")
            return height, width, data[offset + 9]
        if length < 2:
            raise CodestreamError(f"the JPEG segment at byte {offset} has length {length}")
        offset += 2 + length
    raise CodestreamError("the JPEG codestream has no frame header (SOF)")


def _j2k_size(data: bytes) -> tuple[int, int, int]:
    """(height, width, components) from the SIZ segment of a JPEG 2000 codestream."""
    offset = 0
    if data.startswith(_JP2_SIGNATURE):
        offset = _jp2_codestream_offset(data)
    if data[offset : offset + 4] != b"\xff\x4f\xff\x51":
        raise CodestreamError("the JPEG 2000 codestream does not start with SOC and SIZ")
    siz = offset + 2
    if siz + 40 > len(data):
        raise CodestreamError("the JPEG 2000 SIZ segment is cut short")
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", data, siz + 6)
    (components,) = struct.unpack_from(">H", data, siz + 38)
    if xosiz >= xsiz or yosiz >= ysiz:
        raise CodestreamError("the JPEG 2000 SIZ segment declares an empty image")
    return ysiz - yosiz, xsiz - xosiz, components


def _jp2_codestream_offset(data: bytes) -> int:
    """Where the contiguous codestream box of a JP2 file starts."""
    offset = len(_JP2_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        header = 8
        if length == 1:
            if offset + 16 > len(data):
                break
            (length,) = struct.unpack_from(">Q", data, offset + 8)
            header = 16
        if kind == b"jp2c":
            return offset + header
        if length < header:
            break
        offset += length
    raise CodestreamError("the JP2 file has no codestream box")


def _check_rle(data: bytes, pixels: int, segments: int) -> None:
    """Each RLE segment must expand to at most ``pixels`` bytes (PS3.5 G.3)."""
    if len(data) < 64:
        raise CodestreamError("the RLE header is cut short")
    count, *offsets = struct.unpack_from("<16I", data, 0)
    if count != segments:
        raise CodestreamError(f"the RLE frame has {count} segments, the header needs {segments}")
    bounds = [*offsets[:count], len(data)]
    for index in range(count):
        start, stop = bounds[index], bounds[index + 1]
        if not 64 <= start <= stop <= len(data):
            raise CodestreamError(f"the RLE segment {index} has offsets {start}..{stop}")
        if _rle_expanded(data, start, stop, pixels) > pixels:
            raise CodestreamError(
                f"the RLE segment {index} expands to more than the header's {pixels} pixels"
            )


def _rle_expanded(data: bytes, start: int, stop: int, limit: int) -> int:
    """Bytes a PackBits segment expands to, counting no further than ``limit`` + 1."""
    size = 0
    position = start
    while position < stop and size <= limit:
        header = data[position]
        if header < 128:  # a literal run of header + 1 bytes (a trailing pad byte has none)
            size += min(header + 1, stop - position - 1)
            position += header + 2
        elif header > 128:  # one byte repeated 257 - header times
            size += 257 - header
            position += 2
        else:  # 128 is a no-op
            position += 1
    return size
