"""Two instances on one PostgreSQL database, sharing the load: every alert rule holds
across them. The history rule sees the entries of both, each escalation is published
by exactly one, each wellness notification's cooldown holds for both."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable

from tests.support import Client, Daemon, Mosquitto, alert, days_ago, db_rows, wait_for

USERS = [f"user-{n}" for n in range(6)]
CRISES = [f"crisis-{n}" for n in range(4)]
MAX_ESCALATIONS = 3


def test_two_instances_share_history_escalations_and_cooldowns(
    broker: Mosquitto, pg_url: str, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    root = f"fg{uuid.uuid4().hex[:8]}"
    shared = {
        "MQTT__TOPIC_ROOT": root,
        "MQTT__SHARED_GROUP": f"g{uuid.uuid4().hex[:6]}",
        "ALERTS__ESCALATE_AFTER_S": "1",
        "ALERTS__MAX_ESCALATIONS": str(MAX_ESCALATIONS),
        # Short batches: the two instances commit side by side, not one after the other.
        "WRITER__MAX_WAIT_MS": "0",
    }
    instances = [make_daemon(broker.port, db_url=pg_url, **shared) for _ in range(2)]
    client.subscribe(f"{root}/alerts/crisis", f"{root}/devices/+/alerts/ack")
    # Three low-mood journal entries per user, newest first, from three devices at once.
    for day in (0, 1, 2):
        for user in USERS:
            body = alert(f"{user}-d{day}", user_id=user, mood=3, occurred_at=days_ago(day))
            client.publish(f"{root}/devices/dev{day}/alerts", body, wait=False)
    for crisis in CRISES:
        client.publish(f"{root}/devices/dev9/alerts", alert(crisis, kind="panic"), wait=False)
    total = len(USERS) * 3 + len(CRISES)
    wait_for(lambda: len([m for m in client.all if m.topic.endswith("/alerts/ack")]) >= total)

    # Both instances took a share.
    for instance in instances:
        assert any(line.get("event") == "alert stored" for line in instance.log_lines())
    # The history rule: for each user exactly one entry completed the pattern.
    stored = db_rows(pg_url, "select user_id, reasons from alerts where kind = 'journal'")
    sustained = Counter(user for user, reasons in stored if "sustained_low_mood" in reasons)
    assert sustained == dict.fromkeys(USERS, 1)

    # The cooldown: one notification per user and reason, whichever instance stored it.
    def notifications() -> Counter[tuple[str, str]]:
        found = db_rows(
            pg_url,
            "select payload from outbox where channel = 'mqtt' and event_type = 'alert.wellness'",
        )
        return Counter(
            (body["user_id"], body["reason"])
            for body in (json.loads(bytes(payload)) for (payload,) in found)
        )

    assert notifications() == {
        **{(user, "low_mood"): 1 for user in USERS},
        **{(user, "sustained_low_mood"): 1 for user in USERS},
    }

    # Escalations: every level once, though both instances run the schedule.
    def levels() -> dict[str, list[int]]:
        found = db_rows(
            pg_url,
            "select payload from outbox where channel = 'mqtt' and topic like '%/alerts/crisis' "
            "order by id",
        )
        out: dict[str, list[int]] = {}
        for (payload,) in found:
            body = json.loads(bytes(payload))
            out.setdefault(body["alert_id"], []).append(body["escalation"])
        return out

    wait_for(
        lambda: (
            db_rows(pg_url, "select count(*) from alerts where next_escalation_at is not null")
            == [(0,)]
        ),
        timeout=30,
    )
    assert levels() == {crisis: list(range(MAX_ESCALATIONS + 1)) for crisis in CRISES}

    def received() -> set[tuple[str, int]]:
        return {
            (m.json()["alert_id"], m.json()["escalation"])
            for m in list(client.all)
            if m.topic == f"{root}/alerts/crisis"
        }

    everything = {(crisis, n) for crisis in CRISES for n in range(MAX_ESCALATIONS + 1)}
    wait_for(lambda: received() == everything)
