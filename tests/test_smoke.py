"""The spine end to end: a daemon process, a broker, a device, one stored operation."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from tests.support import Client, Daemon, Mosquitto, sync_op


def test_operation_is_stored_and_acked(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port)
    root = daemon.root
    client.subscribe(f"{root}/devices/d1/sync/ack")
    client.publish(f"{root}/devices/d1/sync", sync_op("op-1"))
    (ack,) = client.expect(1)
    assert ack.json() == {
        "batch_id": None,
        "results": [{"op_id": "op-1", "status": "stored", "version": 1}],
    }
    db = daemon.db_url.split("///", 1)[1]
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "select op_id, device_id, entity_type, entity_id, version from sync_log"
        ).fetchall()
    assert rows == [("op-1", "d1", "task", "t1", 1)]
    assert daemon.terminate() == 0
