"""Webhook delivery end to end: a daemon process, real receivers on loopback, a real
Redis of the test's own, the broker (PROTOCOL.md, "Webhooks and the dead-letter queue").

Events come from panic alerts (each makes one `alert.crisis` event). Each status
class, the crash of the daemon mid-delivery, the death of its poster process, the
isolation of endpoints, the breaker, Redis down while deliveries die, reloads, and secrets.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from gateway.outbound.poster_process import CHILD as POSTER
from gateway.outbound.webhook_sender import YIELD_TRICKLE_S
from tests.support.admin import Admin
from tests.support.alerts import alert
from tests.support.database import db_rows
from tests.support.mqtt import Client
from tests.support.processes import (
    Daemon,
    Mosquitto,
    RedisServer,
    children_running,
    free_port,
    wait_for,
)
from tests.support.sync import counter_ops, queue_for
from tests.support.webhooks import SECRET, Receiver, Reply, endpoint
from tests.test_metrics import scrape, value

FAST_RETRIES = [0, 0.1, 0.1]


def panics(client: Client, daemon: Daemon, count: int, start: int = 0) -> list[str]:
    """Publish `count` panic alerts; their ids."""
    ids = [f"alert-{i}" for i in range(start, start + count)]
    for alert_id in ids:
        client.publish(
            f"{daemon.root}/devices/dev1/alerts",
            alert(alert_id, user_id=f"u-{alert_id}", kind="panic"),
        )
    return ids


def waiting(daemon: Daemon) -> list[tuple[Any, ...]]:
    return db_rows(daemon.db_url, "SELECT endpoint, attempts, dead_at FROM webhook_deliveries")


def settled(daemon: Daemon) -> None:
    """Every delivery is done with: delivered (gone) or in Redis (gone from the spool)."""
    wait_for(lambda: not waiting(daemon) and not unsent_events(daemon))


def unsent_events(daemon: Daemon) -> list[tuple[Any, ...]]:
    return db_rows(
        daemon.db_url, "SELECT id FROM outbox WHERE channel = 'webhook' AND sent_at IS NULL"
    )


def dlq_entries(server: RedisServer) -> dict[str, dict[str, Any]]:
    r = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        members = cast(list[str], r.zrange("webhook:dlq:index", 0, -1))
        entries = {}
        for member in members:
            raw = r.get(f"webhook:dlq:{member}")
            assert raw is not None, member
            entries[member] = json.loads(raw)
        return entries
    finally:
        r.close()


@pytest.fixture
def start(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], own_redis: RedisServer
) -> Callable[..., Daemon]:
    """`start(*endpoint_tables)`: a daemon with those endpoints and the test's Redis."""

    def make(*tables: str, **env: str) -> Daemon:
        return make_daemon(
            broker.port, config_text="".join(tables), REDIS__URL=own_redis.url, **env
        )

    return make


def test_a_200_is_delivered_once_signed_with_the_crisis_message_as_its_data(
    start: Callable[..., Daemon], client: Client
) -> None:
    with Receiver() as receiver:
        daemon = start(endpoint("ops", receiver.url))
        client.subscribe(f"{daemon.root}/alerts/crisis")
        panics(client, daemon, 1)
        (crisis,) = client.expect(1)
        (request,) = receiver.wait(1)
        settled(daemon)
        assert len(receiver.requests) == 1
    assert request.verified
    assert request.msg_id.startswith("msg_")
    event = request.event
    assert set(event) == {"type", "timestamp", "data"}
    assert event["type"] == "alert.crisis"
    assert event["data"] == crisis.json()
    stats = Admin(client, daemon.root).data("stats")["webhooks"]
    assert stats == {
        "delivered": 1,
        "failed": 0,
        "dead": 0,
        "pending": 0,
        "dlq": 0,
        "spool": 0,
        "poster_restarts": 0,
    }


def test_a_500_then_a_200_is_delivered_on_the_retry_with_the_same_webhook_id(
    db_url: str,
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    own_redis: RedisServer,
    client: Client,
) -> None:
    """On SQLite and PostgreSQL (its claims lock with SKIP LOCKED). (db_url first: its
    database must outlive the daemon, which stops before it is dropped.)"""
    port = free_port()
    with Receiver(lambda n: Reply(500) if n == 0 else Reply()) as receiver:
        daemon = make_daemon(
            broker.port,
            db_url,
            endpoint("ops", receiver.url, retry_schedule_s=FAST_RETRIES),
            REDIS__URL=own_redis.url,
            METRICS__LISTEN=f"127.0.0.1:{port}",
        )
        panics(client, daemon, 1)
        first, second = receiver.wait(2)
        settled(daemon)
        assert len(receiver.requests) == 2
    assert first.msg_id == second.msg_id
    assert first.body == second.body
    assert first.verified and second.verified
    webhooks = Admin(client, daemon.root).data("stats")["webhooks"]
    assert (webhooks["delivered"], webhooks["failed"], webhooks["dead"]) == (1, 1, 0)
    series = scrape(f"http://127.0.0.1:{port}/metrics")[1]
    assert (
        value(series, "fieldgate_webhook_deliveries_total", endpoint="ops", outcome="delivered")
        == 1
    )
    assert value(series, "fieldgate_webhook_deliveries_total", endpoint="ops", outcome="retry") == 1
    assert value(series, "fieldgate_webhook_delivery_seconds_count", endpoint="ops") == 2


def test_two_instances_on_one_postgresql_send_each_delivery_once(
    pg_url: str,
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    own_redis: RedisServer,
    client: Client,
) -> None:
    """Both fan out and claim from the same tables at once: neither sends what the
    other leased (a fast receiver: no lease lapses, so not even at least once twice).

    Checked against: claims without SKIP LOCKED / leases (requests > 40)."""
    with Receiver() as receiver:
        table = endpoint("ops", receiver.url, max_in_flight=4)
        first, second = (
            make_daemon(broker.port, pg_url, table, REDIS__URL=own_redis.url) for _ in range(2)
        )
        panics(client, first, 20)
        panics(client, second, 20, start=20)
        receiver.wait(40)
        settled(first)
        assert len(receiver.requests) == 40
        assert len(receiver.distinct()) == 40


def test_two_instances_never_send_a_slow_endpoints_queued_delivery_twice(
    pg_url: str,
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    own_redis: RedisServer,
    client: Client,
) -> None:
    """One slot, 0.6 s a request, leases of 4 x 1 s + 1 s: the instance that claims
    the 16 deliveries cannot attempt its queue's tail before those leases end. It
    gives them back unattempted; the two instances share them out again, and none
    is sent twice.

    Checked against: queued deliveries started whatever their lease (requests > 16:
    the other instance claims the lapsed ones while the first still sends them)."""
    with Receiver(lambda n: Reply(200, delay_s=0.6)) as receiver:
        table = endpoint("slow", receiver.url, max_in_flight=1, timeout_s=1)
        first = make_daemon(broker.port, pg_url, table, REDIS__URL=own_redis.url)
        panics(client, first, 16)
        wait_for(lambda: len(waiting(first)) == 16)
        make_daemon(broker.port, pg_url, table, REDIS__URL=own_redis.url)
        receiver.wait(16, timeout=60)
        settled(first)
        assert len(receiver.requests) == 16
        assert len(receiver.distinct()) == 16


def test_a_slow_endpoint_keeps_only_what_half_a_lease_can_attempt_claimed(
    start: Callable[..., Daemon], client: Client
) -> None:
    """0.5 s a request, one slot, leases of 4 x 1 s + 1 s: once the lane knows its
    pace it keeps what two seconds of attempts need claimed (two queued, two
    waiting in the poster process, one in flight), not 64 pages, so that its queue
    is not given back and claimed again over and over.

    Checked against: the bound fixed at 32 pages (12 still leased then); the poster's
    waiting one not counted against it (6)."""
    with Receiver(lambda n: Reply(200, delay_s=0.5)) as receiver:
        daemon = start(endpoint("slow", receiver.url, max_in_flight=1, timeout_s=1))
        panics(client, daemon, 24)
        receiver.wait(14, timeout=30)
        leased = db_rows(
            daemon.db_url,
            "SELECT count(*) FROM webhook_deliveries WHERE claimed_until IS NOT NULL",
        )
        assert leased[0][0] <= 5
        wait_for(lambda: len(receiver.distinct()) == 24, timeout=30)
        settled(daemon)
        assert len(receiver.requests) == 24


def test_while_a_backlog_drains_crises_go_at_once_and_other_events_wait(
    own_broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    own_redis: RedisServer,
) -> None:
    """10,000 colliding sync operations queued while the daemon was down, then a panic:
    the crisis is delivered while most of the backlog still waits, and the endpoint
    shows `yielding`; of the conflict events the backlog makes, only a trickle (a
    page a second) is sent before it is all stored (the devices' acks go first);
    then every one is delivered, once.

    Checked against: lanes that do not yield (1,043 conflict events sent during a
    drain of 2.3 s; 6 when they yield)."""
    with Receiver() as receiver:
        daemon = make_daemon(
            own_broker.port,
            config_text=endpoint("ops", receiver.url, max_in_flight=2),
            REDIS__URL=own_redis.url,
            WRITER__MAX_IN_PROCESS="100",
            MQTT__RECEIVE_MAXIMUM="1000",
        )
        assert daemon.terminate() == 0  # its sessions are kept: what follows queues
        ops = counter_ops(10_000, "yield", 20, 50)
        queue_for(own_broker.port, daemon.root, ops)
        device = Client(own_broker.port).connect()
        try:
            device.publish(f"{daemon.root}/devices/yield-d0/alerts", alert("y-1", kind="panic"))
        finally:
            device.close()
        daemon.start(wait_ready=False)
        stored = "select count(*) from sync_log"
        wait_for(lambda: any(r.event["type"] == "alert.crisis" for r in receiver.requests), 60)
        ((at_crisis,),) = db_rows(daemon.db_url, stored)
        started = time.monotonic()
        operator = Client(own_broker.port).connect()
        try:
            (shown,) = Admin(operator, daemon.root).data("webhooks/list")["items"]
        finally:
            operator.close()
        wait_for(lambda: db_rows(daemon.db_url, stored) == [(len(ops),)], timeout=120)
        drained_s = time.monotonic() - started
        during = [r for r in list(receiver.requests) if r.event["type"].startswith("conflict.")]
        settled(daemon)
        conflicts = [r for r in receiver.requests if r.event["type"].startswith("conflict.")]
    assert at_crisis < len(ops) // 2
    assert shown["state"] == "yielding"
    # Judged after the ack, in passes of thousands: a conflict's event per pass, not
    # per commit of the backlog.
    assert len(conflicts) >= 100
    assert len(during) <= 2 * (drained_s / YIELD_TRICKLE_S + 2)
    assert len({r.msg_id for r in conflicts}) == len(conflicts)
    ((events,),) = db_rows(
        daemon.db_url,
        "select count(*) from outbox where channel = 'webhook' and event_type like 'conflict.%'",
    )
    assert len(conflicts) == events
    assert "webhooks yield to the intake's backlog" in daemon.log()


def test_a_400_is_dead_at_once_in_redis_and_announced(
    start: Callable[..., Daemon], client: Client, own_redis: RedisServer
) -> None:
    with Receiver(lambda _n: Reply(400)) as receiver:
        daemon = start(endpoint("ops", receiver.url, retry_schedule_s=FAST_RETRIES))
        client.subscribe(f"{daemon.root}/webhooks/dead")
        panics(client, daemon, 1)
        (notice,) = client.expect(1)
        settled(daemon)
        (request,) = receiver.requests
    announced = notice.json()
    assert announced["event"] == "webhook.dead"
    entry = announced["entry"]
    assert dlq_entries(own_redis) == {entry["id"]: entry}
    assert entry["id"].startswith("dlq_")
    assert entry["webhook"] == "ops"
    assert entry["url"] == receiver.url.split("?")[0]  # the query may hold a token
    assert entry["event_type"] == "alert.crisis"
    assert entry["payload"] == request.event
    assert entry["attempts"] == 1
    assert entry["last_status"] == 400
    assert entry["last_error"] == "HTTP 400"
    assert entry["webhook_id"] == request.msg_id
    assert entry["first_attempt_at"] <= entry["failed_at"]


def test_a_timeout_is_retried_then_dead(
    start: Callable[..., Daemon], client: Client, own_redis: RedisServer
) -> None:
    with Receiver(lambda _n: Reply(200, delay_s=2.0)) as receiver:
        daemon = start(endpoint("slow", receiver.url, retry_schedule_s=[0, 0.1], timeout_s=0.3))
        panics(client, daemon, 1)
        first, second = receiver.wait(2)
        settled(daemon)
    assert first.msg_id == second.msg_id
    (entry,) = dlq_entries(own_redis).values()
    assert (entry["attempts"], entry["last_status"]) == (2, None)
    assert entry["last_error"] == "no answer within 0.3 s"


def test_a_429_is_retried_no_sooner_than_its_retry_after(
    start: Callable[..., Daemon], client: Client
) -> None:
    def respond(n: int) -> Reply:
        return Reply(429, headers={"Retry-After": "1"}) if n == 0 else Reply()

    with Receiver(respond) as receiver:
        daemon = start(endpoint("ops", receiver.url, retry_schedule_s=FAST_RETRIES))
        panics(client, daemon, 1)
        first, second = receiver.wait(2)
        settled(daemon)
    # The schedule alone would have retried after 0.08-0.12 s.
    assert second.at - first.at >= 0.95
    assert first.msg_id == second.msg_id


def test_a_refused_connection_is_retried_then_dead(
    start: Callable[..., Daemon], client: Client, own_redis: RedisServer
) -> None:
    url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    daemon = start(endpoint("gone", url, retry_schedule_s=FAST_RETRIES))
    panics(client, daemon, 1)
    wait_for(lambda: len(dlq_entries(own_redis)) == 1)
    settled(daemon)
    (entry,) = dlq_entries(own_redis).values()
    assert entry["attempts"] == 3
    assert entry["last_status"] is None
    assert entry["last_error"] == "cannot connect: Connection refused"


def test_after_a_sigkill_mid_delivery_every_event_is_delivered_once_by_webhook_id(
    start: Callable[..., Daemon], client: Client
) -> None:
    """The first eight requests hang past the kill; the restarted daemon sends what the
    dead one had leased (in flight or queued) once the leases lapse (4 x timeout + 1 s:
    5 s)."""
    with Receiver(lambda n: Reply(200, delay_s=0.8 if n < 8 else 0)) as receiver:
        daemon = start(endpoint("ops", receiver.url, timeout_s=1, retry_schedule_s=FAST_RETRIES))
        ids = panics(client, daemon, 20)
        receiver.wait(8)
        daemon.kill()
        daemon.start()
        wait_for(lambda: len(receiver.distinct()) == 20 and not waiting(daemon), timeout=60)
        settled(daemon)
        distinct = receiver.distinct()
    alerts_by_id = {r.event["data"]["alert_id"]: r.msg_id for r in distinct.values()}
    assert sorted(alerts_by_id) == sorted(ids)
    assert all(r.verified for r in distinct.values())


def test_a_sigkilled_daemons_poster_process_ends_and_the_restarted_one_delivers_all(
    start: Callable[..., Daemon], client: Client
) -> None:
    """The MQTT process dies with attempts in its poster process: the poster ends with
    it (its channel closes), and the daemon started again delivers every event."""
    with Receiver(lambda n: Reply(200, delay_s=0.8 if n < 4 else 0)) as receiver:
        daemon = start(endpoint("ops", receiver.url, timeout_s=1, retry_schedule_s=FAST_RETRIES))
        panics(client, daemon, 10)
        receiver.wait(4)
        assert daemon.proc is not None
        (poster,) = children_running(daemon.proc.pid, POSTER)
        daemon.kill()
        wait_for(lambda: not Path(f"/proc/{poster}").exists(), timeout=10)
        daemon.start()
        wait_for(lambda: len(receiver.distinct()) == 10 and not waiting(daemon), timeout=60)
        settled(daemon)


def test_the_poster_process_starts_with_a_daemon_that_has_an_endpoint_and_not_without(
    start: Callable[..., Daemon], client: Client
) -> None:
    """Started once the engine serves, before any event: the first one does not wait
    for it. A daemon without endpoints never starts one."""
    with Receiver() as receiver:
        daemon = start(endpoint("ops", receiver.url))
        assert daemon.proc is not None
        pid = daemon.proc.pid
        (poster,) = wait_for(lambda: children_running(pid, POSTER))
        panics(client, daemon, 1)
        receiver.wait(1)
        assert children_running(pid, POSTER) == [poster]
        bare = start()
        assert bare.proc is not None
        panics(client, bare, 1)
        wait_for(lambda: db_rows(bare.db_url, "SELECT alert_id FROM alerts"))
        assert children_running(bare.proc.pid, POSTER) == []


def test_a_killed_poster_process_is_started_again_and_its_attempts_retried(
    start: Callable[..., Daemon], client: Client
) -> None:
    port = free_port()
    with Receiver(lambda n: Reply(200, delay_s=2.0 if n < 3 else 0)) as receiver:
        daemon = start(
            endpoint("ops", receiver.url, timeout_s=5, retry_schedule_s=FAST_RETRIES),
            METRICS__LISTEN=f"127.0.0.1:{port}",
        )
        panics(client, daemon, 6)
        receiver.wait(3)
        assert daemon.proc is not None
        (poster,) = children_running(daemon.proc.pid, POSTER)
        os.kill(poster, signal.SIGKILL)
        wait_for(lambda: len(receiver.distinct()) == 6 and not waiting(daemon), timeout=30)
        settled(daemon)
        (again,) = children_running(daemon.proc.pid, POSTER)
    assert again != poster
    died = [line for line in daemon.log_lines() if line.get("event", "").startswith("poster")]
    assert [line["event"] for line in died] == ["poster process died: its attempts will be retried"]
    assert died[0]["attempts"] >= 3  # the three held, and any not answered yet
    series = scrape(f"http://127.0.0.1:{port}/metrics")[1]
    assert value(series, "fieldgate_webhook_poster_restarts_total") == 1
    assert Admin(client, daemon.root).data("stats")["webhooks"]["poster_restarts"] == 1


def test_a_slow_endpoint_does_not_delay_a_fast_one(
    start: Callable[..., Daemon], client: Client
) -> None:
    """Each takes the same events; the fast one has them all before the slow one has
    answered its first request (5 s)."""
    with (
        Receiver(lambda _n: Reply(200, delay_s=5.0)) as slow,
        Receiver() as fast,
    ):
        daemon = start(
            endpoint("slow", slow.url, max_in_flight=2, timeout_s=10),
            endpoint("fast", fast.url),
        )
        panics(client, daemon, 30)
        fast.wait(30, timeout=20)
        assert slow.answered == 0
        assert len(slow.requests) <= 2
    assert len(fast.distinct()) == 30


def test_the_breaker_pauses_an_endpoint_that_keeps_failing_and_resumes_it(
    start: Callable[..., Daemon], client: Client
) -> None:
    healthy = False

    def respond(_n: int) -> Reply:
        return Reply(200 if healthy else 503)

    with Receiver(respond) as receiver:
        daemon = start(
            endpoint(
                "flaky",
                receiver.url,
                max_in_flight=1,
                breaker_failures=3,
                breaker_pause_s=2.0,
                retry_schedule_s=[0] + [0.05] * 20,
            )
        )
        admin = Admin(client, daemon.root)
        panics(client, daemon, 4)
        receiver.wait(3)
        (row,) = wait_for(
            lambda: [r for r in admin.data("webhooks/list")["items"] if r["state"] == "paused"]
        )
        assert len(receiver.requests) == 3  # paused: nothing more goes
        assert row["breaker"]["state"] == "open"
        assert row["breaker"]["failures"] == 3
        assert row["last_error"] == "HTTP 503"
        healthy = True
        wait_for(lambda: not waiting(daemon))
        (row,) = admin.data("webhooks/list")["items"]
    assert row["state"] == "active"
    assert row["breaker"] == {"state": "closed", "failures": 0, "paused_until": None}
    assert len(receiver.distinct()) == 4
    said = [(line["event"], line.get("failures")) for line in daemon.log_lines()]
    assert [e for e in said if e[0].startswith("webhook endpoint")] == [
        ("webhook endpoint paused", 3),
        ("webhook endpoint resumed", None),
    ]


def test_entries_wait_in_the_database_while_redis_is_down_then_all_move_once(
    start: Callable[..., Daemon], client: Client, own_redis: RedisServer
) -> None:
    with Receiver(lambda _n: Reply(410)) as receiver:
        # (410s in a row would open the breaker after 5, the default)
        daemon = start(endpoint("ops", receiver.url, breaker_failures=100))
        client.subscribe(f"{daemon.root}/webhooks/dead")
        own_redis.stop()
        panics(client, daemon, 10)
        notices = client.expect(10)
        wait_for(lambda: len([r for r in waiting(daemon) if r[2] is not None]) == 10)
        assert len(receiver.requests) == 10
        own_redis.start()
        settled(daemon)
    entries = dlq_entries(own_redis)
    announced = {n.json()["entry"]["id"] for n in notices}
    assert set(entries) == announced
    assert len(entries) == 10


def test_a_reload_adds_an_endpoint_and_dead_letters_a_removed_ones_waiting_deliveries(
    start: Callable[..., Daemon], client: Client, own_redis: RedisServer
) -> None:
    with Receiver(lambda _n: Reply(503)) as down, Receiver() as up:
        daemon = start(endpoint("down", down.url, retry_schedule_s=[0, 3600]))
        panics(client, daemon, 2)
        down.wait(2)
        daemon.config_path.write_text(endpoint("up", up.url))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(dlq_entries(own_redis)) == 2)
        panics(client, daemon, 1, start=2)
        (request,) = up.wait(1)
        settled(daemon)
    assert request.event["data"]["alert_id"] == "alert-2"
    for entry in dlq_entries(own_redis).values():
        assert entry["webhook"] == "down"
        assert entry["last_error"] == "the endpoint is no longer configured"
        assert entry["attempts"] == 1


def test_a_disabled_endpoint_gets_no_attempt_that_had_not_started(
    start: Callable[..., Daemon], client: Client
) -> None:
    """One place, 3 s a request: the first attempt is at the receiver and the next
    ones wait their turn in the poster process when a reload disables the endpoint. The one
    in flight finishes; no other request goes; the others wait in the database,
    unattempted and unleased, for the endpoint to come back."""
    with Receiver(lambda _n: Reply(200, delay_s=3.0)) as receiver:
        table = endpoint("ops", receiver.url, max_in_flight=1, timeout_s=5)
        daemon = start(table)
        panics(client, daemon, 4)
        receiver.wait(1)
        daemon.config_path.write_text(table + "enabled = false\n")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: receiver.answered == 1)
        time.sleep(2.0)  # what a withdrawal missed would have started by now
        assert len(receiver.requests) == 1
        wait_for(
            lambda: (
                db_rows(
                    daemon.db_url,
                    "SELECT count(*) FROM webhook_deliveries"
                    " WHERE attempts = 0 AND claimed_until IS NULL",
                )
                == [(3,)]
            )
        )


def test_secrets_appear_nowhere(
    start: Callable[..., Daemon], client: Client, own_redis: RedisServer, broker: Mosquitto
) -> None:
    everything = Client(broker.port).connect()
    with Receiver(lambda _n: Reply(400)) as receiver:
        daemon = start(endpoint("ops", receiver.url), LOG__LEVEL="debug")
        admin = Admin(client, daemon.root)
        everything.subscribe(f"{daemon.root}/#")
        panics(client, daemon, 1)
        wait_for(lambda: len(dlq_entries(own_redis)) == 1)
        answers = [
            admin.data("config/get"),
            admin.data("webhooks/list"),
            admin.data("dlq/list"),
            admin.data("stats"),
        ]
    seen = [daemon.log(), json.dumps(answers), json.dumps(dlq_entries(own_redis))]
    everything.fence()
    everything.close()
    seen += [m.payload.decode(errors="replace") for m in everything.all]
    assert any("webhook.dead" in text for text in seen[3:])
    for text in seen:
        assert SECRET not in text
        assert SECRET.removeprefix("whsec_") not in text
        assert "query-secret" not in text
