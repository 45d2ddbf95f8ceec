"""Tests of the pure backoff decision in pneumonode.queue.retry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from pneumonode.queue.retry import RetryPolicy, backoff_delay, next_attempt

NOW = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


def test_delays_double_from_base_and_stop_at_max() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay_s=30, max_delay_s=300)
    expected = [
        NOW + timedelta(seconds=30),
        NOW + timedelta(seconds=60),
        NOW + timedelta(seconds=120),
        NOW + timedelta(seconds=240),
        NOW + timedelta(seconds=300),
        NOW + timedelta(seconds=300),
    ]
    assert [next_attempt(policy, n, NOW) for n in range(1, 7)] == expected


def test_gives_up_once_the_budget_is_spent() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay_s=10, max_delay_s=100)
    assert next_attempt(policy, 1, NOW) == NOW + timedelta(seconds=10)
    assert next_attempt(policy, 2, NOW) == NOW + timedelta(seconds=20)
    assert next_attempt(policy, 3, NOW) is None
    assert next_attempt(policy, 4, NOW) is None


def test_single_attempt_policy_never_retries() -> None:
    assert next_attempt(RetryPolicy(1, 5, 5), 1, NOW) is None


def test_same_inputs_give_the_same_answer() -> None:
    policy = RetryPolicy(max_attempts=5, base_delay_s=1.5, max_delay_s=60)
    assert next_attempt(policy, 3, NOW) == next_attempt(policy, 3, NOW)
    assert next_attempt(policy, 3, NOW) == NOW + timedelta(seconds=6)


def test_huge_attempt_counts_stay_at_the_maximum_delay() -> None:
    policy = RetryPolicy(max_attempts=1_000_000, base_delay_s=1, max_delay_s=900)
    assert backoff_delay(policy, 5000) == 900.0
    assert next_attempt(policy, 5000, NOW) == NOW + timedelta(seconds=900)


def test_result_keeps_the_callers_time_zone_instant() -> None:
    plus_two = timezone(timedelta(hours=2))
    local = NOW.astimezone(plus_two)
    result = next_attempt(RetryPolicy(3, 60, 60), 1, local)
    assert result == NOW + timedelta(seconds=60)


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        next_attempt(RetryPolicy(3, 1, 1), 1, datetime(2024, 3, 1, 12, 0, 0))


@pytest.mark.parametrize("attempts", [0, -1])
def test_attempts_made_must_be_positive(attempts: int) -> None:
    with pytest.raises(ValueError, match="attempts_made must be >= 1"):
        next_attempt(RetryPolicy(3, 1, 1), attempts, NOW)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0, "base_delay_s": 1, "max_delay_s": 1}, "max_attempts must be >= 1"),
        ({"max_attempts": 3, "base_delay_s": -1, "max_delay_s": 1}, "base_delay_s must be >= 0"),
        ({"max_attempts": 3, "base_delay_s": 10, "max_delay_s": 5}, "max_delay_s must be >="),
        (
            {"max_attempts": 3, "base_delay_s": 1, "max_delay_s": float("inf")},
            "finite",
        ),
        ({"max_attempts": 3, "base_delay_s": 1, "max_delay_s": 1e9}, "one year"),
    ],
)
def test_policy_validates_its_fields(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_refuses_a_non_integer_budget() -> None:
    with pytest.raises(TypeError, match="max_attempts must be an int"):
        RetryPolicy(max_attempts=2.5, base_delay_s=1, max_delay_s=1)  # type: ignore[arg-type]
