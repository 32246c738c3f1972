"""A small MQTT client for tests: paho on a background thread, keeping what it receives.

Two waits replace sleeping: `subscribe` returns once the broker's SUBACK is in
(a message published after it reaches this client), and `fence()` proves that
everything the broker had routed to this client before now has arrived.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SUBACK_TIMEOUT_S = 10.0
GRANTED_MAX = 0x7F
"""A SUBACK reason code at or below this grants the subscription (0, 1, 2: the QoS)."""


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Client:
    """A paho client on a background thread, collecting what it receives.

    `messages` is a queue for `expect` and `fence`; `all` keeps everything (but the
    client's own fences), in order.
    """

    port: int
    client_id: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:10]}")
    v5: bool = True
    username: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        protocol = mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol
        )
        if self.username:
            self.paho.username_pw_set(self.username, self.password)
        self.messages: queue.Queue[Received] = queue.Queue()
        self.all: list[Received] = []
        self._lock = threading.Lock()
        self._subacks: dict[int, list[int]] = {}
        self._subacked = threading.Condition(self._lock)
        self._fences = itertools.count(1)
        self._fence_topic: str | None = None
        self.paho.on_message = self._on_message
        self.paho.on_subscribe = self._on_subscribe
        self.connected = threading.Event()
        self.paho.on_connect = lambda *a: self.connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        received = Received(
            msg.topic, bytes(msg.payload), bool(msg.retain), getattr(props, "CorrelationData", None)
        )
        if msg.topic != self._fence_topic:  # a fence is no message of the test's
            with self._lock:
                self.all.append(received)
        self.messages.put(received)

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[Any], _props: Any) -> None:
        with self._subacked:
            self._subacks[mid] = [int(getattr(code, "value", code)) for code in codes]
            self._subacked.notify_all()

    def connect(self) -> Client:
        if self.v5:
            self.paho.connect("127.0.0.1", self.port, clean_start=True)
        else:
            self.paho.connect("127.0.0.1", self.port)
        self.paho.loop_start()
        if not self.connected.wait(10):
            raise TimeoutError("test client did not connect")
        return self

    def try_subscribe(self, topic: str) -> int:
        """Subscribe at QoS 1 and wait for the SUBACK; its reason code (1: granted QoS 1,
        0x80 and above: refused, e.g. 0x87 not authorized)."""
        rc, mid = self.paho.subscribe(topic, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS and mid is not None, mqtt.error_string(rc)
        with self._subacked:
            if not self._subacked.wait_for(lambda: mid in self._subacks, SUBACK_TIMEOUT_S):
                raise TimeoutError(f"no SUBACK for {topic!r}")
            (code,) = self._subacks.pop(mid)
        return code

    def subscribe(self, *topics: str) -> Client:
        """Subscribe to each topic; returns once the broker granted every one."""
        for topic in topics:
            code = self.try_subscribe(topic)
            assert code <= GRANTED_MAX, f"subscription to {topic!r} refused: {code:#x}"
        return self

    def publish(
        self,
        topic: str,
        payload: bytes | str | dict[str, Any] | list[Any],
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        qos: int = 1,
        retain: bool = False,
        wait: bool = True,
    ) -> mqtt.MQTTMessageInfo:
        if isinstance(payload, dict | list):
            payload = json.dumps(payload)
        props = None
        if response_topic or correlation:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
        info = self.paho.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if wait:
            info.wait_for_publish(10)
        return info

    def on(self, topic: str) -> list[Received]:
        """Everything received so far on `topic`, in order."""
        with self._lock:
            return [m for m in self.all if m.topic == topic]

    def expect(self, count: int = 1, timeout: float = 15.0) -> list[Received]:
        out: list[Received] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"got {len(out)} of {count} messages: {out!r}")
            with contextlib.suppress(queue.Empty):
                out.append(self.messages.get(timeout=remaining))
        return out

    def fence(self) -> list[Received]:
        """What reached this client before a message it publishes now to itself.

        The broker delivers to one subscriber in the order it routed: whatever it had
        routed here before it took the fence has arrived once the fence does. (Whether
        the daemon had sent it yet is another question: see `sync_fence`.)
        """
        if self._fence_topic is None:
            self._fence_topic = f"fence/{self.client_id}"
            self.subscribe(self._fence_topic)
        marker = f"fence-{next(self._fences)}".encode()
        self.publish(self._fence_topic, marker)
        before, _ = self.until(lambda m: m.topic == self._fence_topic and m.payload == marker)
        return before

    def until(
        self, is_last: Callable[[Received], bool], timeout: float = 15.0
    ) -> tuple[list[Received], Received]:
        """Take messages from the queue up to the first for which `is_last(message)`
        holds: (those before it, that one)."""
        before: list[Received] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the awaited message did not come; before it: {before!r}")
            with contextlib.suppress(queue.Empty):
                message = self.messages.get(timeout=remaining)
                if is_last(message):
                    return before, message
                before.append(message)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.paho.disconnect()
        self.paho.loop_stop()


@dataclass
class PersistentClient(Client):
    """A subscriber whose session outlives its connection: the broker queues for it
    while it is away (a broker restart included, with persistence on), and paho
    reconnects it by itself, after 1 s and then every `reconnect_max_s` at most."""

    reconnect_max_s: int = 1

    def connect(self) -> PersistentClient:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.paho.reconnect_delay_set(1, self.reconnect_max_s)
        self.paho.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        self.paho.loop_start()
        if not self.connected.wait(10):
            raise TimeoutError("test client did not connect")
        return self
