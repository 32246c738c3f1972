"""`handlers.webhooks`: what a delivery sends and signs, what a failure means, when the
next attempt goes, and the breaker; pure, no server.

Signatures are checked twice: by the Standard Webhooks reference library, as a
receiver would, and by a check written here from the spec's text, so that a bug
shared by our signer and one verifier cannot pass both.
"""

from __future__ import annotations

import base64
import json
import random
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from handlers import webhooks
from handlers.webhooks import (
    CLOSED,
    Breaker,
    BreakerPolicy,
    admit,
    classify,
    next_delay_s,
    parse_retry_after,
    record,
    secret_key,
    sign,
)
from tests.support.webhooks import hand_check

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
"""The secret of the spec's test vector."""
OTHER = "whsec_" + base64.b64encode(b"another key, 24 bytes..").decode()
SCHEDULE = [0.0, 5.0, 30.0, 120.0, 600.0, 1800.0]


def signed_request(secret: str, msg_id: str, payload: bytes) -> tuple[dict[str, str], bytes]:
    now_s = int(time.time())  # the library refuses a timestamp 5 minutes off its clock
    body = webhooks.body("alert.crisis", 1_795_953_600_000_000, payload)
    signature = sign(secret_key(secret), msg_id, now_s, body)
    return webhooks.headers(msg_id, now_s, signature), body


# -- signing -------------------------------------------------------------------------------


def test_the_spec_test_vector() -> None:
    """Checked against: the key taken as the text after `whsec_` (not its base64
    decoding), and a signed string without the dots or in another order."""
    key = secret_key(SECRET)
    assert key == base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_a_receiver_verifies_with_the_reference_library_and_by_hand() -> None:
    """Checked against: a header misnamed or missing (the library needs all three), a
    timestamp header that is not the signed one, a body other than the signed bytes."""
    payload = b'{"alert_id":"al-1","reasons":["panic"],"escalation":0}'
    headers, body = signed_request(SECRET, "msg_0001", payload)
    assert set(headers) == {
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "content-type",
    }
    assert headers["webhook-id"] == "msg_0001"
    assert headers["content-type"] == "application/json"
    assert Webhook(SECRET).verify(body, headers) == {
        "type": "alert.crisis",
        "timestamp": "2026-11-29T12:00:00.000000Z",
        "data": json.loads(payload),
    }
    assert hand_check(SECRET, headers, body) is True


def test_a_wrong_secret_or_a_changed_body_fails_both_checks() -> None:
    """Checked against: a verifier that accepts any `v1,` signature, and a signature
    that does not cover the body or the id."""
    headers, body = signed_request(SECRET, "msg_0002", b'{"a":1}')
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(OTHER).verify(body, headers)
    assert hand_check(OTHER, headers, body) is False
    tampered = body.replace(b'"a":1', b'"a":2')
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(SECRET).verify(tampered, headers)
    assert hand_check(SECRET, headers, tampered) is False
    renamed = {**headers, "webhook-id": "msg_0003"}
    assert hand_check(SECRET, renamed, body) is False


def test_the_body_embeds_the_payload_as_an_object() -> None:
    """Checked against: `data` as a string holding JSON, `timestamp` the send time (it
    must be the event's, the same on every retry), and bytes re-encoded differently
    from the stored payload."""
    payload = b'{"event":"conflict.detected","conflict":{"conflict_id":"c-1","n":1.5}}'
    body = webhooks.body("conflict.detected", 1_795_953_600_123_456, payload)
    assert body == (
        b'{"type":"conflict.detected","timestamp":"2026-11-29T12:00:00.123456Z","data":'
        + payload
        + b"}"
    )
    assert json.loads(body)["data"] == json.loads(payload)


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("", "the secret is empty"),
        (
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "the secret must be whsec_ then the base64 of the key",
        ),
        ("whsec_", "the key after whsec_ is empty"),
        ("whsec_MfKQ9r8GKYqr!wjUPD8ILPZIo2LaLaSw", "the part after whsec_ is not valid base64"),
        ("whsec_MfKQ9r8GKYqr wjUPD8ILPZIo2LaLaSw", "the part after whsec_ is not valid base64"),
        ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwx", "the part after whsec_ is not valid base64"),
        ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw-_", "the part after whsec_ is not valid base64"),
    ],
)
def test_a_secret_that_cannot_sign_is_refused_without_quoting_it(secret: str, message: str) -> None:
    """Checked against: a message that quotes the secret (it reaches logs and admin
    answers), undecodable text taken as a key, the URL-safe alphabet accepted (the
    spec's libraries decode the standard one and would verify with another key)."""
    with pytest.raises(ValueError) as caught:
        secret_key(secret)
    assert str(caught.value) == message
    body = secret.removeprefix("whsec_")
    assert not body or body not in str(caught.value)


def test_padding_may_be_left_out() -> None:
    """As the reference library accepts: `whsec_c2VjcmV0LWtleQ` is `whsec_c2VjcmV0LWtleQ==`.

    Checked against: a secret the receiver's library accepts refused at our start."""
    assert secret_key("whsec_c2VjcmV0LWtleQ") == b"secret-key"
    assert secret_key("whsec_c2VjcmV0LWtleQ==") == b"secret-key"


# -- what an answer means ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "outcome"),
    [
        (200, None, "success"),
        (201, None, "success"),
        (204, None, "success"),
        (299, None, "success"),
        (200, "timeout while reading the body", "retry"),
        (None, "timeout", "retry"),
        (None, "connection refused", "retry"),
        (408, None, "retry"),
        (429, None, "retry"),
        (500, None, "retry"),
        (502, None, "retry"),
        (503, None, "retry"),
        (599, None, "retry"),
        (400, None, "dead"),
        (401, None, "dead"),
        (403, None, "dead"),
        (404, None, "dead"),
        (409, None, "dead"),
        (410, None, "dead"),
        (413, None, "dead"),
        (422, None, "dead"),
        (499, None, "dead"),
        (100, None, "dead"),
        (199, None, "dead"),
        (300, None, "dead"),
        (301, None, "dead"),
        (302, None, "dead"),
        (304, None, "dead"),
        (600, None, "dead"),
    ],
)
def test_classify_every_status_class(status: int | None, error: str | None, outcome: str) -> None:
    """Checked against: a 403 retried forever (Convoy's bug), 408 or 429 taken as a
    final 4xx, a redirect followed or retried, a 2xx whose exchange timed out counted
    delivered, and the edges of each range (199/200, 299/300, 499/500, 599/600)."""
    assert classify(status, error) == outcome


# -- when the next attempt goes ------------------------------------------------------------


def test_the_schedule_with_jitter_within_20_percent() -> None:
    """Checked against: the step after `attempt` off by one, jitter outside ±20% or
    none at all, and a spent schedule that retries again instead of dying."""
    rng = random.Random(7)
    for attempt, step in enumerate(SCHEDULE):
        delays = [next_delay_s(attempt, SCHEDULE, None, rng) for _ in range(500)]
        assert all(d is not None and step * 0.8 <= d <= step * 1.2 for d in delays), attempt
        if step:
            spread = [d for d in delays if d is not None]
            assert min(spread) < step * 0.85
            assert max(spread) > step * 1.15
    assert next_delay_s(0, SCHEDULE, None, rng) == 0.0
    assert next_delay_s(6, SCHEDULE, None, rng) is None
    assert next_delay_s(7, SCHEDULE, None, rng) is None
    assert next_delay_s(1, [0.0], None, rng) is None


def test_the_same_seed_the_same_delays() -> None:
    """Checked against: a delay drawn from a random source other than the one given
    (the delivery tests seed it to be repeatable)."""
    first = [next_delay_s(a, SCHEDULE, None, random.Random(3)) for a in range(6)]
    again = [next_delay_s(a, SCHEDULE, None, random.Random(3)) for a in range(6)]
    assert first == again
    assert first[0] == 0.0
    assert first[1] == pytest.approx(5.0 * random.Random(3).uniform(0.8, 1.2))


@pytest.mark.parametrize(
    ("attempt", "retry_after", "low", "high"),
    [
        (1, 60.0, 60.0, 60.0),  # longer than the step (5 s ±20%): waited
        (1, 2.0, 4.0, 6.0),  # shorter than the step: the step
        (1, 0.0, 4.0, 6.0),
        (1, 3600.0, 3600.0, 3600.0),  # at the cap
        (1, 86400.0, 3600.0, 3600.0),  # a day: capped at an hour
        (5, 7200.0, 3600.0, 3600.0),  # capped, and longer than the step (1800 s ±20%)
    ],
)
def test_retry_after_is_a_lower_bound_capped_at_an_hour(
    attempt: int, retry_after: float, low: float, high: float
) -> None:
    """Checked against: `Retry-After` ignored, taken even when shorter than the
    schedule's step, or uncapped (a day's wait holds the event a day)."""
    rng = random.Random(11)
    for _ in range(200):
        delay = next_delay_s(attempt, SCHEDULE, retry_after, rng)
        assert delay is not None
        assert low <= delay <= high
    assert webhooks.RETRY_AFTER_CAP_S == 3600.0


def test_retry_after_does_not_outlive_the_schedule() -> None:
    """Checked against: a `Retry-After` that revives a spent schedule."""
    assert next_delay_s(6, SCHEDULE, 60.0, random.Random(1)) is None


NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 30 ", 30.0),
        ("Sun, 29 Nov 2026 12:02:00 GMT", 120.0),  # IMF-fixdate
        ("Sunday, 29-Nov-26 12:00:45 GMT", 45.0),  # RFC 850
        ("Sun Nov 29 12:01:00 2026", 60.0),  # asctime: no zone, GMT
        ("Sun, 29 Nov 2026 12:00:10 -0000", 10.0),
        ("Sun, 29 Nov 2026 13:05:00 +0100", 300.0),
        ("Sun, 29 Nov 2026 11:00:00 GMT", 0.0),  # already past: go now
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("١٢", None),  # Arabic-Indic digits: not delta-seconds
    ],
)
def test_parse_retry_after_both_forms(
    value: str | None, seconds: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked against: only one of the two forms read, a date without a zone read as
    local time (the machine's zone is set to New York here), a past date giving a
    negative wait, and junk taken as a number."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_retry_after(value, NOW) == seconds
    finally:
        monkeypatch.undo()
        time.tzset()


# -- the breaker ---------------------------------------------------------------------------

POLICY = BreakerPolicy(failures=3, pause_s=60.0)


def fail(breaker: Breaker, now_s: float, times: int = 1) -> Breaker:
    for _ in range(times):
        breaker = record(breaker, "retry", now_s, POLICY)
    return breaker


def test_the_breaker_opens_after_n_failures_in_a_row() -> None:
    """Checked against: opening one failure early or late, and failures counted in
    total rather than in a row (a success between them resets the count)."""
    breaker = fail(CLOSED, 100.0, 2)
    assert breaker == Breaker("closed", 2, 0.0, 0.0)
    assert admit(breaker, 100.0) == breaker
    assert record(breaker, "success", 100.0, POLICY) == CLOSED
    breaker = fail(record(breaker, "success", 100.0, POLICY), 100.0, 2)
    assert breaker.state == "closed"
    breaker = fail(breaker, 100.0)
    assert breaker == Breaker("open", 3, 60.0, 160.0)
    assert record(CLOSED, "dead", 1.0, BreakerPolicy(failures=1)) == Breaker("open", 1, 60.0, 61.0)


def test_open_admits_nothing_then_one_probe() -> None:
    """Checked against: a send while paused, a probe before the pause ends, and more
    than one probe at a time."""
    breaker = fail(CLOSED, 100.0, 3)
    assert admit(breaker, 100.0) is None
    assert admit(breaker, 159.999) is None
    probing = admit(breaker, 160.0)
    assert probing == Breaker("half_open", 3, 60.0, 160.0)
    assert admit(probing, 160.0) is None
    assert admit(probing, 10_000.0) is None


def test_a_probe_that_fails_doubles_the_pause_up_to_30_minutes() -> None:
    """Checked against: a pause that stays the same, grows without a bound, or
    counts from the first opening instead of the probe's failure."""
    breaker = fail(CLOSED, 0.0, 3)
    now = 0.0
    pauses = []
    for _ in range(8):
        now = breaker.until_s
        probing = admit(breaker, now)
        assert probing is not None
        breaker = record(probing, "retry", now + 1.0, POLICY)
        assert breaker.state == "open"
        assert breaker.until_s == now + 1.0 + breaker.pause_s
        pauses.append(breaker.pause_s)
    assert pauses == [120.0, 240.0, 480.0, 960.0, 1800.0, 1800.0, 1800.0, 1800.0]


def test_a_probe_that_succeeds_closes() -> None:
    """Checked against: a success that leaves the breaker half open or keeps the
    failure count (the next failure would reopen it at once)."""
    probing = admit(fail(CLOSED, 0.0, 3), 60.0)
    assert probing is not None
    assert record(probing, "success", 61.0, POLICY) == CLOSED
    assert fail(CLOSED, 70.0, 2).state == "closed"


def test_a_late_outcome_while_open() -> None:
    """An attempt sent before the breaker opened answers while it is open.

    Checked against: a late failure restarting or doubling the pause."""
    breaker = fail(CLOSED, 100.0, 3)
    assert record(breaker, "retry", 130.0, POLICY) == breaker
    assert record(breaker, "success", 130.0, POLICY) == CLOSED


def test_a_first_pause_above_the_cap_is_the_cap() -> None:
    """Checked against: a policy built without the config's bound pausing for longer."""
    policy = BreakerPolicy(failures=1, pause_s=5000.0)
    assert record(CLOSED, "retry", 0.0, policy) == Breaker("open", 1, 1800.0, 1800.0)
