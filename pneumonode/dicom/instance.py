"""One received instance as bytes: bounded inflation, the file the spool keeps, the one reader.

Intake and the worker must read an instance the same way, or an image validated at intake can
be read differently (and fail, or worse) in the worker. Both therefore read the spooled file
with :func:`read_instance`, and intake reads exactly the bytes it is about to spool.

A data set received in Deflated Explicit VR Little Endian is inflated here, once, with its
inflated size bounded by ``max_bytes`` *while* inflating (a 1.6 MB deflate bomb would otherwise
become 1 GiB in memory). The spool keeps the inflated data set with the transfer syntax Explicit
VR Little Endian, which is what a deflated data set is once inflated (PS3.5 A.5): no pixel or
header value changes, and the worker never inflates anything.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
)

__all__ = [
    "CommandIdentity",
    "InstanceTooLarge",
    "UndecodableInstance",
    "inflate_bounded",
    "meta_elements_in_dataset",
    "read_instance",
    "spool_file_bytes",
]

_PREAMBLE = b"\x00" * 128 + b"DICM"
_INFLATE_CHUNK = 1 << 20


class InstanceTooLarge(ValueError):
    """The data set (inflated, for a deflated one) is larger than the limit: out of resources."""


class UndecodableInstance(ValueError):
    """The received bytes cannot be a data set in the negotiated transfer syntax."""


@dataclass(frozen=True)
class CommandIdentity:
    """The SOP Class and Instance UIDs a C-STORE request names in its command set."""

    sop_class_uid: str
    sop_instance_uid: str


def inflate_bounded(data: bytes | memoryview, max_bytes: int) -> bytes:
    """Inflate a raw deflate stream (PS3.5 A.5), refusing output over ``max_bytes``.

    Raises
    ------
    InstanceTooLarge
        As soon as the inflated size passes ``max_bytes``; at most ``max_bytes`` plus one chunk
        is ever held.
    UndecodableInstance
        When the stream is not valid deflate data or is cut short.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    parts: list[bytes] = []
    size = 0
    pending: bytes | memoryview = data
    try:
        while True:
            chunk = inflater.decompress(pending, _INFLATE_CHUNK)
            size += len(chunk)
            if size > max_bytes:
                raise InstanceTooLarge(
                    f"deflated data set inflates to more than {max_bytes} bytes"
                )
            parts.append(chunk)
            pending = inflater.unconsumed_tail
            if not pending or inflater.eof:
                break
        tail = inflater.flush(_INFLATE_CHUNK)
    except zlib.error as exc:
        raise UndecodableInstance(f"deflated data set cannot be inflated ({exc})") from None
    if size + len(tail) > max_bytes:
        raise InstanceTooLarge(f"deflated data set inflates to more than {max_bytes} bytes")
    if not inflater.eof:
        raise UndecodableInstance("deflated data set is cut short (no end of stream)")
    parts.append(tail)
    return b"".join(parts)


def spool_file_bytes(
    dataset: bytes | memoryview, file_meta: FileMetaDataset, max_bytes: int
) -> bytes:
    """The DICOM file the spool keeps for a received data set.

    Parameters
    ----------
    dataset:
        The data set bytes as received (no file meta), in ``file_meta.TransferSyntaxUID``.
    file_meta:
        The file meta information for the instance (pynetdicom builds it from the command and
        the presentation context); not modified.
    max_bytes:
        The largest data set accepted, checked on the inflated size for a deflated one.

    Returns
    -------
    bytes
        Preamble, file meta and data set; a deflated data set inflated and labelled Explicit VR
        Little Endian.

    Raises
    ------
    InstanceTooLarge, UndecodableInstance
        See :func:`inflate_bounded`; also :class:`InstanceTooLarge` for a data set over
        ``max_bytes`` as received.
    """
    if len(dataset) > max_bytes:
        raise InstanceTooLarge(f"data set of {len(dataset)} bytes exceeds {max_bytes} bytes")
    meta = FileMetaDataset(file_meta)
    syntax = meta.get("TransferSyntaxUID")
    if syntax == DeflatedExplicitVRLittleEndian:
        dataset = inflate_bounded(dataset, max_bytes)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    first_group = bytes(dataset[:2])
    if first_group == (b"\x00\x02" if syntax == ExplicitVRBigEndian else b"\x02\x00"):
        raise UndecodableInstance(
            "the data set begins with a group 0002 (file meta) element; file meta information "
            "is not part of a data set (PS3.10 7.1)"
        )
    buffer = DicomBytesIO()
    buffer.write(_PREAMBLE)
    write_file_meta_info(buffer, meta, enforce_standard=True)
    buffer.write(dataset)
    return buffer.getvalue()


def read_instance(source: bytes | Path) -> Dataset:
    """Read a spooled instance (or the bytes about to be spooled): the node's one reader.

    Raises
    ------
    pydicom.errors.InvalidDicomError, OSError, ValueError, ...
        Whatever pydicom raises for bytes it cannot parse; intake turns it into 0xC000 and the
        worker into a failed attempt.
    """
    if isinstance(source, Path):
        return dcmread(source)
    return dcmread(BytesIO(source))


def meta_elements_in_dataset(ds: Dataset) -> list[str]:
    """Tags of group 0002 found in the data set itself (file meta belongs to the file, not to it).

    A data set that carries them is read one way by a receiver that decodes the stream and
    another way once written as a file, where they would replace the file meta (the transfer
    syntax included). Such a data set is refused.
    """
    return [str(tag) for tag in ds.keys() if tag.group == 0x0002]
