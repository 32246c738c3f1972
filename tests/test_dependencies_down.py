"""A dependency down: what `health` says, what an admin command answers, and that the
daemon comes back with it. Each test owns the service it stops (a Redis, a
PostgreSQL cluster), never the shared one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from tests.support import (
    Admin,
    Client,
    Daemon,
    Mosquitto,
    PostgresServer,
    RedisServer,
    fieldgate,
    free_port,
    send_one,
    stored,
    sync_op,
    wait_for,
)

EMPTY_HISTORY = {"entity_type": "task", "entity_id": "t1", "items": []}


def test_health_with_redis_down_reports_it_and_stays_healthy(
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    own_redis: RedisServer,
    healthy: dict[str, Any],
) -> None:
    """Redis serves only the webhook dead-letter queue, which waits in the database
    while Redis is away (gateway/status.py): reported, not unhealthy.

    Checked against: `healthy` requiring Redis too (it would say false)."""
    daemon = make_daemon(broker.port, REDIS__URL=own_redis.url)
    admin = Admin(client, daemon.root)
    assert admin.data("health") == healthy
    own_redis.stop()
    assert admin.data("health") == {
        "healthy": True,
        "checks": {**healthy["checks"], "redis": {"ok": False, "detail": "ConnectionError"}},
    }
    # Ingest does not need it either.
    client.subscribe(f"{daemon.root}/devices/d1/sync/ack")
    assert send_one(client, daemon.root, "d1", sync_op("op-1")) == stored("op-1", 1)
    own_redis.start()
    wait_for(lambda: admin.data("health") == healthy)


def test_an_admin_command_on_a_database_that_is_down_answers_unavailable(
    private_pg: PostgresServer,
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
) -> None:
    """PROTOCOL.md, Errors: `unavailable`, a dependency is down, retry later. The
    database stops under a running daemon: a read answers `unavailable`, `health`
    says why, and once the database is back the same request is served.

    Checked against: a database error answered as a crash ("the command failed; see
    the gateway's log"), and the `health` database check ignoring the connection."""
    url = private_pg.start().replace("postgresql://", "postgresql+psycopg://", 1)
    daemon = make_daemon(broker.port, url)
    admin = Admin(client, daemon.root)
    history = {"entity_type": "task", "entity_id": "t1"}
    assert admin.data("sync/history", **history) == EMPTY_HISTORY
    private_pg.stop()
    assert admin.error("sync/history", **history) == {
        "code": "unavailable",
        "message": "the database is unavailable; retry later",
    }
    health = admin.data("health")
    assert (health["healthy"], health["checks"]["database"]) == (
        False,
        {"ok": False, "detail": "OperationalError"},
    )
    private_pg.start()
    wait_for(lambda: admin("sync/history", **history)["status"] == "ok")
    assert admin.data("sync/history", **history) == EMPTY_HISTORY
    client.subscribe(f"{daemon.root}/devices/d1/sync/ack")
    assert send_one(client, daemon.root, "d1", sync_op("op-1")) == stored("op-1", 1)


def test_a_database_down_at_start_is_one_line_and_exit_1(
    broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """Exit 1, not 2: systemd's RestartPreventExitStatus=2 is for a config that cannot
    run; a database that is not up yet is retried by systemd's restart. Checked
    against: the traceback it printed before, with the same outcome for systemd but
    nothing an operator could read at a glance."""
    password = "pg-Secret-9d1e"
    port = free_port()
    url = f"postgresql+psycopg://postgres:{password}@127.0.0.1:{port}/test"
    daemon = make_daemon(broker.port, url, start=False)
    result = fieldgate("run", "--config", str(daemon.config_path), env={**os.environ, **daemon.env})
    assert result.returncode == 1
    (line,) = [json.loads(text) for text in result.stdout.splitlines() + result.stderr.splitlines()]
    assert line["event"] == "the database cannot be reached at start"
    assert (line["level"], line["error"]) == ("error", "OperationalError")
    assert line["database"] == url.replace(password, "***")
    assert f"port {port} failed" in line["detail"]
    assert password not in result.stdout + result.stderr
