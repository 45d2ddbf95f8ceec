"""Durable intake: one received instance becomes a fsynced spool file and a committed job row."""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path

from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from sqlalchemy.exc import SQLAlchemyError

from pneumonode.datafolder import (
    PARTIAL_SUFFIX,
    incoming_dir,
    place_partial,
    spool_day,
    spool_dir,
    write_partial,
)
from pneumonode.dicom.group_commit import GroupCommit
from pneumonode.dicom.instance import CommandIdentity, meta_elements_in_dataset, read_instance
from pneumonode.identifiers import is_valid_uid
from pneumonode.observer import NodeObserver, NullObserver
from pneumonode.queue.jobs import JobTransitions
from pneumonode.queue.records import NewJob

LOGGER = logging.getLogger(__name__)

ACCEPTED_MODALITIES = frozenset({"CR", "DX"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "CHEST_LAT", "CHESTABDOMEN"})
#: Threads checking headers; more associations at once wait for one.
HEADER_CHECKERS = 8
#: Deepest sequence nesting accepted (a deeper one is a parser bomb, not a radiograph).
MAX_SEQUENCE_DEPTH = 16


class Status(IntEnum):
    """C-STORE response statuses the node answers (PS3.4 B.2.3 and PS3.7 C)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000


class Outcome(IntEnum):
    """What intake did with an instance."""

    QUEUED = 1
    SKIPPED = 2
    DUPLICATE = 3
    REFUSED = 4


#: Errors pydicom raises when a received element's value cannot be converted (wrong VR, odd
#: length, undecodable text): the instance cannot be understood.
_HEADER_ERRORS = (
    BytesLengthException,
    AttributeError,
    IndexError,
    KeyError,
    LookupError,
    NotImplementedError,
    OverflowError,
    TypeError,
    ValueError,
)


@dataclass(frozen=True)
class IntakeResult:
    """The answer to give the sender and what happened."""

    status: Status
    outcome: Outcome
    job_id: int | None
    reason: str | None = None


def skip_reason(ds: Dataset) -> str | None:
    """Why an accepted instance is not a single-frame chest radiograph, or None when it is.

    Instances of a supported SOP class that fail these checks are acknowledged (the sender did
    nothing wrong) and their job ends ``skipped`` with this reason.
    """
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality not in ACCEPTED_MODALITIES:
        return f"modality {modality or '(absent)'!r} is not CR or DX"
    body_part = str(ds.get("BodyPartExamined", "")).strip().upper()
    if body_part and body_part not in CHEST_BODY_PARTS:
        return f"body part examined {body_part!r} is not chest"
    if "PixelData" not in ds or ds["PixelData"].is_empty:
        return "no pixel data"
    frames = ds.get("NumberOfFrames", 1)
    try:
        n_frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        return f"number of frames {frames!r} is not an integer"
    if n_frames != 1:
        return f"multi-frame image ({n_frames} frames); only single-frame radiographs are read"
    return _header_reason(ds)


def _header_reason(ds: Dataset) -> str | None:
    """Why the header cannot describe a decodable image (character set, rescale), or None."""
    charsets = ds.get("SpecificCharacterSet") or []
    for charset in [charsets] if isinstance(charsets, str) else charsets:
        if str(charset).strip() not in python_encoding:
            return f"specific character set {str(charset)[:32]!r} is not a DICOM character set"
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            return f"{keyword} {str(value)[:32]!r} is not a number"
        if not math.isfinite(number):
            return f"{keyword} {str(value)[:32]!r} is not a finite number"
    return None


def unreadable_element(ds: Dataset, depth: int = 0) -> str | None:
    """Why a standard element of ``ds`` cannot be read, or None when every one can.

    Every public element, in sequences too, must carry the VR the standard gives it (or UN) and
    its value must convert with that VR; sequences may nest at most ``MAX_SEQUENCE_DEPTH`` deep.
    Such an instance cannot be understood (0xC000): the node never stores bytes that would fail
    later, in the worker, with the raw value (a patient name, say) in the error. The reason names
    the tag and the VRs, never the value. Private elements are not checked: they are not used.
    """
    if depth > MAX_SEQUENCE_DEPTH:
        return f"sequences are nested more than {MAX_SEQUENCE_DEPTH} deep"
    for tag in list(ds.keys()):
        if tag.is_private:
            continue
        declared = ds.get_item(tag).VR  # None in implicit VR: the dictionary's is used
        try:
            standard = dictionary_VR(tag)
        except KeyError:
            standard = None
        if standard is not None and declared is not None and declared not in (standard, "UN"):
            if not set(declared.split(" or ")) & {*standard.split(" or "), "UN"}:
                return f"element {tag} has VR {declared}; the standard's is {standard}"
        try:
            element = ds[tag]
        except (*_HEADER_ERRORS, RecursionError) as exc:
            return f"element {tag} cannot be read as {declared or standard} ({type(exc).__name__})"
        if element.VR == "SQ":
            for item in element.value:
                reason = unreadable_element(item, depth + 1)
                if reason is not None:
                    return reason
    return None


class Intake:
    """Turns received instances into durable jobs.

    Parameters
    ----------
    data_dir:
        The node's data folder; spool files live under ``spool/``.
    repository:
        The job repository.
    on_queued:
        Called (without arguments) after a job is committed, to wake the workers.
    observer:
        Told the outcome of every answered C-STORE (metrics).
    """

    def __init__(
        self,
        data_dir: Path,
        repository: JobTransitions,
        on_queued: Callable[[], None] | None = None,
        observer: NodeObserver | None = None,
    ) -> None:
        self._data_dir = data_dir
        self._incoming = incoming_dir(data_dir)
        self._group = GroupCommit(repository)
        # spool file names: 80 random bits drawn once per Intake, then a counter (cheaper than
        # a uuid4 per image, unique across restarts and nodes; O_EXCL refuses a clash)
        self._name_prefix = secrets.token_hex(10)
        self._name_counter = itertools.count()
        # checks headers while the receiving threads write and fsync the spool files
        self._checker = ThreadPoolExecutor(HEADER_CHECKERS, thread_name_prefix="intake-check")
        self._on_queued = on_queued
        self._observer: NodeObserver = observer or NullObserver()
        self._incoming.mkdir(parents=True, exist_ok=True)

    def _write_partial(self, encoded: bytes) -> tuple[Path, OSError | None]:
        """Write and fsync the instance to ``spool/incoming``; the file, or why it failed.

        A failed write leaves nothing behind.
        """
        name = f"{self._name_prefix}{next(self._name_counter):012x}.dcm"
        partial = self._incoming / (name + PARTIAL_SUFFIX)
        try:
            write_partial(functools.partial(_write_new_file, encoded), partial)
        except OSError as exc:
            return partial, exc
        return partial, None

    def _spool(self, partial: Path) -> Path:
        """Rename the partial file into today's spool folder.

        The folder is fsynced by the group commit, before the job is recorded.
        """
        final = spool_dir(self._data_dir) / spool_day(datetime.now(UTC)) / partial.stem
        place_partial(partial, final)
        return final

    def receive(
        self,
        encoded: bytes,
        calling_aet: str,
        peer_host: str | None,
        command: CommandIdentity | None = None,
    ) -> IntakeResult:
        """Store one instance (see :meth:`_receive`) and tell the observer the outcome."""
        outcome = "error"
        try:
            result = self._receive(encoded, calling_aet, peer_host, command)
            outcome = result.outcome.name.lower()
            return result
        finally:
            self._observer.image_received(outcome)

    def _receive(
        self,
        encoded: bytes,
        calling_aet: str,
        peer_host: str | None,
        command: CommandIdentity | None,
    ) -> IntakeResult:
        """Store one instance; returns the status to answer.

        ``encoded`` is the complete DICOM file the spool will keep (preamble, file meta, data
        set; see :func:`pneumonode.dicom.instance.spool_file_bytes`). It is read here with the
        reader the worker uses, so that what intake validates is what the worker will read.
        ``command`` holds the SOP Class and Instance UIDs the C-STORE request names; a data
        set that names others is refused (0xA900).

        Never raises for a bad instance: the result's status is one of :class:`Status`
        (0x0000 queued, skipped or duplicate; 0xA700 the spool or the database failed; 0xA900
        the data set does not match the request; 0xC000 it cannot be understood).
        """
        # the header is checked on a pool thread while this one writes and fsyncs the file
        # (the thread that blocks in I/O is the one that lets go of the GIL); the file is kept
        # only for an instance that is queued
        checking = self._checker.submit(self._check, encoded, command)
        partial, write_error = self._write_partial(encoded)
        try:
            verdict = checking.result()
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        if isinstance(verdict, IntakeResult):
            partial.unlink(missing_ok=True)
            return verdict
        header, sop_uid, reason = verdict
        spool_path: Path | None = None
        spool_rel: str | None = None
        if reason is not None:
            partial.unlink(missing_ok=True)
        else:
            try:
                if write_error is not None:
                    raise write_error
                spool_path = self._spool(partial)
            except OSError as exc:
                LOGGER.error("cannot spool SOP Instance %s: %s", sop_uid, exc)
                return IntakeResult(
                    Status.OUT_OF_RESOURCES, Outcome.REFUSED, None, f"spool write failed: {exc}"
                )
            spool_rel = str(spool_path.relative_to(self._data_dir))
        new = NewJob(
            sop_instance_uid=sop_uid,
            sop_class_uid=str(header.SOPClassUID),
            study_instance_uid=str(header.StudyInstanceUID),
            series_instance_uid=str(header.SeriesInstanceUID),
            calling_aet=calling_aet.strip(),
            peer_host=peer_host,
            spool_path=spool_rel,
            skip_reason=reason,
        )
        try:
            # the spool folder fsynced and the job committed with the others arriving now
            result = self._group.commit(new, None if spool_path is None else spool_path.parent)
        except OSError as exc:
            LOGGER.error("cannot spool SOP Instance %s: %s", sop_uid, exc)
            if spool_path is not None:
                spool_path.unlink(missing_ok=True)
            return IntakeResult(
                Status.OUT_OF_RESOURCES, Outcome.REFUSED, None, f"spool sync failed: {exc}"
            )
        except SQLAlchemyError as exc:
            LOGGER.error("cannot record job for SOP Instance %s: %s", sop_uid, exc)
            if spool_path is not None:
                spool_path.unlink(missing_ok=True)
            return IntakeResult(
                Status.OUT_OF_RESOURCES, Outcome.REFUSED, None, "job database unavailable"
            )
        if result.unused_spool_path is not None:
            (self._data_dir / result.unused_spool_path).unlink(missing_ok=True)
        if not result.created and not result.reopened:
            LOGGER.info("SOP Instance %s already known as job %d", sop_uid, result.job_id)
            return IntakeResult(Status.SUCCESS, Outcome.DUPLICATE, result.job_id)
        if reason is not None:
            LOGGER.info("job %d skipped at intake: %s", result.job_id, reason)
            return IntakeResult(Status.SUCCESS, Outcome.SKIPPED, result.job_id, reason)
        LOGGER.info(
            "job %d queued: SOP Instance %s%s",
            result.job_id, sop_uid, " (received again)" if result.reopened else "",
        )
        if self._on_queued is not None:
            self._on_queued()
        return IntakeResult(Status.SUCCESS, Outcome.QUEUED, result.job_id)

    def _check(
        self, encoded: bytes, command: CommandIdentity | None
    ) -> IntakeResult | tuple[Dataset, str, str | None]:
        """The refusal to answer, or (header, SOP Instance UID, skip reason or None)."""
        try:
            header = read_instance(encoded)
            sop_uid, reason = self._read_header(header)
        except Exception as exc:  # any parse failure of bytes from a peer is 0xC000
            text = f"data set cannot be read ({type(exc).__name__})"
            LOGGER.warning("refused instance: %s", text)
            LOGGER.debug("refused instance: parse error", exc_info=True)
            return IntakeResult(Status.CANNOT_UNDERSTAND, Outcome.REFUSED, None, text)
        if sop_uid is None:
            assert reason is not None
            LOGGER.warning("refused instance: %s", reason)
            return IntakeResult(Status.CANNOT_UNDERSTAND, Outcome.REFUSED, None, reason)
        mismatch = _command_mismatch(header, command)
        if mismatch is not None:
            LOGGER.warning("refused SOP Instance %s: %s", sop_uid, mismatch)
            return IntakeResult(Status.DATASET_DOES_NOT_MATCH, Outcome.REFUSED, None, mismatch)
        return header, sop_uid, reason

    @staticmethod
    def _read_header(header: Dataset) -> tuple[str | None, str | None]:
        """(SOP Instance UID, skip reason), or (None, refusal) when the instance is refused."""
        for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
            value = header.get(keyword)
            if not is_valid_uid(value):
                return None, f"{keyword} is not a valid UID: {str(value)[:80]!r}"
        meta = meta_elements_in_dataset(header)
        if meta:
            return None, (
                f"the data set carries file meta elements ({', '.join(meta[:4])}); group 0002 "
                "is not part of a data set (PS3.10 7.1)"
            )
        unreadable = unreadable_element(header)
        if unreadable is not None:
            return None, unreadable
        return str(header.SOPInstanceUID), skip_reason(header)


def _command_mismatch(header: Dataset, command: CommandIdentity | None) -> str | None:
    """Why the data set does not match its C-STORE request (0xA900), or None."""
    if command is None:
        return None
    for keyword, expected in (
        ("SOPClassUID", command.sop_class_uid),
        ("SOPInstanceUID", command.sop_instance_uid),
    ):
        found = str(header.get(keyword, ""))
        if found != expected.strip():
            shown = expected if is_valid_uid(expected.strip()) else "(an invalid UID)"
            return f"the data set's {keyword} {found} differs from the request's {shown}"
    return None


def _write_new_file(encoded: bytes, path: Path) -> None:
    """Write ``encoded`` to a new file readable by the node's group only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(encoded)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    finally:
        os.close(fd)
