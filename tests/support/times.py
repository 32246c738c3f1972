"""Times as tests write and read them, apart from the gateway's own handlers/times.py.

Expected values are computed here, independently: a test that formatted its
expectation with the code under test would agree with that code's mistakes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
T0 = datetime(2026, 11, 29, 12, tzinfo=UTC)
"""The conflict tests' fixed origin: edits are placed at seconds from it."""
NOW = datetime.now(UTC).replace(microsecond=0)
"""This test session's "now", in whole seconds (what a device would send)."""


def iso(moment: datetime, timespec: str = "auto") -> str:
    """RFC 3339 in UTC with a `Z`: `2026-11-29T12:00:00.250Z` (`timespec` as isoformat's)."""
    return moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def us(moment: datetime | str) -> int:
    """Microseconds since the epoch of an aware datetime or an RFC 3339 text."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    return (moment - EPOCH) // timedelta(microseconds=1)


def from_us(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def shortest(value: int) -> str:
    """How the gateway writes a time it stored: as many fractional digits as it needs
    (none, 3 or 6), so that a time sent in whole seconds comes back as it was sent."""
    spec = (
        "seconds"
        if value % 1_000_000 == 0
        else "milliseconds"
        if value % 1000 == 0
        else "microseconds"
    )
    return iso(from_us(value), spec)


def days_ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def at(seconds: float) -> str:
    """T0 plus `seconds`, to the microsecond, as a device would send it."""
    return iso(T0 + timedelta(microseconds=round(seconds * 1_000_000)), "microseconds")
