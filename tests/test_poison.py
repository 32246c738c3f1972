"""Poison: a value the database refuses for good must not stall ingest.

First, validation: every value that a database here cannot store is rejected
before it reaches the writer (`schema`, with its path, and quarantined), on
SQLite and on PostgreSQL, and what both can store (a NUL inside JSON) is stored
as sent. Then the safety net, for what validation cannot know: a database that
refuses one record of a batch for real (a trigger or CHECK the test adds) gets
that record rejected and quarantined while every other one is stored exactly
once, answered and PUBACKed; and a database outage during the isolation is
retried, never a rejection. A database that would refuse valid text (one not in
UTF8) is refused at start instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from handlers.alerts import AlertHandler, AlertRules
from handlers.errors import NUL_MESSAGE
from handlers.records import AlertRecord, OpRecord, QuarantineRecord
from storage import migrate
from storage.db import create_engine
from storage.writer import Writer, WriteSet
from tests.support import (
    AckRecorder,
    Admin,
    Client,
    Daemon,
    Mosquitto,
    PostgresServer,
    alert,
    db_rows,
    pg_database,
    plain_url,
    plain_writer,
    sqlite_path,
    sync_op,
    wait_for,
)


def execute(url: str, *statements: str) -> None:
    """DDL straight on a database, as an operator (or a test) would run it."""
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(sqlite_path(url), timeout=30)) as conn:
            for statement in statements:
                conn.execute(statement)
            conn.commit()
        return
    with psycopg.connect(plain_url(url), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def refuse(url: str, table: str, column: str, value: str) -> str:
    """Make the database refuse rows of `table` whose `column` is `value`; returns the
    class name of the error it will raise. A trigger on SQLite (which cannot add a
    CHECK to a table), a CHECK constraint on PostgreSQL: the database's own refusal."""
    name = f"refuse_{uuid.uuid4().hex[:8]}"
    if url.startswith("sqlite"):
        execute(
            url,
            f"CREATE TRIGGER {name} BEFORE INSERT ON {table} WHEN NEW.{column} = '{value}'"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        return "IntegrityError"
    execute(url, f"ALTER TABLE {table} ADD CONSTRAINT {name} CHECK ({column} <> '{value}')")
    return "CheckViolation"


LATIN1 = "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
"""A database as old clusters initialised under a Latin-1 locale have: it stores `é`
but not `Ω`, and psycopg refuses to send what it cannot encode."""


# -- validation: what no database here can store never reaches the writer -----------


def nul(text: str) -> str:
    return f"{text}\x00x"


def op_rejected(op_id: str | None, path: str | None, code: str = "schema") -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": NUL_MESSAGE}
    if path is not None:
        error["path"] = path
    return {"op_id": op_id, "status": "rejected", "error": error}


LONG_KEY = "k" * 300

SYNC_REJECTED: list[tuple[str, Any, list[dict[str, Any]], str | None]] = [
    # (case, payload, the answer's results, the quarantine row's path)
    ("op_id", sync_op(nul("o")), [op_rejected(nul("o"), "op_id")], "op_id"),
    ("user_id", sync_op("v-user", user_id=nul("u")), [op_rejected("v-user", "user_id")], "user_id"),
    (
        "entity_id",
        sync_op("v-entity", entity_id=nul("e")),
        [op_rejected("v-entity", "entity_id")],
        "entity_id",
    ),
    (
        "session_id",
        sync_op("v-session", session_id=nul("s")),
        [op_rejected("v-session", "session_id")],
        "session_id",
    ),
    (
        "batch_id",
        {"batch_id": nul("b"), "ops": [sync_op("v-batch")]},
        [op_rejected(None, "batch_id")],
        "batch_id",
    ),
    (
        "one op of a batch",
        {
            "batch_id": "b-mixed",
            "ops": [sync_op("v-ok", entity_id="v-ok"), sync_op("v-bad", entity_id=nul("e"))],
        },
        [
            {"op_id": "v-ok", "status": "stored", "version": 1},
            op_rejected("v-bad", "ops[1].entity_id"),
        ],
        "ops[1].entity_id",
    ),
]
"""Strings stored as text columns, each with a NUL: PostgreSQL refuses them all."""


def test_values_no_database_can_store_are_rejected_and_the_rest_stored_as_sent(
    db_url: str, broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port, db_url)
    root = daemon.root
    client.subscribe(f"{root}/devices/+/sync/ack", f"{root}/devices/+/alerts/ack")

    def answer_to(kind: str, device: str, payload: Any) -> dict[str, Any]:
        """Publish on the device's `kind` topic (sync, alerts); its one answer."""
        client.publish(f"{root}/devices/{device}/{kind}", payload)
        (answer,) = client.expect(1)
        assert answer.topic == f"{root}/devices/{device}/{kind}/ack"
        body: dict[str, Any] = answer.json()
        return body

    expected_quarantine: list[tuple[str | None, str, str, str | None]] = []
    for index, (case, payload, results, path) in enumerate(SYNC_REJECTED):
        assert answer_to("sync", f"s{index}", payload)["results"] == results, case
        expected_quarantine.append((f"s{index}", "sync", "schema", path))

    # An unknown key in a change is echoed in the error's path: the quarantine row
    # holds it too, NUL written out and cut to the column, never refused.
    answer = answer_to("sync", "k1", sync_op("v-key", changes={"status": {"new": 1, nul("k"): 2}}))
    assert answer["results"][0]["error"]["path"] == f"changes.status.{nul('k')}"
    expected_quarantine.append(("k1", "sync", "schema", "changes.status.k\\x00x"))
    answer = answer_to("sync", "k2", sync_op("v-long", changes={"status": {"new": 1, LONG_KEY: 2}}))
    assert answer["results"][0]["error"]["path"] == f"changes.status.{LONG_KEY}"
    expected_quarantine.append(("k2", "sync", "schema", f"changes.status.{LONG_KEY}"[:256]))

    # A string that is not UTF-8 where msgspec keeps the bytes raw (`device`).
    raw = json.dumps(sync_op("v-utf8", device={"platform": "x"})).encode()
    answer = answer_to("sync", "m1", raw.replace(b'"x"', b'"\xff"'))
    assert answer["results"] == [
        {
            "op_id": None,
            "status": "rejected",
            "error": {"code": "malformed", "message": "the payload is not UTF-8"},
        }
    ]
    expected_quarantine.append(("m1", "sync", "malformed", None))
    # Integers past BIGINT never get as far as the database.
    answer = answer_to("sync", "i1", sync_op("v-big", base_version=2**63))
    assert answer["results"][0]["error"]["path"] == "base_version"
    expected_quarantine.append(("i1", "sync", "schema", "base_version"))

    for index, name in enumerate(["alert_id", "user_id", "site_id"]):
        body = {**alert(f"al-{name}"), name: nul(name)}
        answer = answer_to("alerts", f"a{index}", body)
        assert answer["status"] == "rejected"
        assert answer["error"] == {"code": "schema", "message": NUL_MESSAGE, "path": name}
        expected_quarantine.append((f"a{index}", "alert", "schema", name))
    for name in ["alert_id", "by"]:
        ack = {"alert_id": "al-x", "by": "ana", name: nul(name)}
        client.publish(f"{root}/alerts/crisis/ack", ack)
        expected_quarantine.append((None, "crisis_ack", "schema", name))

    # What both databases hold: a NUL inside JSON stays the escape `\u0000`.
    changes = {nul("field"): {"old": None, "new": nul("value")}, "n": {"old": -(10**30), "new": 0}}
    device = {"platform": nul("android"), nul("key"): 1}
    answer = answer_to(
        "sync",
        "j1",
        sync_op(
            "v-json",
            changes=changes,
            device=device,
            base_version=2**63 - 1,
            edited_at="0001-01-01T00:00:00Z",
        ),
    )
    assert answer["results"] == [{"op_id": "v-json", "status": "stored", "version": 1}]
    ((stored_changes, stored_device, base_version, edited_at),) = db_rows(
        daemon.db_url,
        "select changes, device_meta, base_version, edited_at from sync_log where op_id = 'v-json'",
    )
    assert json.loads(stored_changes) == changes
    assert json.loads(stored_device) == device
    assert (base_version, edited_at) == (2**63 - 1, -62135596800000000)
    answer = answer_to("alerts", "j2", alert("al-flags", flags=[nul("flag")]))
    assert (answer["status"], answer["classification"]) == ("stored", "none")
    ((flags,),) = db_rows(daemon.db_url, "select flags from alerts where alert_id = 'al-flags'")
    assert json.loads(flags) == [nul("flag")]
    # A panic must not be lost to a detail of its text: a NUL in the note (free text,
    # a text column) is stored as U+FFFD, and the crisis raised as for any panic.
    answer = answer_to("alerts", "n1", alert("al-note", kind="panic", note=nul("\x00help")))
    assert answer == {"alert_id": "al-note", "status": "stored", "classification": "crisis"}
    assert db_rows(
        daemon.db_url, "select note, classification from alerts where alert_id = 'al-note'"
    ) == [("\ufffdhelp\ufffdx", "crisis")]
    crisis = f"select payload from outbox where topic = '{root}/alerts/crisis'"
    ((published,),) = db_rows(daemon.db_url, crisis)
    assert json.loads(bytes(published))["alert_id"] == "al-note"

    wait_for(lambda: len(quarantined(daemon)) >= len(expected_quarantine))
    assert [row[:4] for row in quarantined(daemon)] == expected_quarantine
    assert db_rows(daemon.db_url, "select op_id from sync_log order by op_id") == [
        ("v-json",),
        ("v-ok",),
    ]
    assert answer_to("sync", "after", sync_op("after-1", entity_id="after"))["results"] == [
        {"op_id": "after-1", "status": "stored", "version": 1}
    ]
    # Validation caught it all: the database never refused a commit.
    events = [line.get("event") for line in daemon.log_lines()]
    assert "commit failed, retrying" not in events
    assert "batch refused by the database, isolating" not in events


def quarantined(daemon: Daemon) -> list[tuple[Any, ...]]:
    return db_rows(
        daemon.db_url,
        "select device_id, kind, code, path, message, payload from quarantine order by id",
    )


# -- the safety net, end to end: a real daemon, broker and database -------------------


@dataclass
class Poison:
    """A database that will refuse one op of the batch, and how it says so."""

    url: str
    op: dict[str, Any]
    arm: Callable[[], str]
    """Makes the database refuse `op` (once the daemon created the tables); returns the
    class name of the error it raises."""


MARKER = "private-marker-58"
"""In the poison op's change: must never reach the log."""


@pytest.fixture
def poison(db_url: str) -> Poison:
    op = sync_op("poison", entity_id="ep", changes={"note": {"old": None, "new": MARKER}})
    return Poison(db_url, op, lambda: refuse(db_url, "sync_log", "op_id", "poison"))


def test_a_database_not_in_utf8_is_refused_at_start(
    pg_admin: str, broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """In LATIN1 every op with an `Ω` in an id would be refused and rejected one by one,
    and a quarantine row holding one would stall ingest: the daemon does not start,
    says why in one line, and exits 2 (the unit file does not restart it)."""
    with pg_database(pg_admin, LATIN1) as url:
        daemon = make_daemon(broker.port, url, start=False)
        daemon.start(wait_ready=False)
        assert daemon.proc is not None
        assert daemon.proc.wait(30) == 2
        assert (
            "fieldgate: database.url: the database's encoding is LATIN1, and fieldgate"
            " needs UTF8 (CREATE DATABASE ... ENCODING 'UTF8')"
        ) in daemon.log()
        assert "Traceback" not in daemon.log()


def answers_by_topic(*clients: Client) -> dict[str, dict[str, Any]]:
    """The answers each client received, by topic (one each is expected here)."""
    out: dict[str, dict[str, Any]] = {}
    for client in clients:
        with client._lock:
            out.update((m.topic, m.json()) for m in client.all if m.topic.endswith("/ack"))
    return out


def test_a_poison_op_is_rejected_and_every_other_message_stored_once(
    poison: Poison, broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """One op that the database refuses, in a batch with good ops from three devices,
    and an alert that came meanwhile: it alone is rejected and quarantined; all else is
    stored once, answered, and PUBACKed (a restart gets nothing redelivered); ingest
    goes on. (The alert goes ahead in a commit of its own, not in the poisoned batch.)"""
    daemon = make_daemon(broker.port, poison.url, WRITER__MAX_WAIT_MS="500")
    error_name = poison.arm()
    root = daemon.root
    recorder = AckRecorder(broker.port, root).start()
    device = Client(broker.port).connect().subscribe(f"{root}/devices/+/alerts/ack")
    try:
        batch = {
            "batch_id": "b-a",
            "ops": [sync_op("a1", entity_id="ea1"), poison.op, sync_op("a2", entity_id="ea2")],
        }
        sent = [
            (f"{root}/devices/dev-a/sync", json.dumps(batch).encode()),
            (f"{root}/devices/dev-b/sync", json.dumps(sync_op("b1", entity_id="eb1")).encode()),
            (f"{root}/devices/dev-c/sync", json.dumps(sync_op("c1", entity_id="café")).encode()),
            # Last: an alert ends the gathering at once (urgent), and is committed first.
            (f"{root}/devices/dev-d/alerts", json.dumps(alert("al-1", mood=7)).encode()),
        ]
        infos = [device.publish(topic, payload, wait=False) for topic, payload in sent]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
        wait_for(lambda: len(answers_by_topic(recorder.client, device)) >= 4)
        refused: dict[str, Any] = {
            "op_id": "poison",
            "status": "rejected",
            "error": {
                "code": "schema",
                "message": f"the database refused this operation ({error_name})",
                "path": "ops[1]",
            },
        }
        assert answers_by_topic(recorder.client, device) == {
            f"{root}/devices/dev-a/sync/ack": {
                "batch_id": "b-a",
                "results": [
                    {"op_id": "a1", "status": "stored", "version": 1},
                    refused,
                    {"op_id": "a2", "status": "stored", "version": 1},
                ],
            },
            f"{root}/devices/dev-b/sync/ack": {
                "batch_id": None,
                "results": [{"op_id": "b1", "status": "stored", "version": 1}],
            },
            f"{root}/devices/dev-c/sync/ack": {
                "batch_id": None,
                "results": [{"op_id": "c1", "status": "stored", "version": 1}],
            },
            f"{root}/devices/dev-d/alerts/ack": {
                "alert_id": "al-1",
                "status": "stored",
                "classification": "none",
            },
        }
        assert db_rows(
            daemon.db_url, "select op_id, device_id, entity_id, version from sync_log order by id"
        ) == [
            ("a1", "dev-a", "ea1", 1),
            ("a2", "dev-a", "ea2", 1),
            ("b1", "dev-b", "eb1", 1),
            ("c1", "dev-c", "café", 1),
        ]
        assert db_rows(daemon.db_url, "select alert_id from alerts") == [("al-1",)]
        ((row),) = quarantined(daemon)
        assert row[:5] == ("dev-a", "sync", "schema", "ops[1]", refused["error"]["message"])
        assert bytes(row[5]) == sent[0][1]

        # It was isolated from the company it came in, logged without the payload.
        lines = daemon.log_lines()
        (isolating,) = [
            e for e in lines if e["event"] == "batch refused by the database, isolating"
        ]
        assert (isolating["level"], isolating["ops"], isolating["alerts"]) == ("warning", 5, 0)
        (logged,) = [e for e in lines if e["event"] == "refused by the database"]
        assert (logged["level"], logged["id"], logged["device_id"]) == (
            "warning",
            "poison",
            "dev-a",
        )
        assert MARKER not in daemon.log()
        assert "commit failed, retrying" not in [e["event"] for e in lines]

        # Counted, and nothing held: every message was PUBACKed.
        stats = Admin(device, root).data("stats")
        assert stats["rejected_by_code"] == {"schema": 1}
        assert (stats["queues"]["in_flight"], stats["queues"]["pending_commit"]) == (0, 0)

        # Ingest goes on.
        device.publish(f"{root}/devices/dev-b/sync", sync_op("b2", entity_id="eb1"))
        wait_for(lambda: {"op_id": "b2", "status": "stored", "version": 2} in recorder.results())

        # The broker agrees: after a SIGKILL, a restart gets nothing redelivered.
        # Redelivery comes before new messages, so it would show before the sentinel.
        daemon.kill()
        answered = len(recorder.results())
        daemon.start()
        device.publish(f"{root}/devices/dev-b/sync", sync_op("sentinel", entity_id="s"))
        wait_for(lambda: any(r["op_id"] == "sentinel" for r in recorder.results()))
        assert [r["op_id"] for r in recorder.results()[answered:]] == ["sentinel"]
    finally:
        device.close()
        recorder.close()


# -- the safety net, on the Writer with a real database -------------------------------


@pytest.fixture
async def writer(db_url: str) -> AsyncIterator[Writer]:
    await migrate.upgrade_async(db_url)
    engine = create_engine(db_url)
    made = plain_writer(engine)
    try:
        yield made
    finally:
        await made.close()
        await engine.dispose()


def op(op_id: str, entity_id: str) -> OpRecord:
    changes = {"status": {"old": None, "new": op_id}}
    return OpRecord(
        op_id=op_id,
        device_id="d1",
        user_id="u1",
        entity_type="task",
        entity_id=entity_id,
        operation="update",
        changes=changes,
        changes_json=json.dumps(changes),
        edited_at_us=1_790_000_000_000_000,
        received_at_us=1_790_000_000_000_000,
    )


def alert_record(alert_id: str) -> AlertRecord:
    return AlertRecord(
        alert_id=alert_id,
        device_id="d1",
        user_id="u1",
        kind="journal",
        occurred_at_us=1_790_000_000_000_000,
        received_at_us=1_790_000_000_000_000,
        mood=7,
    )


def quarantine_record(topic: str) -> QuarantineRecord:
    return QuarantineRecord(
        received_at_us=1_790_000_000_000_000,
        topic=topic,
        device_id="d1",
        kind="sync",
        code="schema",
        message="m",
        path=None,
        payload=b"{}",
        payload_bytes=2,
    )


def expected_versions(records: list[OpRecord]) -> list[tuple[str, str, int]]:
    """Per entity 1, 2, ... in the order given: what the committed records must carry."""
    seen: dict[str, int] = {}
    out = []
    for record in records:
        seen[record.entity_id] = seen.get(record.entity_id, 0) + 1
        out.append((record.op_id, record.entity_id, seen[record.entity_id]))
    return out


async def test_a_panic_whose_note_holds_a_nul_is_stored_and_raises_its_crisis(
    db_url: str, writer: Writer
) -> None:
    """The handler's record through the real storage step: the NUL that PostgreSQL
    cannot hold in text is stored as U+FFFD, the alert committed and its crisis message
    written. Checked against: the NUL passed through (PostgreSQL refuses the commit,
    the panic is rejected as poison)."""
    payload = json.dumps(alert("al-nul", kind="panic", note="\x00help\x00")).encode()
    decoded = AlertHandler(AlertRules()).decode(
        "fg/devices/d1/alerts", "d1", payload, 1_790_000_000_000_000
    )
    assert decoded.record is not None
    committed = await writer.commit(WriteSet([decoded.record]))
    assert (committed.refused, decoded.record.status) == ([], "stored")
    assert db_rows(db_url, "select note, classification, reasons from alerts") == [
        ("\ufffdhelp\ufffd", "crisis", '["panic"]')
    ]
    ((body,),) = db_rows(
        db_url, "select payload from outbox where topic = 'fieldgate/alerts/crisis'"
    )
    assert json.loads(bytes(body))["alert_id"] == "al-nul"


async def test_the_writer_commits_all_but_the_records_refused_alone(
    db_url: str, writer: Writer
) -> None:
    """Two poison ops and a poison alert among 14 ops, a duplicate and a quarantine row:
    exactly those three come back refused, rolled back; everything else is committed
    once, with the versions it would have had in one transaction."""
    error_name = refuse(db_url, "sync_log", "op_id", "p-3")
    refuse(db_url, "sync_log", "op_id", "p-10")
    refuse(db_url, "alerts", "alert_id", "al-poison")
    ops = [op(f"p-{i}" if i in (3, 10) else f"g-{i}", f"e{i % 3}") for i in range(14)]
    again = op("g-1", "e1")
    alerts = [alert_record("al-good"), alert_record("al-poison")]
    batch = WriteSet([*ops, again, *alerts], quarantine=[quarantine_record("q/1")])
    commits_before = writer.commits

    committed = await writer.commit(batch)

    # One batch, one commit in the writer's count (stats), however many parts it took.
    assert writer.commits == commits_before + 1

    # Alerts are searched first (a crisis must not wait for the ops' search).
    assert [(type(r.record).__name__, r.error) for r in committed.refused] == [
        ("AlertRecord", error_name),
        ("OpRecord", error_name),
        ("OpRecord", error_name),
    ]
    assert [r.record for r in committed.refused] == [alerts[1], ops[3], ops[10]]
    good = [record for record in ops if record.op_id.startswith("g-")]
    assert [(r.op_id, r.entity_id, r.version) for r in good] == expected_versions(good)
    assert {r.status for r in good} == {"stored"}
    assert (again.status, again.version) == ("duplicate", ops[1].version)
    assert [(r.status, r.version) for r in (ops[3], ops[10])] == [("pending", None)] * 2
    assert (alerts[0].status, alerts[1].status) == ("stored", "pending")
    assert sorted(db_rows(db_url, "select op_id, entity_id, version from sync_log")) == sorted(
        expected_versions(good)
    )
    assert db_rows(db_url, "select alert_id from alerts") == [("al-good",)]
    assert db_rows(db_url, "select topic from quarantine") == [("q/1",)]
    assert writer.healthy


async def test_a_lone_poison_op_is_refused_and_the_next_batch_commits(
    db_url: str, writer: Writer
) -> None:
    error_name = refuse(db_url, "sync_log", "op_id", "poison")
    poison = op("poison", "e1")
    committed = await writer.commit(WriteSet([poison]))
    assert [(r.record, r.error) for r in committed.refused] == [(poison, error_name)]
    following = op("next", "e1")
    assert (await writer.commit(WriteSet([following]))).refused == []
    assert (following.status, following.version) == ("stored", 1)
    assert db_rows(db_url, "select op_id from sync_log") == [("next",)]


async def test_a_missing_table_is_retried_not_refused(db_url: str, writer: Writer) -> None:
    """A table gone (a migration not run, a rename) fails every record alike: that is
    the deployment's fault, not the data's. PostgreSQL says so with SQLSTATE class 42
    (a `ProgrammingError`), SQLite with an `OperationalError`: both retried until the
    table is back, nothing refused."""
    execute(db_url, "ALTER TABLE quarantine RENAME TO quarantine_away")
    record = op("g-1", "e1")
    commit = asyncio.ensure_future(
        writer.commit(WriteSet([record], quarantine=[quarantine_record("q/1")]))
    )
    await until(lambda: not writer.healthy)
    assert writer.last_error in {"ProgrammingError", "OperationalError"}
    assert not commit.done()
    execute(db_url, "ALTER TABLE quarantine_away RENAME TO quarantine")
    committed = await asyncio.wait_for(commit, 30)
    assert committed.refused == []
    assert (record.status, writer.healthy) == ("stored", True)
    assert db_rows(db_url, "select topic from quarantine") == [("q/1",)]


def refuse_every(url: str, table: str, column: str) -> str:
    """Make the database refuse every new row of `table`, as a bad migration can (a
    trigger on SQLite, a CHECK on PostgreSQL, the rows already there untouched);
    returns the error's class name and the statement that undoes it."""
    name = f"refuse_all_{uuid.uuid4().hex[:8]}"
    if url.startswith("sqlite"):
        execute(
            url,
            f"CREATE TRIGGER {name} BEFORE INSERT ON {table}"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        return f"DROP TRIGGER {name}"
    execute(url, f"ALTER TABLE {table} ADD CONSTRAINT {name} CHECK ({column} = 'never') NOT VALID")
    return f"ALTER TABLE {table} DROP CONSTRAINT {name}"


async def test_a_database_that_refuses_every_record_alike_is_an_outage_not_poison(
    db_url: str, writer: Writer
) -> None:
    """A constraint every row fails (a bad migration) refuses each record alone, as
    poison would; but a canary of plain values is refused too, with the same error:
    the database is at fault. Nothing is refused (no operation or crisis alert
    rejected for good): the batch is retried, unhealthy, until the constraint is
    gone, then stored once. Checked against: the refusals handed back as they came
    (the ops and the alert rejected, lost to the device)."""
    undo_ops = refuse_every(db_url, "sync_log", "op_id")
    undo_alerts = refuse_every(db_url, "alerts", "alert_id")
    ops = [op(f"g-{i}", f"e{i % 2}") for i in range(4)]
    crisis = alert_record("al-1")
    commit = asyncio.ensure_future(writer.commit(WriteSet([*ops, crisis])))
    await until(lambda: not writer.healthy)
    assert writer.last_error in {"IntegrityError", "CheckViolation"}
    await asyncio.sleep(0.5)
    assert not commit.done()
    assert db_rows(db_url, "select count(*) from sync_log") == [(0,)]
    execute(db_url, undo_ops)
    execute(db_url, undo_alerts)
    committed = await asyncio.wait_for(commit, 30)
    assert committed.refused == []
    assert [(r.op_id, r.entity_id, r.version) for r in ops] == expected_versions(ops)
    assert (crisis.status, writer.healthy) == ("stored", True)
    assert sorted(db_rows(db_url, "select op_id, entity_id, version from sync_log")) == sorted(
        expected_versions(ops)
    )
    assert db_rows(db_url, "select alert_id from alerts") == [("al-1",)]
    # The canaries were rolled back: nothing of theirs is stored.
    assert db_rows(
        db_url, "select count(*) from entities where entity_type = 'fieldgate-canary'"
    ) == [(0,)]


async def until(predicate: Callable[[], Any]) -> None:
    """`wait_for` off the event loop (the writer's thread and the database run meanwhile)."""
    await asyncio.to_thread(wait_for, predicate, 30.0)


# -- a real outage in the middle of an isolation --------------------------------------


def waiting_on_lock(url: str) -> bool:
    rows = db_rows(
        url,
        "select count(*) from pg_stat_activity"
        " where wait_event_type = 'Lock' and query like 'INSERT INTO entities%'",
    )
    return bool(rows[0][0])


async def test_an_outage_during_the_isolation_is_retried_not_refused(
    private_pg: PostgresServer,
) -> None:
    """The isolation is pinned mid-way on a row lock: the poison refused, a good op
    waiting alone for the lock. The server stops (the lone op fails with
    `OperationalError`, then cannot even connect) and starts again: the lone op is
    retried until it commits, never refused; the poison alone is."""
    url = private_pg.start().replace("postgresql://", "postgresql+psycopg://", 1)
    await migrate.upgrade_async(url)
    engine = create_engine(url)
    writer = plain_writer(engine)
    try:
        await writer.commit(WriteSet([op("seed", "b-locked")]))
        # Entities are upserted in sorted order: the poison's row fails before the lock.
        error_name = refuse(url, "entities", "entity_id", "a-poison")
        holder = psycopg.connect(plain_url(url))
        holder.execute("select * from entities where entity_id = 'b-locked' for update")
        poison, locked, free = op("p", "a-poison"), op("g-1", "b-locked"), op("g-2", "c-free")
        commit = asyncio.ensure_future(writer.commit(WriteSet([poison, locked, free])))
        await until(lambda: waiting_on_lock(url))
        assert not commit.done()

        await asyncio.to_thread(private_pg.stop)
        await until(lambda: not writer.healthy)
        assert writer.last_error == "OperationalError"
        await asyncio.sleep(1.0)
        assert not commit.done()
        with contextlib.suppress(psycopg.Error):
            holder.close()
        await asyncio.to_thread(private_pg.start)

        committed = await asyncio.wait_for(commit, 60)
        assert [(r.record, r.error) for r in committed.refused] == [(poison, error_name)]
        assert [(r.status, r.version) for r in (locked, free)] == [("stored", 2), ("stored", 1)]
        assert writer.healthy
        assert sorted(db_rows(url, "select op_id, version from sync_log")) == [
            ("g-1", 2),
            ("g-2", 1),
            ("seed", 1),
        ]
    finally:
        await writer.close()
        await engine.dispose()
