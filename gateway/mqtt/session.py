"""The MQTT session: the one module that knows what lies under aiomqtt.

aiomqtt owns the connection (connect, TLS, will, subscribe). What it does not offer,
or offers at a cost per message that grows with what is in flight, is done here, on
the paho client beneath it:

- manual acknowledgement: a QoS 1 message is acked only once the gateway says
  it is committed (`ack`); aiomqtt would ack on arrival, losing a crash's worth;
- connection epochs: a message remembers the connection it came on, and an ack
  for an older connection is dropped (after a reconnect the broker reuses packet
  ids; acking the old id would confirm a different, uncommitted message);
- intake without aiomqtt's iterator (a task per message) and read pausing: the
  broker does not honour ReceiveMaximum past the first window, so the gateway
  bounds its own memory by not reading the socket while too much is in hand;
- the outgoing window and confirmed publishes: paho's own window rescans every
  message it holds on each PUBACK, and aiomqtt's awaited publish scans every call
  pending; with a thousand answers in flight that was a third of the MQTT process
  under a drain. Here paho sends what it is given, the session keeps the window
  (`max_outgoing_inflight`) with a queue of its own, and a PUBACK resolves its
  publish by packet id.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeAlias

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.config import MqttConfig
from gateway.lifecycle import Part, backoff
from gateway.mqtt.client import TlsFileError, describe, make_client
from gateway.seam import Outbound
from handlers.times import now_us

log = structlog.get_logger("fieldgate.mqtt")

PAUSED_PING_S = 1.0
"""While reading is paused, how often the ping paho waits for is forgotten (below the
shortest keepalive, 5 s; paho judges its keepalive once a second)."""

SOCKET_PROBE_S = 0.5
"""How often a connected session checks that its socket is still open (see `_probe`)."""

HEAD_START_S = 2.0
"""The longest a session given `after` waits for it before it connects anyway (a lane
the broker refuses, or an engine that cannot start, must not keep it down)."""


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def _echo(message: Outbound) -> Properties | None:
    """The v5 properties of an answer: the request's correlation data, echoed."""
    if message.correlation is None:
        return None
    properties = _properties(PacketTypes.PUBLISH)
    properties.CorrelationData = message.correlation
    return properties


Confirm: TypeAlias = asyncio.Future[bool] | None
"""Resolved True by the message's PUBACK, False when its connection is lost; None for
a message whose sender does not wait (an answer: a device that misses it resends)."""


def priority_client_id(client_id: str) -> str:
    """The priority lane's client id: the configured one with a suffix, so that one
    setting names both sessions and an ACL by username covers both."""
    return f"{client_id}-priority"


class Inbound:
    """One received message and what is needed to answer and acknowledge it."""

    __slots__ = (
        "correlation",
        "epoch",
        "mid",
        "payload",
        "qos",
        "received_at_us",
        "response_topic",
        "retain",
        "topic",
    )

    def __init__(
        self,
        topic: str,
        payload: bytes,
        *,
        mid: int = 0,
        qos: int = 0,
        epoch: int = 0,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        received_at_us: int | None = None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.mid = mid
        self.qos = qos
        self.epoch = epoch
        self.retain = retain
        self.response_topic = response_topic
        self.correlation = correlation
        self.received_at_us = now_us() if received_at_us is None else received_at_us


MessageCallback = Callable[[Inbound], None]
ConnectedCallback = Callable[["aiomqtt.Client"], Any]


class _NoFilters(MQTTMatcher):
    """paho's table of per-topic callbacks, always empty."""

    def iter_match(self, topic: str) -> Iterator[Any]:
        return iter(())


_NO_FILTERS = _NoFilters()  # type: ignore[no-untyped-call]  # paho: untyped __init__


def _ignore(_message: Inbound) -> None:
    """Messages before anyone routes them: none arrive, nothing is subscribed yet."""


SLOW_WAITING = 50_000
"""Messages waiting for the window at which the broker is said to be slow (logged once
until they flow again). The window itself (`max_outgoing_inflight`, at most 65,535)
keeps paho's 16-bit packet ids unique: past 65,535 outstanding it would refuse a new
one whose id is in use (seen once under a 100,000-message drain: acks lost)."""

AHEAD_ROOM = 100
"""How far messages published `ahead` (crises) may pass the window: they go out at once
while it is full of answers whose PUBACKs the broker sends behind a kept session's
backlog, as Mosquitto 2.0 does (docs/broker.md). The broker must take that many more
in flight (the shipped Mosquitto config: 10,000)."""

STABLE_S = 2.0
"""A session up this long was a real one: its end starts the reconnect backoff anew."""

LAST_WORDS_S = 5.0
"""How long a clean stop waits for the broker to confirm the last words."""
STOP_WITH_LAST_WORDS_S = LAST_WORDS_S + 1
STOP_S = 2.0
"""A session's time to stop: its last words, if it has any, and the disconnect."""


class MqttSession(Part):
    """A persistent MQTT v5 session that reconnects by itself until `stop()`.

    `on_message` (set by whoever routes: the intake) is called on the event loop for
    every message, in arrival order, for the topics of `subscriptions`;
    `on_connected` (awaited) runs after each connect (a new session's subscriptions
    granted, a kept one's being confirmed: `_settle`), before the session is
    considered up; `last_words` is published (awaited) on a clean stop. Publishing
    and acking are synchronous and never block.

    The gateway keeps one per lane (gateway/mqtt/intake.py): `lane` names it in logs
    and health, `client_id` (the configured one by default) keeps its broker session
    apart from the other lane's. A session given `after` connects once all of those
    events are set (or HEAD_START_S later). The broker sends a kept session's queue as
    soon as it accepts the connection: the sync lane waits for the priority lane to be
    up, so that a crisis queued during an outage is read before a backlog of
    operations, and for the engine to serve, so that the backlog's flood does not
    take the two cores from the engine's start.
    """

    name = "mqtt"
    critical = True
    ends_on_stop = True

    def __init__(
        self,
        config: MqttConfig,
        *,
        lane: str = "sync",
        client_id: str | None = None,
        will: Outbound | None = None,
        last_words: Callable[[], Outbound] | None = None,
        on_connected: ConnectedCallback | None = None,
        after: Sequence[asyncio.Event] = (),
    ) -> None:
        self.config = config
        self.after = after
        self.lane = lane
        self.stop_timeout_s = STOP_WITH_LAST_WORDS_S if last_words is not None else STOP_S
        self.name = "mqtt" if lane == "sync" else f"mqtt-{lane}"
        self.client_id = client_id or config.client_id
        self._log = log.bind(lane=lane)
        self.subscriptions: list[str] = []
        self.unsubscriptions: list[str] = []
        """Filters a session the broker kept may hold and this one no longer wants."""
        self.on_message: MessageCallback = _ignore
        self.will = will
        self.last_words = last_words
        self.on_connected = on_connected
        self.epoch = 0
        self.reconnects = 0
        self.connected = asyncio.Event()
        self.last_error: str | None = None
        self._client: aiomqtt.Client | None = None
        self._paho: paho.Client | None = None
        self._paused = False
        self._pause_wanted = False
        """A pause asked for before the session was up: applied once it is."""
        self._stopping = asyncio.Event()
        self._reader_fd: int | None = None
        self._up_at: float | None = None
        """When the current session came up (monotonic); None while connecting."""
        self.refused: dict[str, tuple[int, str]] = {}
        """Subscriptions the broker refused (or granted below QoS 1): filter ->
        (reason code, reason). Retried every `reconnect_max_s` while connected."""
        self.session_lost_at: int | None = None
        """When (µs) a reconnect found that the broker had kept no session."""
        self.expiry_granted_s: int | None = None
        """The session expiry the broker granted on the last connect."""
        self._connack: tuple[bool, int | None] | None = None
        self._connections = 0
        self._window = config.max_outgoing_inflight
        self._ahead_window = min(self._window + AHEAD_ROOM, 65_535)
        self._waiting: collections.deque[tuple[Outbound, Confirm]] = collections.deque()
        """QoS 1 messages past the window, in order: handed over as the broker
        acknowledges earlier ones, on this connection or (answers) the next."""
        self._ahead: collections.deque[tuple[Outbound, Confirm]] = collections.deque()
        """Confirmed publishes that go before `_waiting` (crises: `publish_confirmed`)."""
        self._confirms: dict[int, asyncio.Future[bool]] = {}
        """Confirmed publishes in flight on this connection, by packet id."""
        self._pinging: asyncio.Future[None] | None = None
        """Keeps the connection while reading is paused (`_ping_while_paused`)."""

    # -- lifecycle -----------------------------------------------------------

    async def run(self) -> None:
        """Connect, subscribe, and stay connected until `stop()`; reconnect with backoff.

        The backoff grows while connecting fails, and starts again from its minimum
        after a session that was up for STABLE_S: every outage of a broker that comes
        back is retried as promptly as the first (a drop always ends a session with
        an error, so "ended without one" cannot be the signal). A broker that takes
        the connection and drops it at once is still retried with a growing delay.
        """
        attempt = 0
        while not self._stopping.is_set():
            self._up_at = None
            connections = self._connections
            await self._wait_for_head()
            try:
                await self._session()
            except (aiomqtt.MqttError, TlsFileError) as exc:
                self.last_error = describe(exc)
            finally:
                self._detach()
            if self._stopping.is_set():
                break
            if self._up_at is not None and time.monotonic() - self._up_at >= STABLE_S:
                attempt = 0
            attempt += 1
            self.reconnects += 1
            delay = backoff(attempt, self.config.reconnect_min_s, self.config.reconnect_max_s)
            if self._connections > connections:
                self._log.warning(
                    "mqtt disconnected, reconnecting", reason=self.last_error, retry_in_s=delay
                )
            else:  # no CONNACK accepted: a broker down, TLS refused, credentials refused
                self._log.warning(
                    "mqtt connection failed",
                    host=self.config.host,
                    port=self.config.port,
                    reason=self.last_error,
                    retry_in_s=delay,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    async def _wait_for_head(self) -> None:
        """Until every event of `after` is set, HEAD_START_S at most (or the stop)."""
        waits = {asyncio.ensure_future(event.wait()) for event in self.after if not event.is_set()}
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            async with asyncio.timeout(HEAD_START_S):
                while waits and not stopping.done():
                    done, _ = await asyncio.wait(
                        {*waits, stopping}, return_when=asyncio.FIRST_COMPLETED
                    )
                    waits -= done
        except TimeoutError:
            pass
        finally:
            for waiting in (*waits, stopping):
                waiting.cancel()

    async def _session(self) -> None:
        client = self._make_client()
        async with client:
            self._client = client
            self._heard_connack()
            settling = asyncio.ensure_future(self._settle(client))
            if not self._kept():
                await settling
            if self.on_connected is not None:
                await self.on_connected(client)
            self.connected.set()
            self._up_at = time.monotonic()
            self._hand_over()
            if self._pause_wanted:
                self.pause_reading()
            self.last_error = None
            self._log.info(
                "mqtt connected", host=self.config.host, port=self.config.port, epoch=self.epoch
            )
            disconnected = client._disconnected
            disconnected.add_done_callback(lambda _: self._fail_confirms())
            stopping = asyncio.ensure_future(self._stopping.wait())
            probe = asyncio.ensure_future(self._probe(client))
            retry = asyncio.ensure_future(self._retry_refused(client))
            either: set[asyncio.Future[Any]] = {disconnected, stopping}
            try:
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                probe.cancel()
                retry.cancel()
                settling.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await settling
            if disconnected.done():
                disconnected.result()
                raise aiomqtt.MqttError("broker closed the connection")

    def _heard_connack(self) -> None:
        """What the CONNACK said of the session: kept or not, and for how long."""
        present, granted = self._connack or (True, None)
        self._connections += 1
        requested = self.config.session_expiry_s
        expiry = requested if granted is None else granted
        if expiry < requested and expiry != self.expiry_granted_s:
            self._log.warning(
                "the broker shortened the gateway's session expiry: a longer outage"
                " loses what devices send meanwhile",
                granted_s=expiry,
                requested_s=requested,
            )
        self.expiry_granted_s = expiry
        if present:
            return
        if self._connections == 1:
            self._log.info("mqtt session new: the broker held none for the gateway")
            return
        self.session_lost_at = now_us()
        self._log.warning(
            "mqtt session lost: the broker kept no session for the gateway, and what"
            " devices sent while it was away was not queued",
            epoch=self.epoch,
        )

    def _kept(self) -> bool:
        """Did the broker keep the session (CONNACK's session-present flag)?"""
        return self._connack[0] if self._connack is not None else False

    async def _settle(self, client: aiomqtt.Client) -> None:
        """Subscribe, and let go of what the session no longer wants.

        A new session waits for this before it is up: nothing is queued for it, so
        the SUBACK comes at once, and a broker that never answers is a broker to
        leave. A session the broker kept is up at once, and this runs beside it with
        no time limit: the broker holds its subscriptions already, and sends what it
        queued ahead of the SUBACK. Mosquitto 2.0 sends far more than the session's
        receive maximum then (eclipse-mosquitto/mosquitto#2301): 100,000 messages of
        a 200,000 backlog came ahead of the SUBACK, 12 s, and waiting for it (10 s at
        most) reconnected the sync lane every 11 s of a 500,000-message drain, each
        time with the broker's whole window sent again and the backlog read into
        memory unpaused (tests/test_huge_backlog.py).
        """
        wait_s = math.inf if self._kept() else None
        await self._subscribe(client, self.subscriptions, wait_s)
        if self._kept() and self.unsubscriptions:
            await client.unsubscribe(self.unsubscriptions, timeout=wait_s)

    async def _subscribe(
        self, client: aiomqtt.Client, filters: list[str], wait_s: float | None = None
    ) -> None:
        """Subscribe at QoS 1 and read the SUBACK: a refused filter, or one granted
        below QoS 1 (its messages would never wait for the gateway's ack), is logged
        once and kept in `refused`; the others work meanwhile."""
        if not filters:
            return
        codes: Sequence[int | ReasonCode] = await client.subscribe(
            [(topic, SubscribeOptions(qos=1)) for topic in filters], timeout=wait_s
        )
        for topic, code in zip(filters, codes, strict=True):
            value = code if isinstance(code, int) else code.value
            if 1 <= value < 0x80:
                if self.refused.pop(topic, None) is not None:
                    self._log.info("mqtt subscription granted", filter=topic)
                continue
            reason = "granted QoS 0" if value == 0 else str(code)
            if self.refused.get(topic) != (value, reason):
                self._log.error(
                    "mqtt subscription refused",
                    filter=topic,
                    reason_code=value,
                    reason=reason,
                    retry_every_s=self.config.reconnect_max_s,
                )
            self.refused[topic] = (value, reason)

    async def _retry_refused(self, client: aiomqtt.Client) -> None:
        """Ask again for the refused subscriptions now and then: a broker's ACL fixed
        takes effect without a restart."""
        while True:
            await asyncio.sleep(self.config.reconnect_max_s)
            if self.refused:
                with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                    await self._subscribe(client, sorted(self.refused))

    async def _probe(self, client: aiomqtt.Client) -> None:
        """Declare the connection lost when its socket is closed or reset by the broker.

        Under uvloop, a socket that the peer resets (a broker stopped while messages
        were in flight) gets an error event; uvloop then closes the poll handle of that
        socket without calling the reader, so paho never reads the end of the stream,
        still believes it is connected, and the session hangs until the keepalive runs
        out (1.5 x keepalive_s, after the broker is long back). A non-blocking peek
        every SOCKET_PROBE_S sees the reset or the end of the stream at once.
        """
        while not client._disconnected.done():
            await asyncio.sleep(SOCKET_PROBE_S)
            inner = self._paho
            sock = inner.socket() if inner is not None else None
            if not isinstance(sock, socket.socket):
                continue
            try:
                # The plain socket's recv, also under TLS: a peek at raw bytes.
                data = socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                reason: str = exc.strerror or type(exc).__name__
            else:
                if data:
                    continue
                reason = "the broker closed the connection"
            if not client._disconnected.done():
                client._disconnected.set_exception(aiomqtt.MqttError(f"connection lost: {reason}"))
            return

    def _make_client(self) -> aiomqtt.Client:
        cfg = self.config
        connect = _properties(PacketTypes.CONNECT)
        connect.SessionExpiryInterval = cfg.session_expiry_s
        connect.ReceiveMaximum = cfg.receive_maximum
        will = None
        if self.will is not None:
            will = aiomqtt.Will(self.will.topic, self.will.payload, qos=1, retain=self.will.retain)
        client = make_client(
            cfg,
            identifier=self.client_id,
            clean_start=False,
            properties=connect,
            will=will,
            max_inflight_messages=0,  # the session keeps the window (module docstring)
        )
        client.pending_calls_threshold = 10_000
        inner: paho.Client = client._client
        inner.manual_ack_set(True)
        inner.on_message = self._receive
        # No per-topic callbacks are ever added (`message_callback_add`): routing is the
        # intake's. paho still matches each message against them, in a recursive closure
        # that refers to itself: a reference cycle a message, which only the collector
        # frees (45,000 objects a young collection, 10-20 ms pauses at 2,000 ops/s).
        inner._on_message_filtered = _NO_FILTERS
        aiomqtt_on_connect = inner.on_connect
        inner.on_socket_open = self._wrap_socket_open(inner.on_socket_open)

        def on_connect(*args: Any) -> None:
            # Bump the epoch before paho hands over the first message of this
            # connection: it may sit in the same read as the CONNACK.
            self.epoch += 1
            _client, _userdata, flags, _reason, properties = (*args, None)[:5]
            granted = getattr(properties, "SessionExpiryInterval", None)
            self._connack = (bool(flags.session_present), granted)
            if aiomqtt_on_connect is not None:
                aiomqtt_on_connect(*args)

        inner.on_connect = on_connect
        aiomqtt_on_publish = inner.on_publish

        def on_publish(*args: Any) -> None:
            if aiomqtt_on_publish is not None:  # the birth message and the last words
                aiomqtt_on_publish(*args)
            confirm = self._confirms.pop(args[2], None)
            if confirm is not None and not confirm.done():
                confirm.set_result(True)
            if self._ahead or self._waiting:
                self._hand_over()

        inner.on_publish = on_publish
        self._paho = inner
        return client

    def _wrap_socket_open(self, original: Any) -> Any:
        def on_socket_open(client: paho.Client, userdata: Any, sock: Any) -> None:
            original(client, userdata, sock)
            self._reader_fd = sock.fileno()
            # What was sent and not acknowledged by the broker's TCP for 1.5 keepalives
            # ends the connection: a broker that vanishes while the session does not
            # read (decision 14) is noticed as a keepalive would, not after TCP's
            # ~15 minutes of retransmissions.
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self.config.keepalive_s * 1500
                )
                # paho leaves Nagle on: on the quiet priority lane a crisis written
                # right after a PUBACK waited for the broker's delayed ACK (~40 ms).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        return on_socket_open

    def _stop_pinging(self) -> None:
        if self._pinging is not None:
            self._pinging.cancel()
            self._pinging = None

    def _detach(self) -> None:
        self._stop_pinging()
        self._fail_confirms()
        self.connected.clear()
        self._client = None
        self._paho = None
        self._paused = False
        self._pause_wanted = False
        self._reader_fd = None

    async def stop(self) -> None:
        """Publish `last_words` (awaited), then disconnect cleanly and end `run()`.

        Reading resumes first: the PUBACK of the last words comes on the socket. What
        else is read now is not taken by anyone (the intake closed), stays unacked,
        and the broker delivers it again to the next session."""
        client = self._client
        last_words = self.last_words() if self.last_words is not None else None
        if self.paused:
            self.resume_reading()
        if client is not None and last_words is not None and self.connected.is_set():
            try:
                await client.publish(
                    last_words.topic,
                    last_words.payload,
                    qos=1,
                    retain=last_words.retain,
                    timeout=LAST_WORDS_S,
                )
            except (aiomqtt.MqttError, TimeoutError) as exc:
                # The will says offline instead, after its delay.
                self._log.warning("last words not confirmed", error=type(exc).__name__)
        self._stopping.set()

    # -- intake --------------------------------------------------------------

    def _receive(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        payload = message.payload
        self.on_message(
            Inbound(
                message.topic,
                payload if isinstance(payload, bytes) else bytes(payload),
                mid=message.mid,
                qos=message.qos,
                epoch=self.epoch,
                retain=bool(message.retain),
                response_topic=response_topic or None,
                correlation=correlation,
            )
        )

    def pause_reading(self) -> None:
        """Stop reading the socket: TCP pushes back on the broker, which queues.

        Not before the session is up: a resumed session's queued messages come
        ahead of the SUBACK, and a pause then would leave the SUBACK unread until
        the subscribe times out and the session is torn down (its messages in
        flight all redelivered). The broker's in-flight window (our
        ReceiveMaximum) bounds what arrives meanwhile.
        """
        if not self.connected.is_set():
            self._pause_wanted = True
            return
        self._pause_wanted = False
        if self._paused or self._reader_fd is None:
            return
        asyncio.get_running_loop().remove_reader(self._reader_fd)
        self._paused = True
        if self._paho is not None:
            self._pinging = asyncio.ensure_future(self._ping_while_paused(self._paho))
        self._log.debug("intake paused")

    async def _ping_while_paused(self, inner: paho.Client) -> None:
        """Keep the connection through a long pause (docs/decisions/0014).

        paho waits one keepalive for the PINGRESP to its PINGREQ and then closes the
        connection; while the socket is not read, the PINGRESP cannot be read, so a
        database outage longer than two keepalives tore the session down and the
        broker delivered everything in flight again. Forgetting the ping paho waits for
        makes it send the next one on time instead: the broker hears from the gateway
        every keepalive and keeps the session; the PINGRESPs wait in the socket with
        the rest, read on resume. A broker gone meanwhile shows then, or at once when
        it resets the connection (`_probe`)."""
        while True:
            await asyncio.sleep(PAUSED_PING_S)
            inner._ping_t = 0.0

    def resume_reading(self) -> None:
        self._pause_wanted = False
        self._stop_pinging()
        if not self._paused or self._reader_fd is None or self._paho is None:
            self._paused = False
            return
        inner = self._paho
        client = self._client

        def read() -> None:
            try:
                inner.loop_read()
                sock: Any = inner.socket()
                while hasattr(sock, "pending") and sock.pending() > 0:
                    inner.loop_read()
            except Exception as exc:  # noqa: BLE001 - any read failure is a lost connection
                if client is not None and not client._disconnected.done():
                    client._disconnected.set_exception(exc)

        asyncio.get_running_loop().add_reader(self._reader_fd, read)
        self._paused = False
        self._log.debug("intake resumed")

    @property
    def paused(self) -> bool:
        return self._paused or self._pause_wanted

    # -- answers -------------------------------------------------------------

    def ack(self, messages: Iterable[Inbound]) -> int:
        """PUBACK `messages` in the order given; returns how many were acked.

        Messages of an older connection are skipped: the broker redelivers them
        on this one, and the gateway will answer them as duplicates.
        """
        inner = self._paho
        # Not `self.connected`: that waits for the birth message, and the broker
        # starts sending the backlog right after CONNACK.
        if inner is None or not inner.is_connected():
            return 0
        epoch = self.epoch
        acked = 0
        for message in messages:
            if message.qos > 0 and message.epoch == epoch:
                inner.ack(message.mid, message.qos)
                acked += 1
        return acked

    def publish(self, message: Outbound) -> bool:
        """Hand a message over without waiting for its PUBACK.

        For answers whose loss the sender recovers from by retrying: a device
        that misses its ack resends, and gets `duplicate`. Past the window the
        message waits here, in order, and goes out as the broker acknowledges.
        Returns False when it could not even be queued (not connected).
        """
        inner = self._paho
        if inner is None:
            return False
        return self._enqueue(inner, message, None)

    async def publish_confirmed(
        self, message: Outbound, wait_s: float = 10.0, *, ahead: bool = False
    ) -> bool:
        """Publish and wait for the broker's PUBACK; False if it did not come in
        `wait_s` or the connection was lost first (the caller retries on the next).

        `ahead`: past the window by up to AHEAD_ROOM, and before every message not
        `ahead` past that. A crisis published behind thousands of admin answers and
        notifications (50,000 queued for the priority lane, tests/test_huge_backlog.py)
        waited out its 10 s behind them, and went to the outbox's rounds, after every
        notification written before it.
        """
        inner = self._paho
        if inner is None or not self.connected.is_set():
            return False
        confirm: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._enqueue(inner, message, confirm, ahead=ahead)
        try:
            async with asyncio.timeout(wait_s):
                return await confirm
        except TimeoutError:
            # At debug: the outbox says it once for all of a round (thousands, in a flood).
            self._log.debug("confirmed publish failed", topic=message.topic, reason="no PUBACK")
            return False

    def _enqueue(
        self, inner: paho.Client, message: Outbound, confirm: Confirm, *, ahead: bool = False
    ) -> bool:
        in_flight = len(inner._out_messages)
        if message.qos > 0 and ahead and (self._ahead or in_flight >= self._ahead_window):
            self._ahead.append((message, confirm))
            return True
        if message.qos > 0 and not ahead and (self._waiting or in_flight >= self._window):
            self._waiting.append((message, confirm))
            if len(self._waiting) == SLOW_WAITING:
                self._log.warning(
                    "outgoing messages wait: the broker is slow to acknowledge",
                    waiting=SLOW_WAITING,
                    in_flight=self._window,
                )
            return True
        return self._send(inner, message, confirm)

    def _send(self, inner: paho.Client, message: Outbound, confirm: Confirm) -> bool:
        info = inner.publish(
            message.topic, message.payload, message.qos, message.retain, _echo(message)
        )
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self._log.warning("publish refused", topic=message.topic, rc=paho.error_string(info.rc))
            if confirm is not None and not confirm.done():
                confirm.set_result(False)
            return False
        if confirm is not None:
            if message.qos == 0:
                confirm.set_result(True)
            else:
                self._confirms[info.mid] = confirm
        return True

    def _hand_over(self) -> None:
        """Waiting messages to paho, in order, as far as the window has room."""
        inner = self._paho
        if inner is None:
            return
        slow = len(self._waiting) >= SLOW_WAITING
        for waiting, window in ((self._ahead, self._ahead_window), (self._waiting, self._window)):
            while waiting and len(inner._out_messages) < window:
                message, confirm = waiting.popleft()
                if confirm is None or not confirm.done():  # done: its sender stopped waiting
                    self._send(inner, message, confirm)
        if slow and not self._waiting:
            self._log.info("outgoing messages flow again")

    def _fail_confirms(self) -> None:
        """The connection is lost: every confirmed publish in flight or waiting is
        answered False at once, for its sender to retry on the next connection.
        Answers stay queued; paho's in flight go with its client."""
        failed = [confirm for confirm in self._confirms.values() if not confirm.done()]
        failed += [confirm for _message, confirm in self._ahead if confirm and not confirm.done()]
        self._confirms.clear()
        self._ahead.clear()
        if any(confirm is not None for _message, confirm in self._waiting):
            failed += [c for _m, c in self._waiting if c is not None and not c.done()]
            self._waiting = collections.deque((m, c) for m, c in self._waiting if c is None)
        for confirm in failed:
            confirm.set_result(False)
        if failed:
            self._log.warning(
                "confirmed publishes failed", count=len(failed), reason="connection lost"
            )

    def outgoing_pending(self) -> int:
        inner = self._paho
        return len(inner._out_messages) if inner is not None else 0
