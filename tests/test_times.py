"""`handlers.times`: microseconds inside, RFC 3339 on the wire, exactly."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from handlers.times import DAY_US, HOUR_US, now_us, rfc3339, to_us

T = 1_795_953_600_000_000
"""2026-11-29T12:00:00Z"""


def test_to_us_is_exact_in_any_offset() -> None:
    assert to_us(datetime(2026, 11, 29, 12, tzinfo=UTC)) == T
    assert type(to_us(datetime(2026, 11, 29, 12, tzinfo=UTC))) is int
    plus_two = timezone(timedelta(hours=2))
    assert to_us(datetime(2026, 11, 29, 14, 0, 0, 123456, tzinfo=plus_two)) == T + 123456
    assert to_us(datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)) == -1
    assert to_us(datetime(1, 1, 1, tzinfo=UTC)) == -62135596800000000


@pytest.mark.parametrize(
    ("value", "digits", "text"),
    [
        (T, 6, "2026-11-29T12:00:00.000000Z"),
        (T + 123456, 6, "2026-11-29T12:00:00.123456Z"),
        (T + 123456, 3, "2026-11-29T12:00:00.123Z"),
        (T + 123999, 3, "2026-11-29T12:00:00.123Z"),
        (T + 999999, 0, "2026-11-29T12:00:00Z"),
        (T, None, "2026-11-29T12:00:00Z"),
        (T + 250_000, None, "2026-11-29T12:00:00.250Z"),
        (T + 250_001, None, "2026-11-29T12:00:00.250001Z"),
        (T + 1000, None, "2026-11-29T12:00:00.001Z"),
        (T + 1, None, "2026-11-29T12:00:00.000001Z"),
        (0, None, "1970-01-01T00:00:00Z"),
        (-1, 6, "1969-12-31T23:59:59.999999Z"),
    ],
)
def test_rfc3339_writes_the_digits_asked_for_truncated(
    value: int, digits: int | None, text: str
) -> None:
    assert rfc3339(value, digits) == text  # type: ignore[arg-type]


def test_rfc3339_defaults_to_microseconds_and_keeps_none() -> None:
    assert rfc3339(T) == "2026-11-29T12:00:00.000000Z"
    assert rfc3339(None) is None
    assert rfc3339(None, None) is None


def test_now_is_the_clock_in_microseconds() -> None:
    before = time.time_ns() // 1000
    now = now_us()
    after = time.time_ns() // 1000
    assert before <= now <= after
    assert type(now) is int


def test_the_units() -> None:
    assert (HOUR_US, DAY_US) == (3_600_000_000, 86_400_000_000)
