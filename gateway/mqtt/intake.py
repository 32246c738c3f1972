"""The MQTT side of the seam: every received message is routed, held, and acked in order.

A message for the engine (a topic of the message-kind table) crosses the seam
as a `Delivery` and is PUBACKed when its `Result` says it is committed; an
admin request is PUBACKed at once and handed to the admin server; anything
else is acked and dropped. While too many messages are held, or the engine
holds as many payload bytes as it may, the session stops reading the socket
(backpressure by not reading: the broker queues).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from gateway.lifecycle import Part
from gateway.metrics import Metrics
from gateway.mqtt.acks import AckSequencer, Ticket
from gateway.mqtt.router import Endpoint, Route, Router
from gateway.mqtt.session import Inbound, MqttSession
from gateway.seam import WAKES, Delivery, Engine, Reply, Result
from handlers.errors import Code, Error
from handlers.times import now_us

log = structlog.get_logger("fieldgate.intake")


class Intake(Part):
    """Routes the session's messages; holds each until its work is done."""

    name = "intake"
    stop_timeout_s = 1.0

    def __init__(
        self,
        root: str,
        session: MqttSession,
        engine: Engine,
        kinds: Sequence[tuple[str, str]],
        *,
        max_in_process: int,
        metrics: Metrics,
        wake: Mapping[str, Callable[[], None]],
        publish_leased: Callable[[list[dict[str, Any]]], None],
    ) -> None:
        """`kinds`: (name, topic pattern) of each message kind received from MQTT; `wake`:
        a callable for each part a commit may wake (every name of WAKES)."""
        missing = WAKES - set(wake)
        assert not missing, f"the intake cannot wake {sorted(missing)}"
        self.root = root
        self.session = session
        self.engine = engine
        self.max_in_process = max_in_process
        self.metrics = metrics
        self.wake = wake
        self.publish_leased = publish_leased
        self.routes = [Route(pattern, self._for_engine(name)) for name, pattern in kinds]
        self.router = Router(root, self.routes)
        self.acks = AckSequencer(session.ack)
        self._ids = itertools.count(1)
        self._held: dict[int, Ticket] = {}
        self._calls: dict[int, asyncio.Future[Reply]] = {}
        self._closed = asyncio.Event()
        self._attached = False
        engine.on_result(self._result)
        metrics.in_flight.set_function(lambda: len(self.acks))

    def mount(self, pattern: str, endpoint: Endpoint) -> None:
        """Route `pattern` to `endpoint`, which takes its messages at once: they are acked
        (in order) before it runs (the admin requests, answered on their own topics).
        Before `attach`, which subscribes to what is mounted by then."""
        assert not self._attached, "mount before attach: the session subscribes once"

        def taken(message: Inbound, params: dict[str, str]) -> None:
            ticket = self.hold(message)
            if ticket is None:
                return
            self.release([ticket])
            endpoint(message, params)

        self.routes.append(Route(pattern, taken))
        self.router = Router(self.root, self.routes)

    def attach(self, shared_group: str | None) -> None:
        """Take the session's messages: subscribe it to every route, in one place."""
        self.session.subscriptions = self.router.subscriptions(shared_group)
        self.session.on_message = self.receive
        self._attached = True

    # -- intake (called on the event loop by the session) --------------------------

    def receive(self, message: Inbound) -> None:
        resolved = self.router.resolve(message.topic)
        if resolved is None:
            ticket = self.hold(message)
            if ticket is not None:
                self.release([ticket])
            return
        endpoint, params = resolved
        endpoint(message, params)

    def hold(self, message: Inbound) -> Ticket | None:
        """Take responsibility for a message; None once closed (it stays unacked)."""
        if self._closed.is_set():
            return None
        ticket = self.acks.hold(message)
        if len(self.acks) >= self.max_in_process or self.engine.busy:
            self.session.pause_reading()
        return ticket

    def release(self, tickets: list[Ticket]) -> None:
        """The work of these messages is done: PUBACK what is now in order. Once closed
        (the drain), reading stays paused."""
        self.acks.done(tickets)
        if self._closed.is_set():
            return
        below = len(self.acks) < self.max_in_process * 3 // 4
        if self.session.paused and below and not self.engine.busy:
            self.session.resume_reading()

    def _for_engine(self, kind: str) -> Endpoint:
        # Every kind's series exists from the start, at 0: a dashboard sees the kinds.
        received = self.metrics.messages_received.labels(kind)

        def endpoint(message: Inbound, params: dict[str, str]) -> None:
            ticket = self.hold(message)
            if ticket is None:
                return
            received.inc()
            receive_id = next(self._ids)
            self._held[receive_id] = ticket
            self.engine.submit(
                Delivery(
                    receive_id,
                    kind,
                    message.topic,
                    params,
                    message.payload,
                    message.received_at_us,
                    message.response_topic,
                    message.correlation,
                )
            )

        return endpoint

    async def call(self, kind: str, payload: bytes) -> Reply:
        """Submit a write of an admin command to the engine; its reply once committed
        (or at once, `unavailable`, once the intake is closed for the drain)."""
        if self._closed.is_set():
            error = Error(Code.UNAVAILABLE, "the gateway is stopping: nothing was written")
            return Reply(error=error.as_dict())
        receive_id = next(self._ids)
        reply: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._calls[receive_id] = reply
        self.engine.submit(Delivery(receive_id, kind, "", {}, payload, now_us(), reply=True))
        return await reply

    # -- results (called on the event loop by the engine) --------------------------

    def _result(self, result: Result) -> None:
        for outbound in result.answers:
            self.session.publish(outbound)
        if result.leased:
            self.publish_leased(result.leased)
        for part in result.wake:
            self.wake[part]()
        tickets: list[Ticket] = []
        for receive_id in result.done:
            ticket = self._held.pop(receive_id, None)
            if ticket is not None:
                tickets.append(ticket)
                continue
            call = self._calls.pop(receive_id, None)
            if call is not None and not call.done():
                call.set_result(result.replies.get(receive_id, Reply()))
        self.release(tickets)
        acked_us = now_us()
        for ticket in tickets:
            self.metrics.ack_seconds.observe((acked_us - ticket.message.received_at_us) / 1e6)

    # -- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        await self._closed.wait()

    async def stop(self) -> None:
        """Stop reading and taking messages; what is held is still acked when done."""
        self.session.pause_reading()
        self._closed.set()
