"""The MQTT session's outgoing side under a broker that is slow to acknowledge, or gone.

paho numbers QoS 1 messages with 16-bit packet ids and refuses a new one whose id is
still outstanding: a 100,000-message drain once had 65,535 answers unacknowledged and
its next acks refused ("Message queue full"), lost to the devices. The session keeps
its own window (`max_outgoing_inflight`), holds what is past it in order, and hands it
over as the broker acknowledges. Here the window is made small and the session stops
reading, so that no PUBACK is seen until it reads again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
import types
import uuid
from collections.abc import AsyncIterator

import pytest

from gateway.config import MqttConfig
from gateway.mqtt import session as session_module
from gateway.mqtt.session import AHEAD_ROOM, Inbound, MqttSession
from gateway.seam import Outbound
from tests.support import Client, Mosquitto, wait_for


@contextlib.asynccontextmanager
async def paused_session(port: int, window: int) -> AsyncIterator[tuple[MqttSession, Client, str]]:
    """A session connected with an outgoing window of `window` and reading paused (no
    PUBACK seen until it resumes), a receiver of `<root>/out/#`, and the root."""
    root = f"t-{uuid.uuid4().hex[:8]}"
    config = MqttConfig(
        port=port, topic_root=root, client_id=f"{root}-gw", max_outgoing_inflight=window
    )
    mqtt = MqttSession(config)
    mqtt.subscriptions = [f"{root}/nothing"]
    running = asyncio.create_task(mqtt.run())
    receiver = Client(port).connect().subscribe(f"{root}/out/#")
    try:
        await asyncio.wait_for(mqtt.connected.wait(), 10)
        mqtt.pause_reading()
        yield mqtt, receiver, root
    finally:
        receiver.close()
        await mqtt.stop()
        await asyncio.wait_for(running, 10)


async def test_messages_past_the_window_wait_in_order_and_all_arrive(broker: Mosquitto) -> None:
    """Checked against: a window of 65,535 with paho's limit at 50 (the refusal logged and
    the message dropped from the 51st on)."""
    async with paused_session(broker.port, window=10) as (mqtt, receiver, root):
        for index in range(500):
            assert mqtt.publish(Outbound(f"{root}/out/{index}", str(index).encode()))
        assert len(mqtt._waiting) == 500 - 10
        assert len(mqtt._paho._out_messages) == 10  # type: ignore[union-attr]
        mqtt.resume_reading()
        await asyncio.to_thread(
            wait_for, lambda: len([m for m in receiver.all if m.topic.startswith(root)]) == 500
        )
        got = [int(m.payload) for m in receiver.all if m.topic.startswith(f"{root}/out/")]
        assert got == list(range(500))
        assert not mqtt._waiting


async def test_messages_published_ahead_pass_those_waiting_in_their_own_order(
    broker: Mosquitto,
) -> None:
    """A crisis (`ahead`, the outbox's leased rows) goes out at once while the window is
    full, before the answers and notifications waiting there, and crises keep their
    order among themselves; past AHEAD_ROOM they wait, still ahead of the others.
    Checked against: `ahead` ignored (the crises waited behind the 480)."""
    async with paused_session(broker.port, window=10) as (mqtt, receiver, root):
        for index in range(490):
            assert mqtt.publish(Outbound(f"{root}/out/answer", str(index).encode()))
        crises = [
            asyncio.ensure_future(
                mqtt.publish_confirmed(Outbound(f"{root}/out/crisis", b"c%d" % i), ahead=True)
            )
            for i in range(AHEAD_ROOM + 5)
        ]
        await asyncio.sleep(0)
        assert len(mqtt._paho._out_messages) == 10 + AHEAD_ROOM  # type: ignore[union-attr]
        assert (len(mqtt._ahead), len(mqtt._waiting)) == (5, 480)
        mqtt.resume_reading()
        assert await asyncio.wait_for(asyncio.gather(*crises), 10) == [True] * (AHEAD_ROOM + 5)
        total = 490 + AHEAD_ROOM + 5
        await asyncio.to_thread(
            wait_for, lambda: len([m for m in receiver.all if m.topic.startswith(root)]) == total
        )
        got = [m.payload.decode() for m in receiver.all if m.topic.startswith(f"{root}/out/")]
        crisis = [f"c{i}" for i in range(AHEAD_ROOM + 5)]
        assert got == [*map(str, range(10)), *crisis, *map(str, range(10, 490))]


async def test_confirmed_publishes_are_answered_by_their_own_puback_or_a_lost_connection(
    own_broker: Mosquitto,
) -> None:
    """Each confirmed publish is resolved by the PUBACK of its packet id, also past the
    window; when the broker goes, those in flight and those waiting answer False at once
    (the outbox releases them for the next connection) while answers stay queued.

    Checked against: confirms resolved in arrival order of PUBACKs regardless of id, and
    a lost connection leaving them to their 10 s timeout."""
    root = f"t-{uuid.uuid4().hex[:8]}"
    config = MqttConfig(
        port=own_broker.port,
        topic_root=root,
        client_id=f"{root}-gw",
        max_outgoing_inflight=5,
        reconnect_min_s=30,
        reconnect_max_s=30,
    )
    mqtt = MqttSession(config)
    mqtt.subscriptions = [f"{root}/nothing"]
    running = asyncio.create_task(mqtt.run())
    receiver = Client(own_broker.port).connect().subscribe(f"{root}/out/#")
    try:
        await asyncio.wait_for(mqtt.connected.wait(), 10)
        sent = [Outbound(f"{root}/out/{index}", str(index).encode()) for index in range(20)]
        confirmed = await asyncio.gather(*(mqtt.publish_confirmed(m) for m in sent))
        assert confirmed == [True] * 20
        assert not mqtt._confirms
        await asyncio.to_thread(
            wait_for, lambda: len([m for m in receiver.all if m.topic.startswith(root)]) == 20
        )

        assert own_broker.proc is not None
        os.kill(own_broker.proc.pid, signal.SIGSTOP)  # no PUBACK comes: 5 in flight, 3 wait
        pending = [
            asyncio.ensure_future(
                mqtt.publish_confirmed(Outbound(f"{root}/out/late{index}", b"x"), wait_s=60)
            )
            for index in range(8)
        ]
        await asyncio.sleep(0.2)
        assert mqtt.publish(Outbound(f"{root}/out/answer", b"a"))
        assert len(mqtt._confirms) == 5
        assert len(mqtt._waiting) == 4
        started = time.monotonic()
        os.kill(own_broker.proc.pid, signal.SIGKILL)  # its sockets close: the connection ends
        own_broker.stop()
        results = await asyncio.wait_for(asyncio.gather(*pending), 10)
        assert results == [False] * 8
        assert time.monotonic() - started < 10
        assert [m.topic for m, _c in mqtt._waiting] == [f"{root}/out/answer"]
        assert not mqtt._confirms
    finally:
        receiver.close()
        await mqtt.stop()
        await asyncio.wait_for(running, 40)


async def test_a_session_given_after_connects_once_they_are_set_or_after_the_head_start(
    broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's sync lane waits for the priority lane and the engine (`after`), so
    that a crisis queued during an outage is read before a backlog; a lane or an
    engine that never comes up keeps it waiting HEAD_START_S at most. Checked
    against: `after` ignored (connected at once)."""
    monkeypatch.setattr(session_module, "HEAD_START_S", 1.5)
    root = f"t-{uuid.uuid4().hex[:8]}"
    first, second = asyncio.Event(), asyncio.Event()
    waiting = MqttSession(
        MqttConfig(port=broker.port, topic_root=root, client_id=f"{root}-a"),
        after=(first, second),
    )
    waiting.subscriptions = [f"{root}/nothing"]
    running = asyncio.create_task(waiting.run())
    try:
        first.set()
        await asyncio.sleep(0.5)
        assert not waiting.connected.is_set()
        second.set()
        await asyncio.wait_for(waiting.connected.wait(), 1.0)
    finally:
        await waiting.stop()
        await asyncio.wait_for(running, 10)

    never = MqttSession(
        MqttConfig(port=broker.port, topic_root=root, client_id=f"{root}-b"),
        after=(asyncio.Event(),),
    )
    never.subscriptions = [f"{root}/nothing"]
    started = time.monotonic()
    running = asyncio.create_task(never.run())
    try:
        await asyncio.wait_for(never.connected.wait(), 10)
        assert 1.5 <= time.monotonic() - started < 5
    finally:
        await never.stop()
        await asyncio.wait_for(running, 10)


async def test_receiving_makes_no_reference_cycle_a_message(broker: Mosquitto) -> None:
    """paho matches each message against its table of per-topic callbacks in a recursive
    closure that refers to itself: a reference cycle a message, which only the collector
    frees (10-22 ms pauses of the MQTT process at 2,000 ops/s). The session gives paho an
    empty table. Checked against: paho's own table (200 such closures held)."""
    root = f"t-{uuid.uuid4().hex[:8]}"
    mqtt = MqttSession(MqttConfig(port=broker.port, topic_root=root, client_id=f"{root}-gw"))
    mqtt.subscriptions = [f"{root}/in/#"]
    received: list[Inbound] = []
    all_in = asyncio.Event()

    def receive(message: Inbound) -> None:
        received.append(message)
        if len(received) == 200:
            all_in.set()

    mqtt.on_message = receive
    running = asyncio.create_task(mqtt.run())
    sender = Client(broker.port).connect()
    gc.collect()
    gc.disable()
    try:
        await asyncio.wait_for(mqtt.connected.wait(), 10)
        for index in range(200):
            sender.publish(f"{root}/in/{index}", b"x")
        await asyncio.wait_for(all_in.wait(), 10)
        closures = [
            o
            for o in gc.get_objects()
            if isinstance(o, types.FunctionType)
            and o.__qualname__ == "MQTTMatcher.iter_match.<locals>.rec"
        ]
    finally:
        gc.enable()
        sender.close()
        await mqtt.stop()
        await asyncio.wait_for(running, 10)
    assert (len(received), len(closures)) == (200, 0)
