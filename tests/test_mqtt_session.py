"""The MQTT session's outgoing side under a broker that is slow to acknowledge.

paho numbers QoS 1 messages with 16-bit packet ids and refuses a new one whose id is
still outstanding: a 100,000-message drain once had 65,535 answers unacknowledged and
its next acks refused ("Message queue full"), lost to the devices. The session keeps
what paho has no room for (OUTGOING_MAX) in order, and hands it over as the broker
acknowledges. Here the room is made small and the session stops reading, so that no
PUBACK is seen until it reads again.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.config import MqttConfig
from gateway.mqtt import session as session_module
from gateway.mqtt.session import MqttSession
from gateway.seam import Outbound
from tests.support import Client, Mosquitto, wait_for


async def test_messages_past_paho_s_room_wait_in_order_and_all_arrive(
    broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked against: the refusal logged and the message dropped (from the 51st on)."""
    monkeypatch.setattr(session_module, "OUTGOING_MAX", 50)
    root = f"t-{uuid.uuid4().hex[:8]}"
    config = MqttConfig(
        port=broker.port, topic_root=root, client_id=f"{root}-gw", max_outgoing_inflight=10
    )
    mqtt = MqttSession(config)
    mqtt.subscriptions = [f"{root}/nothing"]
    running = asyncio.create_task(mqtt.run())
    receiver = Client(broker.port).connect().subscribe(f"{root}/out/#")
    try:
        await asyncio.wait_for(mqtt.connected.wait(), 10)
        mqtt.pause_reading()
        for index in range(500):
            assert mqtt.publish(Outbound(f"{root}/out/{index}", str(index).encode()))
        assert len(mqtt._waiting) >= 500 - 50
        mqtt.resume_reading()
        await asyncio.to_thread(
            wait_for, lambda: len([m for m in receiver.all if m.topic.startswith(root)]) == 500
        )
        got = [int(m.payload) for m in receiver.all if m.topic.startswith(f"{root}/out/")]
        assert got == list(range(500))
        assert not mqtt._waiting
    finally:
        receiver.close()
        await mqtt.stop()
        await asyncio.wait_for(running, 10)
