"""Log output that a peer cannot forge: control characters escaped, library tracebacks folded.

AE titles, UIDs and other values from the network reach log messages, pynetdicom's own included
(it writes what it decoded), and a raw newline, carriage return, ESC or NUL in them would forge a
log line or drive the terminal that shows the log. :class:`EscapingFormatter` writes every
record's message with such characters as visible escapes, and marks every further line of a
record (a traceback) with a prefix, so that no line a peer influences can pass for a record of
its own. :class:`FoldLibraryTracebacks` keeps pynetdicom to one line per failure: it writes
``LOGGER.error(what)`` followed by ``LOGGER.exception(exc)`` (a traceback of some 20 lines) for
every malformed PDU; the second record is dropped and any other traceback of its becomes a
summary on the same line.
"""

from __future__ import annotations

import logging
import re

#: C0 and C1 controls, DEL, Unicode line/paragraph separators and bidirectional overrides.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

#: Prefix of every line of a record after its first (traceback lines).
CONTINUATION = "  | "

#: Loggers whose tracebacks are folded to one line unless they log at DEBUG.
LIBRARY_LOGGERS = ("pynetdicom",)


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return _UNSAFE.sub(_escape_one, text)


class EscapingFormatter(logging.Formatter):
    """A formatter whose every record is one line with no control characters, plus marked
    continuation lines (escaped too) for a traceback or stack."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as :class:`logging.Formatter` writes it, made safe."""
        safe = logging.makeLogRecord(record.__dict__)
        safe.msg, safe.args = escape_controls(record.getMessage()), None
        first, *rest = super().format(safe).split("\n")
        return "\n".join(
            [escape_controls(first), *(CONTINUATION + escape_controls(line) for line in rest)]
        )


class FoldLibraryTracebacks(logging.Filter):
    """Drop pynetdicom's ``LOGGER.exception(exc)`` records (each follows its own error line) and
    put any other pynetdicom traceback on one line, unless that logger is at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record (True), possibly folded, or drop it (False)."""
        if record.exc_info is None or not record.name.startswith(LIBRARY_LOGGERS):
            return True
        if logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return True
        if isinstance(record.msg, BaseException):
            return False
        error = record.exc_info[1]
        summary = "" if error is None else f" ({type(error).__name__}: {error})"
        record.msg, record.args = record.getMessage() + summary, None
        record.exc_info, record.exc_text = None, None
        return True


def safe_handler(handler: logging.Handler, fmt: str) -> logging.Handler:
    """``handler`` with the escaping formatter (format string ``fmt``) and the folding filter."""
    handler.setFormatter(EscapingFormatter(fmt))
    handler.addFilter(FoldLibraryTracebacks())
    return handler
