"""What the broker says, heard (issue 15, item 12): a refused subscription, a session
the broker did not keep, a shorter session expiry than asked. Each is one clear log
line and a part of `health`'s mqtt check, against a broker made to say it: Mosquitto
with its dynamic-security plugin denying the sync subscription, Mosquitto without
persistence restarted, and a fake broker that grants 300 s (Mosquitto grants all)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import Admin, Client, Daemon, Mosquitto, wait_for
from tests.support.fake_broker import FakeBroker

DYNSEC = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")


def events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [line for line in daemon.log_lines() if line.get("event", "").startswith(name)]


@pytest.mark.skipif(not DYNSEC.exists(), reason="Mosquitto's dynamic-security plugin")
def test_a_refused_subscription_is_logged_once_and_said_in_health(
    tmp_path: Path, make_daemon: Callable[..., Daemon]
) -> None:
    rules = tmp_path / "dynsec.json"
    rules.write_text(
        json.dumps(
            {
                "defaultACLAccess": {
                    "publishClientSend": True,
                    "publishClientReceive": True,
                    "subscribe": True,
                    "unsubscribe": True,
                },
                "clients": [],
                "groups": [{"groupname": "anyone", "roles": [{"rolename": "no-sync"}]}],
                "roles": [
                    {
                        "rolename": "no-sync",
                        "acls": [
                            {
                                "acltype": "subscribePattern",
                                "topic": "+/devices/+/sync",
                                "priority": 0,
                                "allow": False,
                            }
                        ],
                    }
                ],
                "anonymousGroup": "anyone",
            }
        )
    )
    broker = Mosquitto(
        tmp_path / "broker",
        extra=f"plugin {DYNSEC}\nplugin_opt_config_file {rules}\n",
    ).start()
    try:
        daemon = make_daemon(broker.port)
        client = Client(broker.port).connect()
        try:
            health = Admin(client, daemon.root).data("health")
        finally:
            client.close()
        assert health["healthy"] is False
        refusal = {
            "filter": f"{daemon.root}/devices/+/sync",
            "reason_code": 135,
            "reason": "Not authorized",
        }
        client_id = daemon.env["FIELDGATE_MQTT__CLIENT_ID"]
        assert health["checks"]["mqtt"] == {
            "ok": False,
            "detail": "sync: subscription refused",
            "reconnects": 0,
            "session_expiry_granted_s": 604800,
            "subscription_refused": [refusal],
            "lanes": {
                "sync": {
                    "ok": False,
                    "detail": "subscription refused",
                    "client_id": client_id,
                    "reconnects": 0,
                    "session_expiry_granted_s": 604800,
                    "subscription_refused": [refusal],
                },
                "priority": {
                    "ok": True,
                    "client_id": f"{client_id}-priority",
                    "reconnects": 0,
                    "session_expiry_granted_s": 604800,
                },
            },
        }
        (refused,) = events(daemon, "mqtt subscription refused")
        assert (refused["filter"], refused["reason_code"], refused["level"]) == (
            f"{daemon.root}/devices/+/sync",
            135,
            "error",
        )
    finally:
        broker.stop()


def test_a_session_the_broker_did_not_keep_is_said(
    tmp_path: Path, make_daemon: Callable[..., Daemon]
) -> None:
    """A broker that keeps sessions in memory (persistence off) restarts: the daemon
    reconnects, and says that what devices sent meanwhile was not kept for it."""
    broker = Mosquitto(tmp_path / "broker", persistence=False).start()
    try:
        daemon = make_daemon(broker.port)
        new = events(daemon, "mqtt session new")
        assert sorted((n["lane"], n["level"]) for n in new) == [
            ("priority", "info"),
            ("sync", "info"),
        ]
        assert events(daemon, "mqtt session lost") == []
        broker.restart(down_s=0.5)
        wait_for(lambda: len(events(daemon, "mqtt session lost")) == 2)
        lost = events(daemon, "mqtt session lost")
        assert sorted((n["lane"], n["level"]) for n in lost) == [
            ("priority", "warning"),
            ("sync", "warning"),
        ]
        client = Client(broker.port).connect()
        try:
            mqtt = wait_for(
                lambda: (
                    (m := Admin(client, daemon.root).data("health")["checks"]["mqtt"])
                    and "session_lost" in m
                    and m
                )
            )
        finally:
            client.close()
        assert mqtt["ok"] is True
        assert mqtt["reconnects"] >= 1
        assert set(mqtt["session_lost"]) == {"at", "lane"}
    finally:
        broker.stop()


def test_a_shorter_session_expiry_than_asked_is_said(
    make_daemon: Callable[..., Daemon],
) -> None:
    with FakeBroker(expiry_s=300) as broker:
        daemon = make_daemon(broker.port, start=False)
        daemon.start(wait_ready=False)
        wait_for(lambda: len(events(daemon, "the broker shortened")) == 2)
        said = events(daemon, "the broker shortened")
        assert sorted((s["lane"], s["granted_s"], s["requested_s"], s["level"]) for s in said) == [
            ("priority", 300, 604800, "warning"),
            ("sync", 300, 604800, "warning"),
        ]
        wait_for(lambda: f"{daemon.root}/devices/+/sync" in broker.subscribed)


def test_a_kept_session_is_up_before_its_suback(make_daemon: Callable[..., Daemon]) -> None:
    """A broker that kept the gateway's sessions sends their backlog ahead of the SUBACK
    (Mosquitto 2.0.11: 100,000 messages of 200,000, 12 s): each lane is up at once, and
    the SUBACK is awaited beside it without a time limit. Waiting for it first (10 s at
    most) reconnected the sync lane every 11 s of a 500,000-message drain, never up."""
    with FakeBroker(session_present=True, suback=False) as broker:
        daemon = make_daemon(broker.port, start=False)
        daemon.start(wait_ready=False)
        wait_for(lambda: len(events(daemon, "mqtt connected")) == 2)
        wait_for(lambda: events(daemon, "ready"))
        subscribed = {f"{daemon.root}/devices/+/sync", f"{daemon.root}/devices/+/alerts"}
        wait_for(lambda: subscribed <= set(broker.subscribed))
        assert sorted(e["lane"] for e in events(daemon, "mqtt connected")) == ["priority", "sync"]
        assert events(daemon, "mqtt disconnected") == []
        assert daemon.terminate() == 0
