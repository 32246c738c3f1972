"""Flood control (issue 15, item 2): one device far over `limits.device_rate` while
others publish within theirs, end to end: a daemon process, the session broker.

The limiter refills with time; the rate here is so low (one operation in 1,000 s,
as in tests/test_rate_limit.py) that nothing refills while the test runs: a
device's budget is its burst, and every count is exact. The latency half of the
item (the others' ack p99 within twice its value without the flood) is measured
by benchmarks/flood.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from tests.support import (
    AckRecorder,
    Admin,
    Client,
    Daemon,
    Mosquitto,
    OpStream,
    db_rows,
    free_port,
    stored,
    sync_op,
    wait_for,
)
from tests.test_metrics import scrape, value

NO_REFILL = "0.001"
"""Operations a second: none comes back within a test."""
BURST = 5
NORMAL_DEVICES = 8
NORMAL_OPS = BURST - 1
"""Each normal device stays within its budget, by one."""
FLOODER = "flood-1"
FLOOD_SINGLES = 9 * BURST
FLOOD_BATCH = BURST
"""The flooder sends ten times its budget: singles, then one batch, all refused."""
RATE_MESSAGE = "the device is over its operation rate; retry later"


def rate_limited(op_id: str, path: str | None = None) -> dict[str, Any]:
    error = {"code": "rate_limited", "message": RATE_MESSAGE}
    if path is not None:
        error["path"] = path
    return {"op_id": op_id, "status": "rejected", "error": error}


def normal_ops() -> list[tuple[str, dict[str, Any]]]:
    """Round-robin over the devices, each op on an entity of its own (version 1)."""
    return [
        (f"dev-{d}", sync_op(f"n{d}-{i}", entity_id=f"n{d}-{i}"))
        for i in range(NORMAL_OPS)
        for d in range(NORMAL_DEVICES)
    ]


def flood_ops() -> list[tuple[str, dict[str, Any]]]:
    singles = [(FLOODER, sync_op(f"f{i:02d}", entity_id=f"f{i:02d}")) for i in range(FLOOD_SINGLES)]
    batch = {
        "batch_id": "fb",
        "ops": [sync_op(f"fb{i}", entity_id=f"fb{i}") for i in range(FLOOD_BATCH)],
    }
    return [*singles, (FLOODER, batch)]


def test_a_flooding_device_is_refused_past_its_budget_and_the_others_lose_nothing(
    broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """Eight devices within their budget and one at ten times it, publishing at once
    on two connections: every op of the eight is stored once and answered `stored`;
    the flooder's first BURST ops (in its publishing order) are stored, every other
    one is answered `rate_limited`, quarantined, counted, not stored; and each was
    PUBACKed: after a SIGKILL and a restart (the buckets start full again, so a
    redelivered op would now be stored), nothing comes back.

    Checked against: the limiter left out of the daemon's sync handler (f05 on
    stored), and payloads refused whole answered but never marked done (the wait
    for nothing held times out; without that wait, the restart redelivers them
    and f05 is stored)."""
    metrics_port = free_port()
    daemon = make_daemon(
        broker.port,
        LIMITS__DEVICE_RATE=NO_REFILL,
        LIMITS__DEVICE_BURST=str(BURST),
        METRICS__LISTEN=f"127.0.0.1:{metrics_port}",
    )
    root = daemon.root
    normal, flood = normal_ops(), flood_ops()
    flood_singles = [op["op_id"] for _, op in flood[:-1]]
    flood_batch = [op["op_id"] for op in flood[-1][1]["ops"]]
    recorder = AckRecorder(broker.port, root).start()
    admin_client = Client(broker.port).connect()
    streams = [OpStream(broker.port, root, ops, chunk=10, pause_s=0.005) for ops in (normal, flood)]
    try:
        for stream in streams:
            stream.start()
        for stream in streams:
            assert stream.puback_all() == 0
        expected = len(normal) + len(flood_singles) + len(flood_batch)
        wait_for(lambda: len(recorder.results()) >= expected, timeout=30)
        admin = Admin(admin_client, root)

        # Answered: each op once, the others' all stored.
        results = recorder.results()
        assert len(results) == expected, results
        by_op = {r["op_id"]: r for r in results}
        assert len(by_op) == expected
        assert {op["op_id"]: by_op[op["op_id"]] for _, op in normal} == {
            op["op_id"]: stored(op["op_id"], 1) for _, op in normal
        }
        # The flooder: its burst stored, the rest refused; the batch's by their paths.
        assert [by_op[op_id] for op_id in flood_singles] == [
            stored(op_id, 1) for op_id in flood_singles[:BURST]
        ] + [rate_limited(op_id) for op_id in flood_singles[BURST:]]
        assert [by_op[op_id] for op_id in flood_batch] == [
            rate_limited(op_id, f"ops[{i}]") for i, op_id in enumerate(flood_batch)
        ]

        # Stored once: the others' ops and the flooder's burst, nothing more.
        rows = db_rows(daemon.db_url, "select op_id, device_id from sync_log")
        assert [op_id for op_id, n in Counter(op_id for op_id, _ in rows).items() if n > 1] == []
        assert sorted(rows) == sorted(
            [(op["op_id"], device) for device, op in normal]
            + [(op_id, FLOODER) for op_id in flood_singles[:BURST]]
        )
        # Quarantined: the refused ones alone, under the flooder's id.
        refused = len(flood_singles) - BURST + len(flood_batch)
        quarantine = db_rows(
            daemon.db_url, "select device_id, code, path from quarantine order by id"
        )
        assert Counter(quarantine) == Counter(
            [(FLOODER, "rate_limited", None)] * (len(flood_singles) - BURST)
            + [(FLOODER, "rate_limited", f"ops[{i}]") for i in range(FLOOD_BATCH)]
        )
        # Counted: in stats and in the metrics, by code.
        stats = admin.data("stats")
        assert (stats["ops"], stats["rejected_by_code"]) == (
            {"stored": len(normal) + BURST, "duplicate": 0, "rejected": refused},
            {"rate_limited": refused},
        )
        _, samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert value(samples, "fieldgate_rejected_total", code="rate_limited") == refused

        # Nothing held: every message PUBACKed (a SIGKILL now loses no PUBACK).
        def nothing_held() -> bool:
            queues = admin.data("stats")["queues"]
            return (queues["in_flight"], queues["pending_commit"]) == (0, 0)

        wait_for(nothing_held)
        daemon.kill()
        answered = len(recorder.results())
        daemon.start()
        # Redelivery comes before new messages: any would be answered before this.
        admin_client.publish(f"{root}/devices/{FLOODER}/sync", sync_op("sentinel", entity_id="s"))
        wait_for(lambda: any(r["op_id"] == "sentinel" for r in recorder.results()))
        assert recorder.results()[answered:] == [stored("sentinel", 1)]
        assert len(db_rows(daemon.db_url, "select op_id from sync_log")) == len(rows) + 1
    finally:
        for stream in streams:
            stream.close()
        admin_client.close()
        recorder.close()
