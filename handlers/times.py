"""Times: integer microseconds since the epoch (UTC) inside, RFC 3339 on the wire.

Integers keep arithmetic exact and identical on SQLite and PostgreSQL (the
conflict window is compared to the microsecond); this module is the one place
that turns them into text and back, so that every answer writes a time alike.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Literal, overload

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
HOUR_US = 3_600_000_000
DAY_US = 86_400_000_000

Digits = Literal[0, 3, 6]
_SPEC: dict[int, str] = {0: "seconds", 3: "milliseconds", 6: "microseconds"}


MIN_US = (datetime.min.replace(tzinfo=UTC) - EPOCH) // MICROSECOND
MAX_US = (datetime.max.replace(tzinfo=UTC) - EPOCH) // MICROSECOND
"""The instants `rfc3339` can write: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z."""
OUT_OF_RANGE = "Expected a time from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z"


def in_range(us: int) -> bool:
    """Whether `us` can be written back as RFC 3339. A time with an offset can name an
    instant just outside (`0001-01-01T00:00:00+01:00` is in year 0 in UTC): stored, it
    could never be shown, published nor sent to a webhook."""
    return MIN_US <= us <= MAX_US


def now_us() -> int:
    return time.time_ns() // 1000


def to_us(moment: datetime) -> int:
    """An aware datetime as microseconds since the epoch, exactly."""
    return (moment - EPOCH) // MICROSECOND


@overload
def rfc3339(us: int, digits: Digits | None = 6) -> str: ...
@overload
def rfc3339(us: None, digits: Digits | None = 6) -> None: ...
def rfc3339(us: int | None, digits: Digits | None = 6) -> str | None:
    """`2026-11-29T12:00:00.123456Z`, with `digits` fractional digits (truncated).

    `digits=None` writes as many as the value needs (0, 3 or 6): a time a device
    sent in whole seconds comes back as it was sent. None stays None.
    """
    if us is None:
        return None
    if digits is None:
        digits = 0 if us % 1_000_000 == 0 else 3 if us % 1000 == 0 else 6
    moment = EPOCH + timedelta(microseconds=us)
    return moment.isoformat(timespec=_SPEC[digits]).replace("+00:00", "Z")
