"""`rate_limited` (PROTOCOL.md, Errors): over `limits.device_rate` operations a second,
with bursts of `limits.device_burst`, per device; off by default.

The limiter refills with time; these tests set a rate so low (one operation in
1,000 s) that nothing refills while they run, so every count is exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from gateway.config import Settings
from gateway.ingest.rules import sync_limits
from handlers.ratelimit import DeviceRateLimiter
from handlers.records import OpRecord
from handlers.sync import Rejected, SyncHandler
from tests.support import Admin, Client, Daemon, Mosquitto, db_rows, send_one, stored, sync_op

DEVICE = "d1"
TOPIC = f"fg/devices/{DEVICE}/sync"
RECEIVED_AT_US = 1_790_000_000_000_000

NO_REFILL = 0.001
"""Operations a second: none comes back within a test."""

RATE_MESSAGE = "the device is over its operation rate; retry later"


def rate_limited(op_id: str | None, path: str | None = None) -> dict[str, Any]:
    error = {"code": "rate_limited", "message": RATE_MESSAGE}
    if path is not None:
        error["path"] = path
    return {"op_id": op_id, "status": "rejected", "error": error}


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
    """Past `max_devices`, buckets that have refilled are dropped: memory stays bounded
    (here they refill at once). Checked against: never evicting."""
    limiter = DeviceRateLimiter(1e12, 2, max_devices=2)
    for device in ("a", "b", "c", "d"):
        assert limiter(device, 1) == 1
    assert len(limiter._buckets) <= 2


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
    assert [(q.code, q.path, q.payload) for q in decoded.quarantine] == [
        ("schema", "ops[1].changes", raws[1]),
        ("rate_limited", "ops[3]", raws[3]),
    ]
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


def test_rate_limited_end_to_end(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    """Per device, answered and quarantined, counted as rejections; another device
    has its own bucket.

    Checked against: the limiter left out of the daemon's sync handler (all stored)."""
    daemon = make_daemon(broker.port, LIMITS__DEVICE_RATE=str(NO_REFILL), LIMITS__DEVICE_BURST="3")
    root = daemon.root
    client.subscribe(f"{root}/devices/d1/sync/ack", f"{root}/devices/d2/sync/ack")
    batch = {"batch_id": "b-5", "ops": [sync_op(f"a{i}", entity_id=f"e{i}") for i in range(5)]}
    client.publish(f"{root}/devices/d1/sync", batch)
    (ack,) = client.expect(1)
    assert ack.json() == {
        "batch_id": "b-5",
        "results": [
            stored("a0", 1),
            stored("a1", 1),
            stored("a2", 1),
            rate_limited("a3", "ops[3]"),
            rate_limited("a4", "ops[4]"),
        ],
    }
    assert send_one(client, root, "d2", sync_op("b0")) == stored("b0", 1)
    assert send_one(client, root, "d1", sync_op("a5")) == rate_limited("a5")
    assert db_rows(daemon.db_url, "select op_id from sync_log order by id") == [
        ("a0",),
        ("a1",),
        ("a2",),
        ("b0",),
    ]
    assert db_rows(daemon.db_url, "select device_id, code, path from quarantine order by id") == [
        ("d1", "rate_limited", "ops[3]"),
        ("d1", "rate_limited", "ops[4]"),
        ("d1", "rate_limited", None),
    ]
    stats = Admin(client, root).data("stats")
    assert (stats["ops"], stats["rejected_by_code"]) == (
        {"stored": 4, "duplicate": 0, "rejected": 3},
        {"rate_limited": 3},
    )
