"""The database fails under a running daemon while devices publish (issue 15, item 4):
PostgreSQL restarted, SQLite locked by another process for 30 s, the disk full.

What must hold each time: nothing published after the fault is answered while the
database cannot commit (the daemon acknowledges nothing it has not stored, and the
broker keeps what is not acknowledged); `health`, the retained `<root>/health` and
systemd's STATUS= text say the database is failing; the writer retries the same
batch with backoff; the MQTT session stays up (no keepalive timeout, no reconnect:
a reconnect makes the broker deliver again everything in flight); once the
database is back the daemon resumes by itself, every operation is stored exactly
once, and each is answered once, with the version stored.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    SPINE_ONLY,
    AckRecorder,
    Admin,
    Client,
    Daemon,
    Mosquitto,
    NotifySocket,
    OpStream,
    PostgresServer,
    SmallDisk,
    SqliteLock,
    db_rows,
    results_on,
    sqlite_path,
    sync_op,
    wait_for,
)

COUNT = 400
BEFORE = 100
"""Ops published before the fault; the rest flow while the database is down."""
OPS = [
    (f"dev-{index % 4}", sync_op(f"op-{index:04d}", entity_id=f"e-{index:04d}"))
    for index in range(COUNT)
]
"""Each op on an entity of its own: stored once, each row is exactly (op_id, op_id's
entity, version 1)."""
OP_IDS = {op["op_id"] for _, op in OPS}
EXPECTED_ROWS = sorted((op["op_id"], op["entity_id"], 1) for _, op in OPS)

SETTINGS = {**SPINE_ONLY, "HEALTH__INTERVAL_S": "0.5"}
"""The retained health report every half second, so that it follows the outage."""

COMMITS_FAILING = "commits failing: OperationalError"
"""`health`'s database detail while the database answers but the writer's commits fail
(gateway/status.py)."""
LOCK_S = 30.0
"""How long the other process holds SQLite's write lock (the issue's figure)."""
KEEPALIVE_S = 5
"""The shortest keepalive the config allows: an outage of LOCK_S spans six."""
RETRIES = 5
"""Failed attempts the daemon shows before the database comes back (PostgreSQL, the
disk): four waits between them, 0.05 s doubling (storage/writer.py), about a second."""


@dataclass
class Outage:
    at_fault: int
    """Ops published when the fault was in place: those after it came while it lasted."""
    answered_while_down: list[str]
    """The op_ids answered by the time the database came back."""
    results: list[dict[str, Any]]
    """Every answer devices received, to the end."""


def through_an_outage(
    daemon: Daemon,
    port: int,
    inject: Callable[[], object],
    while_down: Callable[[], object],
    restore: Callable[[], object],
) -> Outage:
    """Devices publish OPS throughout: the fault is injected once answers flow, the
    stream resumes at once; `while_down` runs once the broker has PUBACKed every op;
    then the database comes back, and the daemon is left to resume by itself."""
    acks = AckRecorder(port, daemon.root).start()
    stream = OpStream(port, daemon.root, OPS, chunk=20, pause_s=0.02, holds=[BEFORE]).start()
    try:
        wait_for(lambda: len(acks.results()) >= BEFORE // 2, timeout=60)
        inject()
        at_fault = len(stream.infos)
        stream.resume()
        # The broker stays up: it took every op at once, whatever the daemon does.
        assert stream.puback_all(timeout=60) == 0
        while_down()
        answered_while_down = [result["op_id"] for result in acks.results()]
        restore()
        wait_for(lambda: {r["op_id"] for r in acks.results()} >= OP_IDS, timeout=120)
        results = acks.results()
    finally:
        stream.close()
        acks.close()
    return Outage(at_fault, answered_while_down, results)


def assert_nothing_lost_nothing_answered_early(daemon: Daemon, outage: Outage) -> None:
    """Stored exactly once; nothing that came during the outage answered before its end;
    each op answered once, with the truth."""
    assert sorted(db_rows(daemon.db_url, "select op_id, entity_id, version from sync_log")) == (
        EXPECTED_ROWS
    )
    late = {op["op_id"] for _, op in OPS[outage.at_fault :]}
    assert len(late) >= COUNT - BEFORE
    assert late & set(outage.answered_while_down) == set()
    # One answer per op: no redelivery (a reconnect's) answered again. A commit whose
    # outcome the writer could not see (PostgreSQL stopped during its COMMIT) is found
    # stored on the retry: `duplicate`, still the one answer, with the stored version.
    assert Counter(r["op_id"] for r in outage.results) == Counter(OP_IDS)
    for result in outage.results:
        assert result in (
            {"op_id": result["op_id"], "status": "stored", "version": 1},
            {"op_id": result["op_id"], "status": "duplicate", "version": 1},
        )


def failing(healthy: dict[str, Any], detail: str) -> dict[str, Any]:
    """`health` with everything as on a healthy daemon (the MQTT session up, never
    reconnected) but the database."""
    return {
        "healthy": False,
        "checks": {**healthy["checks"], "database": {"ok": False, "detail": detail}},
    }


def health_report(port: int, root: str) -> dict[str, Any]:
    """`healthy` and `checks` of the retained `<root>/health`, as a dashboard that
    subscribes now reads them."""
    late = Client(port).connect()
    try:
        late.subscribe(f"{root}/health")
        (message,) = late.expect(1)
    finally:
        late.close()
    assert message.retain, message
    body = message.json()
    return {"healthy": body["healthy"], "checks": body["checks"]}


def says(admin: Admin, port: int, root: str, expected: dict[str, Any]) -> None:
    """Wait until `health` and the retained report both say `expected`."""
    wait_for(lambda: admin.data("health") == expected, timeout=30, interval=0.2)
    wait_for(lambda: health_report(port, root) == expected, timeout=30, interval=0.2)


def retries(daemon: Daemon) -> list[tuple[int, str, str]]:
    """(attempt, error, detail) of each `commit failed, retrying` line so far."""
    return [
        (line["attempt"], line["error"], line["detail"])
        for line in daemon.log_lines()
        if line.get("event") == "commit failed, retrying"
    ]


def assert_one_batch_retried(daemon: Daemon, detail: str | None) -> None:
    """The writer retried the batch under way with backoff (attempts 1..n of one
    commit, as tenacity counts them) and never gave up on it: no other batch failed,
    each failure an `OperationalError`, saying `detail` (None: whatever it says)."""
    tried = retries(daemon)
    assert len(tried) >= 2, tried
    assert [attempt for attempt, _, _ in tried] == list(range(1, len(tried) + 1)), tried
    assert {error for _, error, _ in tried} == {"OperationalError"}, tried
    if detail is not None:
        assert {said for _, _, said in tried} == {detail}, tried


def disconnects(daemon: Daemon) -> list[dict[str, Any]]:
    return [
        line
        for line in daemon.log_lines()
        if line.get("event") in ("mqtt disconnected, reconnecting", "mqtt connection failed")
    ]


# -- PostgreSQL restarted ---------------------------------------------------------------


def test_postgresql_restarted_mid_stream_stops_acks_says_so_and_stores_everything_once(
    private_pg: PostgresServer,
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    healthy: dict[str, Any],
) -> None:
    """The test's own PostgreSQL cluster stopped (fast shutdown: sessions cut) while
    devices publish, and started again once the daemon has said so and retried.

    Checked against: the writer's transient errors not retried (storage/writer.py
    `_retryable` False for them: the engine process died on the first failure, again
    after each restart, and no `commit failed, retrying` came)."""
    url = private_pg.start().replace("postgresql://", "postgresql+psycopg://", 1)
    daemon = make_daemon(broker.port, url, **SETTINGS)
    admin = Admin(client, daemon.root)

    def while_down() -> None:
        wait_for(lambda: len(retries(daemon)) >= RETRIES, timeout=30)
        says(admin, broker.port, daemon.root, failing(healthy, "OperationalError"))

    outage = through_an_outage(daemon, broker.port, private_pg.stop, while_down, private_pg.start)

    assert_nothing_lost_nothing_answered_early(daemon, outage)
    # What psycopg says first depends on the moment the server cut the session (the
    # commit under way, an idle pooled connection, a connection during the shutdown);
    # while it is down, connecting is refused.
    assert_one_batch_retried(daemon, None)
    refused = (
        f'connection failed: connection to server at "127.0.0.1", port {private_pg.port}'
        " failed: Connection refused"
    )
    assert refused in [detail for _, _, detail in retries(daemon)]
    says(admin, broker.port, daemon.root, healthy)
    assert disconnects(daemon) == []


# -- SQLite locked by another process ----------------------------------------------------


def test_sqlite_locked_for_30_s_by_another_process_keeps_the_session_and_stores_once(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client, healthy: dict[str, Any]
) -> None:
    """`BEGIN EXCLUSIVE` held by another process for 30 s (a backup script, an
    operator's `sqlite3` shell): each commit waits out SQLite's busy timeout (10 s),
    fails `database is locked`, and is retried. With a 5 s keepalive the lock spans
    six keepalives; the session answers the broker's pings all along (reading is
    not paused: what is held stays under `writer.max_in_process`).

    Checked against: a failed commit's batch given up instead of retried (its ops
    answered all the same, and 300 of them missing from `sync_log`), and `health`
    reading only `SELECT 1` (it said healthy all along: the database answers reads
    while the lock is held)."""
    daemon = make_daemon(broker.port, MQTT__KEEPALIVE_S=str(KEEPALIVE_S), **SETTINGS)
    admin = Admin(client, daemon.root)
    lock = SqliteLock(sqlite_path(daemon.db_url))
    locked_at = 0.0

    def inject() -> None:
        nonlocal locked_at
        lock.acquire()
        locked_at = time.monotonic()

    def while_down() -> None:
        says(admin, broker.port, daemon.root, failing(healthy, COMMITS_FAILING))
        # The 30 s: the time this test is about, not a wait for something.
        time.sleep(max(0.0, LOCK_S - (time.monotonic() - locked_at)))
        assert admin.data("health") == failing(healthy, COMMITS_FAILING)

    try:
        outage = through_an_outage(daemon, broker.port, inject, while_down, lock.release)
    finally:
        lock.close()

    assert_nothing_lost_nothing_answered_early(daemon, outage)
    assert_one_batch_retried(daemon, "database is locked")
    says(admin, broker.port, daemon.root, healthy)
    assert disconnects(daemon) == []


# -- the disk full -----------------------------------------------------------------------


WAL_CHECKPOINT_BYTES = 1000 * (4096 + 24)
"""The write-ahead log's size at SQLite's automatic checkpoint (1000 frames of a 4 KiB
page and its header); after one, commits reuse the log's space from its start."""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 16 MB tmpfs of this test's own (unmounted after the daemon has stopped: list
    it before `make_daemon`)."""
    disk = SmallDisk(tmp_path / "disk", "16m").mount()
    yield disk
    disk.close()


def test_a_full_disk_stops_acks_until_space_is_freed_then_stores_everything_once(
    small_disk: SmallDisk,
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    healthy: dict[str, Any],
) -> None:
    """The SQLite database on a small file system that the test fills until a write
    fails with ENOSPC, while devices publish; then the filler is removed.

    Every commit then needs new pages for SQLite's write-ahead log, which the disk
    no longer has (the log grows at its end until SQLite's first checkpoint, at 1000
    pages: the test fills the disk well before): `database or disk is full`, retried
    like any outage (not a refusal of the data: storage/refusals.py), until there is
    space again.

    Checked against: `OperationalError` taken for a refusal of the data
    (storage/refusals.py: the failing batch bisected and its ops refused, lost; the
    canary of decision 13 did not save them, since a rolled-back write never reaches
    the disk), and `health` reading only `SELECT 1` (healthy all along)."""
    url = f"sqlite+aiosqlite:///{small_disk.path}/fieldgate.db"
    daemon = make_daemon(broker.port, url, **SETTINGS)
    admin = Admin(client, daemon.root)

    def inject() -> None:
        wal = Path(f"{sqlite_path(url)}-wal")
        assert wal.stat().st_size < WAL_CHECKPOINT_BYTES, "checkpointed: it may not grow"
        assert small_disk.fill() > 0

    def while_down() -> None:
        wait_for(lambda: len(retries(daemon)) >= RETRIES, timeout=30)
        says(admin, broker.port, daemon.root, failing(healthy, COMMITS_FAILING))

    outage = through_an_outage(daemon, broker.port, inject, while_down, small_disk.free)

    assert_nothing_lost_nothing_answered_early(daemon, outage)
    assert_one_batch_retried(daemon, "database or disk is full")
    says(admin, broker.port, daemon.root, healthy)
    assert disconnects(daemon) == []


# -- systemd's status text ---------------------------------------------------------------

SERVING = "STATUS=serving on 127.0.0.1"
READY = "READY=1\nSTATUS=serving on 127.0.0.1"


def test_systemd_status_says_the_database_is_failing_and_clears(
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    notify: NotifySocket,
    healthy: dict[str, Any],
) -> None:
    """`systemctl status` shows the last STATUS= the daemon sent: while commits fail it
    must say so, and say `serving` again once they commit; the watchdog keeps pinging
    meanwhile (a database outage is no reason for systemd to restart the daemon:
    the restarted one could not reach the database either).

    All three places an operator looks say the same: `health`, the retained report,
    and the STATUS= text. Checked against: the watchdog alone, which sent nothing but
    WATCHDOG=1 after READY=1 (gateway/systemd.py's StatusLine now says it)."""
    daemon = make_daemon(broker.port, start=False, **SETTINGS)
    admin = Admin(client, daemon.root)
    daemon.start(extra_env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
    wait_for(lambda: notify.count(READY) == 1)
    client.subscribe(f"{daemon.root}/devices/d1/sync/ack")
    lock = SqliteLock(sqlite_path(daemon.db_url)).acquire()
    try:
        client.publish(f"{daemon.root}/devices/d1/sync", sync_op("op-1"))
        says(admin, broker.port, daemon.root, failing(healthy, COMMITS_FAILING))
        # The watchdog judges every 0.2 s: three pings after `health` said it, it has
        # seen the failure too.
        pings = notify.count("WATCHDOG=1")
        wait_for(lambda: notify.count("WATCHDOG=1") >= pings + 3)
        down = f"STATUS=unhealthy: database: {COMMITS_FAILING}"
        assert down in notify.messages(), notify.messages()
        lock.release()
    finally:
        lock.close()
    assert wait_for(lambda: results_on(client, daemon.root), timeout=30) == [
        {"op_id": "op-1", "status": "stored", "version": 1}
    ]
    says(admin, broker.port, daemon.root, healthy)
    wait_for(lambda: SERVING in notify.messages())
    statuses = [m for m in notify.messages() if m.startswith("STATUS=")]
    assert statuses == [down, SERVING]


# -- the keepalive while reading is paused ------------------------------------------------

PAUSED_COUNT = 300
PAUSED_OPS = [
    (f"dev-{index % 4}", sync_op(f"p-{index:04d}", entity_id=f"p-{index:04d}"))
    for index in range(PAUSED_COUNT)
]
KEEPALIVES = 4
"""How many keepalives the outage lasts once reading is paused."""


def test_a_long_outage_with_reading_paused_keeps_the_mqtt_session(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client, healthy: dict[str, Any]
) -> None:
    """More is held than `writer.max_in_process` while the database is locked: the
    session stops reading the socket (backpressure: the broker queues), for four
    keepalives. The session must stay up all along: no keepalive timeout, no
    reconnect, and so no redelivery of what it holds (each op answered once, never
    `duplicate`).

    Checked against: the session before decision 14 (a `Keep alive timeout` every
    2 x keepalive_s, and for 300 ops the devices got 700 answers, 400 of them
    `duplicate` for the redelivered)."""
    daemon = make_daemon(
        broker.port,
        MQTT__KEEPALIVE_S=str(KEEPALIVE_S),
        WRITER__MAX_IN_PROCESS="100",
        LOG__LEVEL="debug",
        **SPINE_ONLY,
    )
    acks = AckRecorder(broker.port, daemon.root).start()
    lock = SqliteLock(sqlite_path(daemon.db_url)).acquire()
    stream = OpStream(broker.port, daemon.root, PAUSED_OPS).start()
    try:
        assert stream.puback_all(timeout=60) == 0
        wait_for(lambda: "intake paused" in daemon.log(), timeout=30)
        # The outage's length is what this test is about.
        time.sleep(KEEPALIVES * KEEPALIVE_S)
        lock.release()
        ids = {op["op_id"] for _, op in PAUSED_OPS}
        wait_for(lambda: {r["op_id"] for r in acks.results()} >= ids, timeout=120)
        results = acks.results()
    finally:
        lock.close()
        stream.close()
        acks.close()
    assert [line.get("reason") for line in disconnects(daemon)] == []
    assert sorted(results, key=lambda r: r["op_id"]) == [
        {"op_id": op["op_id"], "status": "stored", "version": 1}
        for _, op in sorted(PAUSED_OPS, key=lambda pair: pair[1]["op_id"])
    ]
    assert sorted(db_rows(daemon.db_url, "select op_id, entity_id, version from sync_log")) == (
        sorted((op["op_id"], op["entity_id"], 1) for _, op in PAUSED_OPS)
    )
    admin = Admin(client, daemon.root)
    wait_for(lambda: admin.data("health") == healthy, timeout=30, interval=0.2)
