"""PUBACKs in arrival order, whatever order the work behind them finishes in.

MQTT 3.1.1 section 4.6 asks a receiver to acknowledge QoS 1 messages in the
order they came; sync messages finish at their commit, admin requests at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from gateway.mqtt.session import Inbound


class Ticket:
    __slots__ = ("message", "owner", "ready")

    def __init__(self, message: Inbound, owner: AckSequencer) -> None:
        self.message = message
        self.owner = owner
        """The sequencer that holds it: a session's, one per lane."""
        self.ready = False


class AckSequencer:
    """Holds every received message until it and all before it are done."""

    def __init__(self, send: Callable[[Iterable[Inbound]], int]) -> None:
        self._send = send
        self._queue: deque[Ticket] = deque()

    def hold(self, message: Inbound) -> Ticket:
        ticket = Ticket(message, self)
        self._queue.append(ticket)
        return ticket

    def done(self, tickets: Iterable[Ticket]) -> int:
        """Mark tickets done; PUBACK the ready prefix. Returns how many left the queue."""
        for ticket in tickets:
            ticket.ready = True
        queue = self._queue
        released: list[Inbound] = []
        while queue and queue[0].ready:
            released.append(queue.popleft().message)
        if released:
            self._send(released)
        return len(released)

    def __len__(self) -> int:
        return len(self._queue)
