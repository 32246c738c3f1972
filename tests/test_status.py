"""Retained `<root>/status` (birth, will, clean stop) and `<root>/health` (PROTOCOL.md
"Gateway status"), as a dashboard that subscribes late would see them."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway import __version__
from tests.support import STATS_KEYS, Client, Daemon, Mosquitto, Received, sync_op, wait_for

STARTED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def first_message(port: int, topic: str) -> Received:
    """What a new subscriber of `topic` gets first."""
    late = Client(port).connect()
    try:
        late.subscribe(topic)
        (message,) = late.expect(1)
    finally:
        late.close()
    return message


def retained(port: int, topic: str) -> Received:
    """What a new subscriber gets at once: the retained message of `topic`."""
    message = first_message(port, topic)
    assert message.retain, message
    return message


def dropped(broker_log: str, client_id: str) -> bool:
    """Whether Mosquitto has logged that `client_id`'s connection dropped (not a clean
    disconnect): the will is published in the same step, right after the line."""
    return (
        f"Client {client_id} closed its connection." in broker_log
        or f"Socket error on client {client_id}, disconnecting." in broker_log
    )


def online(daemon: Daemon, status: dict[str, Any]) -> None:
    assert status == {
        "state": "online",
        "version": __version__,
        "instance": daemon.env["FIELDGATE_INSTANCE"],
        "started_at": status["started_at"],
    }
    assert STARTED_AT.match(status["started_at"]), status


def test_status_birth_will_restart_and_clean_stop(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    """Checked against: a will delay of 5 s (the will comes after the fence)."""
    daemon = make_daemon(broker.port)
    topic = f"{daemon.root}/status"
    first = retained(broker.port, topic).json()
    online(daemon, first)

    # A crash: the broker publishes the will as soon as the connection drops.
    client.subscribe(topic)
    (live,) = client.expect(1)
    assert live.json() == first
    daemon.kill()
    # The broker sees the connection drop, logs it, and publishes the will at once: with
    # no will delay it is ahead of a fence published after that line.
    client_id = daemon.env["FIELDGATE_MQTT__CLIENT_ID"]
    log = broker.workdir / "mosquitto.log"
    wait_for(lambda: dropped(log.read_text(), client_id))
    (will,) = client.fence()
    assert will.json() == {"state": "offline"}
    assert retained(broker.port, topic).json() == {"state": "offline"}

    # Back: online again, with a new started_at.
    daemon.start()
    (birth,) = client.expect(1)
    online(daemon, birth.json())
    assert birth.json()["started_at"] != first["started_at"]
    assert retained(broker.port, topic).json() == birth.json()

    # A clean stop publishes offline itself, with who stopped and since when.
    assert daemon.terminate() == 0
    stopped = {
        "state": "offline",
        "version": __version__,
        "instance": daemon.env["FIELDGATE_INSTANCE"],
        "started_at": birth.json()["started_at"],
    }
    messages = client.expect(1)
    assert [m.json() for m in messages] == [stopped]
    assert retained(broker.port, topic).json() == stopped
    # ...confirmed by the broker (the socket is read again for its PUBACK), so the
    # stop did not wait out LAST_WORDS_S
    events = [line.get("event") for line in daemon.log_lines()]
    assert "last words not confirmed" not in events
    assert events[-1] == "stopped"
    # the will is not sent after a clean disconnect: nothing but the one offline
    fence = f"{daemon.root}/fence"
    client.subscribe(fence)
    client.publish(fence, b"x")
    assert [m.topic for m in client.expect(1)] == [fence]


def test_health_retained_every_interval(
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    healthy: dict[str, Any],
) -> None:
    daemon = make_daemon(broker.port, HEALTH__INTERVAL_S="0.5")
    root = daemon.root
    topic = f"{root}/health"
    # the first report goes out once the first checks are done, maybe just after `ready`
    found: Received = wait_for(
        lambda: (message := first_message(broker.port, topic)).retain and message
    )
    first = found.json()
    assert (first["healthy"], first["checks"]) == (healthy["healthy"], healthy["checks"])
    # the `health` and the `stats` data together
    assert set(first) == {"healthy", "checks", *STATS_KEYS}

    ack = f"{root}/devices/d1/sync/ack"
    client.subscribe(ack)
    client.publish(f"{root}/devices/d1/sync", sync_op("op-1"))
    client.publish(f"{root}/devices/d1/sync", sync_op("op-2", entity_id="t2"))
    client.publish(f"{root}/devices/d1/sync", b"not json")

    def reported() -> dict[str, Any] | None:
        body: dict[str, Any] = retained(broker.port, topic).json()
        return body if body["ops"]["stored"] == 2 and body["ops"]["rejected"] == 1 else None

    report = wait_for(reported, timeout=20)
    assert report["ops"] == {"stored": 2, "duplicate": 0, "rejected": 1}
    assert report["rejected_by_code"] == {"malformed": 1}
    assert report["messages"] == {"alert": 0, "crisis_ack": 0, "sync": 3, "admin": 0}
    assert report["healthy"] is True
    assert report["since"] == first["since"]
    assert report["uptime_s"] >= first["uptime_s"]


def test_status_is_published_again_on_every_connect(
    tmp_path: Path, make_daemon: Callable[..., Daemon]
) -> None:
    """A broker that lost its retained messages (no persistence) gets `online` back."""
    mosq = Mosquitto(tmp_path / "forgetful", persistence=False).start()
    try:
        daemon = make_daemon(mosq.port)
        topic = f"{daemon.root}/status"
        first = retained(mosq.port, topic).json()
        online(daemon, first)
        mosq.restart()
        # the same process, reconnected: the same status, retained again
        again: Received = wait_for(
            lambda: (message := first_message(mosq.port, topic)).retain and message,
            timeout=20,
        )
        assert again.json() == first
        assert daemon.proc is not None and daemon.proc.poll() is None
        daemon.stop()
    finally:
        mosq.stop()
