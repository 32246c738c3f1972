"""`rate_limited` (PROTOCOL.md, Errors): over `limits.device_rate` operations a second,
with bursts of `limits.device_burst`, per device; off by default. (End to end:
tests/test_ingest.py.)

The limiter refills with time; these tests set a rate so low (one operation in
1,000 s) that nothing refills while they run, so every count is exact.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.config import Settings
from gateway.ingest.rules import sync_limits
from handlers.errors import Code, Error
from handlers.ratelimit import DeviceRateLimiter
from handlers.records import OpRecord, QuarantineRecord
from handlers.sync import Rejected, SyncHandler
from tests.support import sync_op

DEVICE = "d1"
TOPIC = f"fg/devices/{DEVICE}/sync"
RECEIVED_AT_US = 1_790_000_000_000_000

NO_REFILL = 0.001
"""Operations a second: none comes back within a test."""

RATE_MESSAGE = "the device is over its operation rate; retry later"


def test_a_burst_then_nothing_per_device() -> None:
    """Checked against: one bucket shared by every device (d2 would get 0)."""
    limiter = DeviceRateLimiter(NO_REFILL, 3)
    assert limiter("d1", 2) == 2
    assert limiter("d1", 2) == 1
    assert limiter("d1", 5) == 0
    assert limiter("d2", 5) == 3
    assert limiter("d2", 1) == 0


def test_a_rate_of_zero_is_off() -> None:
    limiter = DeviceRateLimiter(0, 1)
    assert [limiter("d1", 1000) for _ in range(3)] == [1000] * 3


def test_buckets_refill_at_the_rate() -> None:
    """At a rate no test can outrun, a spent bucket is full again at the next call."""
    limiter = DeviceRateLimiter(1e12, 2)
    assert [limiter("d1", 5) for _ in range(3)] == [2, 2, 2]


def test_full_buckets_are_forgotten_past_max_devices() -> None:
    """At `max_devices` buckets, a new device first drops those that have refilled
    (here, at once): memory stays bounded. Checked against: never evicting, and
    evicting only past `max_devices`."""
    limiter = DeviceRateLimiter(1e12, 2, max_devices=2)
    sizes = []
    for device in ("a", "b", "c", "d", "d"):
        assert limiter(device, 1) == 1
        sizes.append(sorted(limiter._buckets))
    assert sizes == [["a"], ["a", "b"], ["c"], ["c", "d"], ["c", "d"]]
    assert DeviceRateLimiter(1, 1).max_devices == 100_000


def test_a_bucket_not_yet_full_is_kept_past_max_devices() -> None:
    """Checked against: evicting every bucket (d1 would get its burst back)."""
    limiter = DeviceRateLimiter(NO_REFILL, 2, max_devices=1)
    assert limiter("d1", 2) == 2
    assert limiter("d2", 2) == 2
    assert limiter("d1", 2) == 0


def test_the_last_operations_of_a_batch_are_refused_and_quarantined() -> None:
    """The surplus is the batch's last accepted operations; an op already rejected
    keeps its own error and takes no token.

    Checked against: refusing the first operations instead of the last; a schema
    rejection counted against the burst; the surplus not quarantined."""
    handler = SyncHandler(sync_limits(Settings()), DeviceRateLimiter(NO_REFILL, 2))
    ops: list[Any] = [sync_op(f"o{i}", entity_id=f"t{i}") for i in range(4)]
    ops[1] = sync_op("o1", changes={})
    raws = [json.dumps(op).encode() for op in ops]
    payload = b'{"batch_id": "b-1", "ops": [' + b", ".join(raws) + b"]}"
    decoded = handler.decode(TOPIC, DEVICE, payload, RECEIVED_AT_US)
    assert [type(item).__name__ for item in decoded.items] == [
        "OpRecord",
        "Rejected",
        "OpRecord",
        "Rejected",
    ]
    assert [item.op_id for item in decoded.items] == ["o0", "o1", "o2", "o3"]
    (refused,) = [item for item in decoded.items[3:] if isinstance(item, Rejected)]
    assert refused.error.as_dict() == {
        "code": "rate_limited",
        "message": RATE_MESSAGE,
        "path": "ops[3]",
    }
    assert decoded.batch_id == "b-1"
    assert [(q.code, q.path, q.payload) for q in decoded.quarantine] == [
        ("schema", "ops[1].changes", raws[1]),
        ("rate_limited", "ops[3]", raws[3]),
    ]
    assert decoded.quarantine[1] == QuarantineRecord(
        received_at_us=RECEIVED_AT_US,
        topic=TOPIC,
        device_id=DEVICE,
        kind="sync",
        code="rate_limited",
        message=RATE_MESSAGE,
        path="ops[3]",
        payload=raws[3],
        payload_bytes=len(raws[3]),
    )
    assert [r.op_id for r in decoded.records if isinstance(r, OpRecord)] == ["o0", "o2"]
    # The bucket is empty: the next single op is refused whole, without a path.
    single = json.dumps(sync_op("o4")).encode()
    again = handler.decode(TOPIC, DEVICE, single, RECEIVED_AT_US)
    assert [(item.op_id, item.error.as_dict()) for item in again.items] == [  # type: ignore[union-attr]
        ("o4", {"code": "rate_limited", "message": RATE_MESSAGE})
    ]
    assert [(q.code, q.path, q.payload) for q in again.quarantine] == [
        ("rate_limited", None, single)
    ]


def test_the_handler_keeps_a_bucket_per_device() -> None:
    """Checked against: the handler asking the limiter without the device's id."""
    handler = SyncHandler(sync_limits(Settings()), DeviceRateLimiter(NO_REFILL, 1))
    for device in ("d1", "d2"):
        decoded = handler.decode(
            f"fg/devices/{device}/sync", device, json.dumps(sync_op("o")).encode(), 0
        )
        assert [type(item).__name__ for item in decoded.items] == ["OpRecord"]


def test_a_batch_of_one_refused_is_named_by_its_path() -> None:
    handler = SyncHandler(sync_limits(Settings()), DeviceRateLimiter(NO_REFILL, 1))
    first = json.dumps(sync_op("o0")).encode()
    assert [r.op_id for r in handler.decode(TOPIC, DEVICE, first, 0).records] == ["o0"]
    batch = json.dumps({"batch_id": "b-1", "ops": [sync_op("o1")]}).encode()
    (item,) = handler.decode(TOPIC, DEVICE, batch, 0).items
    assert item == Rejected("o1", Error(Code.RATE_LIMITED, RATE_MESSAGE, "ops[0]"))
