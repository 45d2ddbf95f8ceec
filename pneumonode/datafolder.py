"""The data folder: where spool and result files lie, and the one durable way to write them.

Layout, relative to ``node.data_dir``::

    spool/incoming/<uuid>.dcm.part   an instance being written (a crash leaves it; retention
                                     removes it)
    spool/<YYYYMMDD>/<uuid>.dcm      a received instance, by UTC day of receipt
    results/<job id, 9 digits>/      a job's result objects: seg.dcm, overlay.dcm, sr.dcm
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path, PurePosixPath

from pneumonode.results import ResultKind

SPOOL = "spool"
"""The folder of received instances."""

RESULTS = "results"
"""The folder of result objects, one sub-folder per job."""

PARTIAL_SUFFIX = ".part"
"""The suffix of a file being written; it never stays after a write ends, failed or not."""

_DAY_FORMAT = "%Y%m%d"
_DAY_DIGITS = 8
_RESULT_FILES = {ResultKind.SEG: "seg.dcm", ResultKind.SC: "overlay.dcm", ResultKind.SR: "sr.dcm"}


def spool_dir(data_dir: Path) -> Path:
    """The spool folder of a data folder."""
    return data_dir / SPOOL


def incoming_dir(data_dir: Path) -> Path:
    """Where instances are written before they are renamed into their day's spool folder."""
    return spool_dir(data_dir) / "incoming"


def spool_day(at: datetime) -> str:
    """The name of the spool folder of instances received at ``at`` (UTC): ``YYYYMMDD``."""
    return at.strftime(_DAY_FORMAT)


def is_spool_day(name: str) -> bool:
    """Whether a folder name in the spool is a day folder (not ``incoming``)."""
    return name.isdigit() and len(name) == _DAY_DIGITS


def result_path(job_id: int, kind: ResultKind) -> PurePosixPath:
    """Where a job's result of ``kind`` is written, relative to the data folder."""
    return PurePosixPath(RESULTS) / f"{job_id:09d}" / _RESULT_FILES[kind]


def is_result_folder(folder: Path) -> bool:
    """Whether ``folder`` is one job's result folder (``results/<job id>``)."""
    return folder.parent.name == RESULTS


def fsync_path(path: Path, *, directory: bool = False) -> None:
    """fsync a file (or, with ``directory=True``, a folder, making renames in it durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents) if absent, durably: its parent is fsynced."""
    if folder.is_dir():
        return
    folder.mkdir(parents=True, exist_ok=True)
    fsync_path(folder.parent, directory=True)


def write_durably(final: Path, write: Callable[[Path], None], partial: Path) -> None:
    """Write a file so that it is either whole at ``final`` after a power cut, or absent.

    ``write`` writes the content to ``partial``; that file is fsynced, renamed to ``final`` and
    the folder fsynced. When anything fails the partial file is removed and the error raised.
    """
    write_whole(final, write, partial)
    fsync_path(final.parent, directory=True)


def write_whole(final: Path, write: Callable[[Path], None], partial: Path) -> None:
    """:func:`write_durably` without the last step: the folder of ``final`` is not fsynced.

    The content is durable, the name ``final`` not yet: the caller fsyncs ``final.parent``
    before it relies on the file (intake fsyncs the folder once for all the instances that
    arrive at the same time). ``final.parent`` itself is made durably when it is new, before
    the write (``partial`` may lie in it).
    """
    make_folder(final.parent)
    write_partial(write, partial)
    place_partial(partial, final)


def write_partial(write: Callable[[Path], None], partial: Path) -> None:
    """``write`` the content to ``partial`` and fsync it; on failure ``partial`` is removed."""
    try:
        write(partial)
        fsync_path(partial)
    except BaseException:
        partial.unlink(missing_ok=True)  # no half-written file is left behind
        raise


def place_partial(partial: Path, final: Path) -> None:
    """Rename a file written by :func:`write_partial` to ``final`` (its folder made if new).

    The folder of ``final`` is not fsynced (see :func:`write_whole`). On failure ``partial`` is
    removed.
    """
    try:
        make_folder(final.parent)
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
