"""The admin protocol end to end: every command of the table, bad requests, the token.

A real daemon on the test broker; requests and answers as PROTOCOL.md "Admin
commands" says: request on `<root>/admin/request/<command>`, answer on the v5
response topic (correlation echoed) or else on `<root>/admin/response/<command>`.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import threading
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from gateway import __version__
from gateway.admin.server import MAX_CONCURRENT
from tests.support import (
    CONFIG_DEFAULTS,
    STATS_KEYS,
    Admin,
    Client,
    Daemon,
    Mosquitto,
    Watch,
    alert,
    db_rows,
    free_port,
    plain_url,
    results_on,
    send_one,
    shortest,
    stored,
    sync_op,
    wait_for,
)

ISO_US = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def done_lines(daemon: Daemon, command: str) -> int:
    """How many `admin command done` lines the daemon logged for `command`."""
    return sum(
        1
        for line in daemon.log_lines()
        if line.get("event") == "admin command done" and line.get("command") == command
    )


# -- each command: a good request and its exact answer -----------------------------


def test_health(
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    healthy: dict[str, Any],
) -> None:
    daemon = make_daemon(broker.port)
    admin = Admin(client, daemon.root)
    tx = admin.send("health")
    assert admin.answer("health", tx) == {
        "transaction": tx,
        "status": "ok",
        "data": healthy,
    }


def test_info(broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client) -> None:
    daemon = make_daemon(broker.port)
    root = daemon.root
    client.subscribe(f"{root}/status")
    (status,) = client.expect(1)
    admin = Admin(client, root)
    assert admin.data("info") == {
        "version": __version__,
        "instance": daemon.env["FIELDGATE_INSTANCE"],
        "started_at": status.json()["started_at"],
        "config_path": str(daemon.config_path),
        "topic_root": root,
        "database": daemon.db_url,
        "shared_group": None,
    }
    assert ISO.match(status.json()["started_at"])


def test_stats_count_what_the_daemon_stored(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port)
    root = daemon.root
    client.subscribe(f"{root}/devices/d1/sync/ack")
    admin = Admin(client, root)
    for n in (1, 2, 3):
        assert send_one(client, root, "d1", sync_op(f"op-{n}"))["status"] == "stored"
    stats = admin.data("stats")
    assert stats["ops"] == {"stored": 3, "duplicate": 0, "rejected": 0}
    assert stats["rejected_by_code"] == {}
    assert stats["messages"] == {"alert": 0, "crisis_ack": 0, "sync": 3, "admin": 1}

    # a duplicate and a rejected operation move their counters, and only those
    assert send_one(client, root, "d1", sync_op("op-1")) == {
        "op_id": "op-1",
        "status": "duplicate",
        "version": 1,
    }
    assert send_one(client, root, "d1", sync_op("op-4", operation="explode"))["status"] == (
        "rejected"
    )
    # settled: nothing in flight, nothing waiting for a commit or for the broker
    stats = wait_for(
        lambda: (
            (s := admin.data("stats"))["queues"]
            == {
                "in_flight": 0,
                "pending_commit": 0,
                "outbox": 0,
                "detection": 0,
                "mqtt_outgoing": 0,
            }
            and s
        )
    )
    assert stats["ops"] == {"stored": 3, "duplicate": 1, "rejected": 1}
    assert stats["rejected_by_code"] == {"schema": 1}
    # every request this test sent, the one answered here included
    assert stats["messages"] == {"alert": 0, "crisis_ack": 0, "sync": 5, "admin": admin.sent}
    assert set(stats) == STATS_KEYS
    assert stats["since"] == admin.data("info")["started_at"]
    assert isinstance(stats["uptime_s"], int | float) and stats["uptime_s"] >= 0
    # five payloads, each acked before the next went out: five commits
    assert stats["commits"] == 5
    assert stats["outbox"] == {"published": 0, "failed": 0}


def test_sync_history_lists_the_entity_newest_first(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port)
    root = daemon.root
    client.subscribe(f"{root}/devices/d1/sync/ack", f"{root}/devices/d2/sync/ack")
    admin = Admin(client, root)
    send_one(
        client,
        root,
        "d1",
        sync_op(
            "op-1",
            operation="create",
            changes={"status": {"old": None, "new": "open"}},
            edited_at="2026-11-29T12:00:00Z",
        ),
    )
    send_one(
        client,
        root,
        "d2",
        {
            "batch_id": "b-7",
            "ops": [
                sync_op(
                    "op-2",
                    user_id="u2",
                    changes={"status": {"old": "open", "new": "done"}},
                    edited_at="2026-11-29T12:01:00.250+00:00",
                    base_version=1,
                )
            ],
        },
    )
    send_one(client, root, "d1", sync_op("op-3", operation="delete", changes={}))
    send_one(client, root, "d1", sync_op("other", entity_id="t2"))

    data = admin.data("sync/history", entity_type="task", entity_id="t1")
    received = [item.pop("received_at") for item in data["items"]]
    assert all(ISO_US.match(r) for r in received), received
    assert received == sorted(received, reverse=True)
    assert data == {
        "entity_type": "task",
        "entity_id": "t1",
        "items": [
            {
                "op_id": "op-3",
                "version": 3,
                "device_id": "d1",
                "user_id": "u1",
                "operation": "delete",
                "changes": {},
                "edited_at": "2026-11-29T12:00:00.000000Z",
                "base_version": None,
                "batch_id": None,
            },
            {
                "op_id": "op-2",
                "version": 2,
                "device_id": "d2",
                "user_id": "u2",
                "operation": "update",
                "changes": {"status": {"old": "open", "new": "done"}},
                "edited_at": "2026-11-29T12:01:00.250000Z",
                "base_version": 1,
                "batch_id": "b-7",
            },
            {
                "op_id": "op-1",
                "version": 1,
                "device_id": "d1",
                "user_id": "u1",
                "operation": "create",
                "changes": {"status": {"old": None, "new": "open"}},
                "edited_at": "2026-11-29T12:00:00.000000Z",
                "base_version": None,
                "batch_id": None,
            },
        ],
    }

    limited = admin.data("sync/history", entity_type="task", entity_id="t1", limit=2)
    assert [(i["op_id"], i["version"]) for i in limited["items"]] == [("op-3", 3), ("op-2", 2)]
    assert admin.data("sync/history", entity_type="task", entity_id="nope") == {
        "entity_type": "task",
        "entity_id": "nope",
        "items": [],
    }
    tx = admin.send("sync/history", {"entity_type": "task"})
    assert admin.answer("sync/history", tx) == {
        "transaction": tx,
        "status": "error",
        "error": {
            "code": "invalid_args",
            "message": "Object missing required field `entity_id`",
            "path": "entity_id",
        },
    }


BAD_PAYLOADS: list[tuple[bytes, dict[str, Any]]] = [
    (
        b"this is not json",
        {
            "code": "malformed",
            "message": "not valid JSON: JSON is malformed: invalid character (byte 4)",
        },
    ),
    (
        b'["not", "an", "object"]',
        {"code": "malformed", "message": "the payload is not a JSON object"},
    ),
    (
        json.dumps(sync_op("bad-3", operation="explode")).encode(),
        {"code": "schema", "message": "Invalid enum value 'explode'", "path": "operation"},
    ),
]


def test_quarantine_list_pages_newest_first(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port)
    root = daemon.root
    client.subscribe(f"{root}/devices/d1/sync/ack")
    admin = Admin(client, root)
    errors = []
    for payload, _ in BAD_PAYLOADS:
        result = send_one(client, root, "d1", payload)
        assert result["status"] == "rejected", result
        errors.append(result["error"])
    assert errors == [expected for _, expected in BAD_PAYLOADS]

    data = admin.data("quarantine/list")
    assert data["next_cursor"] is None
    items = data["items"]
    assert len(items) == 3
    ids = [item["id"] for item in items]
    assert ids == sorted(ids, reverse=True)
    for item, (payload, _), error in zip(
        items, reversed(BAD_PAYLOADS), reversed(errors), strict=True
    ):
        assert ISO_US.match(item.pop("received_at"))
        item.pop("id")
        assert item == {
            "topic": f"{root}/devices/d1/sync",
            "device_id": "d1",
            "kind": "sync",
            "error": {"path": None, **error},
            "payload": payload.decode(),
            "payload_bytes": len(payload),
        }

    first = admin.data("quarantine/list", limit=2)
    assert [i["id"] for i in first["items"]] == ids[:2]
    assert isinstance(first["next_cursor"], str) and first["next_cursor"]
    second = admin.data("quarantine/list", limit=2, cursor=first["next_cursor"])
    assert [i["id"] for i in second["items"]] == ids[2:]
    assert second["next_cursor"] is None

    tx = admin.send("quarantine/list", {"cursor": "this-is-forged!"})
    assert admin.answer("quarantine/list", tx) == {
        "transaction": tx,
        "status": "error",
        "error": {
            "code": "invalid_args",
            "message": "not a cursor of this gateway",
            "path": "cursor",
        },
    }


def test_config_get_hides_every_secret(
    pg_url: str, broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    # (pg_url first: its database must outlive the daemon, which stops before it is dropped)
    secrets = {
        "admin": "adm-Tok3n-b7f1",
        "mqtt": "mqtt-Pw-c4d2",
        "redis": "redis-Pw-e9a0",
        "database": "pg-Pw-5b3c",
        "webhook": "d2gtS2V5LWE4ZjM=",  # the key's base64, as it follows `whsec_`
        "webhook_url": "hook-Tok-77aa",  # a token in the endpoint URL's query
    }
    db_url = pg_url.replace("postgres@", f"postgres:{secrets['database']}@", 1)
    assert secrets["database"] in db_url
    redis_url = f"redis://:{secrets['redis']}@127.0.0.1:6379/0"
    endpoint = {
        "name": "ops",
        "url": f"https://hooks.example/in?token={secrets['webhook_url']}",
        "events": ["alert.crisis"],
    }
    daemon = make_daemon(
        broker.port,
        db_url,
        "[[webhooks]]\n"
        + "".join(f"{key} = {json.dumps(value)}\n" for key, value in endpoint.items())
        + f'secret = "whsec_{secrets["webhook"]}"\n',
        ADMIN__TOKEN=secrets["admin"],
        MQTT__USERNAME="gateway",
        MQTT__PASSWORD=secrets["mqtt"],
        REDIS__URL=redis_url,
    )
    root = daemon.root
    client.subscribe(f"{root}/status", f"{root}/health")
    admin = Admin(client, root, token=secrets["admin"])
    tx = admin.send("config/get")
    answer = admin.answer("config/get", tx)
    assert answer["status"] == "ok", answer
    data = answer["data"]
    assert data["admin"] == {"token": "***"}
    assert data["mqtt"]["password"] == "***"
    assert data["mqtt"]["username"] == "gateway"
    assert data["redis"] == {"url": "redis://:***@127.0.0.1:6379/0"}
    assert data["database"]["url"] == pg_url.replace("postgres@", "postgres:***@", 1)
    assert data["mqtt"] == {
        **CONFIG_DEFAULTS["mqtt"],
        "port": broker.port,
        "topic_root": root,
        "client_id": daemon.env["FIELDGATE_MQTT__CLIENT_ID"],
        "username": "gateway",
        "password": "***",
        "reconnect_max_s": 1.0,
    }
    assert data["instance"] == daemon.env["FIELDGATE_INSTANCE"]
    assert data["log"] == {"level": "info", "format": "json"}
    assert set(data) == {
        "instance",
        "mqtt",
        "database",
        "redis",
        "admin",
        "limits",
        "writer",
        "engine",
        "sync",
        "health",
        "metrics",
        "log",
        "alerts",
        "conflicts",
        "outbox",
        "quarantine",
        "dlq",
        "ml",
        "webhooks",
    }
    assert data["outbox"] == {"retention_s": 604800.0}
    assert data["quarantine"] == {"retention_s": 2592000.0, "max_rows": 1_000_000}
    assert data["webhooks"] == [
        {
            **endpoint,
            "url": "https://hooks.example/in?token=***",
            "secret": "***",
            "timeout_s": 15.0,
            "retry_schedule_s": [0.0, 5.0, 30.0, 120.0, 600.0, 1800.0],
            "max_in_flight": 8,
            "enabled": True,
            "breaker_failures": 5,
            "breaker_pause_s": 60.0,
        }
    ]
    info = admin.data("info")
    assert info["database"] == data["database"]["url"]

    raw = [m.payload for m in client.all if m.topic.startswith(f"{root}/admin/response/")]
    assert len(raw) == 2
    log = daemon.log()
    assert '"event": "admin command done"' in log
    # nor in anything else the gateway published: status, health
    published = [m.topic for m in client.all if not m.topic.startswith(f"{root}/admin/")]
    assert sorted(published) == [f"{root}/health", f"{root}/status"]
    for secret in secrets.values():
        for message in client.all:
            assert secret.encode() not in message.payload
        assert secret not in log


def test_config_reload_applies_the_file(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port, start=False)
    # The file, not the environment (which beats it), must carry the keys under test.
    del daemon.env["FIELDGATE_LOG__LEVEL"]
    del daemon.env["FIELDGATE_MQTT__PORT"]
    config: Path = daemon.config_path
    config.write_text(f'[mqtt]\nport = {broker.port}\n\n[log]\nlevel = "info"\n')
    daemon.start()
    admin = Admin(client, daemon.root)
    assert admin.data("config/get")["log"]["level"] == "info"
    assert done_lines(daemon, "config/get") == 1

    config.write_text(f'[mqtt]\nport = {broker.port}\n\n[log]\nlevel = "warning"\n')
    assert admin.data("config/reload") == {"reloaded": True, "needs_restart": []}
    assert admin.data("config/get")["log"]["level"] == "warning"
    # applied, not only shown: info lines are no longer written
    assert done_lines(daemon, "config/get") == 1
    assert done_lines(daemon, "config/reload") == 0

    other_port = free_port()
    config.write_text(f'[mqtt]\nport = {other_port}\n\n[log]\nlevel = "warning"\n')
    assert admin.data("config/reload") == {"reloaded": True, "needs_restart": ["mqtt"]}
    # the running connection (and the config it reports) stay until a restart
    assert admin.data("config/get")["mqtt"]["port"] == broker.port

    for bad, reason in [
        ('[log]\nlevel = "loud"\n', "log.level: Input should be"),
        ("[log\nlevel = 1\n", "not valid TOML"),
        ("[mqtt]\nprot = 1883\n", "mqtt.prot: unknown key"),
    ]:
        config.write_text(bad)
        tx = admin.send("config/reload")
        answer = admin.answer("config/reload", tx)
        assert answer["status"] == "error", answer
        assert set(answer) == {"transaction", "status", "error"}
        assert answer["error"]["code"] == "invalid_args"
        assert answer["error"]["message"].startswith(f"config {config}: ")
        assert reason in answer["error"]["message"]
        assert "\n" not in answer["error"]["message"]
        # the old config stays, and still runs
        kept = admin.data("config/get")
        assert kept["log"]["level"] == "warning"
        assert kept["mqtt"]["port"] == broker.port
    assert admin.data("health")["healthy"] is True
    assert sum(1 for line in daemon.log_lines() if line.get("event") == "reload refused") == 3

    # SIGHUP reloads the same way
    config.write_text(f'[mqtt]\nport = {broker.port}\n\n[log]\nlevel = "error"\n')
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: admin.data("config/get")["log"]["level"] == "error")
    assert daemon.proc.poll() is None


def test_config_reload_changes_which_events_wait_for_webhooks(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    """The engine process writes a webhook row for an event exactly when an enabled
    endpoint subscribes to it, as the running config says, reloads included.

    Checked against: the subscriptions built once at start (a reload not reaching the
    engine process's notices), a disabled endpoint's events written, and a refused
    reload (a bad secret) that changed them or quoted the secret."""
    endpoint = (
        '[[webhooks]]\nname = "ops"\nurl = "http://127.0.0.1:9/"\nevents = ["alert.crisis"]\n'
        'secret = "whsec_c2VjcmV0LWtleQ=="\n'
    )
    daemon = make_daemon(broker.port, config_text=endpoint + "enabled = false\n")
    admin = Admin(client, daemon.root)
    watch = Watch(client, daemon.root)

    def webhook_rows() -> list[tuple[str, str]]:
        rows = db_rows(
            daemon.db_url, "select event_type, payload from outbox where channel = 'webhook'"
        )
        return sorted((event, json.loads(payload)["alert_id"]) for event, payload in rows)

    watch.send(alert("a1", kind="panic"))
    assert watch.ack_of("a1")["classification"] == "crisis"
    assert webhook_rows() == []

    daemon.config_path.write_text(endpoint)
    assert admin.data("config/reload") == {"reloaded": True, "needs_restart": []}
    watch.send(alert("a2", kind="panic"))
    watch.send(alert("a3", user_id="u3", mood=3))  # wellness: not subscribed
    assert watch.ack_of("a2")["classification"] == "crisis"
    assert watch.ack_of("a3")["classification"] == "wellness"
    assert webhook_rows() == [("alert.crisis", "a2")]

    daemon.config_path.write_text(endpoint.replace("whsec_c2VjcmV0LWtleQ==", "c2VjcmV0LWtleQ=="))
    tx = admin.send("config/reload")
    error = admin.answer("config/reload", tx)["error"]
    assert error["message"] == (
        f"config {daemon.config_path}: webhooks[0].secret:"
        " the secret must be whsec_ then the base64 of the key"
    )
    watch.send(alert("a4", kind="panic"))
    assert watch.ack_of("a4")["classification"] == "crisis"
    assert webhook_rows() == [("alert.crisis", "a2"), ("alert.crisis", "a4")]
    assert "c2VjcmV0LWtleQ" not in daemon.log()


def test_config_reload_rotates_the_token(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port, config_text='[admin]\ntoken = "first-t0ken"\n')
    admin = Admin(client, daemon.root, token="first-t0ken")
    assert admin.data("health")["healthy"] is True
    daemon.config_path.write_text('[admin]\ntoken = "second-t0ken"\n')
    assert admin.data("config/reload") == {"reloaded": True, "needs_restart": []}
    tx = admin.send("health")
    assert admin.answer("health", tx)["error"]["code"] == "unauthorized"
    tx = admin.send("health", token="second-t0ken")
    assert admin.answer("health", tx)["status"] == "ok"


def test_log_level(broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client) -> None:
    daemon = make_daemon(broker.port)
    admin = Admin(client, daemon.root)
    admin.data("health")
    assert done_lines(daemon, "health") == 1

    assert admin.data("log_level", level="error") == {"level": "error"}
    admin.data("health")
    assert done_lines(daemon, "health") == 1  # info lines are off now

    tx = admin.send("log_level", {"level": "loud"})
    assert admin.answer("log_level", tx) == {
        "transaction": tx,
        "status": "error",
        "error": {"code": "invalid_args", "message": "Invalid enum value 'loud'", "path": "level"},
    }

    assert admin.data("log_level", level="info") == {"level": "info"}
    admin.data("health")
    assert done_lines(daemon, "health") == 2
    assert done_lines(daemon, "log_level") == 1  # the last one, logged at info again


# -- bad requests --------------------------------------------------------------------


DEEP = "the request is nested too deeply"


def test_not_json_is_malformed(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port)
    root = daemon.root
    admin = Admin(client, root)
    for command, payload, message in [
        ("health", b"{this is not json", "JSON is malformed: object keys must be strings (byte 1)"),
        ("stats", b'["an", "array"]', "Expected `object`, got `array`"),
        ("info", b'"a string"', "Expected `object`, got `str`"),
        ("config/get", b"\xff\xfe", "JSON is malformed: invalid character (byte 0)"),
        # Deeper than msgspec recurses, within 64 KiB: it raised out of the session's
        # message callback and failed the critical mqtt part (found by fuzzing).
        ("ml/status", b'{"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", DEEP),
    ]:
        client.publish(f"{root}/admin/request/{command}", payload)
        # no transaction could be read: the answer carries null
        assert wait_for(functools.partial(admin.answers, command, None)) == [
            {
                "transaction": None,
                "status": "error",
                "error": {"code": "malformed", "message": message},
            }
        ]
    assert done_lines(daemon, "health") == 0

    # over the request size limit (64 KiB): refused before it is even parsed
    client.publish(
        f"{root}/admin/request/log_level",
        json.dumps({"transaction": "big", "level": "x" * 70_000}),
    )
    assert wait_for(functools.partial(admin.answers, "log_level", None)) == [
        {
            "transaction": None,
            "status": "error",
            "error": {"code": "too_large", "message": "request is over 65536 bytes"},
        }
    ]


def test_unknown_command(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port)
    admin = Admin(client, daemon.root)
    tx = admin.send("no/such/command")
    assert admin.answer("no/such/command", tx) == {
        "transaction": tx,
        "status": "error",
        "error": {"code": "unknown_command", "message": "no command 'no/such/command'"},
    }


def test_unknown_argument_and_wrong_type_are_invalid_args(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port)
    admin = Admin(client, daemon.root)

    cases: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        (
            "health",
            {"verbose": True},
            {
                "code": "invalid_args",
                "message": "Object contains unknown field `verbose`",
                "path": "verbose",
            },
        ),
        (
            "quarantine/list",
            {"limit": 10, "cursr": "x"},
            {
                "code": "invalid_args",
                "message": "Object contains unknown field `cursr`",
                "path": "cursr",
            },
        ),
        (
            "sync/history",
            {"entity_type": "task", "entity_id": "t\u0000"},
            {
                "code": "invalid_args",
                "message": "a NUL character (\\u0000) cannot be stored",
                "path": "entity_id",
            },
        ),
        (
            "quarantine/list",
            {"limit": "many"},
            {"code": "invalid_args", "message": "Expected `int`, got `str`", "path": "limit"},
        ),
        (
            "quarantine/list",
            {"limit": 0},
            {"code": "invalid_args", "message": "Expected `int` >= 1", "path": "limit"},
        ),
        (
            "quarantine/list",
            {"limit": 1001},
            {"code": "invalid_args", "message": "Expected `int` <= 1000", "path": "limit"},
        ),
        (
            "log_level",
            {"level": 5},
            {"code": "invalid_args", "message": "Expected `str`, got `int`", "path": "level"},
        ),
        (
            "sync/history",
            {"entity_type": "task", "entity_id": ["t1"]},
            {
                "code": "invalid_args",
                "message": "Expected `str`, got `array`",
                "path": "entity_id",
            },
        ),
    ]
    for command, args, error in cases:
        tx = admin.send(command, args)
        assert admin.answer(command, tx) == {"transaction": tx, "status": "error", "error": error}
    assert done_lines(daemon, "quarantine/list") == 0
    # the daemon is still fine after all of that
    assert admin.data("health")["healthy"] is True


# -- the token ---------------------------------------------------------------------


def test_token_is_required_and_refusals_do_nothing(
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    healthy: dict[str, Any],
) -> None:
    daemon = make_daemon(broker.port, ADMIN__TOKEN="s3cret")
    admin = Admin(client, daemon.root)
    refused = {
        "code": "unauthorized",
        "message": "a valid admin token is required",
    }
    tx = admin.send("log_level", {"level": "error"})
    assert admin.answer("log_level", tx) == {"transaction": tx, "status": "error", "error": refused}
    for wrong in ["s3creT", "", "s3cret ", "x" * 200]:
        tx = admin.send("log_level", {"level": "error"}, token=wrong)
        assert admin.answer("log_level", tx) == {
            "transaction": tx,
            "status": "error",
            "error": refused,
        }
    tx = admin.send("log_level", {"level": "error", "token": 12345})
    assert admin.answer("log_level", tx)["error"] == refused
    # no probing of the command table without the token either
    tx = admin.send("no/such/command")
    assert admin.answer("no/such/command", tx)["error"] == refused
    assert done_lines(daemon, "log_level") == 0

    # nothing changed: the level is still info, so a good request is logged
    tx = admin.send("health", token="s3cret")
    assert admin.answer("health", tx) == {
        "transaction": tx,
        "status": "ok",
        "data": healthy,
    }
    assert done_lines(daemon, "health") == 1
    tx = admin.send("log_level", {"level": "warning"}, token="s3cret")
    assert admin.answer("log_level", tx)["data"] == {"level": "warning"}

    for line in daemon.log_lines():
        assert "s3cret" not in json.dumps(line)
    for message in client.all:
        assert b"s3cret" not in message.payload


def test_refused_admin_flood_does_not_stall_ingest(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port, ADMIN__TOKEN="s3cret")
    root = daemon.root
    client.subscribe(f"{root}/devices/d1/sync/ack")
    admin = Admin(client, root)
    stop = threading.Event()
    sent: list[str] = []

    def flood() -> None:
        flooder = Client(broker.port).connect()
        try:
            while not stop.is_set():
                tx = f"flood-{len(sent)}"
                flooder.publish(
                    f"{root}/admin/request/stats",
                    {"transaction": tx, "token": "wrong"},
                    wait=False,
                )
                sent.append(tx)
                if len(sent) % 50 == 0:
                    flooder.publish(f"{root}/admin/request/stats", {"token": "wrong"})
        finally:
            flooder.close()

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        # the flood is on: its refusals are coming back
        wait_for(lambda: admin.answers("stats", "flood-100"))
        flooded_before = len(sent)
        for n in range(20):
            client.publish(f"{root}/devices/d1/sync", sync_op(f"op-{n}", entity_id=f"t{n}"))
        results = wait_for(lambda: len(r := results_on(client, root, "d1")) >= 20 and r)
        # still flooding while the ops were stored and acked
        assert len(sent) > flooded_before
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(10)
    assert sorted(r["op_id"] for r in results) == sorted(f"op-{n}" for n in range(20))
    assert all(r["status"] == "stored" and r["version"] == 1 for r in results)
    # every refused request was answered, none was run
    last = sent[-1]
    (answer,) = wait_for(lambda: admin.answers("stats", last))
    assert answer["error"]["code"] == "unauthorized"
    assert done_lines(daemon, "stats") == 0


# -- where answers go --------------------------------------------------------------


def test_v5_response_topic_and_correlation(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port)
    root = daemon.root
    admin = Admin(client, root)  # also listens on the default answer topics
    reply = f"{root}/replies/{uuid.uuid4().hex}"
    client.subscribe(reply)
    correlation = b"\x00\x01corr\xff"
    client.publish(
        f"{root}/admin/request/sync/history",
        {"transaction": 7, "entity_type": "task", "entity_id": "t1"},
        response_topic=reply,
        correlation=correlation,
    )
    (answer,) = wait_for(lambda: [m for m in client.all if m.topic == reply])
    assert answer.correlation == correlation
    assert answer.json() == {
        "transaction": 7,
        "status": "ok",
        "data": {"entity_type": "task", "entity_id": "t1", "items": []},
    }
    # a fence: an answer on the default topic sent after, and nothing else there
    tx = admin.send("sync/history", {"entity_type": "task", "entity_id": "t1"})
    admin.answer("sync/history", tx)
    on_default = [m for m in client.all if m.topic.startswith(f"{root}/admin/response/")]
    assert [m.json()["transaction"] for m in on_default] == [tx]
    assert on_default[0].topic == f"{root}/admin/response/sync/history"
    assert on_default[0].correlation is None


def test_v311_client_gets_the_named_topic(
    broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    daemon = make_daemon(broker.port)
    root = daemon.root
    old = Client(broker.port, v5=False).connect()
    try:
        old.subscribe(f"{root}/admin/response/#")
        old.publish(f"{root}/admin/request/config/get", {"transaction": "v3"})
        (answer,) = old.expect(1)
        assert answer.topic == f"{root}/admin/response/config/get"
        body = answer.json()
        assert body["transaction"] == "v3"
        assert body["status"] == "ok"
        assert body["data"]["mqtt"]["topic_root"] == root
        # one answer, and only there: the next message is a later request's answer
        old.publish(f"{root}/admin/request/health", {"transaction": "v3-fence"})
        before, fence = old.until(lambda m: m.json().get("transaction") == "v3-fence")
        assert (before, fence.topic) == ([], f"{root}/admin/response/health")
    finally:
        old.close()


def test_twenty_requests_at_once_all_answered(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port)
    admin = Admin(client, daemon.root)
    commands: list[tuple[str, dict[str, Any]]] = [
        ("health", {}),
        ("info", {}),
        ("stats", {}),
        ("config/get", {}),
        ("quarantine/list", {"limit": 5}),
        ("sync/history", {"entity_type": "task", "entity_id": "t1"}),
    ]
    sent: list[tuple[str, Any]] = []
    for n in range(20):
        command, args = commands[n % len(commands)]
        transaction: Any = {"n": n, "tag": "burst"} if n % 2 else n
        admin.send(command, args, transaction=transaction, wait=False)
        sent.append((command, transaction))
    for command, transaction in sent:
        answer = admin.answer(command, transaction)
        assert answer["status"] == "ok", answer
        assert answer["transaction"] == transaction
    answered = [m for m in client.all if m.topic.startswith(f"{daemon.root}/admin/response/")]
    assert len(answered) == 20


# -- the transaction as an idempotency key ----------------------------------------------


def test_a_redelivered_write_runs_once_and_gets_the_first_answer(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    """The same request twice (as an MQTT redelivery brings it: same command, same
    transaction, same bytes) acts once, and both deliveries get the first answer,
    whether the second comes while the first runs or after it was answered. Another
    transaction is another request.

    Checked against: the server without its memory of recent writes (the second
    `alerts/ack` answers `already_acknowledged`, and runs: two `done` lines)."""
    daemon = make_daemon(broker.port)
    root = daemon.root
    admin = Admin(client, root)
    watch = Watch(client, root)
    watch.send(alert("r-1", kind="panic"))
    watch.ack_of("r-1")

    ack = {"alert_id": "r-1", "by": "officer-1"}
    admin.send("alerts/ack", ack, transaction="tx-ack")
    admin.send("alerts/ack", ack, transaction="tx-ack")  # while the first is under way
    (first, second) = wait_for(lambda: (a := admin.answers("alerts/ack", "tx-ack"))[1:] and a)
    ((acked_at,),) = db_rows(
        daemon.db_url, "select acknowledged_at from alerts where alert_id = 'r-1'"
    )
    acked = {
        "alert_id": "r-1",
        "status": "acknowledged",
        "acknowledged_at": shortest(acked_at),
        "acknowledged_by": "officer-1",
    }
    answer = {"transaction": "tx-ack", "status": "ok", "data": acked}
    assert first == second == answer
    admin.send("alerts/ack", ack, transaction="tx-ack")  # after it was answered
    wait_for(lambda: len(admin.answers("alerts/ack", "tx-ack")) == 3)
    assert admin.answers("alerts/ack", "tx-ack")[2] == answer
    assert done_lines(daemon, "alerts/ack") == 1
    assert crisis_acks(daemon) == [("r-1", "acknowledged")]

    # Another transaction is another request: it runs, and says what it finds.
    again = admin.data("alerts/ack", alert_id="r-1", by="officer-2")
    assert again == {**acked, "status": "already_acknowledged"}
    assert done_lines(daemon, "alerts/ack") == 2

    # The same for the gateway's own writes.
    for _ in range(2):
        admin.send("log_level", {"level": "warning"}, transaction="tx-level")
    wait_for(lambda: len(admin.answers("log_level", "tx-level")) == 2)
    assert (
        admin.answers("log_level", "tx-level")
        == [{"transaction": "tx-level", "status": "ok", "data": {"level": "warning"}}] * 2
    )


def crisis_acks(daemon: Daemon) -> list[tuple[str, str]]:
    """The crisis acks the engine committed, as logged: (alert_id, outcome)."""
    return [
        (line["alert_id"], line["outcome"])
        for line in daemon.log_lines()
        if line.get("event") == "crisis ack"
    ]


def test_a_read_asked_again_answers_with_the_figures_of_now(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    """Reads are not remembered: a read has no effect to double, and the same request
    again answers with what holds now.

    Checked against: remembering every command (the second `sync/history` would
    answer the first's empty page)."""
    daemon = make_daemon(broker.port)
    root = daemon.root
    admin = Admin(client, root)
    client.subscribe(f"{root}/devices/d1/sync/ack")
    args = {"entity_type": "task", "entity_id": "t1"}
    admin.send("sync/history", args, transaction="tx-read")
    wait_for(lambda: admin.answers("sync/history", "tx-read"))
    send_one(client, root, "d1", sync_op("op-1"))
    admin.send("sync/history", args, transaction="tx-read")
    (first, second) = wait_for(lambda: (a := admin.answers("sync/history", "tx-read"))[1:] and a)
    assert first["data"]["items"] == []
    assert [item["op_id"] for item in second["data"]["items"]] == ["op-1"]
    assert done_lines(daemon, "sync/history") == 2


def test_admin_commands_stuck_on_the_database_do_not_stall_ingest(
    pg_url: str, broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    """PROTOCOL.md: admin work never stalls ingest. More `quarantine/list` requests than
    the admin runs at once wait on a lock the test holds on the quarantine table (they
    hold as many database connections); meanwhile valid operations are stored, acked
    and PUBACKed, and a crisis alert is published; every request is answered after.

    Checked against: a request's PUBACK withheld until its command is done (the ops'
    PUBACKs come in arrival order, after it: in flight stays above 0)."""
    metrics_port = free_port()
    daemon = make_daemon(broker.port, pg_url, METRICS__LISTEN=f"127.0.0.1:{metrics_port}")
    root = daemon.root
    admin = Admin(client, root)
    watch = Watch(client, root)
    client.subscribe(f"{root}/devices/d1/sync/ack")
    waiting = (
        "select count(*) from pg_locks where not granted and relation = 'quarantine'::regclass"
    )
    with psycopg.connect(plain_url(pg_url)) as locker:
        locker.execute("LOCK TABLE quarantine IN ACCESS EXCLUSIVE MODE")
        sent = [admin.send("quarantine/list", wait=False) for _ in range(MAX_CONCURRENT + 4)]
        # (a pool that the admin shares holds 15 connections: 5, and 10 more at most)
        wait_for(lambda: db_rows(pg_url, waiting)[0][0] >= min(MAX_CONCURRENT, 15))
        for n in range(5):
            assert send_one(client, root, "d1", sync_op(f"op-{n}")) == stored(f"op-{n}", n + 1)
        watch.send(alert("crisis-1", kind="panic"))
        assert [c["alert_id"] for c in watch.wait_crises(1)] == ["crisis-1"]
        wait_for(lambda: in_flight(metrics_port) == 0)
        assert all(admin.answers("quarantine/list", tx) == [] for tx in sent)
        locker.rollback()
    for tx in sent:
        assert admin.answer("quarantine/list", tx) == {
            "transaction": tx,
            "status": "ok",
            "data": {"items": [], "next_cursor": None},
        }


def in_flight(metrics_port: int) -> float:
    """The daemon's `fieldgate_in_flight_messages`: received and not yet PUBACKed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("fieldgate_in_flight_messages "):
                return float(line.split()[1])
    raise AssertionError("no fieldgate_in_flight_messages series")
