"""Prometheus series: one registry per process, so tests can run several in one."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.lifecycle import Part

log = structlog.get_logger("fieldgate.daemon")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CRISIS_BUCKETS = (*LATENCY_BUCKETS, 30.0, 60.0, 300.0, 900.0)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
WEBHOOK_BUCKETS = (*LATENCY_BUCKETS, 15.0, 30.0, 60.0)


class Metrics:
    """The MQTT process's series, and the engine process's as it last reported them
    (`relay`): one registry, so one endpoint exports both."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.relay = Relayed()
        r.register(self.relay)
        self.messages_received = Counter(
            "fieldgate_messages_received", "MQTT messages received", ["kind"], registry=r
        )
        self.ack_seconds = Histogram(
            "fieldgate_ack_seconds",
            "From receipt of a message to its PUBACK",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "fieldgate_in_flight_messages",
            "Messages received and not yet acknowledged",
            registry=r,
        )
        self.reconnects = Counter(
            "fieldgate_mqtt_reconnects",
            "MQTT reconnections, by lane (each lane is a session of its own)",
            ["lane"],
            registry=r,
        )
        self.crisis_publish_seconds = Histogram(
            "fieldgate_crisis_publish_seconds",
            "From receipt of a crisis alert to the broker's PUBACK of its publication",
            buckets=CRISIS_BUCKETS,
            registry=r,
        )
        self.open_crises = Gauge(
            "fieldgate_open_crises",
            "Crisis alerts not yet acknowledged (all instances: read from the database)",
            registry=r,
        )
        self.escalations = Counter(
            "fieldgate_crisis_escalations", "Crisis escalations published", registry=r
        )
        self.engine_held_bytes = Gauge(
            "fieldgate_engine_held_bytes",
            "Payload bytes handed to the engine process and not yet committed",
            registry=r,
        )
        self.engine_held_bytes_max = Gauge(
            "fieldgate_engine_held_bytes_max",
            "The most payload bytes the engine process held at once since start"
            " (bounded by engine.max_channel_bytes plus one socket read)",
            registry=r,
        )
        self.engine_restarts = Counter(
            "fieldgate_engine_restarts", "Engine processes that died and were restarted", registry=r
        )
        self.webhook_poster_restarts = Counter(
            "fieldgate_webhook_poster_restarts",
            "Webhook poster processes that died or were killed, and were started again",
            registry=r,
        )
        self.quarantine_dropped = Counter(
            "fieldgate_quarantine_dropped",
            "Quarantine rows deleted before their retention: past quarantine.max_rows",
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "fieldgate_webhook_deliveries",
            "Webhook attempts by endpoint and outcome (delivered, retry, dead)",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.webhook_seconds = Histogram(
            "fieldgate_webhook_delivery_seconds",
            "From a webhook POST to its answer (or its failure)",
            ["endpoint"],
            buckets=WEBHOOK_BUCKETS,
            registry=r,
        )
        self.webhook_pending = Gauge(
            "fieldgate_webhook_pending",
            "Deliveries waiting for an attempt or being attempted (all instances)",
            ["endpoint"],
            registry=r,
        )
        self.webhook_retrying = Gauge(
            "fieldgate_webhook_retries_pending",
            "Waiting deliveries that failed before (all instances)",
            ["endpoint"],
            registry=r,
        )
        self.webhook_breaker_open = Gauge(
            "fieldgate_webhook_breaker_open",
            "1 while the endpoint's circuit breaker pauses it (or probes), else 0",
            ["endpoint"],
            registry=r,
        )
        self.dlq_entries = Gauge(
            "fieldgate_dlq_entries", "Entries in the dead-letter queue in Redis", registry=r
        )
        self.dlq_spool = Gauge(
            "fieldgate_dlq_spool",
            "Dead deliveries waiting in the database for Redis (all instances)",
            registry=r,
        )


class EngineMetrics:
    """The engine process's series: what its commits did. Reported to the MQTT process
    with every ping (gateway/channel.py), which exports them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ops = Counter(
            "fieldgate_sync_ops", "Sync operations by outcome", ["status"], registry=r
        )
        self.rejected = Counter(
            "fieldgate_rejected",
            "Rejected payloads and operations by error code",
            ["code"],
            registry=r,
        )
        self.commit_batch = Histogram(
            "fieldgate_commit_batch_messages",
            "Messages per committed transaction",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "fieldgate_commit_seconds",
            "Time to commit one batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.alerts = Counter(
            "fieldgate_alerts", "Alerts stored, by classification", ["classification"], registry=r
        )
        self.conflicts = Counter(
            "fieldgate_conflicts",
            "Conflicts detected (groups of colliding operations), by severity at detection",
            ["severity"],
            registry=r,
        )
        self.conflict_members = Counter(
            "fieldgate_conflict_members",
            "Operations that joined a conflict",
            registry=r,
        )
        self.conflict_merges = Counter(
            "fieldgate_conflict_merges",
            "Conflicts absorbed by another that an operation bridged them to",
            registry=r,
        )
        self.conflicts_judged = Counter(
            "fieldgate_conflict_judged_operations",
            "Stored operations conflict detection has judged (after the ack: behind the"
            " stored count by what still waits)",
            registry=r,
        )
        self.conflicts_resolved = Counter(
            "fieldgate_conflicts_resolved",
            "Conflicts resolved by an operator",
            registry=r,
        )
        self.scored = Counter(
            "fieldgate_ml_scored_ops",
            "Stored operations scored by the active conflict model",
            registry=r,
        )
        self.hints = Counter(
            "fieldgate_ml_hints",
            "Hints sent to devices (operations scored at or above ml.hint_threshold)",
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Relayed(Collector):
    """The engine's series, from its last report. A restarted engine starts its counters
    again from 0, which Prometheus reads as a counter reset."""

    def __init__(self) -> None:
        self.text = ""
        self.refresh: Callable[[], None] = lambda: None
        """Called on each collection, to ask the engine for its latest figures first
        (the engine process sets it; it does nothing on the event loop's thread)."""

    def update(self, exposition: bytes) -> None:
        self.text = exposition.decode()

    def collect(self) -> Iterator[Metric]:
        self.refresh()
        yield from text_string_to_metric_families(self.text)


class MetricsEndpoint(Part):
    """Prometheus exposition on `metrics.listen` (`host:port`; empty: off)."""

    name = "metrics"
    critical = True
    """The endpoint is bound at start; a port that is taken or malformed stops the
    daemon there (exit 1, logged), rather than leaving it running unwatched."""
    stop_timeout_s = 1.0

    def __init__(self, metrics: Metrics, listen: str) -> None:
        self.metrics = metrics
        self.listen = listen

    async def run(self) -> None:
        if not self.listen:
            return
        host, _, port = self.listen.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=self.metrics.registry)
        log.info("metrics endpoint", listen=self.listen)
