"""Helpers for the alert tests: payloads, a watching client, reads of the daemon's database."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.support import Client, Daemon, Received, wait_for

NOW = datetime.now(UTC).replace(microsecond=0)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def alert(
    alert_id: str,
    user_id: str = "u1",
    kind: str = "journal",
    occurred_at: datetime | None = None,
    **fields: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "alert_id": alert_id,
        "user_id": user_id,
        "kind": kind,
        "occurred_at": iso(occurred_at or NOW),
    }
    body.update(fields)
    return body


def days_ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


class Watch:
    """A client subscribed to everything an alert causes, with filters over what came."""

    def __init__(self, client: Client, root: str) -> None:
        self.client = client
        self.root = root
        client.subscribe(
            f"{root}/devices/+/alerts/ack",
            f"{root}/alerts/crisis",
            f"{root}/alerts/wellness/#",
        )

    def send(self, body: dict[str, Any] | bytes, device_id: str = "d1") -> None:
        self.client.publish(f"{self.root}/devices/{device_id}/alerts", body)

    def on(self, topic_suffix: str) -> list[Received]:
        topic = f"{self.root}/{topic_suffix}"
        return [m for m in list(self.client.all) if m.topic == topic]

    def acks(self, device_id: str = "d1") -> dict[str | None, dict[str, Any]]:
        return {m.json()["alert_id"]: m.json() for m in self.on(f"devices/{device_id}/alerts/ack")}

    def ack_of(self, alert_id: str, device_id: str = "d1") -> dict[str, Any]:
        found: dict[str, Any] = wait_for(lambda: self.acks(device_id).get(alert_id))
        return found

    def crises(self) -> list[dict[str, Any]]:
        return [m.json() for m in self.on("alerts/crisis")]

    def wellness(self) -> list[dict[str, Any]]:
        prefix = f"{self.root}/alerts/wellness/"
        return [m.json() for m in list(self.client.all) if m.topic.startswith(prefix)]

    def wait_crises(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = wait_for(
            lambda: (c := self.crises()) and len(c) >= count and c, timeout
        )
        return got


def db_path(daemon: Daemon) -> str:
    return daemon.db_url.split("///", 1)[1]


def query(daemon: Daemon, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_path(daemon), timeout=10) as conn:
        return list(conn.execute(sql, args).fetchall())


def stored_reasons(daemon: Daemon, alert_id: str) -> tuple[str, list[str]]:
    ((classification, reasons),) = query(
        daemon, "select classification, reasons from alerts where alert_id = ?", alert_id
    )
    return classification, json.loads(reasons)
