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

    Parameters
    ----------
    max_attempts:
        Total number of attempts allowed, the first one included (>= 1). After that many
        failed attempts the work is given up.
    base_delay_s:
        Delay in seconds after the first failed attempt (>= 0).
    max_delay_s:
        Upper bound of any delay in seconds (>= base_delay_s, <= one year).
    factor:
        Growth of the delay from one failed attempt to the next (>= 1).
    """

    max_attempts: int
    base_delay_s: float
    max_delay_s: float
    factor: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise TypeError(f"RetryPolicy.max_attempts must be an int, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        for name in ("base_delay_s", "max_delay_s", "factor"):
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
        if self.factor < 1:
            raise ValueError(f"RetryPolicy.factor must be >= 1, got {self.factor}")


def backoff_delay(policy: RetryPolicy, attempts_made: int) -> float:
    """Delay in seconds before the next attempt, ignoring the attempt budget.

    Parameters
    ----------
    policy:
        The retry policy.
    attempts_made:
        Attempts made so far, the one that just failed included (>= 1).

    Returns
    -------
    float
        ``min(max_delay_s, base_delay_s * factor ** (attempts_made - 1))``.
    """
    _check_attempts(attempts_made)
    try:
        raw = policy.base_delay_s * policy.factor ** (attempts_made - 1)
    except OverflowError:
        raw = math.inf
    return float(min(policy.max_delay_s, raw))


def next_attempt(
    policy: RetryPolicy,
    attempts_made: int,
    now: datetime,
    *,
    jitter: float = 0.0,
    random_value: float | None = None,
) -> datetime | None:
    """When to try again after a failed attempt, or None to give up.

    Parameters
    ----------
    policy:
        The retry policy.
    attempts_made:
        Attempts made so far, the one that just failed included (>= 1).
    now:
        The current time; must be timezone-aware.
    jitter:
        Fraction in [0, 1) of the delay that may be taken off at random; 0 (the default) makes
        the result fully deterministic.
    random_value:
        A value in [0, 1) supplied by the caller (for example ``random.random()``); required
        when ``jitter`` is above 0. The delay becomes ``delay * (1 - jitter * random_value)``,
        so jitter never lengthens a delay beyond ``max_delay_s``.

    Returns
    -------
    datetime or None
        ``now`` plus the backoff delay, or None when ``attempts_made`` has reached
        ``policy.max_attempts``.
    """
    _check_attempts(attempts_made)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"next_attempt: now must be timezone-aware, got naive {now.isoformat()}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"next_attempt: jitter must lie in [0, 1), got {jitter!r}")
    if jitter > 0.0 and random_value is None:
        raise ValueError("next_attempt: jitter above 0 needs an injected random_value")
    if random_value is not None and not 0.0 <= random_value < 1.0:
        raise ValueError(f"next_attempt: random_value must lie in [0, 1), got {random_value!r}")
    if attempts_made >= policy.max_attempts:
        return None
    delay = backoff_delay(policy, attempts_made)
    if jitter > 0.0 and random_value is not None:
        delay *= 1.0 - jitter * random_value
    return now + timedelta(seconds=delay)


def _check_attempts(attempts_made: int) -> None:
    if isinstance(attempts_made, bool) or not isinstance(attempts_made, int):
        raise TypeError(f"attempts_made must be an int, got {attempts_made!r}")
    if attempts_made < 1:
        raise ValueError(f"attempts_made must be >= 1, got {attempts_made}")
