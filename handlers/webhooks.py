"""Webhooks: what a delivery sends, how it is signed, and what happens when it fails.

Pure, no I/O: the sender (to come, issue 13) holds the clock, the random source and
the HTTP session and asks this module what to send and what to do next.

Signing follows the Standard Webhooks spec, so that a receiver verifies with any of
its libraries: the secret is written `whsec_<base64 of the key>`, and
`webhook-signature` is `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import random
from collections.abc import Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Literal, get_args
from urllib.parse import urlsplit, urlunsplit

import msgspec

from handlers.times import rfc3339

EventType = Literal[
    "conflict.detected",
    "conflict.updated",
    "conflict.resolved",
    "alert.crisis",
    "alert.crisis.escalated",
    "alert.wellness",
    "model.trained",
]
EVENT_TYPES: frozenset[str] = frozenset(get_args(EventType))
"""PROTOCOL.md's event types; `*` in an endpoint's `events` means all of them."""
URGENT_EVENTS: frozenset[str] = frozenset({"alert.crisis", "alert.crisis.escalated"})
"""Sent at once even while the intake drains a backlog, when the other events wait
(docs/webhooks.md, "While a backlog drains")."""
ALL_EVENTS = "*"
Subscription = Literal[EventType, "*"]
"""What an endpoint's `events` lists."""

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret


def public_url(url: str) -> str:
    """The URL without its query and user info, which may hold credentials: what
    answers, logs and dead-letter entries show of an endpoint."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# -- signing -----------------------------------------------------------------------------


def secret_key(secret: str) -> bytes:
    """The key a `whsec_<base64>` secret writes, the one that signs.

    The config validates secrets with this, so that a secret the daemon starts with
    is one it can sign with. Errors never quote the secret, not even in part.
    Padding may be left out (the reference library accepts that too); anything
    outside the standard base64 alphabet, whitespace included, is refused.
    """
    if not secret:
        raise ValueError("the secret is empty")
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"the secret must be {SECRET_PREFIX} then the base64 of the key")
    encoded = secret[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError(f"the part after {SECRET_PREFIX} is not valid base64") from None
    if not key:
        raise ValueError(f"the key after {SECRET_PREFIX} is empty")
    return key


def sign(secret_key: bytes, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """`v1,<signature>` of `body` as sent with `msg_id` and `timestamp_s` (epoch seconds)."""
    signed = f"{msg_id}.{timestamp_s}.".encode() + body
    digest = hmac.digest(secret_key, signed, "sha256")  # in C: no HMAC object built
    return "v1," + base64.b64encode(digest).decode("ascii")


def headers(msg_id: str, timestamp_s: int, signature: str) -> dict[str, str]:
    """The request's headers. `msg_id` stays the same across an event's retries, so that
    a receiver deduplicates by it."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


class _Body(msgspec.Struct):
    type: str
    timestamp: str
    data: msgspec.Raw


_encode_body = msgspec.json.Encoder().encode


def body(event_type: str, at_us: int, payload: bytes) -> bytes:
    """`{"type", "timestamp", "data"}`: `timestamp` is when the event happened (its outbox
    row's time, the same on every retry), not when it is sent.

    `data` is the event's payload, the JSON object the outbox holds, which is also the
    body of the event's MQTT message: a receiver of both sees the same object. It is
    embedded as it is stored (never a string holding JSON, which every receiver would
    have to decode twice), and not decoded and re-encoded: no cost per delivery, and
    no way for the two copies to drift.
    """
    return _encode_body(_Body(event_type, rfc3339(at_us), msgspec.Raw(payload)))


# -- what a failure means -------------------------------------------------------------------

Outcome = Literal["success", "retry", "dead"]

RETRY_STATUSES = frozenset({408, 429})
JITTER = 0.2
"""A retry waits its step of the schedule ±20%, uniformly."""
RETRY_AFTER_CAP_S = 3600.0
"""A receiver's `Retry-After` is honoured up to an hour."""


def classify(status: int | None, error: str | None) -> Outcome:
    """What an attempt's answer means (PROTOCOL.md): a 2xx is a success; no answer
    (`status` None: a timeout, a refused or broken connection), 408, 429 and 5xx are
    retried; anything else (other 4xx, 1xx, 3xx: redirects are not followed) is final.

    `error` is the transport's failure. A 2xx with an error did not complete within the
    timeout (the body was still being read): it is retried, not counted a success.
    """
    if status is None:
        return "retry"
    if 200 <= status <= 299:
        return "success" if error is None else "retry"
    if status in RETRY_STATUSES or 500 <= status <= 599:
        return "retry"
    return "dead"


def next_delay_s(
    attempt: int,
    schedule: Sequence[float],
    retry_after_s: float | None,
    rng: random.Random,
) -> float | None:
    """Seconds to wait before the next attempt, after `attempt` attempts failed; None
    when the schedule is spent (the delivery is dead).

    `schedule[0]` is the wait before the first attempt, so `schedule[attempt]` is the
    wait before the next: the default `[0, 5, 30, 120, 600, 1800]` is six attempts.

    Jitter: ±20% of the step (`JITTER`). Deliveries that failed together (an endpoint
    down for a minute fails every delivery in that minute) must not all come back in
    the same instant, and ±20% is enough to spread them; full jitter (anywhere from 0
    to the step) would spread them more but would break the schedule the operator
    wrote: a 30-minute step could come back after seconds.

    `Retry-After` (429, 503) is a lower bound on the wait, capped at an hour
    (`RETRY_AFTER_CAP_S`): a receiver may slow the sender down, but a `Retry-After`
    of a day must not hold an event that long; past the cap the schedule goes on and
    the delivery dies when it is spent, as any other.
    """
    if attempt >= len(schedule):
        return None
    step = schedule[attempt] * rng.uniform(1 - JITTER, 1 + JITTER)
    if retry_after_s is None:
        return step
    return max(step, min(retry_after_s, RETRY_AFTER_CAP_S))


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """`Retry-After` in seconds from `now_s` (epoch seconds, the wall clock): either
    delta-seconds (`120`) or an HTTP-date (`Wed, 21 Oct 2015 07:28:00 GMT`); a date in
    the past is 0. None when absent or unreadable: the schedule alone decides."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:  # no zone, or `-0000`: an HTTP-date is always in GMT
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - now_s)


# -- the circuit breaker: an endpoint that keeps failing is paused, not hammered ------------

BreakerState = Literal["closed", "open", "half_open"]
MAX_PAUSE_S = 1800.0
"""The longest pause: an endpoint down for hours is still probed every 30 minutes."""


class BreakerPolicy(msgspec.Struct, frozen=True):
    """An endpoint's `breaker_failures` and `breaker_pause_s`."""

    failures: int = 5
    pause_s: float = 60.0


class Breaker(msgspec.Struct, frozen=True):
    """One endpoint's breaker, plain data: the functions below return the next one.

    `closed`: deliveries go; `failures` counts the failed attempts in a row. `open`:
    none goes before `until_s`, then one, the probe, and the breaker is `half_open`
    until the probe's outcome: a success closes it, a failure opens it again for twice
    the pause (`pause_s`), up to `MAX_PAUSE_S`. Times are the caller's clock in
    seconds (monotonic: a pause must not jump with the wall clock).
    """

    state: BreakerState = "closed"
    failures: int = 0
    pause_s: float = 0.0
    until_s: float = 0.0


CLOSED = Breaker()


def admit(breaker: Breaker, now_s: float) -> Breaker | None:
    """The breaker once an attempt is sent now, or None when none may be: open and
    not yet due, or half open with its probe still out."""
    if breaker.state == "closed":
        return breaker
    if breaker.state == "open" and now_s >= breaker.until_s:
        return msgspec.structs.replace(breaker, state="half_open")
    return None


def record(breaker: Breaker, outcome: Outcome, now_s: float, policy: BreakerPolicy) -> Breaker:
    """The breaker after an attempt's outcome.

    Every outcome but a success counts as a failure, a final 4xx too: an endpoint that
    answers 401 or 404 to everything is as unusable as one that is down, and pausing
    it keeps its events waiting instead of sending each to the dead-letter queue in
    turn. A success closes the breaker from any state (one from an attempt sent before
    it opened shows the endpoint answers). A failure while open (an attempt sent before
    it opened) changes nothing: the pause already runs.
    """
    if outcome == "success":
        return CLOSED
    if breaker.state == "closed":
        failures = breaker.failures + 1
        if failures < policy.failures:
            return msgspec.structs.replace(breaker, failures=failures)
        pause = min(policy.pause_s, MAX_PAUSE_S)
        return Breaker("open", failures, pause, now_s + pause)
    if breaker.state == "half_open":
        pause = min(breaker.pause_s * 2, MAX_PAUSE_S)
        return Breaker("open", breaker.failures + 1, pause, now_s + pause)
    return breaker
