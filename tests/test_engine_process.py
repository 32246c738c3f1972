"""The two processes: the engine's death, the MQTT process's death, and the stop.

The engine process (gateway/ingest/process.py) does the work on payloads; the
MQTT process owns it (gateway/mqtt/engine_process.py). Each test kills one of
them for real, with SIGKILL, and checks what the devices were told against
what is stored.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support import (
    SPINE_ONLY,
    AckRecorder,
    Admin,
    Client,
    Daemon,
    Mosquitto,
    NotifySocket,
    OpStream,
    PostgresServer,
    counter_ops,
    db_rows,
    kill_marks,
    results_of,
    sync_op,
    wait_for,
)

DEVICES = 5
ENTITIES = 17


def stream_ops(count: int, prefix: str) -> list[tuple[str, dict[str, Any]]]:
    return counter_ops(count, prefix, DEVICES, ENTITIES)


def engines(daemon: Daemon) -> list[int]:
    """The pids of the engine processes the daemon started, in order (its log)."""
    return [
        int(line["pid"])
        for line in daemon.log_lines()
        if line.get("event") == "engine process serving"
    ]


def deaths(daemon: Daemon) -> list[str]:
    return [
        str(line["how"])
        for line in daemon.log_lines()
        if line.get("event") == "engine process died"
    ]


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as gone: it exited)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def answered(acks: AckRecorder) -> int:
    return len({r["op_id"] for r in acks.results()})


def kill_engine(daemon: Daemon) -> int:
    (*_, pid) = engines(daemon)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_the_engine_killed_mid_stream_loses_nothing_and_stores_once(
    own_broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """SIGKILL of the engine twice while ops flow: the MQTT process keeps its session
    (one `ready`, no reconnect), starts a new engine each time, gives it everything
    not yet committed, and every op is stored once and answered with its version.

    Checked against: acking a delivery when it is sent to the engine instead of
    when its commit is reported (ops acked before a kill are then missing), and not
    giving the new engine what the dead one held (the stream never completes)."""
    count, kills = 3000, 2
    daemon = make_daemon(own_broker.port, **SPINE_ONLY)
    ops = stream_ops(count, "x")
    acks = AckRecorder(own_broker.port, daemon.root).start()
    marks = kill_marks(count, kills)
    stream = OpStream(
        own_broker.port, daemon.root, ops, chunk=100, pause_s=0.02, holds=[h for _, h in marks]
    ).start()
    acked_before_kill: dict[str, int] = {}
    killed: list[int] = []
    try:
        for threshold, _ in marks:
            wait_for(lambda: answered(acks) >= threshold, timeout=60)  # noqa: B023
            stream.resume()
            killed.append(kill_engine(daemon))
            acked_before_kill.update({r["op_id"]: r["version"] for r in acks.results()})
            wait_for(lambda: len(engines(daemon)) > len(killed), timeout=30)
        assert stream.puback_all(timeout=60) == 0
        wait_for(lambda: answered(acks) >= count, timeout=120)
    finally:
        stream.close()
        acks.close()

    rows = db_rows(daemon.db_url, "select op_id, version from sync_log")
    assert len(rows) == count
    stored = dict(rows)
    assert set(stored) == {op["op_id"] for _, op in ops}
    for op_id, version in acked_before_kill.items():
        assert stored[op_id] == version, op_id
    results = acks.results()
    for result in results:
        assert result["status"] in {"stored", "duplicate"}, result
        assert stored[result["op_id"]] == result["version"], result
    stored_answers = Counter(r["op_id"] for r in results if r["status"] == "stored")
    assert [op_id for op_id, n in stored_answers.items() if n > 1] == []
    per_entity: dict[str, list[int]] = {}
    for entity_id, version in db_rows(daemon.db_url, "select entity_id, version from sync_log"):
        per_entity.setdefault(entity_id, []).append(version)
    assert all(sorted(v) == list(range(1, len(v) + 1)) for v in per_entity.values())

    assert deaths(daemon) == ["was killed by signal 9"] * kills
    started = engines(daemon)
    assert len(started) == kills + 1 and started[:kills] == killed
    assert not any(running(pid) for pid in killed)
    assert daemon.log().count('"event": "ready"') == 1  # the MQTT process lived on
    assert daemon.log().count('"event": "mqtt connected"') == 2  # one a lane
    assert daemon.terminate() == 0
    assert not running(started[-1])


def test_health_says_the_engine_is_restarting_and_recovers(
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    healthy: dict[str, Any],
) -> None:
    """While the engine is down the daemon is unhealthy and says why; what arrives
    meanwhile is stored by the next engine; then health is whole again.

    Checked against: health reading only the database (it stays up), and the
    engine's restart not clearing `down`."""
    daemon = make_daemon(broker.port, **SPINE_ONLY)
    root = daemon.root
    ack = f"{root}/devices/d1/sync/ack"
    client.subscribe(ack)
    admin = Admin(client, root)
    assert admin.data("health") == healthy
    kill_engine(daemon)
    wait_for(lambda: deaths(daemon), timeout=10, interval=0.01)
    # The next engine starts after a pause of at least 0.5 s: ask now.
    data = admin.data("health")
    assert data == {
        **healthy,
        "healthy": False,
        "checks": {
            **healthy["checks"],
            "engine": {
                "ok": False,
                "detail": "restarting: the engine process was killed by signal 9",
            },
        },
    }
    client.publish(f"{root}/devices/d1/sync", sync_op("while-down"))
    assert wait_for(lambda: results_of(client.on(ack)), timeout=30) == [
        {"op_id": "while-down", "status": "stored", "version": 1}
    ]
    wait_for(lambda: len(engines(daemon)) == 2, timeout=30)
    assert admin.data("health") == healthy
    stats = admin.data("stats")
    assert stats["ops"] == {"stored": 1, "duplicate": 0, "rejected": 0}  # the new engine's
    assert daemon.terminate() == 0


def test_the_engine_exits_when_the_mqtt_process_is_killed(
    own_broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """The MQTT process dies (SIGKILL): its engine notices the channel close and exits
    at once, committing nothing more; the next daemon stores what the broker kept,
    once.

    Checked against: an engine that ignored the end of its channel (it lives on,
    an orphan holding a database connection)."""
    daemon = make_daemon(own_broker.port, **SPINE_ONLY)
    (engine,) = engines(daemon)
    ops = stream_ops(1500, "p")
    acks = AckRecorder(own_broker.port, daemon.root).start()
    stream = OpStream(own_broker.port, daemon.root, ops, chunk=100, pause_s=0.02, holds=[750])
    stream.start()
    try:
        wait_for(lambda: answered(acks) >= 300, timeout=60)
        stream.resume()
        daemon.kill()
        wait_for(lambda: not running(engine), timeout=10)
        assert stream.puback_all(timeout=60) == 0
        daemon.start()
        wait_for(lambda: answered(acks) >= len(ops), timeout=120)
    finally:
        stream.close()
        acks.close()
    rows = db_rows(daemon.db_url, "select op_id from sync_log")
    assert sorted(op_id for (op_id,) in rows) == sorted(op["op_id"] for _, op in ops)
    assert deaths(daemon) == []
    assert daemon.terminate() == 0


def test_the_engine_exits_when_the_mqtt_process_is_killed_during_its_drain(
    private_pg: PostgresServer, broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """A stop whose drain cannot finish (the database went away with an operation in
    hand: the engine retries its commit) outlasts the MQTT process, which its stop
    timeout or an operator kills: the engine, reading its channel while it drains,
    exits too.

    Checked against: an engine that stopped reading its channel during a drain (it
    lived on, retrying the commit every 5 s for nobody: seen after a test dropped
    its database under a stopping daemon)."""
    url = private_pg.start().replace("postgresql://", "postgresql+psycopg://", 1)
    daemon = make_daemon(broker.port, url)
    (engine,) = engines(daemon)
    private_pg.stop()
    client = Client(broker.port).connect()
    client.publish(f"{daemon.root}/devices/d1/sync", sync_op("op-1"), wait=False)
    wait_for(lambda: "commit failed, retrying" in daemon.log())
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping: draining what is in hand" in daemon.log())
    daemon.kill()
    wait_for(lambda: not running(engine), timeout=10)
    client.close()
    assert "the MQTT process is gone" in daemon.log()


def test_a_stop_drains_the_engine_then_the_session(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    """SIGTERM: the engine commits and answers what it holds and exits 0 before the
    MQTT process stops; no death is logged."""
    daemon = make_daemon(broker.port, **SPINE_ONLY)
    (engine,) = engines(daemon)
    client.subscribe(f"{daemon.root}/devices/d1/sync/ack")
    client.publish(f"{daemon.root}/devices/d1/sync", sync_op("before-stop"))
    assert client.expect(1)[0].json()["results"][0]["status"] == "stored"
    assert daemon.terminate() == 0
    assert not running(engine)
    assert deaths(daemon) == []
    events = [line.get("event") for line in daemon.log_lines()]
    assert events.index("stopping: draining what is in hand") < events.index("stopped")


def test_the_watchdog_is_withheld_while_the_engine_is_down(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], notify: NotifySocket
) -> None:
    """`WATCHDOG=1` only while the engine serves: withheld from its death until the
    next engine answers, then sent again."""
    daemon = make_daemon(broker.port, start=False, **SPINE_ONLY)
    daemon.start(extra_env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"})
    wait_for(lambda: notify.count("WATCHDOG=1") >= 2)
    kill_engine(daemon)
    reason = "restarting: the engine process was killed by signal 9"

    def withheld() -> bool:
        return any(
            line.get("event") == "withholding watchdog pings" and line.get("reason") == reason
            for line in daemon.log_lines()
        )

    wait_for(withheld, timeout=10, interval=0.02)
    wait_for(lambda: len(engines(daemon)) == 2, timeout=30)
    pings = notify.count("WATCHDOG=1")
    wait_for(lambda: notify.count("WATCHDOG=1") >= pings + 2)
    assert daemon.terminate() == 0


def test_an_admin_write_while_the_engine_is_down_is_answered_unavailable(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    """An admin write cannot wait for an engine that may not come back: answered
    `unavailable` at once, nothing written; once the engine serves, the same write
    goes through.

    Checked against: the write held until the next engine (the operator's command
    hangs, or is applied twice when the dead engine had committed it)."""
    daemon = make_daemon(broker.port, **SPINE_ONLY)
    admin = Admin(client, daemon.root)
    kill_engine(daemon)
    wait_for(lambda: deaths(daemon), timeout=10, interval=0.01)
    ack = {"alert_id": "a-1", "by": "officer-1"}
    assert admin.error("alerts/ack", **ack) == {
        "code": "unavailable",
        "message": "the engine is down: nothing was written; retry later",
    }
    wait_for(lambda: len(engines(daemon)) == 2, timeout=30)
    assert admin.error("alerts/ack", **ack) == {  # the engine's answer: it got there
        "code": "invalid_args",
        "message": "no crisis alert with that alert_id",
        "path": "alert_id",
    }
    assert daemon.terminate() == 0


def test_a_stop_while_the_engine_restarts_leaves_no_process(
    broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """SIGTERM while the engine is down (or starting again): the daemon stops, exit 0,
    and no engine process outlives it.

    Where the stop lands (the pause before the restart, or the new engine's start)
    depends on timing; either way the daemon must end whole, within its budget."""
    daemon = make_daemon(broker.port, **SPINE_ONLY)
    (first,) = engines(daemon)
    kill_engine(daemon)
    wait_for(lambda: deaths(daemon), timeout=10, interval=0.01)
    assert daemon.proc is not None
    parent = daemon.proc.pid
    assert daemon.terminate(timeout=15) == 0
    assert not running(first)
    assert [pid for pid in children_of(parent) if running(pid)] == []
    assert "part did not stop in time" not in daemon.log()


def children_of(pid: int) -> list[int]:
    """Processes whose parent is `pid` (read from /proc: the parent may be gone)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
