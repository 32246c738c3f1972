"""The seam between the MQTT side and the engine: the only things that cross it.

The MQTT side (gateway/mqtt/) keeps the session: it reads, pauses, PUBACKs in
arrival order and publishes. The engine (gateway/ingest/) does the work on
payloads: decode, validate, store, detect, build answers. Between them go
`Delivery`s one way (raw payloads with their topic and a receive id) and
`Result`s the other way (answer bodies, and the receive ids whose work is
committed). Nothing else crosses: no handler, record or database object, so the
engine lives in another process with this seam as its channel's protocol
(gateway/channel.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import msgspec

KIND_PATTERNS: dict[str, str | None] = {
    "alert": "devices/{device_id}/alerts",
    "crisis_ack": "alerts/crisis/ack",
    "sync": "devices/{device_id}/sync",
    "conflict_resolution": None,
}
"""The message kinds by name, and the topic (under the root) each is received on; None
for a write that only an admin command submits. The MQTT side routes by these; the
engine's table (gateway/ingest/kinds.py) has a row for each."""

LANE_SYNC = "sync"
LANE_PRIORITY = "priority"
KIND_LANES: dict[str, str] = {
    "alert": LANE_PRIORITY,
    "crisis_ack": LANE_PRIORITY,
    "sync": LANE_SYNC,
}
"""The lane (MQTT session, gateway/mqtt/intake.py) each received kind comes in on:
alerts never wait behind a sync backlog. Admin requests come in the priority lane."""
assert KIND_LANES.keys() == {kind for kind, topic in KIND_PATTERNS.items() if topic}


class Outbound(msgspec.Struct, array_like=True):
    """A message to publish; `correlation` is echoed as v5 CorrelationData."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    correlation: bytes | None = None


class Delivery(msgspec.Struct, array_like=True):
    """One message for the engine: a received MQTT message, or a write that an admin
    command submits (`reply` true: the engine answers it with a `Reply`)."""

    receive_id: int
    kind: str
    """The message kind's name (gateway/ingest/kinds.py), resolved from the topic."""
    topic: str
    params: dict[str, str]
    payload: bytes
    received_at_us: int
    response_topic: str | None = None
    correlation: bytes | None = None
    reply: bool = False


class Reply(msgspec.Struct, array_like=True):
    """The engine's answer to a submitted write: its data, or a typed error."""

    data: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


WAKE_OUTBOX = "outbox"
WAKE_ESCALATION = "escalation"
WAKES = frozenset({WAKE_OUTBOX, WAKE_ESCALATION})
"""The background parts a commit may wake (`Result.wake`): the MQTT side is given
one callable per name, and checks that it has them all."""


class Result(msgspec.Struct, array_like=True):
    """What a commit gives back: what to publish now and which deliveries are done."""

    done: list[int] = msgspec.field(default_factory=list)
    """Receive ids whose work is committed (or rejected and quarantined): PUBACK them."""
    answers: list[Outbound] = msgspec.field(default_factory=list)
    replies: dict[int, Reply] = msgspec.field(default_factory=dict)
    leased: list[dict[str, Any]] = msgspec.field(default_factory=list)
    """Outbox rows leased to this side by the commit that wrote them: publish at once."""
    wake: list[str] = msgspec.field(default_factory=list)
    """Background parts with new work in the database (names of WAKES)."""


class EngineState(msgspec.Struct, array_like=True):
    """How the engine is doing, as it says itself when pinged: for health, stats and the
    watchdog."""

    healthy: bool = True
    """Its commits succeed (False while the database refuses them)."""
    last_error: str | None = None
    stuck_s: float = 0.0
    """How long its writer has made no progress: the running transaction attempt's age,
    or, idle, the time since its loop last woke."""
    pending: int = 0
    """Deliveries taken and not yet committed."""
    commits: int = 0
    pid: int = 0
    model_id: str | None = None
    """The conflict model it scores with; None: it scores nothing."""
    model_refused: str | None = None
    """Why the active model's file was refused (it then scores nothing)."""


class Engine(Protocol):
    """The engine as the MQTT side sees it."""

    def submit(self, delivery: Delivery) -> None:
        """Take a delivery; its `Result` comes back through the callback later."""

    @property
    def busy(self) -> bool:
        """It holds as many payload bytes as it may: stop reading until it is not."""

    def on_result(self, callback: Callable[[Result], None]) -> None:
        """Where every `Result` goes, on the MQTT side's event loop."""
