"""Sync operations as a device sends them, and their answers as a device reads them."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import paho.mqtt.client as mqtt

from tests.support.mqtt import Client, Received
from tests.support.processes import wait_for

SPINE_ONLY = {"CONFLICTS__ENABLED": "false"}
"""These streams edit one field of a few entities from many devices at one instant:
every pair conflicts, quadratically (3000 ops make ~167,000 conflicts and their
notices). That is conflict detection's worst case, tested in its own suite; here
it would only bury what these tests prove about storing and acknowledging."""


def sync_op(
    op_id: str,
    *,
    entity_id: str = "t1",
    entity_type: str = "task",
    operation: str = "update",
    changes: dict[str, Any] | None = None,
    user_id: str = "u1",
    edited_at: str = "2026-11-29T12:00:00Z",
    **extra: Any,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "op_id": op_id,
        "user_id": user_id,
        "entity_type": entity_type,
        "entity_id": entity_id,
        "operation": operation,
        "changes": {"status": {"old": "open", "new": "done"}} if changes is None else changes,
        "edited_at": edited_at,
    }
    op.update(extra)
    return op


def counter_ops(
    count: int, prefix: str, devices: int, entities: int
) -> list[tuple[str, dict[str, Any]]]:
    """`count` single ops (device, op) round-robin over `devices` devices and `entities`
    entities, so that each entity is edited from several devices: the crash tests'
    stream, whose every op is distinct and whose versions per entity must be gapless."""
    return [
        (
            f"dev-{index % devices}",
            sync_op(
                f"{prefix}{index:05d}",
                entity_id=f"e{index % entities}",
                changes={"counter": {"old": index, "new": index + 1}},
            ),
        )
        for index in range(count)
    ]


def kill_marks(count: int, kills: int) -> list[tuple[int, int]]:
    """For a stream of `count` ops broken `kills` times: (answered, hold) per kill. The
    k-th kill waits for (2k - 1) / (2 kills + 1) of the ops answered, the stream holding
    at 2k / (2 kills + 1), so that each kill lands while the stream flows."""
    return [
        (count * (2 * k - 1) // (2 * kills + 1), count * 2 * k // (2 * kills + 1))
        for k in range(1, kills + 1)
    ]


def sync_topic(root: str, device: str = "d1") -> str:
    return f"{root}/devices/{device}/sync"


def ack_topic(root: str, device: str = "d1") -> str:
    return f"{root}/devices/{device}/sync/ack"


def stored(op_id: str, version: int) -> dict[str, Any]:
    """The result of an op stored with `version`."""
    return {"op_id": op_id, "status": "stored", "version": version}


def results_of(messages: Iterable[Received]) -> list[dict[str, Any]]:
    """The results that sync ack messages carry, in order.

    For streams where which payloads share a commit is up to timing: an ack is
    one payload's `{"batch_id", "results"}` or several payloads' `{"batch_ids",
    "results"}` (PROTOCOL.md), and a device matches results by op_id. Where a test
    knows the shape, it compares the whole message instead.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        body = message.json()
        assert set(body) in ({"batch_id", "results"}, {"batch_ids", "results"}), body
        assert isinstance(body["results"], list)
        assert body["results"], body
        out.extend(body["results"])
    return out


def results_on(client: Client, root: str, device: str = "d1") -> list[dict[str, Any]]:
    """Every sync result `device` has received so far, in order of arrival."""
    return results_of(client.on(ack_topic(root, device)))


def expect_results(client: Client, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Wait for `count` sync results on whatever ack messages carry them."""
    messages: list[Received] = []
    deadline = time.monotonic() + timeout
    while len(results_of(messages)) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"got {results_of(messages)!r}, expected {count} results")
        with contextlib.suppress(queue.Empty):
            messages.append(client.messages.get(timeout=remaining))
    return results_of(messages)


def send_one(client: Client, root: str, device: str, payload: Any) -> dict[str, Any]:
    """Publish one sync payload of one op and wait for its one result (one at a time:
    versions in the order sent). `client` must be subscribed to the device's acks."""
    before = len(results_on(client, root, device))
    client.publish(sync_topic(root, device), payload)
    results = wait_for(lambda: results_on(client, root, device)[before:])
    assert len(results) == 1, results
    result: dict[str, Any] = results[0]
    return result


FENCE_DEVICE = "fence"


def sync_fence(client: Client, root: str, device: str = FENCE_DEVICE) -> list[Received]:
    """What reached `client` before the answer to a fence op published now on `device`.

    The daemon answers in commit order on one connection, and the broker delivers
    one publisher's messages to a subscriber in order: any answer the daemon owed
    for what came before has arrived before the fence's. The fence op is stored, on
    an entity of its own (`fence-<id>`) of the device `fence` by default: assert on
    the sync log before fencing, or leave the fence device out.
    """
    op_id = f"fence-{uuid.uuid4().hex[:8]}"
    topic = ack_topic(root, device)
    client.subscribe(topic)
    client.publish(sync_topic(root, device), sync_op(op_id, entity_id=op_id))

    def is_fence(message: Received) -> bool:
        return message.topic == topic and message.json()["results"][0]["op_id"] == op_id

    before, answer = client.until(is_fence)
    assert answer.json() == {"batch_id": None, "results": [stored(op_id, 1)]}, answer
    return before


class AckRecorder:
    """Subscribes to every device's sync acks under `root` and keeps every result;
    subscribes again after each reconnect (its session is not persistent)."""

    def __init__(self, port: int, root: str) -> None:
        self.client = Client(port)
        self.client.paho.reconnect_delay_set(min_delay=1, max_delay=2)
        self.topic = f"{root}/devices/+/sync/ack"
        self.client.paho.on_connect = self._on_connect

    def _on_connect(self, client: mqtt.Client, *_args: Any) -> None:
        client.subscribe(self.topic, qos=1)
        self.client.connected.set()

    def start(self) -> AckRecorder:
        """Connected and subscribed: the SUBACK of a second subscription (the broker
        answers in order) follows the first's."""
        self.client.connect()
        self.client.subscribe(self.topic)
        return self

    def results(self) -> list[dict[str, Any]]:
        with self.client._lock:
            messages = list(self.client.all)
        return results_of(messages)

    def close(self) -> None:
        self.client.close()


def _pubacked(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether the broker acknowledged it.

    A QoS 1 publish made while disconnected reports `MQTT_ERR_NO_CONN` (and
    `is_published()` raises), yet paho keeps it and sends it on reconnect; its
    PUBACK is then recorded all the same.
    """
    if info.rc == mqtt.MQTT_ERR_NO_CONN:
        return bool(info._published)
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False


class OpStream:
    """Publishes `(device_id, op)` pairs at QoS 1 from a background thread.

    Paced (`chunk` messages, then `pause_s`), and held: after publishing up to each
    index in `holds` it waits for `resume()`. A test that breaks something
    mid-stream waits for what it needs (so many answers), resumes the stream and
    breaks it at once: the break lands while the stream flows, before its next
    hold, however slow the machine. Every publish is kept, so that the test can
    see which ones the broker PUBACKed and republish the others (op_id makes that
    harmless).
    """

    def __init__(
        self,
        port: int,
        root: str,
        ops: list[tuple[str, dict[str, Any]]],
        *,
        chunk: int = 25,
        pause_s: float = 0.01,
        holds: Iterable[int] = (),
    ) -> None:
        self.port = port
        self.root = root
        self.ops = ops
        self.chunk = chunk
        self.pause_s = pause_s
        self.holds = set(holds)
        assert all(0 < hold < len(ops) for hold in self.holds), self.holds
        self._resumed = threading.Semaphore(0)
        self.client = Client(port)
        self.client.paho.reconnect_delay_set(min_delay=1, max_delay=2)
        self.infos: list[mqtt.MQTTMessageInfo] = []
        self.thread = threading.Thread(target=self._run, name="op-stream", daemon=True)
        self.error: BaseException | None = None

    def topic(self, device_id: str) -> str:
        return sync_topic(self.root, device_id)

    def start(self) -> OpStream:
        self.client.connect()
        self.thread.start()
        return self

    def resume(self) -> None:
        """Let the stream go on past the hold it waits at (or will wait at next)."""
        self._resumed.release()

    def _run(self) -> None:
        try:
            for index, (device_id, op) in enumerate(self.ops):
                if index in self.holds:
                    self._resumed.acquire()
                info = self.client.paho.publish(self.topic(device_id), json.dumps(op), qos=1)
                self.infos.append(info)
                if (index + 1) % self.chunk == 0:
                    time.sleep(self.pause_s)
        except BaseException as exc:
            self.error = exc
            raise

    def join(self, timeout: float = 60.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the publisher did not finish"
        assert self.error is None, self.error

    def unacked(self) -> list[int]:
        return [index for index, info in enumerate(self.infos) if not _pubacked(info)]

    def puback_all(self, timeout: float = 60.0) -> int:
        """Wait for every PUBACK; republish what the broker never acknowledged.

        Returns how many were republished (0 when the broker acked them all).
        """
        self.join(timeout)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not self.unacked(), timeout=min(timeout, 15.0))
        missing = self.unacked()
        if not missing:
            return 0
        again = Client(self.port).connect()
        try:
            infos = [
                again.paho.publish(self.topic(self.ops[i][0]), json.dumps(self.ops[i][1]), qos=1)
                for i in missing
            ]
            for info in infos:
                info.wait_for_publish(timeout)
                assert info.is_published()
        finally:
            again.close()
        return len(missing)

    def close(self) -> None:
        self.client.close()


def queue_for(port: int, root: str, ops: list[tuple[str, dict[str, Any]]]) -> None:
    """Publish `ops` while the daemon is down; wait until the broker PUBACKed every one."""
    device = Client(port).connect()
    try:
        infos = [device.publish(f"{root}/devices/{dev}/sync", op, wait=False) for dev, op in ops]
        wait_for(lambda: all(info.is_published() for info in infos), timeout=60)
    finally:
        device.close()
