"""The hot path: message -> handler -> group commit -> answers and PUBACKs.

Messages are decoded as they arrive (on the event loop, between socket reads)
and queued for the writer loop, which commits whatever has gathered in one
transaction: while one batch commits in the database's thread, the next one
gathers. Only after the commit are the devices answered and the broker acked.

What the database refuses alone, when it refuses a batch for a value it holds
(the writer isolates it), is rejected (`schema`), quarantined and acked like
any rejection; the rest is stored and answered as usual
(docs/decisions/0006-poison-batch-bisection.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from gateway.acks import AckSequencer, Ticket
from gateway.answers import alert_answers, sync_answers
from gateway.config import WriterConfig
from gateway.metrics import Metrics
from gateway.mqtt import Inbound, MqttSession
from handlers.alerts import CRISIS, AckDecoded, AlertDecoded, AlertHandler, AlertRules
from handlers.errors import Code, Error, quarantine_record
from handlers.sync import Decoded, Rejected, SyncHandler, item_path
from storage.records import QuarantineRecord
from storage.writer import Committed, Writer, WriteSet

log = structlog.get_logger("fieldgate.ingest")


class Pending(msgspec.Struct):
    message: Inbound
    device_id: str
    decoded: Decoded | AlertDecoded | AckDecoded
    ticket: Ticket


class Gathered(msgspec.Struct):
    """One batch as the writer and the answers need it."""

    writes: WriteSet
    syncs: list[tuple[Inbound, str, Decoded]]
    alerts: list[tuple[Inbound, str, AlertDecoded]]


def collect(batch: list[Pending]) -> Gathered:
    """Every record of the batch in one write set, and the payloads to answer."""
    gathered = Gathered(WriteSet(), [], [])
    writes = gathered.writes
    for pending in batch:
        decoded = pending.decoded
        if isinstance(decoded, Decoded):
            writes.ops.extend(decoded.records)
            gathered.syncs.append((pending.message, pending.device_id, decoded))
        elif isinstance(decoded, AlertDecoded):
            if decoded.record is not None:
                writes.alerts.append(decoded.record)
            gathered.alerts.append((pending.message, pending.device_id, decoded))
        elif decoded.record is not None:
            writes.crisis_acks.append(decoded.record)
        writes.quarantine.extend(decoded.quarantine)
    return gathered


def owners(batch: list[Pending]) -> dict[int, tuple[Pending, int]]:
    """`id(record)` -> its message and its index in the payload's items, for every
    record of the batch: which answer a refused record belongs to."""
    found: dict[int, tuple[Pending, int]] = {}
    for pending in batch:
        decoded = pending.decoded
        if isinstance(decoded, Decoded):
            for index, item in enumerate(decoded.items):
                found[id(item)] = (pending, index)
        elif decoded.record is not None:
            found[id(decoded.record)] = (pending, 0)
    return found


def refuse(pending: Pending, index: int, error_name: str) -> tuple[str, str | None, Error]:
    """Turn a record that the database refused into a rejection in its payload, in place.

    Returns (quarantine kind, the record's id, the error). The error names the class of
    the database's error, never its message: that may quote the row, an alert's note.
    """
    decoded = pending.decoded
    if isinstance(decoded, Decoded):
        op_id = decoded.items[index].op_id
        path = item_path(decoded.batch_id, len(decoded.items), index)
        error = Error(Code.SCHEMA, _refused("operation", error_name), path)
        decoded.items[index] = Rejected(op_id, error)
        return "sync", op_id, error
    if isinstance(decoded, AlertDecoded):
        decoded.record = None
        decoded.error = Error(Code.SCHEMA, _refused("alert", error_name))
        return "alert", decoded.alert_id, decoded.error
    alert_id = decoded.record.alert_id if decoded.record is not None else None
    decoded.record = None
    decoded.error = Error(Code.SCHEMA, _refused("acknowledgement", error_name))
    return "crisis_ack", alert_id, decoded.error


def _refused(what: str, error_name: str) -> str:
    return f"the database refused this {what} ({error_name})"


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
        beat_s: float = 1.0,
        alerts: AlertHandler | None = None,
        publish_leased: Callable[[list[dict[str, Any]]], None] | None = None,
        on_crisis: Callable[[], None] | None = None,
    ) -> None:
        self.root = root
        self.alerts = alerts or AlertHandler(AlertRules())
        self.on_crisis = on_crisis
        self.publish_leased = publish_leased
        self._urgent = asyncio.Event()
        self.session = session
        self.writer = writer
        self.sync = sync
        self.config = config
        self.metrics = metrics
        self.on_outbox = on_outbox
        self.beat_s = beat_s
        """How often the idle loop proves it is alive (the watchdog reads `last_beat`)."""
        self._received_sync = metrics.messages_received.labels("sync")
        metrics.in_flight.set_function(lambda: len(self.acks))
        self.acks = AckSequencer(session.ack)
        self._pending: list[Pending] = []
        self._arrived = asyncio.Event()
        self._closed = False
        self.last_beat = time.monotonic()

    # -- intake (called on the event loop by the router) ----------------------

    def hold(self, message: Inbound) -> Ticket | None:
        """Take responsibility for a message; None once draining (it stays unacked)."""
        if self._closed:
            return None
        ticket = self.acks.hold(message)
        if len(self.acks) >= self.config.max_in_process:
            self.session.pause_reading()
        return ticket

    def release(self, tickets: list[Ticket]) -> None:
        """The work of these messages is done: PUBACK what is now in order."""
        self.acks.done(tickets)
        if self.session.paused and len(self.acks) < self.config.max_in_process * 3 // 4:
            self.session.resume_reading()

    def sync_message(self, message: Inbound, params: dict[str, str]) -> None:
        ticket = self.hold(message)
        if ticket is None:
            return
        device_id = params["device_id"]
        self._received_sync.inc()
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

    def alert_message(self, message: Inbound, params: dict[str, str]) -> None:
        """An alert: decoded now, stored with the next batch, answered and acked after.

        Logged by id only: never the note nor any other text of the payload.
        """
        ticket = self.hold(message)
        if ticket is None:
            return
        device_id = params["device_id"]
        self.metrics.messages_received.labels("alert").inc()
        decoded = self.alerts.decode(
            message.topic, device_id, message.payload, message.received_at_us
        )
        if decoded.error is not None:
            self.metrics.rejected.labels(decoded.error.code.value).inc()
            log.info(
                "alert rejected",
                device_id=device_id,
                alert_id=decoded.alert_id,
                code=decoded.error.code.value,
                path=decoded.error.path,
            )
        self._pending.append(Pending(message, device_id, decoded, ticket))
        self._urgent.set()
        self._arrived.set()

    def crisis_ack_message(self, message: Inbound, _params: dict[str, str]) -> None:
        """An operator's acknowledgement of a crisis, stored with the next batch."""
        ticket = self.hold(message)
        if ticket is None:
            return
        self.metrics.messages_received.labels("crisis_ack").inc()
        decoded = self.alerts.decode_ack(message.topic, message.payload, message.received_at_us)
        if decoded.error is not None:
            self.metrics.rejected.labels(decoded.error.code.value).inc()
            log.info("crisis ack rejected", code=decoded.error.code.value, path=decoded.error.path)
        self._pending.append(Pending(message, "", decoded, ticket))
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
                    await asyncio.wait_for(self._arrived.wait(), timeout=self.beat_s)
                except TimeoutError:
                    self.last_beat = time.monotonic()
                    continue
                # Gather a batch, unless an alert is waiting: it goes at once.
                gather = wait_s and len(self._pending) < self.config.max_messages
                if gather and not self._urgent.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._urgent.wait(), timeout=wait_s)
            self._urgent.clear()
            self.last_beat = time.monotonic()
            batch = self._pending[: self.config.max_messages]
            del self._pending[: len(batch)]
            await self._commit(batch)

    async def _commit(self, batch: list[Pending]) -> None:
        started = time.perf_counter()
        gathered, written = await self._store(batch)
        writes = gathered.writes
        if written.leased and self.publish_leased is not None:
            self.publish_leased(written.leased)
        if (written.outbox_rows or writes.conflicts) and self.on_outbox is not None:
            self.on_outbox()
        for conflict in writes.conflicts:
            self.metrics.conflicts.labels(conflict["severity"]).inc()
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self.metrics.commit_batch.observe(len(batch))
        for status in ("stored", "duplicate"):
            count = sum(1 for record in writes.ops if record.status == status)
            self.metrics.ops.labels(status).inc(count)
        if writes.alerts or writes.crisis_acks:
            self._after_alerts(writes)
        for outbound in sync_answers(self.root, gathered.syncs):
            self.session.publish(outbound)
        for outbound in alert_answers(self.root, gathered.alerts):
            self.session.publish(outbound)
        self.release([p.ticket for p in batch])
        now_us = time.time_ns() // 1000
        for p in batch:
            self.metrics.ack_seconds.observe((now_us - p.message.received_at_us) / 1e6)

    async def _store(self, batch: list[Pending]) -> tuple[Gathered, Committed]:
        """Commit the batch; what the database refused alone is rejected and quarantined.

        The writer commits everything else (storage/writer.py). Each refused record
        becomes a rejection in its payload's answer, and its quarantine row is
        committed before anything is answered or acked, as every rejection's is.
        Returns the batch as committed, refused records gone from the write set.
        """
        gathered = collect(batch)
        written = await self.writer.commit(gathered.writes)
        if not written.refused:
            return gathered, written
        found = owners(batch)
        quarantine = []
        for refusal in written.refused:
            pending, index = found[id(refusal.record)]
            quarantine.append(self._quarantined(pending, *refuse(pending, index, refusal.error)))
        await self.writer.commit(WriteSet(quarantine=quarantine), refusable=False)
        conflicts = gathered.writes.conflicts
        gathered = collect(batch)
        gathered.writes.conflicts = conflicts
        return gathered, written

    def _quarantined(
        self, pending: Pending, kind: str, item_id: str | None, error: Error
    ) -> QuarantineRecord:
        """The quarantine row of a refused record, and its log line and count: ids and
        the error class only, never the payload."""
        self.metrics.rejected.labels(error.code.value).inc()
        # An alert or a crisis ack that is not stored reaches no operator: say so louder.
        emit = log.warning if kind == "sync" else log.error
        emit(
            "refused by the database",
            kind=kind,
            device_id=pending.device_id or None,
            id=item_id,
            path=error.path,
            reason=error.message,
        )
        message = pending.message
        return quarantine_record(
            topic=message.topic,
            device_id=pending.device_id or None,
            kind=kind,
            error=error,
            payload=message.payload,
            received_at_us=message.received_at_us,
        )

    def _after_alerts(self, writes: WriteSet) -> None:
        """Metrics and logs of committed alerts and acks: ids only, never text."""
        crisis = False
        for record in writes.alerts:
            if record.status == "stored":
                self.metrics.alerts.labels(record.classification or "none").inc()
                crisis = crisis or record.classification == CRISIS
            log.info(
                "alert stored" if record.status == "stored" else "alert duplicate",
                alert_id=record.alert_id,
                device_id=record.device_id,
                classification=record.classification,
                notified=record.notified,
            )
        for ack in writes.crisis_acks:
            log.info("crisis ack", alert_id=ack.alert_id, outcome=ack.outcome)
        if (crisis or writes.crisis_acks) and self.on_crisis is not None:
            self.on_crisis()

    async def drain(self) -> None:
        """Stop taking messages; commit, answer and ack everything already taken."""
        self._closed = True
        self._arrived.set()

    @property
    def pending(self) -> int:
        return len(self._pending)
