"""The Prometheus endpoint (`[metrics] listen`): the series it serves and how they move."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from tests.support import Client, Daemon, Mosquitto, free_port, sync_op, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

FAMILIES = {
    "fieldgate_messages_received": "counter",
    "fieldgate_sync_ops": "counter",
    "fieldgate_rejected": "counter",
    "fieldgate_commit_batch_messages": "histogram",
    "fieldgate_commit_seconds": "histogram",
    "fieldgate_ack_seconds": "histogram",
    "fieldgate_in_flight_messages": "gauge",
    "fieldgate_mqtt_reconnects": "counter",
}


def scrape(url: str) -> tuple[dict[str, str], Samples]:
    """(family name -> type, (sample name, labels) -> value) from GET /metrics."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; a labelled series not yet touched counts as 0."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_endpoint_series_move_exactly(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    port = free_port()
    daemon = make_daemon(broker.port, METRICS__LISTEN=f"127.0.0.1:{port}")
    root = daemon.root
    url = f"http://127.0.0.1:{port}/metrics"

    types, before = scrape(url)
    assert {name: types.get(name) for name in FAMILIES} == FAMILIES
    assert value(before, "fieldgate_mqtt_reconnects_total") == 0
    assert value(before, "fieldgate_in_flight_messages") == 0
    assert value(before, "fieldgate_ack_seconds_count") == 0
    assert value(before, "fieldgate_commit_batch_messages_count") == 0
    # histograms carry their buckets, up to +Inf
    assert ("fieldgate_commit_batch_messages_bucket", (("le", "+Inf"),)) in before
    assert ("fieldgate_ack_seconds_bucket", (("le", "0.005"),)) in before

    ack = f"{root}/devices/d1/sync/ack"
    client.subscribe(ack)
    for n in range(5):
        client.publish(f"{root}/devices/d1/sync", sync_op(f"op-{n}", entity_id=f"t{n}"))
    for bad in (b"not json", b"{broken"):
        client.publish(f"{root}/devices/d1/sync", bad)

    def results() -> int:
        return sum(len(m.json()["results"]) for m in list(client.all) if m.topic == ack)

    wait_for(lambda: results() >= 7)
    # the histograms are observed right after the answers go out: poll until they show
    after = wait_for(
        lambda: (
            (s := scrape(url)[1])
            and value(s, "fieldgate_ack_seconds_count") >= 7
            and value(s, "fieldgate_in_flight_messages") == 0
            and s
        )
    )
    stored = value(after, "fieldgate_sync_ops_total", status="stored")
    assert stored - value(before, "fieldgate_sync_ops_total", status="stored") == 5
    assert value(after, "fieldgate_sync_ops_total", status="duplicate") == 0
    malformed = value(after, "fieldgate_rejected_total", code="malformed")
    assert malformed - value(before, "fieldgate_rejected_total", code="malformed") == 2
    assert [k for k in after if k[0] == "fieldgate_rejected_total"] == [
        ("fieldgate_rejected_total", (("code", "malformed"),))
    ]
    assert value(after, "fieldgate_messages_received_total", kind="sync") == 7
    assert value(after, "fieldgate_ack_seconds_count") == 7
    assert value(after, "fieldgate_ack_seconds_bucket", le="+Inf") == 7
    assert value(after, "fieldgate_ack_seconds_sum") > 0
    # every commit is one observation of both commit histograms; together they hold 7 messages
    commits = value(after, "fieldgate_commit_batch_messages_count")
    assert 1 <= commits <= 7
    assert value(after, "fieldgate_commit_batch_messages_sum") == 7
    assert value(after, "fieldgate_commit_seconds_count") == commits
    assert value(after, "fieldgate_in_flight_messages") == 0
    assert value(after, "fieldgate_mqtt_reconnects_total") == 0

    # admin requests count as messages of their own kind, not as sync ones
    client.subscribe(f"{root}/admin/response/#")
    client.publish(f"{root}/admin/request/health", {"transaction": 1})
    wait_for(lambda: [m for m in list(client.all) if m.topic == f"{root}/admin/response/health"])
    final = scrape(url)[1]
    assert value(final, "fieldgate_messages_received_total", kind="admin") == 1
    assert value(final, "fieldgate_messages_received_total", kind="sync") == 7
    assert value(final, "fieldgate_ack_seconds_count") == 7


def test_reconnects_are_counted(own_broker: Mosquitto, make_daemon: Callable[..., Daemon]) -> None:
    port = free_port()
    daemon = make_daemon(own_broker.port, METRICS__LISTEN=f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/metrics"

    def reconnects() -> list[float]:
        samples = scrape(url)[1]
        return [
            value(samples, "fieldgate_mqtt_reconnects_total", lane=lane)
            for lane in ("sync", "priority")
        ]

    assert ("fieldgate_mqtt_reconnects_total", (("lane", "sync"),)) in scrape(url)[1]
    assert reconnects() == [0, 0]
    own_broker.restart()
    wait_for(lambda: reconnects() == [1, 1], timeout=20)
    # and the daemon serves again on the new connection
    client = Client(own_broker.port).connect()
    try:
        ack = f"{daemon.root}/devices/d1/sync/ack"
        client.subscribe(ack)
        client.publish(f"{daemon.root}/devices/d1/sync", sync_op("op-1"))
        (answer,) = client.expect(1)
        assert answer.json()["results"] == [{"op_id": "op-1", "status": "stored", "version": 1}]
    finally:
        client.close()
    assert reconnects() == [1, 1]
