"""Decides when a failed attempt is tried again, or that it is not: pure exponential backoff."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

MAX_DELAY_S = 365 * 24 * 3600.0
"""The longest delay a policy may ask for: one year."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how far apart a failing job or delivery is retried.

    The delay doubles from ``base_delay_s`` after each failed attempt, up to ``max_delay_s``.

    Parameters
    ----------
    max_attempts:
        Total number of attempts allowed, the first one included (>= 1). After that many
        failed attempts the work is given up.
    base_delay_s:
        Delay in seconds after the first failed attempt (>= 0).
    max_delay_s:
        Upper bound of any delay in seconds (>= base_delay_s, <= one year).
    """

    max_attempts: int
    base_delay_s: float
    max_delay_s: float

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise TypeError(f"RetryPolicy.max_attempts must be an int, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        for name in ("base_delay_s", "max_delay_s"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"RetryPolicy.{name} must be a finite number, got {value!r}")
        if self.base_delay_s < 0:
            raise ValueError(f"RetryPolicy.base_delay_s must be >= 0, got {self.base_delay_s}")
        if self.max_delay_s < self.base_delay_s:
            raise ValueError(
                "RetryPolicy.max_delay_s must be >= base_delay_s, got "
                f"max_delay_s={self.max_delay_s} < base_delay_s={self.base_delay_s}"
            )
        if self.max_delay_s > MAX_DELAY_S:
            raise ValueError(
                f"RetryPolicy.max_delay_s must be <= {MAX_DELAY_S:.0f} (one year), "
                f"got {self.max_delay_s}"
            )


def backoff_delay(policy: RetryPolicy, attempts_made: int) -> float:
    """Seconds to wait after ``attempts_made`` (>= 1) failed attempts, whatever the budget.

    ``min(max_delay_s, base_delay_s * 2 ** (attempts_made - 1))``.
    """
    _check_attempts(attempts_made)
    try:
        raw = policy.base_delay_s * 2.0 ** (attempts_made - 1)
    except OverflowError:
        raw = math.inf
    return float(min(policy.max_delay_s, raw))


def next_attempt(policy: RetryPolicy, attempts_made: int, now: datetime) -> datetime | None:
    """When to try again after a failed attempt, or None to give up.

    Parameters
    ----------
    policy:
        The retry policy.
    attempts_made:
        Attempts made so far, the one that just failed included (>= 1).
    now:
        The current time; must be timezone-aware.

    Returns
    -------
    datetime or None
        ``now`` plus :func:`backoff_delay`, or None when ``attempts_made`` has reached
        ``policy.max_attempts``.
    """
    _check_attempts(attempts_made)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"next_attempt: now must be timezone-aware, got naive {now.isoformat()}")
    if attempts_made >= policy.max_attempts:
        return None
    return now + timedelta(seconds=backoff_delay(policy, attempts_made))


def _check_attempts(attempts_made: int) -> None:
    if isinstance(attempts_made, bool) or not isinstance(attempts_made, int):
        raise TypeError(f"attempts_made must be an int, got {attempts_made!r}")
    if attempts_made < 1:
        raise ValueError(f"attempts_made must be >= 1, got {attempts_made}")
