"""Fill a database with fieldgate v1 (pair conflicts) and dump it: tests/data/v1_conflicts.json.

Not run by the suite: it made the fixture that tests/test_migration_v1.py
migrates, and stays so that the fixture can be made again. It needs a checkout
of v1 (any commit before 4b81cce, e.g. `git worktree add /tmp/v1 033e51d`) and a
broker on 127.0.0.1:1883:

    python tests/data/fill_v1.py /tmp/v1 > tests/data/v1_conflicts.json

It runs v1's own daemon on a fresh SQLite file, publishes the scenario below from
several devices, resolves two pairs with v1's `conflicts/resolve`, stops the
daemon, and dumps the rows the migration reads (sync_log, entities, conflicts).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TABLES = ("sync_log", "entities", "conflicts")


def op(op_id: str, kind: str, entity: str, user: str, at: str, **changes: Any) -> dict[str, Any]:
    return {
        "op_id": op_id,
        "user_id": user,
        "entity_type": kind,
        "entity_id": entity,
        "operation": "delete" if changes.pop("delete", False) else "update",
        "changes": {k: {"old": old, "new": new} for k, (old, new) in changes.items()},
        "edited_at": f"2026-11-29T{at}Z",
    }


SCENARIO: list[tuple[str, dict[str, Any]]] = [
    # one pair, automatic (last writer wins)
    ("d1", op("single-1", "task", "t-single", "u1", "12:00:00", title=("a", "b"))),
    ("d2", op("single-2", "task", "t-single", "u2", "12:00:30", title=("a", "c"))),
    # one pair (asset: manual), resolved by an operator below
    ("d1", op("resolved-1", "asset", "a-resolved", "u1", "12:00:00", location=("x", "y"))),
    ("d2", op("resolved-2", "asset", "a-resolved", "u2", "12:00:40", location=("x", "z"))),
    # a chain of three: three pairs, one group
    ("d1", op("chain-1", "task", "t-chain", "u1", "12:00:00", title=("a", "b"))),
    ("d2", op("chain-2", "task", "t-chain", "u2", "12:01:00", title=("a", "c"))),
    ("d3", op("chain-3", "task", "t-chain", "u3", "12:02:00", title=("a", "d"))),
    # a bridge: 1 and 2 do not collide, 3 collides with both
    ("d1", op("bridge-1", "task", "t-bridge", "u1", "12:00:00", title=("a", "b"))),
    ("d2", op("bridge-2", "task", "t-bridge", "u2", "12:00:10", notes=("n", "m"))),
    (
        "d3",
        op("bridge-3", "task", "t-bridge", "u3", "12:00:20", title=("a", "c"), notes=("n", "o")),
    ),
    # update against delete: critical, open for an operator
    ("d1", op("del-1", "work_order", "wo-del", "u1", "12:00:00", status=("open", "done"))),
    ("d2", op("del-2", "work_order", "wo-del", "u2", "12:00:05", delete=True)),
    # two pairs on one manual asset: the first resolved before the third op arrives
    ("d1", op("mixed-1", "asset", "a-mixed", "u1", "12:00:00", location=("x", "y"))),
    ("d2", op("mixed-2", "asset", "a-mixed", "u2", "12:00:20", location=("x", "z"))),
    ("resolve", {"entity_id": "a-mixed", "winner_op_id": "mixed-1"}),
    ("d3", op("mixed-3", "asset", "a-mixed", "u3", "12:00:40", location=("x", "w"))),
    ("resolve", {"entity_id": "a-resolved", "winner_op_id": "resolved-2"}),
    # no conflict at all: one device, or far apart in time
    ("d1", op("alone-1", "task", "t-alone", "u1", "12:00:00", title=("a", "b"))),
    ("d2", op("alone-2", "task", "t-alone", "u2", "13:00:00", title=("b", "c"))),
]


def main(v1: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="fieldgate-v1-"))
    db = work / "v1.db"
    root = f"fgv1{uuid.uuid4().hex[:6]}"
    (work / "fieldgate.toml").write_text('[conflicts.types.asset]\nstrategy = "manual"\n')
    env = {
        **os.environ,
        "FIELDGATE_MQTT__TOPIC_ROOT": root,
        "FIELDGATE_MQTT__CLIENT_ID": root,
        "FIELDGATE_DATABASE__URL": f"sqlite+aiosqlite:///{db}",
        "FIELDGATE_LOG__FORMAT": "json",
    }
    python = str(v1 / ".venv/bin/python") if (v1 / ".venv").exists() else sys.executable
    daemon = subprocess.Popen(
        [python, "-m", "gateway", "run", "--config", str(work / "fieldgate.toml")],
        cwd=v1,
        env=env,
        stdout=(work / "daemon.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    replies: list[dict[str, Any]] = []
    acks: list[str] = []

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        if msg.topic.endswith("/sync/ack"):
            acks.extend(r["op_id"] for r in body["results"] if r["status"] == "stored")
        else:
            replies.append(body)

    client.on_message = on_message
    client.connect("127.0.0.1", 1883)
    client.subscribe(f"{root}/devices/+/sync/ack", qos=1)
    client.subscribe(f"{root}/test/reply", qos=1)
    client.loop_start()
    try:
        _wait(lambda: db.exists() and "ready" in (work / "daemon.log").read_text())
        for device, body in SCENARIO:
            if device == "resolve":
                _resolve(client, db, root, body, replies)
                continue
            client.publish(f"{root}/devices/{device}/sync", json.dumps(body), qos=1)
            _wait(lambda body=body: body["op_id"] in acks)
    finally:
        client.loop_stop()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    json.dump(_dump(db), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


def _resolve(
    client: mqtt.Client, db: Path, root: str, body: dict[str, Any], replies: list[dict[str, Any]]
) -> None:
    with sqlite3.connect(db) as conn:
        (conflict_id,) = conn.execute(
            "SELECT conflict_id FROM conflicts WHERE entity_id = ? AND status = 'open'",
            (body["entity_id"],),
        ).fetchone()
    request = {
        "transaction": uuid.uuid4().hex,
        "conflict_id": conflict_id,
        "winner_op_id": body["winner_op_id"],
        "by": "ops-anna",
    }
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = f"{root}/test/reply"
    client.publish(
        f"{root}/admin/request/conflicts/resolve", json.dumps(request), qos=1, properties=props
    )
    _wait(
        lambda: any(
            r.get("transaction") == request["transaction"] and r.get("status") != "accepted"
            for r in replies
        )
    )
    (answer,) = [
        r
        for r in replies
        if r["transaction"] == request["transaction"] and r["status"] != "accepted"
    ]
    if answer["status"] != "ok":
        raise SystemExit(f"conflicts/resolve: {answer}")


def _dump(db: Path) -> dict[str, Any]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        out: dict[str, Any] = {"revision": revision}
        for table in TABLES:
            out[table] = [dict(row) for row in conn.execute(f"SELECT * FROM {table} ORDER BY 1")]
    return out


def _wait(ready: Any, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > end:
            raise SystemExit("timed out")
        time.sleep(0.02)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
