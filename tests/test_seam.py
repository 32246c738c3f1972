"""The two sides of the seam on their own: the intake's holding and closing, the
engine's queue order and its answers to admin writes it cannot commit.

The engine is the real one, with the real kinds table and a real writer on
SQLite; the intake is given a session and an engine that record what they are
asked (what a broker would do with a PUBACK is not the point here).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import config
from gateway.ingest.assembly import EngineSide
from gateway.ingest.engine import Engine
from gateway.metrics import Metrics
from gateway.mqtt import intake as intake_module
from gateway.mqtt.intake import Intake
from gateway.mqtt.session import Inbound
from gateway.seam import WAKE_ESCALATION, WAKE_OUTBOX, Delivery, Result
from storage import migrate
from tests.support import sync_op

ROOT = "fgseam"


class Session:
    """The session as the intake uses it."""

    def __init__(self) -> None:
        self.paused = False
        self.calls: list[str] = []
        self.acked: list[int] = []
        self.subscriptions: list[str] = []
        self.unsubscriptions: list[str] = []
        self.on_message: Callable[[Inbound], None] = lambda _m: None

    def pause_reading(self) -> None:
        self.paused = True
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.paused = False
        self.calls.append("resume")

    def ack(self, messages: Any) -> int:
        self.acked.extend(m.mid for m in messages)
        return len(self.acked)

    def publish(self, _outbound: Any) -> None:
        pass


class Recording:
    """The engine as the intake sees it: takes deliveries, answers when told."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.callback: Callable[[Result], None] = lambda _r: None
        self.full = False

    def submit(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    @property
    def busy(self) -> bool:
        return self.full

    def on_result(self, callback: Callable[[Result], None]) -> None:
        self.callback = callback


def intake(
    session: Session,
    engine: Recording,
    max_in_process: int = 4,
    priority: Session | None = None,
) -> Intake:
    sessions = {"sync": session} if priority is None else {"sync": session, "priority": priority}
    kinds = [("sync", "devices/{device_id}/sync", "sync")]
    if priority is not None:
        kinds.append(("alert", "devices/{device_id}/alerts", "priority"))
    found = Intake(
        ROOT,
        sessions,  # type: ignore[arg-type]
        engine,
        kinds,
        max_in_process=max_in_process,
        metrics=Metrics(),
        wake={WAKE_OUTBOX: lambda: None, WAKE_ESCALATION: lambda: None},
        publish_leased=lambda _rows: None,
    )
    found.attach(None)
    return found


def sync_message(mid: int) -> Inbound:
    return Inbound(f"{ROOT}/devices/d1/sync", b"{}", mid=mid, qos=1)


async def test_the_intake_stays_paused_once_closed_for_the_drain() -> None:
    session, engine = Session(), Recording()
    taken = intake(session, engine)
    assert session.subscriptions == [f"{ROOT}/devices/+/sync"]
    for mid in range(1, 5):
        session.on_message(sync_message(mid))
    assert session.calls == ["pause"]  # 4 held: the socket is not read
    await taken.stop()
    done = [d.receive_id for d in engine.deliveries]
    engine.callback(Result(done=done))
    assert session.acked == [1, 2, 3, 4]  # what was held is still acked...
    assert session.paused  # ...and reading does not resume during the drain
    session.on_message(sync_message(5))
    assert len(engine.deliveries) == 4  # nothing more is taken


def alert_message(mid: int) -> Inbound:
    return Inbound(f"{ROOT}/devices/d1/alerts", b"{}", mid=mid, qos=1)


def test_each_lane_subscribes_to_its_own_topics_and_lets_go_of_the_others() -> None:
    sync, priority = Session(), Session()
    intake(sync, Recording(), priority=priority)
    assert sync.subscriptions == [f"{ROOT}/devices/+/sync"]
    assert sync.unsubscriptions == [f"{ROOT}/devices/+/alerts"]
    assert priority.subscriptions == [f"{ROOT}/devices/+/alerts"]
    assert priority.unsubscriptions == [f"{ROOT}/devices/+/sync"]


def test_the_priority_lane_reads_on_while_the_sync_lane_waits_for_the_engine() -> None:
    """A busy engine (its payload bytes full of sync) pauses the sync lane only; each
    lane PUBACKs its own messages in its own arrival order, whatever the engine commits
    first. Checked against: one sequencer for both lanes (the alert's PUBACK waits for
    the sync messages before it; and acks go to the wrong session)."""
    sync, priority, engine = Session(), Session(), Recording()
    intake(sync, engine, max_in_process=100, priority=priority)
    engine.full = True
    sync.on_message(sync_message(1))
    sync.on_message(sync_message(2))
    priority.on_message(alert_message(1))
    assert sync.calls == ["pause", "pause"]
    assert priority.calls == []
    alert = engine.deliveries[2].receive_id
    engine.callback(Result(done=[alert]))  # urgent: committed ahead of the sync messages
    assert priority.acked == [1]
    assert sync.acked == []
    engine.full = False
    engine.callback(Result(done=[engine.deliveries[1].receive_id]))
    assert sync.acked == []  # 2 waits for 1
    engine.callback(Result(done=[engine.deliveries[0].receive_id]))
    assert sync.acked == [1, 2]
    assert sync.calls[-1] == "resume"


def test_the_intake_is_behind_while_the_sync_lane_waits_and_a_moment_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the webhook sender yields to: the sync lane paused for the engine, or
    holding BEHIND_HELD messages, and BEHIND_HOLD_S after (a draining backlog pauses
    and resumes it many times a second)."""
    monkeypatch.setattr(intake_module, "BEHIND_HOLD_S", 0.2)
    monkeypatch.setattr(intake_module, "BEHIND_HELD", 3)
    sync, priority, engine = Session(), Session(), Recording()
    gate = intake(sync, engine, max_in_process=100, priority=priority)
    sync.on_message(sync_message(10))
    sync.on_message(sync_message(11))
    assert not gate.behind()
    sync.on_message(sync_message(12))
    assert gate.behind() and sync.calls == []
    engine.callback(Result(done=[delivery.receive_id for delivery in engine.deliveries]))
    assert gate.behind()
    time.sleep(0.25)
    assert not gate.behind()
    engine.deliveries.clear()
    engine.full = True
    sync.on_message(sync_message(1))
    assert sync.calls == ["pause"] and gate.behind()
    engine.full = False
    engine.callback(Result(done=[engine.deliveries[0].receive_id]))
    assert sync.calls[-1] == "resume" and gate.behind()
    time.sleep(0.25)
    assert not gate.behind()


def test_a_message_from_another_lane_s_filter_is_taken_where_it_came() -> None:
    """A session the broker kept from before the lanes still delivers alerts to the
    sync lane until it lets go of the filter: each is taken, and PUBACKed on the
    session it came on. Checked against: routing by the lane's own topics only (the
    alert dropped, acked unread)."""
    sync, priority, engine = Session(), Session(), Recording()
    intake(sync, engine, priority=priority)
    sync.on_message(alert_message(7))
    assert [d.kind for d in engine.deliveries] == ["alert"]
    assert sync.acked == []
    engine.callback(Result(done=[engine.deliveries[0].receive_id]))
    assert sync.acked == [7]
    assert priority.acked == []


async def test_an_admin_write_after_the_close_is_answered_unavailable() -> None:
    session, engine = Session(), Recording()
    taken = intake(session, engine)
    await taken.stop()
    reply = await taken.call("conflict_resolution", b"{}")
    assert reply.error is not None and reply.error["code"] == "unavailable"
    assert engine.deliveries == []


def test_the_intake_must_be_able_to_wake_every_part() -> None:
    with pytest.raises(AssertionError, match="escalation"):
        Intake(
            ROOT,
            Session(),  # type: ignore[arg-type]
            Recording(),
            [],
            max_in_process=4,
            metrics=Metrics(),
            wake={WAKE_OUTBOX: lambda: None},
            publish_leased=lambda _rows: None,
        )


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    url = f"sqlite+aiosqlite:///{tmp_path}/seam.db"
    await migrate.upgrade_async(url)
    settings = config.Settings(
        mqtt=config.MqttConfig(topic_root=ROOT), database=config.DatabaseConfig(url=url)
    )
    side = EngineSide(settings)
    yield side.engine
    await side.close()


def delivery(receive_id: int, kind: str, body: dict[str, Any], reply: bool = False) -> Delivery:
    topic = {"sync": "devices/d1/sync", "alert": "devices/d1/alerts"}.get(kind, "")
    return Delivery(
        receive_id,
        kind,
        f"{ROOT}/{topic}" if topic else "",
        {"device_id": "d1"} if topic else {},
        json.dumps(body).encode(),
        1_795_953_600_000_000,
        reply=reply,
    )


async def test_alerts_and_admin_writes_go_ahead_of_the_backlog(engine: Engine) -> None:
    """In their own commit: a crisis behind a backlog does not wait for a batch of sync
    to be stored with it. Checked against: the batch taken whole (one result for all)."""
    results: list[Result] = []
    engine.on_result(results.append)
    for n in range(1, 4):
        engine.submit(delivery(n, "sync", sync_op(f"op-{n}", entity_id=f"t{n}")))
    panic = {
        "alert_id": "a1",
        "user_id": "u1",
        "kind": "panic",
        "occurred_at": "2026-11-29T12:00:00Z",
    }
    engine.submit(delivery(4, "alert", panic))
    resolution = {"conflict_id": "nope", "winner_op_id": "op-1", "by": "anna"}
    engine.submit(delivery(5, "conflict_resolution", resolution, reply=True))
    engine.submit(delivery(6, "sync", sync_op("op-6", entity_id="t6")))
    task = asyncio.create_task(engine.run())
    await engine.drain()
    await asyncio.wait_for(task, 10)
    assert [result.done for result in results] == [[4, 5], [1, 2, 3, 6]]


async def test_while_the_engine_is_not_ready_alerts_and_admin_writes_go_on_and_sync_waits(
    engine: Engine,
) -> None:
    """At the start with a model active, sync work waits for the model's load (every
    operation is scored); a crisis queued behind it does not wait for that.
    Checked against: the gate ignored (the sync operation committed before the load)."""
    results: list[Result] = []
    engine.on_result(results.append)
    engine.ready.clear()
    task = asyncio.create_task(engine.run())
    engine.submit(delivery(1, "sync", sync_op("op-1", entity_id="t1")))
    panic = {"alert_id": "a1", "user_id": "u1", "kind": "panic"}
    engine.submit(delivery(2, "alert", panic | {"occurred_at": "2026-11-29T12:00:00Z"}))
    for _ in range(200):
        if results:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # a sync commit, if the gate let one through, would be here
    assert [result.done for result in results] == [[2]]
    engine.ready.set()
    await engine.drain()
    await asyncio.wait_for(task, 10)
    assert [result.done for result in results] == [[2], [1]]


async def test_an_admin_write_is_answered_unavailable_while_the_writer_fails(
    engine: Engine,
) -> None:
    results: list[Result] = []
    engine.on_result(results.append)
    engine.writer.healthy = False  # as after a failed commit, until one succeeds
    body = {"conflict_id": "c1", "winner_op_id": "op-1", "by": "anna"}
    engine.submit(delivery(7, "conflict_resolution", body, reply=True))
    (result,) = results
    assert result.done == [7]
    error = result.replies[7].error
    assert error is not None
    assert (error["code"], error["message"]) == (
        "unavailable",
        "the database is failing: nothing was written; retry later",
    )
    assert engine.pending == 0
