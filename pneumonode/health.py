"""The node's health verdict: which checks pass, and the reasons when one does not."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError


@dataclass(frozen=True)
class Health:
    """The result of the health checks: ``checks`` maps each check to pass/fail.

    Parameters
    ----------
    checks:
        ``listening``, ``database``, ``workers`` (and others) to True when they pass.
    reasons:
        One line per failing check, naming it and why.
    """

    checks: Mapping[str, bool]
    reasons: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checks", MappingProxyType(dict(self.checks)))
        if not self.checks:
            raise ValueError("Health needs at least one check")
        if any(not passed for passed in self.checks.values()) and not self.reasons:
            raise ValueError(f"Health: a failing check needs a reason, checks {dict(self.checks)}")

    @property
    def ok(self) -> bool:
        """True when every check passes."""
        return all(self.checks.values())

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dictionary: status, checks, reasons, details."""
        return {
            "status": "ok" if self.ok else "unhealthy",
            "checks": dict(self.checks),
            "reasons": list(self.reasons),
            **({"details": dict(self.details)} if self.details else {}),
        }


def database_problem(engine: Engine) -> str | None:
    """Why the job database cannot be reached (one line), or None when ``SELECT 1`` works."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            conn.rollback()
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None)
        lines = str(cause if cause is not None else exc).strip().splitlines() or ["no detail"]
        return f"database unreachable: {type(exc).__name__}: {lines[0][:200]}"
    return None
