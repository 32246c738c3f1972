"""`alerts/list`, `alerts/get`, `alerts/ack` over the admin protocol, and the alert metrics."""

from __future__ import annotations

import itertools
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.alerts_support import Watch, alert, days_ago, iso, query
from tests.support import Client, Daemon, Mosquitto, free_port, wait_for

_transactions = itertools.count(1)
_subscribed: set[tuple[str, str]] = set()


def admin(client: Client, root: str, command: str, **args: Any) -> dict[str, Any]:
    """One request, its answer (matched by transaction)."""
    transaction = next(_transactions)
    topic = f"{root}/admin/response/{command}"
    if (client.client_id, root) not in _subscribed:
        client.subscribe(f"{root}/admin/response/#")
        _subscribed.add((client.client_id, root))
    client.publish(f"{root}/admin/request/{command}", {"transaction": transaction, **args})

    def answer() -> dict[str, Any] | None:
        for message in list(client.all):
            if message.topic == topic and message.json().get("transaction") == transaction:
                found: dict[str, Any] = message.json()
                return found
        return None

    result: dict[str, Any] = wait_for(answer)
    return result


def test_list_get_and_ack(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    metrics_port = free_port()
    daemon = make_daemon(broker.port, METRICS__LISTEN=f"127.0.0.1:{metrics_port}")
    root = daemon.root
    watch = Watch(client, root)
    sent = [
        alert("l1", user_id="ann", kind="panic", note="private words"),
        alert("l2", user_id="ann", mood=3, occurred_at=days_ago(1)),
        alert("l3", user_id="bob", mood=8),
        alert("l4", user_id="bob", flags=["injury"], site_id="s1"),
        alert("l5", user_id="cy", stress=5),
    ]
    for body in sent:
        watch.send(body)
        watch.ack_of(body["alert_id"])

    def ids(answer: dict[str, Any]) -> list[str]:
        assert answer["status"] == "ok", answer
        return [item["alert_id"] for item in answer["data"]["items"]]

    assert ids(admin(client, root, "alerts/list")) == ["l5", "l4", "l3", "l2", "l1"]
    assert ids(admin(client, root, "alerts/list", classification="crisis")) == ["l4", "l1"]
    assert ids(admin(client, root, "alerts/list", classification="wellness")) == ["l5", "l2"]
    assert ids(admin(client, root, "alerts/list", user_id="bob")) == ["l4", "l3"]
    assert ids(admin(client, root, "alerts/list", acknowledged=False)) == ["l4", "l1"]
    assert ids(admin(client, root, "alerts/list", acknowledged=True)) == []
    # Pages: newest first, the cursor continues below the last item.
    first = admin(client, root, "alerts/list", limit=2)
    assert ids(first) == ["l5", "l4"]
    second = admin(client, root, "alerts/list", limit=2, cursor=first["data"]["next_cursor"])
    assert ids(second) == ["l3", "l2"]
    third = admin(client, root, "alerts/list", limit=2, cursor=second["data"]["next_cursor"])
    assert ids(third) == ["l1"] and third["data"]["next_cursor"] is None
    bad = admin(client, root, "alerts/list", cursor="forged")
    assert bad["status"] == "error" and bad["error"]["code"] == "invalid_args"
    # since: received at or after.
    ((received_l3,),) = query(daemon, "select received_at from alerts where alert_id = 'l3'")
    since = iso_us(received_l3)
    assert ids(admin(client, root, "alerts/list", since=since)) == ["l5", "l4", "l3"]

    got = admin(client, root, "alerts/get", alert_id="l1")
    assert got["status"] == "ok"
    item = got["data"]
    assert "note" not in item and "payload" not in item
    assert item["classification"] == "crisis" and item["reasons"] == ["panic"]
    assert item["escalation"] == 0 and item["next_escalation_at"] is not None
    assert item["acknowledged_at"] is None
    missing = admin(client, root, "alerts/get", alert_id="nope")
    assert missing["error"]["code"] == "invalid_args"

    acked = admin(client, root, "alerts/ack", alert_id="l1", by="officer-1")
    assert acked["status"] == "ok"
    assert acked["data"]["status"] == "acknowledged"
    assert acked["data"]["acknowledged_by"] == "officer-1"
    again = admin(client, root, "alerts/ack", alert_id="l1", by="officer-2")
    assert again["data"]["status"] == "already_acknowledged"
    assert again["data"]["acknowledged_by"] == "officer-1"
    unknown = admin(client, root, "alerts/ack", alert_id="l3", by="officer-1")  # not a crisis
    assert unknown["status"] == "error" and unknown["error"]["code"] == "invalid_args"
    assert ids(admin(client, root, "alerts/list", acknowledged=True)) == ["l1"]
    assert ids(admin(client, root, "alerts/list", acknowledged=False)) == ["l4"]
    after = admin(client, root, "alerts/get", alert_id="l1")["data"]
    assert after["acknowledged_by"] == "officer-1" and after["next_escalation_at"] is None

    # Metrics: alerts by classification, open crises, the receipt-to-publication histogram.
    stats = admin(client, root, "stats")["data"]
    assert stats["alerts"] == {"crisis": 2, "wellness": 2, "none": 1}

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text: str = r.read().decode()
            return text

    wait_for(lambda: "fieldgate_open_crises 1.0" in scrape())
    text = scrape()
    assert 'fieldgate_alerts_total{classification="crisis"} 2.0' in text
    assert "fieldgate_crisis_publish_seconds_count 2.0" in text
    assert "fieldgate_crisis_escalations_total 0.0" in text


def iso_us(us: int) -> str:
    return iso(datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us))


def test_rules_from_the_config_file_and_reload(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(
        broker.port,
        config_text='[alerts]\ncrisis_flags = ["fall"]\n\n'
        '[alerts.suggestions]\nhigh_stress = "Breathe."\n',
    )
    root = daemon.root
    watch = Watch(client, root)
    watch.send(alert("r1", kind="checkin", flags=["fall"]))
    watch.send(alert("r2", kind="checkin", flags=["injury"]))
    watch.send(alert("r3", kind="checkin", stress=4))
    assert watch.ack_of("r1")["classification"] == "crisis"
    assert watch.ack_of("r2")["classification"] == "none"
    assert watch.ack_of("r3")["classification"] == "wellness"
    wait_for(lambda: [n["suggestion"] for n in watch.wellness()] == ["Breathe."])
    daemon.config_path.write_text('[alerts]\ncrisis_flags = ["injury"]\n')
    assert admin(client, root, "config/reload")["status"] == "ok"
    watch.send(alert("r4", kind="checkin", flags=["fall"]))
    watch.send(alert("r5", kind="checkin", flags=["injury"]))
    assert watch.ack_of("r4")["classification"] == "none"
    assert watch.ack_of("r5")["classification"] == "crisis"
