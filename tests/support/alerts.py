"""Alerts as a device sends them, and a client watching everything an alert causes."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from tests.support.database import db_rows, outbox_sent
from tests.support.mqtt import Client, Received
from tests.support.processes import Daemon, wait_for
from tests.support.times import NOW, iso


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
        return self.client.on(f"{self.root}/{topic_suffix}")

    def acks(self, device_id: str = "d1") -> dict[str | None, dict[str, Any]]:
        return {m.json()["alert_id"]: m.json() for m in self.on(f"devices/{device_id}/alerts/ack")}

    def ack_of(self, alert_id: str | None, device_id: str = "d1") -> dict[str, Any]:
        found: dict[str, Any] = wait_for(lambda: self.acks(device_id).get(alert_id))
        return found

    def crises(self) -> list[dict[str, Any]]:
        return [m.json() for m in self.on("alerts/crisis")]

    def wellness(self) -> list[dict[str, Any]]:
        prefix = f"{self.root}/alerts/wellness/"
        with self.client._lock:
            return [m.json() for m in self.client.all if m.topic.startswith(prefix)]

    def wait_crises(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = wait_for(
            lambda: (c := self.crises()) and len(c) >= count and c, timeout
        )
        return got

    def fence(self, device_id: str = "fence") -> None:
        """Everything the daemon had published for the alerts before now has arrived:
        an alert of the fence device (no classification, nothing published for it)
        is answered after them, on the same connection."""
        alert_id = f"fence-{uuid.uuid4().hex[:8]}"
        self.send(alert(alert_id, user_id="fence", mood=9), device_id)
        assert self.ack_of(alert_id, device_id) == {
            "alert_id": alert_id,
            "status": "stored",
            "classification": "none",
        }

    def settled(self, daemon: Daemon, timeout: float = 15.0) -> None:
        """Every outbox message written so far has been published and PUBACKed, and has
        reached this client: the broker routed it before it PUBACKed it, so before the
        client's own fence, published after."""
        wait_for(lambda: outbox_sent(daemon.db_url), timeout)
        self.client.fence()


def stored_reasons(daemon: Daemon, alert_id: str) -> tuple[str, list[str]]:
    ((classification, reasons),) = db_rows(
        daemon.db_url, "select classification, reasons from alerts where alert_id = ?", alert_id
    )
    return classification, json.loads(reasons)
