"""The MQTT side of the seam: every received message is routed, held, and acked in order.

A message for the engine (a topic of the message-kind table) crosses the seam
as a `Delivery` and is PUBACKed when its `Result` says it is committed; an
admin request is PUBACKed at once and handed to the admin server; anything
else is acked and dropped. While too many messages are held, or the engine
holds as many payload bytes as it may, the session stops reading the socket
(backpressure by not reading: the broker queues).

Messages come in lanes, each an MQTT session of its own (`gateway.seam.KIND_LANES`):
a broker delivers a session's messages in order, so a panic alert or an operator's
request in the sync session would wait behind the whole sync backlog of an outage.
The priority lane (alerts, crisis acks, admin requests) is held and acked apart,
and does not stop reading because the engine is busy with sync: what it brings
goes ahead in the engine (urgent kinds) or is answered here (admin).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from gateway.lifecycle import Part
from gateway.metrics import Metrics
from gateway.mqtt.acks import AckSequencer, Ticket
from gateway.mqtt.router import Endpoint, Route, Router
from gateway.mqtt.session import Inbound, MqttSession
from gateway.seam import LANE_SYNC, WAKES, Delivery, Engine, Reply, Result
from handlers.errors import Code, Error
from handlers.times import now_us

log = structlog.get_logger("fieldgate.intake")

BEHIND_HELD = 1_000
"""Sync messages held (received, not yet acked) from which the intake counts as
behind: a backlog's batches hold thousands; live traffic holds what arrives during
a commit or two (~60 at 2,000 operations a second)."""
BEHIND_HOLD_S = 2.0
"""How long the intake still counts as behind after it last was: while a backlog
drains, the engine's commits empty the channel and it fills again several times a
second, and what yields to a backlog (webhooks) should not start and stop with
each."""


class Lane:
    """A session and what the intake holds of it: its PUBACKs in its own arrival order,
    its reading paused on its own."""

    def __init__(self, name: str, session: MqttSession) -> None:
        self.name = name
        self.session = session
        self.acks = AckSequencer(session.ack)
        self.yields = name == LANE_SYNC
        """Stops reading while the engine holds all the payload bytes it may: the sync
        lane does; the priority lane's few messages go ahead of what is held."""


class Intake(Part):
    """Routes the sessions' messages; holds each until its work is done."""

    name = "intake"
    stop_timeout_s = 1.0

    def __init__(
        self,
        root: str,
        sessions: Mapping[str, MqttSession],
        engine: Engine,
        kinds: Sequence[tuple[str, str, str]],
        *,
        max_in_process: int,
        metrics: Metrics,
        wake: Mapping[str, Callable[[], None]],
        publish_leased: Callable[[list[dict[str, Any]]], None],
    ) -> None:
        """`sessions`: one per lane, by lane name (the sync lane's also publishes the
        engine's answers); `kinds`: (name, topic pattern, lane) of each message kind
        received from MQTT; `wake`: a callable for each part a commit may wake (every
        name of WAKES)."""
        missing = WAKES - set(wake)
        assert not missing, f"the intake cannot wake {sorted(missing)}"
        self.root = root
        self.lanes = {name: Lane(name, session) for name, session in sessions.items()}
        self.session = sessions[LANE_SYNC]
        self.engine = engine
        self.max_in_process = max_in_process
        self.metrics = metrics
        self.wake = wake
        self.publish_leased = publish_leased
        self._kinds = list(kinds)
        self._mounted: list[tuple[str, Endpoint, str]] = []
        self._ids = itertools.count(1)
        self._held: dict[int, Ticket] = {}
        self._calls: dict[int, asyncio.Future[Reply]] = {}
        self._closed = asyncio.Event()
        self._attached = False
        self._behind_until = 0.0
        engine.on_result(self._result)
        metrics.in_flight.set_function(lambda: self.in_flight)

    @property
    def in_flight(self) -> int:
        """Messages received and not yet acked, in every lane."""
        return sum(len(lane.acks) for lane in self.lanes.values())

    def behind(self) -> bool:
        """Whether a backlog is being drained: the sync lane holds BEHIND_HELD messages
        or more, or has paused its reading (the engine holds all it may), or did
        either within BEHIND_HOLD_S. Work that can wait (webhook deliveries other
        than crises) yields to it: the devices' acks go first."""
        return self._backlog_now() or time.monotonic() < self._behind_until

    def _backlog_now(self) -> bool:
        """Whether the sync lane shows a backlog at this moment; if so, the hold of
        BEHIND_HOLD_S starts again from now."""
        sync = self.lanes.get(LANE_SYNC)
        if sync is not None and (sync.session.paused or len(sync.acks) >= BEHIND_HELD):
            self._behind_until = time.monotonic() + BEHIND_HOLD_S
            return True
        return False

    def mount(self, pattern: str, endpoint: Endpoint, lane: str) -> None:
        """Route `pattern` to `endpoint`, which takes its messages at once: they are acked
        (in order) before it runs (the admin requests, answered on their own topics).
        Before `attach`, which subscribes to what is mounted by then."""
        assert not self._attached, "mount before attach: the session subscribes once"
        self._mounted.append((pattern, endpoint, lane))

    def attach(self, shared_group: str | None) -> None:
        """Take the sessions' messages, in one place: each subscribes to its own lane's
        topics, and lets go of the others' (a session the broker kept may hold them
        from an older version, or another lane layout). Each lane still routes every
        topic: what such a filter delivers before it goes is taken, in the lane it came
        on, where its PUBACK belongs."""
        for lane in self.lanes.values():
            routes = [
                Route(pattern, self._for_engine(kind, lane)) for kind, pattern, _ in self._kinds
            ]
            routes += [
                Route(pattern, self._taken(endpoint, lane))
                for pattern, endpoint, _ in self._mounted
            ]
            owned = {pattern for _, pattern, at in self._kinds if at == lane.name}
            owned |= {pattern for pattern, _, at in self._mounted if at == lane.name}
            filters = {r.pattern: r.subscription(self.root, shared_group) for r in routes}
            lane.session.subscriptions = [filters[p] for p in filters if p in owned]
            lane.session.unsubscriptions = [filters[p] for p in filters if p not in owned]
            lane.session.on_message = self._receiver(lane, Router(self.root, routes))
        self._attached = True

    def _taken(self, endpoint: Endpoint, lane: Lane) -> Endpoint:
        def taken(message: Inbound, params: dict[str, str]) -> None:
            ticket = self.hold(message, lane)
            if ticket is None:
                return
            self.release([ticket])
            endpoint(message, params)

        return taken

    # -- intake (called on the event loop by the sessions) -------------------------

    def _receiver(self, lane: Lane, router: Router) -> Callable[[Inbound], None]:
        def receive(message: Inbound) -> None:
            resolved = router.resolve(message.topic)
            if resolved is None:
                ticket = self.hold(message, lane)
                if ticket is not None:
                    self.release([ticket])
                return
            endpoint, params = resolved
            endpoint(message, params)

        return receive

    def hold(self, message: Inbound, lane: Lane) -> Ticket | None:
        """Take responsibility for a message; None once closed (it stays unacked)."""
        if self._closed.is_set():
            return None
        ticket = lane.acks.hold(message)
        if len(lane.acks) >= self.max_in_process or (lane.yields and self.engine.busy):
            lane.session.pause_reading()
        return ticket

    def release(self, tickets: list[Ticket]) -> None:
        """The work of these messages is done: PUBACK what is now in order, lane by lane.
        Once closed (the drain), reading stays paused."""
        for lane in self.lanes.values():
            mine = [ticket for ticket in tickets if ticket.owner is lane.acks]
            if mine:
                lane.acks.done(mine)
            if self._closed.is_set():
                continue
            below = len(lane.acks) < self.max_in_process * 3 // 4
            if lane.session.paused and below and not (lane.yields and self.engine.busy):
                if lane.yields:
                    self._backlog_now()  # paused until now: behind a moment more
                lane.session.resume_reading()

    def _for_engine(self, kind: str, lane: Lane) -> Endpoint:
        # Every kind's series exists from the start, at 0: a dashboard sees the kinds.
        received = self.metrics.messages_received.labels(kind)

        def endpoint(message: Inbound, params: dict[str, str]) -> None:
            ticket = self.hold(message, lane)
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
        for lane in self.lanes.values():
            lane.session.pause_reading()
        self._closed.set()
