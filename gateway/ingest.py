"""The hot path: message -> handler -> group commit -> answers and PUBACKs.

Messages are decoded as they arrive (on the event loop, between socket reads)
and queued for the writer loop, which commits whatever has gathered in one
transaction: while one batch commits in the database's thread, the next one
gathers. Only after the commit are the devices answered and the broker acked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import structlog

from gateway.acks import AckSequencer, Ticket
from gateway.answers import sync_answers
from gateway.config import WriterConfig
from gateway.metrics import Metrics
from gateway.mqtt import Inbound, MqttSession
from handlers.sync import Decoded, Rejected, SyncHandler
from storage.writer import Writer, WriteSet

log = structlog.get_logger("fieldgate.ingest")


class Pending(msgspec.Struct):
    message: Inbound
    device_id: str
    decoded: Decoded
    ticket: Ticket


class Ingest:
    def __init__(
        self,
        root: str,
        session: MqttSession,
        writer: Writer,
        sync: SyncHandler,
        config: WriterConfig,
        metrics: Metrics,
        on_outbox: Callable[[], None] | None = None,
    ) -> None:
        self.root = root
        self.session = session
        self.writer = writer
        self.sync = sync
        self.config = config
        self.metrics = metrics
        self.on_outbox = on_outbox
        self.acks = AckSequencer(session.ack)
        self._pending: list[Pending] = []
        self._arrived = asyncio.Event()
        self._closed = False
        self.last_beat = time.monotonic()
        self.in_commit = False

    # -- intake (called on the event loop by the router) ----------------------

    def hold(self, message: Inbound) -> Ticket | None:
        """Take responsibility for a message; None once draining (it stays unacked)."""
        if self._closed:
            return None
        ticket = self.acks.hold(message)
        self.metrics.in_flight.set(len(self.acks))
        if len(self.acks) >= self.config.max_in_process:
            self.session.pause_reading()
        return ticket

    def release(self, tickets: list[Ticket]) -> None:
        """The work of these messages is done: PUBACK what is now in order."""
        self.acks.done(tickets)
        held = len(self.acks)
        self.metrics.in_flight.set(held)
        if self.session.paused and held < self.config.max_in_process // 2:
            self.session.resume_reading()

    def sync_message(self, message: Inbound, params: dict[str, str]) -> None:
        ticket = self.hold(message)
        if ticket is None:
            return
        device_id = params["device_id"]
        self.metrics.messages_received.labels("sync").inc()
        decoded = self.sync.decode(
            message.topic, device_id, message.payload, message.received_at_us
        )
        for item in decoded.items:
            if isinstance(item, Rejected):
                self.metrics.rejected.labels(item.error.code.value).inc()
                log.info(
                    "sync rejected",
                    device_id=device_id,
                    op_id=item.op_id,
                    code=item.error.code.value,
                    path=item.error.path,
                    reason=item.error.message,
                )
        self._pending.append(Pending(message, device_id, decoded, ticket))
        self._arrived.set()

    # -- the writer loop -----------------------------------------------------

    async def run(self) -> None:
        """Commit what has gathered, answer, ack; until closed and empty."""
        wait_s = self.config.max_wait_ms / 1000
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), timeout=1.0)
                except TimeoutError:
                    self.last_beat = time.monotonic()
                    continue
                if wait_s and len(self._pending) < self.config.max_messages:
                    await asyncio.sleep(wait_s)
            self.last_beat = time.monotonic()
            batch = self._pending[: self.config.max_messages]
            del self._pending[: len(batch)]
            await self._commit(batch)

    async def _commit(self, batch: list[Pending]) -> None:
        writes = WriteSet()
        for pending in batch:
            writes.ops.extend(pending.decoded.records)
            writes.quarantine.extend(pending.decoded.quarantine)
        started = time.perf_counter()
        self.in_commit = True
        try:
            await self.writer.commit(writes)
        finally:
            self.in_commit = False
        if (writes.outbox or writes.conflicts) and self.on_outbox is not None:
            self.on_outbox()
        for conflict in writes.conflicts:
            self.metrics.conflicts.labels(conflict["severity"]).inc()
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self.metrics.commit_batch.observe(len(batch))
        for record in writes.ops:
            self.metrics.ops.labels(record.status).inc()
        for outbound in sync_answers(
            self.root, [(p.message, p.device_id, p.decoded) for p in batch]
        ):
            self.session.publish(outbound)
        self.release([p.ticket for p in batch])
        now_us = time.time_ns() // 1000
        for p in batch:
            self.metrics.ack_seconds.observe((now_us - p.message.received_at_us) / 1e6)

    async def drain(self) -> None:
        """Stop taking messages; commit, answer and ack everything already taken."""
        self._closed = True
        self._arrived.set()

    @property
    def pending(self) -> int:
        return len(self._pending)
