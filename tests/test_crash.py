"""SIGKILL mid-stream: what was acked is stored, and what was sent is stored once.

The daemon's persistent session lets the broker keep what the daemon had not
PUBACKed when it died, and queue what arrives while it is down; the restarted
daemon must store all of it exactly once, with gapless versions per entity.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import (
    SPINE_ONLY,
    AckRecorder,
    Client,
    Daemon,
    Mosquitto,
    OpStream,
    counter_ops,
    db_rows,
    kill_marks,
    queue_for,
    sync_op,
    wait_for,
)

COUNT = 3000
DEVICES = 7
ENTITIES = 23


def stream_ops(count: int, prefix: str) -> list[tuple[str, dict[str, Any]]]:
    return counter_ops(count, prefix, DEVICES, ENTITIES)


def stored_count(daemon: Daemon) -> int:
    return int(db_rows(daemon.db_url, "select count(*) from sync_log")[0][0])


def assert_versions_gapless(db_url: str) -> dict[str, int]:
    """Per entity, the versions are exactly 1..k, and the entity row says k."""
    rows = db_rows(db_url, "select entity_id, version from sync_log")
    per_entity: dict[str, list[int]] = {}
    for entity_id, version in rows:
        per_entity.setdefault(entity_id, []).append(version)
    for entity_id, versions in per_entity.items():
        assert sorted(versions) == list(range(1, len(versions) + 1)), entity_id
    entities = dict(db_rows(db_url, "select entity_id, version from entities"))
    assert entities == {entity_id: len(v) for entity_id, v in per_entity.items()}
    return entities


def assert_stored_once(daemon: Daemon, ops: list[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    """Every op is in sync_log exactly once; returns op_id -> version."""
    rows = db_rows(daemon.db_url, "select op_id, version from sync_log")
    op_counts = Counter(op_id for op_id, _ in rows)
    assert [op_id for op_id, n in op_counts.items() if n > 1] == []
    assert set(op_counts) == {op["op_id"] for _, op in ops}
    assert len(rows) == len(ops)
    return dict(rows)


@pytest.mark.parametrize(
    ("count", "kills"),
    [
        pytest.param(COUNT, 2, id="2-kills"),
        pytest.param(30_000, 10, id="soak-10-kills", marks=pytest.mark.slow),
    ],
)
def test_sigkill_mid_stream_loses_nothing_and_stores_once(
    own_broker: Mosquitto, make_daemon: Callable[..., Daemon], count: int, kills: int
) -> None:
    daemon = make_daemon(own_broker.port, **SPINE_ONLY)
    ops = stream_ops(count, "k")
    acks = AckRecorder(own_broker.port, daemon.root).start()
    # The stream holds before each kill's mark: the daemon answers what it has at its
    # own pace, then the stream resumes and the kill lands while it flows.
    marks = kill_marks(count, kills)
    holds = [hold for _, hold in marks]
    stream = OpStream(
        own_broker.port, daemon.root, ops, chunk=100, pause_s=0.02, holds=holds
    ).start()
    acked_before_kill: dict[str, int] = {}
    published_at_kill: list[int] = []
    try:
        # Kill while the stream flows, restarting at once each time.
        for threshold, _ in marks:

            def answered(at_least: int = threshold) -> bool:
                return len({r["op_id"] for r in acks.results()}) >= at_least

            wait_for(answered, timeout=60, interval=0.005)
            stream.resume()
            daemon.kill()
            published_at_kill.append(len(stream.infos))
            acked_before_kill.update({r["op_id"]: r["version"] for r in acks.results()})
            daemon.start()
        # The broker was up all along: it PUBACKed every op without a republish.
        assert stream.puback_all(timeout=60) == 0
        wait_for(lambda: stored_count(daemon) >= count, timeout=120, interval=0.1)
        wait_for(lambda: len({r["op_id"] for r in acks.results()}) >= count, timeout=60)
    finally:
        stream.close()
        acks.close()

    assert published_at_kill[-1] < count, "the last kill came after the stream ended"
    stored = assert_stored_once(daemon, ops)
    # Acked before a kill: stored, once, with the version that was promised.
    assert len(acked_before_kill) >= marks[-1][0]
    for op_id, version in acked_before_kill.items():
        assert stored[op_id] == version, op_id
    # Every op was answered, with its stored version; none was answered `stored` twice.
    results = acks.results()
    for result in results:
        assert result["status"] in {"stored", "duplicate"}, result
        assert stored[result["op_id"]] == result["version"], result
    assert {r["op_id"] for r in results} == set(stored)
    stored_answers = Counter(r["op_id"] for r in results if r["status"] == "stored")
    assert [op_id for op_id, n in stored_answers.items() if n > 1] == []
    entities = assert_versions_gapless(daemon.db_url)
    assert sum(entities.values()) == count
    assert daemon.log().count('"event": "ready"') == kills + 1
    assert daemon.terminate() == 0


def test_backlog_queued_while_down_is_stored_once(
    own_broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """What the broker queued for the stopped daemon is stored once it is back."""
    daemon = make_daemon(own_broker.port, **SPINE_ONLY)
    assert daemon.terminate() == 0
    ops = stream_ops(2000, "q")
    queue_for(own_broker.port, daemon.root, ops)
    acks = AckRecorder(own_broker.port, daemon.root).start()
    try:
        daemon.start()
        wait_for(lambda: stored_count(daemon) >= len(ops), timeout=60, interval=0.1)
        wait_for(lambda: len({r["op_id"] for r in acks.results()}) >= len(ops), timeout=30)
        results = acks.results()
    finally:
        acks.close()
    stored = assert_stored_once(daemon, ops)
    assert [r for r in results if r["status"] != "stored"] == []
    assert sorted((r["op_id"], r["version"]) for r in results) == sorted(stored.items())
    assert_versions_gapless(daemon.db_url)


def test_a_backlog_over_the_in_process_limit_does_not_break_the_session(
    own_broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """Starting into a backlog that fills `writer.max_in_process` before the SUBACK.

    The broker resumes the persistent session by sending what it queued right
    after the CONNACK, ahead of its answer to the gateway's SUBSCRIBE. Pausing
    the socket then, while the database cannot commit (here: another process
    holds its write lock for 12 s), left the SUBACK unread: the subscribe timed
    out after 10 s, the session was torn down and rebuilt, and every message in
    flight came back as a duplicate (seen on every drain benchmark of 30,000).
    """
    daemon = make_daemon(
        own_broker.port,
        WRITER__MAX_IN_PROCESS="100",
        MQTT__RECEIVE_MAXIMUM="1000",
        LOG__LEVEL="debug",
        **SPINE_ONLY,
    )
    assert daemon.terminate() == 0
    ops = stream_ops(2000, "s")
    queue_for(own_broker.port, daemon.root, ops)
    acks = AckRecorder(own_broker.port, daemon.root).start()
    lock = sqlite3.connect(daemon.db_url.split("///", 1)[1], isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        daemon.start(wait_ready=False)
        wait_for(lambda: "intake paused" in daemon.log(), timeout=30)
        time.sleep(12)
        lock.execute("COMMIT")
        wait_for(lambda: len({r["op_id"] for r in acks.results()}) >= len(ops), timeout=60)
        results = acks.results()
    finally:
        lock.close()
        acks.close()
    stored = assert_stored_once(daemon, ops)
    assert [r for r in results if r["status"] != "stored"] == []
    assert sorted((r["op_id"], r["version"]) for r in results) == sorted(stored.items())
    assert "mqtt disconnected" not in daemon.log()
    assert daemon.terminate() == 0


def test_backlog_is_pubacked_so_a_restart_redelivers_nothing(
    own_broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """Every message the daemon answered was PUBACKed: the broker has nothing to redeliver.

    A message stored and answered but never PUBACKed stays in flight at the broker
    (whose in-flight window is bounded: enough of them stall intake) and comes back
    as a duplicate on the next connection. Redelivery comes before new messages, so
    once a sentinel published after the restart is answered, any would have shown.
    Small commits make the first ones land while the backlog is still being read.
    """
    daemon = make_daemon(
        own_broker.port, WRITER__MAX_MESSAGES="10", WRITER__MAX_WAIT_MS="0", **SPINE_ONLY
    )
    assert daemon.terminate() == 0
    ops = stream_ops(2000, "p")
    queue_for(own_broker.port, daemon.root, ops)
    acks = AckRecorder(own_broker.port, daemon.root).start()
    try:
        daemon.start()
        wait_for(lambda: len({r["op_id"] for r in acks.results()}) >= len(ops), timeout=60)
        assert daemon.terminate() == 0
        answered = len(acks.results())
        daemon.start()
        sentinel = Client(own_broker.port).connect()
        try:
            sentinel.publish(
                f"{daemon.root}/devices/dev-0/sync", sync_op("sentinel", entity_id="s")
            )
        finally:
            sentinel.close()
        wait_for(lambda: any(r["op_id"] == "sentinel" for r in acks.results()), timeout=30)
        after_restart = acks.results()[answered:]
    finally:
        acks.close()
    assert_stored_once(daemon, [*ops, ("dev-0", sync_op("sentinel"))])
    assert [r["op_id"] for r in after_restart] == ["sentinel"]
