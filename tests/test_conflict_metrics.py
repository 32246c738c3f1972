"""Conflict series on the Prometheus endpoint and in `stats`, moved by a real merge.

Two devices collide on a task's title (a conflict), two more on its notes (a
second one), a fifth edits both and bridges them: the older absorbs the newer.
The series count what happened, exactly: two detections (by severity at
detection), five operations that joined, one merge; `stats` counts the one
conflict left standing and its five members.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from tests.support import Client, Daemon, Mosquitto, free_port, send_one, sync_op, wait_for
from tests.test_metrics import scrape, value

EDITS: list[tuple[str, str, dict[str, Any]]] = [
    ("d1", "12:00:00", {"title": {"old": "a", "new": "b"}}),
    ("d2", "12:00:10", {"title": {"old": "a", "new": "c"}}),
    ("d3", "12:00:20", {"notes": {"old": "n", "new": "m"}}),
    ("d4", "12:00:30", {"notes": {"old": "n", "new": "o"}}),
    ("d5", "12:00:40", {"title": {"old": "a", "new": "d"}, "notes": {"old": "n", "new": "p"}}),
]


def judged_up_to(url: str, n: int) -> bool:
    return bool(value(scrape(url)[1], "fieldgate_conflict_judged_operations_total") == n)


def test_conflict_series_and_stats(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    port = free_port()
    daemon = make_daemon(broker.port, METRICS__LISTEN=f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/metrics"
    types, before = scrape(url)
    assert {n: t for n, t in types.items() if "conflict" in n and not n.endswith("_created")} == {
        "fieldgate_conflicts": "counter",
        "fieldgate_conflict_members": "counter",
        "fieldgate_conflict_merges": "counter",
        "fieldgate_conflicts_resolved": "counter",
        "fieldgate_conflict_judged_operations": "counter",
    }
    assert value(before, "fieldgate_conflict_members_total") == 0

    client.subscribe(f"{daemon.root}/devices/+/sync/ack")
    judged = "fieldgate_conflict_judged_operations_total"
    for n, (device, at, changes) in enumerate(EDITS, start=1):
        op = sync_op(f"op-{n}", changes=changes, edited_at=f"2026-11-29T{at}Z")
        assert send_one(client, daemon.root, device, op)["status"] == "stored"
        # judged after the ack: one at a time, so that two conflicts exist to be merged
        wait_for(partial(judged_up_to, url, n))

    after = scrape(url)[1]
    assert {
        key: v
        for key, v in after.items()
        if key[0].startswith("fieldgate_conflict") and not key[0].endswith("_created")
    } == {
        ("fieldgate_conflicts_total", (("severity", "low"),)): 2.0,
        ("fieldgate_conflict_members_total", ()): 5.0,
        ("fieldgate_conflict_merges_total", ()): 1.0,
        ("fieldgate_conflicts_resolved_total", ()): 0.0,
        (judged, ()): 5.0,
    }

    client.subscribe(f"{daemon.root}/admin/response/stats")
    client.publish(f"{daemon.root}/admin/request/stats", {"transaction": "s"})
    wait_for(lambda: [m for m in list(client.all) if m.topic.endswith("/response/stats")])
    (answer,) = [m.json() for m in client.all if m.topic.endswith("/response/stats")]
    assert (answer["data"]["conflicts"], answer["data"]["conflict_members"]) == ({"low": 1}, 5)
