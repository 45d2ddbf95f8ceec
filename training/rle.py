"""Run-length encoding of SIIM-ACR masks (stage-1 relative and stage-2 absolute starts) and CSVs."""

from __future__ import annotations

import csv
import enum
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

EMPTY = "-1"


class RleFormat(enum.Enum):
    """How run starts are written.

    ``RELATIVE`` is the stage-1 file of the challenge: each start is the number of background
    pixels since the end of the previous run (the first is counted from pixel 0).
    ``ABSOLUTE`` is the stage-2 file: each start is the 1-based index of the run's first pixel,
    as in Kaggle's standard run-length encoding.
    In both, pixels are numbered column by column (down the first column, then the next).
    """

    RELATIVE = "relative"
    ABSOLUTE = "absolute"


def _parse_pairs(rle: str) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    text = rle.strip()
    if text == EMPTY or text == "":
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    try:
        values = np.array(text.split(), dtype=np.int64)
    except ValueError as exc:
        raise ValueError(f"RLE must be integers separated by spaces, got {text[:60]!r}") from exc
    if values.size % 2:
        raise ValueError(f"RLE must hold (start, length) pairs, got {values.size} numbers")
    return values[0::2], values[1::2]


def decode(rle: str, shape: tuple[int, int], fmt: RleFormat) -> NDArray[np.bool_]:
    """Decode one RLE string into a mask.

    Parameters
    ----------
    rle : str
        Space-separated (start, length) pairs, or ``"-1"`` for an empty mask.
    shape : tuple of int
        ``(height, width)`` of the image.
    fmt : RleFormat
        Whether starts are relative (stage 1) or absolute and 1-based (stage 2).

    Returns
    -------
    numpy.ndarray
        Boolean mask of ``shape``.

    Raises
    ------
    ValueError
        When the string is malformed or a run leaves the image.
    """
    height, width = shape
    size = height * width
    starts, lengths = _parse_pairs(rle)
    if np.any(lengths < 0) or np.any(starts < 0):
        raise ValueError(f"RLE starts and lengths must be >= 0, got {rle.strip()[:60]!r}")
    if fmt is RleFormat.RELATIVE:
        ends = np.cumsum(starts + lengths)
        begins = ends - lengths
    else:
        if np.any(starts < 1):
            raise ValueError(f"absolute RLE starts are 1-based, got {int(starts.min())}")
        begins = starts - 1
        ends = begins + lengths
    if ends.size and int(ends.max()) > size:
        raise ValueError(f"RLE run ends at pixel {int(ends.max())}, beyond the image ({size})")
    flat = np.zeros(size, dtype=bool)
    for begin, end in zip(begins.tolist(), ends.tolist(), strict=True):
        flat[begin:end] = True
    # Column-major pixel order: the transpose is a view, so encode() reads it back without a copy.
    return flat.reshape(width, height).T


def _runs(flat: NDArray[np.bool_]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Begin (inclusive) and end (exclusive) indices of the True runs of a 1-D array."""
    lo, hi = 0, flat.size
    if flat.size % 8 == 0 and flat.flags.c_contiguous:
        # Skip the empty head and tail eight pixels at a time: most masks are small or empty.
        words = np.flatnonzero(flat.view(np.uint64))
        if words.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        lo, hi = int(words[0]) * 8, (int(words[-1]) + 1) * 8
    part = flat[lo:hi]
    edges = np.flatnonzero(part[1:] != part[:-1]) + 1
    if part.size and part[0]:
        edges = np.concatenate(([0], edges))
    if part.size and part[-1]:
        edges = np.concatenate((edges, [part.size]))
    edges = edges.astype(np.int64) + lo
    return edges[0::2], edges[1::2]


def encode(mask: NDArray[np.bool_] | NDArray[np.uint8], fmt: RleFormat) -> str:
    """Encode a mask as RLE; ``"-1"`` when it is empty.

    Parameters
    ----------
    mask : numpy.ndarray
        2-D mask, ``(height, width)``; nonzero pixels are foreground.
    fmt : RleFormat
        Relative (stage 1) or absolute 1-based (stage 2) starts.

    Returns
    -------
    str
        The encoding, space separated.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (height, width), got shape {mask.shape}")
    raw = np.asarray(mask).T.reshape(-1)
    flat = np.asarray(raw if raw.dtype == np.bool_ else raw != 0, dtype=np.bool_)
    begins, ends = _runs(flat)
    if begins.size == 0:
        return EMPTY
    lengths = ends - begins
    if fmt is RleFormat.RELATIVE:
        previous_end = np.concatenate(([0], ends[:-1]))
        starts = begins - previous_end
    else:
        starts = begins + 1
    pairs = np.empty(begins.size * 2, dtype=np.int64)
    pairs[0::2] = starts
    pairs[1::2] = lengths
    return " ".join(map(str, pairs.tolist()))


def decode_union(rles: Iterable[str], shape: tuple[int, int], fmt: RleFormat) -> NDArray[np.bool_]:
    """Decode several rows of one image and return the union of their regions.

    Parameters
    ----------
    rles : iterable of str
        The image's rows (``"-1"`` rows contribute nothing).
    shape : tuple of int
        ``(height, width)``.
    fmt : RleFormat
        Start convention.

    Returns
    -------
    numpy.ndarray
        Boolean mask of ``shape``.
    """
    mask = np.zeros(shape, dtype=bool)
    for rle in rles:
        mask |= decode(rle, shape, fmt)
    return mask


def read_rle_csv(path: Path) -> dict[str, list[str]]:
    """Read a challenge CSV (``ImageId, EncodedPixels``) into rows grouped by image.

    The header's column names are matched after stripping spaces, so the original file's
    ``"ImageId, EncodedPixels"`` works. Images keep the file's order, rows keep theirs.

    Parameters
    ----------
    path : pathlib.Path
        The CSV file.

    Returns
    -------
    dict
        ``{image_id: [rle, ...]}``; an image without pneumothorax maps to ``["-1"]``.
    """
    rows: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        if header[:2] != ["ImageId", "EncodedPixels"]:
            raise ValueError(f"{path}: header must be 'ImageId, EncodedPixels', got {header!r}")
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2:
                raise ValueError(f"{path}:{line_no}: expected 2 columns, got {len(row)}")
            image_id, rle = row[0].strip(), row[1].strip()
            if not image_id:
                raise ValueError(f"{path}:{line_no}: empty ImageId")
            rows.setdefault(image_id, []).append(rle)
    return rows


def is_positive(rles: Sequence[str]) -> bool:
    """Whether any of an image's rows encodes a region."""
    return any(rle.strip() not in (EMPTY, "") for rle in rles)


def write_rle_csv(path: Path, rows: Mapping[str, Sequence[str]]) -> None:
    """Write ``{image_id: [rle, ...]}`` in the challenge layout (one line per row).

    Parameters
    ----------
    path : pathlib.Path
        Destination file; parent folders must exist.
    rows : mapping
        RLE strings per image; an empty list is written as ``-1``.
    """
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["ImageId", "EncodedPixels"])
        for image_id, rles in rows.items():
            for rle in rles or [EMPTY]:
                writer.writerow([image_id, rle])
