"""The result objects of a job (SEG, SC, SR): their kinds, in sending order, as rows store them."""

from __future__ import annotations

import enum
from collections.abc import Iterable


class ResultKind(enum.StrEnum):
    """One kind of result object, in the order they are made and sent."""

    SEG = "seg"
    SC = "sc"
    SR = "sr"


#: Every kind, in sending order (SEG first: the SC and SR reference nothing the PACS lacks).
ALL_KINDS: tuple[ResultKind, ...] = (ResultKind.SEG, ResultKind.SC, ResultKind.SR)

#: What deliveries recorded before the SR existed carried.
LEGACY_KINDS: tuple[ResultKind, ...] = (ResultKind.SEG, ResultKind.SC)

def encode_kinds(kinds: Iterable[ResultKind]) -> str:
    """The kinds as stored on a delivery row: ``"seg,sc,sr"``, in sending order."""
    chosen = set(kinds)
    return ",".join(kind.value for kind in ALL_KINDS if kind in chosen)


def decode_kinds(text: str | None) -> tuple[ResultKind, ...]:
    """The kinds stored on a delivery row (None, from before routing existed: SEG and SC).

    Raises
    ------
    ValueError
        For a name that is not a result kind.
    """
    if text is None:
        return LEGACY_KINDS
    chosen = {ResultKind(part) for part in text.split(",") if part}
    return tuple(kind for kind in ALL_KINDS if kind in chosen)
