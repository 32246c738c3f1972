"""The writer: many messages, one transaction, retried until it commits.

Group commit is what makes durable acks affordable: one fsync (SQLite) or one
round of WAL flush (PostgreSQL) per batch instead of per message. A batch that
fails is rolled back whole and tried again with backoff; nothing is acked until
the retry commits, so a database outage delays acks and never loses an operation.

A batch that the database refuses for what it holds (storage/refusals.py) is not
retried whole: it would fail forever and stall ingest. Its units (one per op,
alert, crisis ack) are committed in halves, recursively, until what fails alone
is found; that is handed back refused, the rest is committed
(docs/decisions/0006-poison-batch-bisection.md).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from storage import alerts, outbox, quarantine, sync_log
from storage.alerts import AlertPolicy
from storage.conflicts import Detector
from storage.db import create_engine
from storage.records import (
    AlertRecord,
    CrisisAckRecord,
    OpRecord,
    OutboxRecord,
    QuarantineRecord,
)
from storage.refusals import refusal

log = structlog.get_logger("fieldgate.writer")


class WriteSet(msgspec.Struct):
    """Everything one batch writes, gathered from many messages."""

    ops: list[OpRecord] = msgspec.field(default_factory=list)
    quarantine: list[QuarantineRecord] = msgspec.field(default_factory=list)
    outbox: list[OutboxRecord] = msgspec.field(default_factory=list)
    alerts: list[AlertRecord] = msgspec.field(default_factory=list)
    crisis_acks: list[CrisisAckRecord] = msgspec.field(default_factory=list)
    conflicts: list[dict[str, Any]] = msgspec.field(default_factory=list)
    """Filled by the writer: the conflict records the committed batch created."""


Record = OpRecord | AlertRecord | CrisisAckRecord
"""A record the database may refuse on its own: each is one unit of an isolation."""


class Refusal(msgspec.Struct, frozen=True):
    """A record the database refused alone, and the class name of its error (never the
    message: that may quote the row, an alert's note)."""

    record: Record
    error: str


class Committed(msgspec.Struct):
    """What a commit wrote to the outbox: how many rows, and those leased to the caller
    for publication at once (see `outbox.add_leased`); and what it had to leave out."""

    outbox_rows: int = 0
    leased: list[dict[str, Any]] = msgspec.field(default_factory=list)
    refused: list[Refusal] = msgspec.field(default_factory=list)
    """Records the database refused alone, each rolled back; the rest is committed."""

    def add(self, part: Committed) -> None:
        """Count a part of an isolated batch into the whole."""
        self.outbox_rows += part.outbox_rows
        self.leased.extend(part.leased)
        self.refused.extend(part.refused)


class Refused(Exception):
    """The database refused a batch for a value it holds: retrying it whole would fail
    forever. `error` is the class name of the database's error."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


def units(batch: WriteSet) -> list[WriteSet]:
    """`batch` cut into the smallest parts the database can refuse one by one: one per
    alert, crisis ack and op, the same record objects; last, the quarantine and outbox
    rows together, which are never refused (they are where refused data goes).

    Alerts first: the halves are committed in order, and a crisis alert's publication
    (leased for a few seconds from its own commit) must not wait for a search among
    hundreds of ops."""
    out = [WriteSet(alerts=[record]) for record in batch.alerts]
    out.extend(WriteSet(crisis_acks=[ack]) for ack in batch.crisis_acks)
    out.extend(WriteSet(ops=[record]) for record in batch.ops)
    if batch.quarantine or batch.outbox:
        out.append(WriteSet(quarantine=batch.quarantine, outbox=batch.outbox))
    return out


def merge(parts: Sequence[WriteSet]) -> WriteSet:
    """One write set holding every part's records (the same objects)."""
    merged = WriteSet()
    for part in parts:
        merged.ops.extend(part.ops)
        merged.quarantine.extend(part.quarantine)
        merged.outbox.extend(part.outbox)
        merged.alerts.extend(part.alerts)
        merged.crisis_acks.extend(part.crisis_acks)
    return merged


def _record(unit: WriteSet) -> Record | None:
    """The one record of a unit; None for the quarantine and outbox rows."""
    for records in (unit.ops, unit.alerts, unit.crisis_acks):
        if records:
            return records[0]
    return None


DIRECT_LEASE_US = 5_000_000
"""How long the rows of the fast path stay leased to the instance that wrote them."""


class Writer:
    """Commits write sets; `healthy` is False while commits fail and are retried.

    Transactions run on a thread of their own, with an event loop and an engine
    of their own (same URL as `engine`): a commit's dozen awaited statements then
    never queue behind the intake on the gateway's event loop. Measured: a batch
    of 1000 took ~110 ms on the shared loop under load, for ~26 ms of work.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        detector: Detector | None = None,
        alert_policy: AlertPolicy | None = None,
    ) -> None:
        self.url = engine.url.render_as_string(hide_password=False)
        self.echo = engine.echo
        self.detector = detector
        self.alert_policy = alert_policy or AlertPolicy()
        self.engine: AsyncEngine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.healthy = True
        self.last_error: str | None = None
        self.commits = 0
        self.attempt_started: float | None = None
        """Monotonic start of the transaction attempt under way; None when idle."""

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self.engine = create_engine(self.url, echo=self.echo)
        self._started.set()
        loop.run_forever()
        loop.run_until_complete(self.engine.dispose())
        loop.close()

    def _ensure_thread(self) -> asyncio.AbstractEventLoop:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_loop, name="writer", daemon=True)
            self._thread.start()
            self._started.wait()
        assert self._loop is not None
        return self._loop

    async def close(self) -> None:
        """Dispose of the writer's engine and end its thread."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def commit(self, batch: WriteSet, *, refusable: bool = True) -> Committed:
        """Commit `batch` on the writer's thread; returns once it is durable, with
        what it wrote to the outbox (the publisher's cue).

        Transient failures are retried until the commit succeeds. A batch that the
        database refuses for a value it holds is isolated (`_split`): the records
        refused alone come back in `Committed.refused`, the rest is committed. With
        `refusable` False a refusal is retried like the rest, forever (for writes
        that have nowhere else to go, as the quarantine of what was refused).
        """
        loop = self._ensure_thread()
        return await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(self._commit(batch, refusable), loop)
        )

    async def _commit(self, batch: WriteSet, refusable: bool) -> Committed:
        """One batch, committed whole or, when refused, in parts: one commit to count."""
        try:
            written = await self._retrying(batch, refusable)
        except Refused as exc:
            log.warning(
                "batch refused by the database, isolating",
                error=exc.error,
                ops=len(batch.ops),
                alerts=len(batch.alerts),
                crisis_acks=len(batch.crisis_acks),
            )
        else:
            self.commits += 1
            return written
        written = Committed()
        conflicts: list[dict[str, Any]] = []
        tried = await self._split(units(batch), written, conflicts)
        batch.conflicts = conflicts
        log.warning("batch isolated", refused=len(written.refused), transactions=tried)
        self.commits += 1
        return written

    async def _split(
        self, parts: list[WriteSet], written: Committed, conflicts: list[dict[str, Any]]
    ) -> int:
        """`parts` were refused together: commit each half, split a refused half again.

        Each half is a commit of its own, transient failures retried there forever: a
        unit is refused only for a refusal it met alone. Exactly once: a unit in a
        committed half is never tried again. Returns the transactions it took.
        """
        middle = (len(parts) + 1) // 2
        halves = [parts] if len(parts) == 1 else [parts[:middle], parts[middle:]]
        tried = 0
        for half in halves:
            part = merge(half)
            record = _record(part) if len(half) == 1 else None
            rest = len(half) == 1 and record is None
            tried += 1
            try:
                written.add(await self._retrying(part, refusable=not rest))
                conflicts.extend(part.conflicts)
            except Refused:
                if record is None:
                    tried += await self._split(half, written, conflicts)
                else:
                    tried += await self._alone(part, record, written, conflicts)
        return tried

    async def _alone(
        self, unit: WriteSet, record: Record, written: Committed, conflicts: list[dict[str, Any]]
    ) -> int:
        """A unit refused alone, tried once more before it is refused: a refusal counts
        only when it repeats. Two writers storing the same op (a redelivery racing its
        original) can both miss it in their lookup; the second insert then violates the
        unique op_id, and the next attempt finds the op stored: a duplicate."""
        try:
            written.add(await self._retrying(unit, refusable=True))
        except Refused as again:
            _reset(unit.ops)
            alerts.reset(unit.alerts, unit.crisis_acks)
            written.refused.append(Refusal(record, again.error))
        else:
            conflicts.extend(unit.conflicts)
        return 1

    async def _retrying(self, batch: WriteSet, refusable: bool) -> Committed:
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda exc: _retryable(exc, refusable)),
            wait=wait_exponential_jitter(multiplier=0.05, max=5.0, jitter=0.1),
            before_sleep=lambda state: self._failed(state, len(batch.ops)),
            reraise=True,
        )
        written = Committed()
        try:
            async for attempt in retrying:
                with attempt:
                    written = await self._attempt(batch)
        except Exception as exc:
            error = refusal(exc) if refusable else None
            if error is None:
                raise
            raise Refused(error) from exc
        finally:
            self.attempt_started = None
        self.healthy = True
        self.last_error = None
        return written

    async def _attempt(self, batch: WriteSet) -> Committed:
        """One transaction, from a clean slate: what a failed attempt decided is forgotten."""
        self.attempt_started = time.monotonic()
        _reset(batch.ops)
        alerts.reset(batch.alerts, batch.crisis_acks)
        batch.conflicts = []
        try:
            written = await self._transaction(batch)
        except BaseException:
            if self.detector is not None:
                self.detector.failed()
            raise
        if self.detector is not None:
            self.detector.committed()
        return written

    async def _transaction(self, batch: WriteSet) -> Committed:
        now_us = time.time_ns() // 1000
        assert self.engine is not None
        async with self.engine.begin() as conn:
            prior = await sync_log.store_ops(conn, batch.ops, now_us)
            if self.detector is not None:
                batch.conflicts = await self.detector.run(conn, batch.ops, now_us, prior)
            caused = await alerts.store_alerts(conn, batch.alerts, now_us, self.alert_policy)
            await alerts.acknowledge(conn, batch.crisis_acks, now_us)
            await quarantine.store(conn, batch.quarantine)
            # What alerts cause is published by the caller right after the commit,
            # without waiting for the publisher's next claim.
            direct = [r for r in caused if r.channel == "mqtt"]
            leased = await outbox.add_leased(conn, direct, now_us, DIRECT_LEASE_US)
            await outbox.add(conn, [r for r in caused if r.channel != "mqtt"], now_us)
            await outbox.add(conn, batch.outbox, now_us)
        return Committed(len(batch.outbox) + len(caused), leased)

    def _failed(self, state: RetryCallState, ops: int) -> None:
        self.healthy = False
        exc = state.outcome.exception() if state.outcome else None
        self.last_error = type(exc).__name__ if exc else "unknown"
        log.warning(
            "commit failed, retrying",
            error=self.last_error,
            # The first line only: PostgreSQL's DETAIL may quote a failing row, and a
            # row of `alerts` holds a person's note.
            detail=str(getattr(exc, "orig", exc)).partition("\n")[0][:200],
            attempt=state.attempt_number,
            ops=ops,
        )


def _retryable(exc: BaseException, refusable: bool) -> bool:
    """Every database error is retried, except a refusal of the data when it may be refused."""
    refused = refusal(exc) is not None
    if refused:
        return not refusable
    return isinstance(exc, DBAPIError)


def _reset(records: Sequence[OpRecord]) -> None:
    for record in records:
        record.status = "pending"
        record.version = None
