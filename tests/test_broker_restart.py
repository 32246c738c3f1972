"""The broker restarts mid-stream: the daemon reconnects by itself and loses nothing.

The broker (persistence on) keeps the daemon's session and its queue across the
restart. The publisher stands in for devices: it reconnects and resends what the
broker never PUBACKed (a device does the same; op_id makes a resend harmless).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from gateway.mqtt.session import STABLE_S
from tests.support import (
    SPINE_ONLY,
    AckRecorder,
    Client,
    Daemon,
    Mosquitto,
    OpStream,
    db_rows,
    sync_op,
    wait_for,
)

COUNT = 2000
DEVICES = 5
ENTITIES = 17


def test_broker_restart_mid_stream(
    own_broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    daemon = make_daemon(own_broker.port, **SPINE_ONLY)
    ops = [
        (
            f"dev-{index % DEVICES}",
            sync_op(f"r{index:05d}", entity_id=f"e{index % ENTITIES}"),
        )
        for index in range(COUNT)
    ]
    acks = AckRecorder(own_broker.port, daemon.root).start()
    # The stream holds at half-way until the daemon has answered a quarter; then it
    # resumes and the broker restarts while it flows, however slow the machine.
    stream = OpStream(
        own_broker.port, daemon.root, ops, chunk=50, pause_s=0.02, holds=[COUNT // 2]
    ).start()
    try:
        wait_for(lambda: len(acks.results()) >= COUNT // 4, timeout=60, interval=0.005)
        stream.resume()
        published_at_restart = len(stream.infos)
        own_broker.restart(down_s=1)
        stream.puback_all(timeout=60)
        wait_for(
            lambda: db_rows(daemon.db_url, "select count(*) from sync_log")[0][0] >= COUNT,
            timeout=60,
            interval=0.1,
        )
    finally:
        stream.close()
        acks.close()

    assert published_at_restart < COUNT, "the restart came after the stream ended"
    # The test means something only if the broker kept its sessions across the restart.
    assert "Error saving" not in (own_broker.workdir / "mosquitto.log").read_text()
    rows = db_rows(daemon.db_url, "select op_id, entity_id, version from sync_log")
    op_counts = Counter(op_id for op_id, _, _ in rows)
    assert [op_id for op_id, n in op_counts.items() if n > 1] == []
    assert set(op_counts) == {op["op_id"] for _, op in ops}
    per_entity: dict[str, list[int]] = {}
    for _, entity_id, version in rows:
        per_entity.setdefault(entity_id, []).append(version)
    for entity_id, versions in per_entity.items():
        assert sorted(versions) == list(range(1, len(versions) + 1)), entity_id
    # Every answer that reached the recorder names the stored version.
    stored = {op_id: version for op_id, _, version in rows}
    for result in acks.results():
        assert result["status"] in {"stored", "duplicate"}, result
        assert stored[result["op_id"]] == result["version"], result

    # It reconnected by itself, once a lane, and said so on the status topic.
    connected = [line["lane"] for line in daemon.log_lines() if line["event"] == "mqtt connected"]
    assert sorted(connected) == ["priority", "priority", "sync", "sync"]
    assert [line["event"] for line in daemon.log_lines()].count("ready") == 1
    watcher = Client(own_broker.port).connect().subscribe(f"{daemon.root}/status")
    try:
        (status,) = watcher.expect(1)
    finally:
        watcher.close()
    assert status.retain
    assert json.loads(status.payload)["state"] == "online"

    # And it still serves.
    device = Client(own_broker.port).connect().subscribe(f"{daemon.root}/devices/dev-0/sync/ack")
    try:
        device.publish(f"{daemon.root}/devices/dev-0/sync", sync_op("after", entity_id="new"))
        (ack,) = device.expect(1)
    finally:
        device.close()
    assert ack.json() == {
        "batch_id": None,
        "results": [{"op_id": "after", "status": "stored", "version": 1}],
    }
    assert daemon.terminate() == 0


def test_every_broker_outage_is_retried_as_promptly_as_the_first(
    own_broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """Five broker restarts in a row: after each, the daemon's first retry waits the
    minimum (`mqtt.reconnect_min_s`), as after the first one, and it reconnects each
    time. Checked against: the attempt counter cleared only when a session ends
    without an error (a broker drop always raises), which made the retries of the
    third outage wait up to 4 x the minimum, of the fifth up to 16 x."""
    daemon = make_daemon(own_broker.port, **SPINE_ONLY)

    def events() -> list[dict[str, Any]]:
        """The sync lane's (the priority lane's session lives and retries alike)."""
        wanted = ("mqtt connected", "mqtt disconnected, reconnecting")
        return [
            line
            for line in daemon.log_lines()
            if line.get("event") in wanted and line.get("lane") == "sync"
        ]

    def connected() -> int:
        return sum(e["event"] == "mqtt connected" for e in events())

    for outage in range(5):
        own_broker.restart(down_s=1)
        wait_for(lambda: connected() == outage + 2, timeout=30)  # noqa: B023 - called here
        # Up long enough to be a real session, not a broker that drops at once.
        time.sleep(STABLE_S + 0.5)
    first_retries = [
        later["retry_in_s"]
        for earlier, later in itertools.pairwise(events())
        if earlier["event"] == "mqtt connected" and later["event"] != "mqtt connected"
    ]
    assert first_retries == [0.5] * 5
