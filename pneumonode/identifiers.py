"""The syntax of DICOM identifiers, one rule each: UIDs (PS3.5 9.1) and AE titles (PS3.5 6.2)."""

from __future__ import annotations

import re

UID_MAX_LENGTH = 64
"""A UID has at most 64 characters."""

AE_TITLE_MAX_LENGTH = 16
"""An AE title has at most 16 characters."""

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid DICOM UID, as ``pydicom.uid.UID(value).is_valid`` says.

    Digits in dot-separated components, no component empty or zero-padded, at most 64
    characters.
    """
    return (
        isinstance(value, str)
        and len(value) <= UID_MAX_LENGTH
        and _UID.fullmatch(value) is not None
    )


def uid_problem(value: object) -> str | None:
    """Why ``value`` is not a DICOM UID, or None when it is one."""
    if is_valid_uid(value):
        return None
    return (
        "must be a DICOM UID (digits in dot-separated components without leading zeros, "
        f"at most {UID_MAX_LENGTH} characters), got {value!r}"
    )


def ae_title_problem(value: object) -> str | None:
    """Why ``value`` is not an AE title, or None when it is one.

    An AE title has 1 to 16 printable ASCII characters, not only spaces, and no backslash.
    """
    if not isinstance(value, str):
        return f"must be a str, got {value!r}"
    if not 1 <= len(value) <= AE_TITLE_MAX_LENGTH or not value.strip():
        return (
            f"must have 1 to {AE_TITLE_MAX_LENGTH} characters and not be only spaces, "
            f"got {value!r}"
        )
    if "\\" in value:
        return f"must not contain a backslash, got {value!r}"
    if any(not 32 <= ord(char) < 127 for char in value):
        return f"must be printable ASCII, got {value!r}"
    return None
