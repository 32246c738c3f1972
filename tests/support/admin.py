"""The admin protocol from the operator's side: one client for every test.

A request goes to `<root>/admin/request/<command>` with a transaction of its own;
its answer is the message on the answer topic (the v5 response topic when one
is given, else `<root>/admin/response/<command>`) that carries the same
transaction. A long command's `accepted` answer comes first and is not the answer.
"""

from __future__ import annotations

import uuid
from typing import Any

from tests.support.mqtt import Client
from tests.support.processes import wait_for

STATS_KEYS = frozenset(
    {
        "since",
        "uptime_s",
        "ops",
        "rejected_by_code",
        "messages",
        "commits",
        "queues",
        "outbox",
        "alerts",
        "open_crises",
        "escalations",
        "conflicts",
        "conflict_members",
        "webhooks",
    }
)
"""Every key of the `stats` answer (also carried by the retained health report)."""


HEALTHY = {
    "healthy": True,
    "checks": {
        "mqtt": {"ok": True, "reconnects": 0, "session_expiry_granted_s": 604800},
        "engine": {"ok": True},
        "database": {"ok": True},
        "redis": {"ok": True},
        "model": {"ok": True, "detail": "no model active"},
        "parts": {"ok": True},
    },
}
"""The `health` answer's data from a test daemon with nothing wrong (the `healthy`
fixture makes sure the Redis it checks is there)."""


class Admin:
    """Sends admin requests and finds the answer that carries the same transaction.

    `reply_to`: a v5 response topic for every request (the answer goes there and
    only there); None: the named answer topics.
    """

    def __init__(
        self, client: Client, root: str, token: str | None = None, reply_to: str | None = None
    ) -> None:
        self.client = client
        self.root = root
        self.token = token
        self.reply_to = reply_to
        self.sent = 0
        """How many requests this client has sent."""
        client.subscribe(reply_to or f"{root}/admin/response/#")

    def answer_topic(self, command: str) -> str:
        return self.reply_to or f"{self.root}/admin/response/{command}"

    def send(
        self,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        transaction: Any = None,
        token: str | None = None,
        wait: bool = True,
    ) -> Any:
        """Publish one request; returns its transaction (a fresh one unless given)."""
        if transaction is None:
            transaction = f"tx-{uuid.uuid4().hex[:12]}"
        body: dict[str, Any] = {"transaction": transaction, **(args or {})}
        token = token if token is not None else self.token
        if token is not None:
            body["token"] = token
        self.client.publish(
            f"{self.root}/admin/request/{command}",
            body,
            response_topic=self.reply_to,
            wait=wait,
        )
        self.sent += 1
        return transaction

    def answers(self, command: str, transaction: Any) -> list[dict[str, Any]]:
        """Every answer so far that carries `transaction`, `accepted` ones included."""
        found = []
        for message in self.client.on(self.answer_topic(command)):
            body = message.json()
            if body.get("transaction") == transaction:
                found.append(body)
        return found

    def answer(self, command: str, transaction: Any, timeout: float = 15.0) -> dict[str, Any]:
        """The one final answer to `transaction` (after an `accepted`, if any)."""

        def final() -> list[dict[str, Any]]:
            return [a for a in self.answers(command, transaction) if a["status"] != "accepted"]

        found: list[dict[str, Any]] = wait_for(final, timeout)
        assert len(found) == 1, found
        return found[0]

    def __call__(self, command: str, **args: Any) -> dict[str, Any]:
        return self.answer(command, self.send(command, args))

    def data(self, command: str, **args: Any) -> dict[str, Any]:
        """An `ok` answer's data (the answer has nothing else)."""
        answer = self(command, **args)
        assert answer["status"] == "ok", answer
        assert set(answer) == {"transaction", "status", "data"}, answer
        data: dict[str, Any] = answer["data"]
        return data

    def error(self, command: str, **args: Any) -> dict[str, Any]:
        """An `error` answer's error (the answer has nothing else)."""
        answer = self(command, **args)
        assert answer["status"] == "error", answer
        assert set(answer) == {"transaction", "status", "error"}, answer
        error: dict[str, Any] = answer["error"]
        return error
