"""C-STORE of a DICOM file's data set as encoded on disk: no decoding, no re-encoding.

pynetdicom's ``Association.send_c_store`` decodes a file (``dcmread``) and encodes the data set
again for the presentation context, unless ``pynetdicom._config.STORE_SEND_CHUNKED_DATASET`` is
set, a switch for the whole process. The files the node sends are its own results, written in
the transfer syntax they are proposed in, so when the peer accepts a presentation context with
exactly that syntax the bytes after the file meta information are already what goes on the wire.
:func:`send_encoded` sends them under that context, with the request, response and timeout
handling of ``send_c_store`` (pynetdicom 3.x internals, checked by
:func:`pneumonode.dicom.pynetdicom_internals.check_pynetdicom`).
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset

from pneumonode.dicom.reactor import one_wake_up, paused

#: C-STORE priority MEDIUM (PS3.7 9.1.1.1.8), pynetdicom's default.
PRIORITY_MEDIUM = 2


@dataclass(frozen=True)
class EncodedFile:
    """Where a DICOM file's data set starts, and what its file meta information says about it."""

    path: Path
    offset: int
    sop_class_uid: UID
    sop_instance_uid: UID
    transfer_syntax_uid: UID

    @classmethod
    def read_meta(cls, path: Path) -> EncodedFile | None:
        """The file meta of ``path``; None when it lacks the SOP class, instance or syntax.

        Raises
        ------
        OSError
            When the file cannot be read.
        pydicom.errors.InvalidDicomError
            When it has no DICOM preamble and prefix.
        """
        meta, offset = split_dataset(path)
        values = [
            meta.get(keyword)
            for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
                            "TransferSyntaxUID")
        ]
        if not all(values):
            return None
        sop_class, sop_instance, syntax = (UID(str(v)) for v in values)
        return cls(path, offset, sop_class, sop_instance, syntax)

    def dataset_bytes(self) -> bytes:
        """The encoded data set (everything after the file meta information).

        Raises
        ------
        OSError
            When the file cannot be read.
        """
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            return fh.read()


def send_encoded(
    assoc: Association, encoded: EncodedFile, context_id: int, message_id: int
) -> Dataset:
    """C-STORE ``encoded`` under the accepted context ``context_id``, which must have its
    transfer syntax; returns the response's status elements, empty when none came (then the
    association was aborted, as ``send_c_store`` does).

    Raises
    ------
    OSError
        When the file cannot be read.
    """
    request = C_STORE()
    request.MessageID = message_id
    request.Priority = PRIORITY_MEDIUM
    request.AffectedSOPClassUID = encoded.sop_class_uid
    request.AffectedSOPInstanceUID = encoded.sop_instance_uid
    request.DataSet = BytesIO(encoded.dataset_bytes())
    with paused(assoc):
        with one_wake_up(assoc):
            assoc.dimse.send_msg(request, context_id)
        _, response = assoc.dimse.get_msg(block=True)
    if response is None:
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(response)
