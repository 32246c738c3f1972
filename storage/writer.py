"""The writer: many messages, one transaction, retried until it commits.

Group commit is what makes durable acks affordable: one fsync (SQLite) or one
round of WAL flush (PostgreSQL) per batch instead of per message. A batch that
fails is rolled back whole and tried again with backoff; nothing is acked until
the retry commits, so a database outage delays acks and never loses an operation.

What a batch writes is decided by its records: each record type has a `Step`
(storage/sync.py, storage/alerts.py, ...) that writes its share inside the
transaction, in the order the steps were given. A new kind of message adds a
step; the writer does not change.

A batch that the database refuses for what it holds (storage/refusals.py) is not
retried whole: it would fail forever and stall ingest. Its units (one per
record) are committed in halves, recursively, until what fails alone is found;
that is handed back refused, the rest is committed
(docs/decisions/0006-poison-batch-bisection.md).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter

from handlers.records import OutboxRecord, QuarantineRecord
from handlers.times import now_us
from storage import outbox, quarantine
from storage.db import create_engine
from storage.refusals import refusal

log = structlog.get_logger("fieldgate.writer")

CANARY = "fieldgate-canary"
"""The ids of canary records (`Step.canary`): rolled back, never stored."""


class Written(msgspec.Struct):
    """What one step wrote besides its records: outbox rows (published after the
    commit, urgent ones by the committing process at once) and events for the
    caller's metrics and logs (never written anywhere by the writer)."""

    outbox: list[OutboxRecord] = msgspec.field(default_factory=list)
    events: list[Any] = msgspec.field(default_factory=list)


class Step(abc.ABC):
    """One record type's share of the writer's transaction.

    `write` runs inside the transaction and may fill in the records (status,
    version, what only the database knows); if the attempt fails, `reset` makes
    them as they were, and the next attempt writes them again from scratch.
    """

    record_type: type[Any]
    name: str
    """What its records are called in logs: `ops`, `alerts`..."""
    urgent: bool = False
    """Its records are isolated first when a batch is refused (see `units`); the
    transaction itself runs the steps in the writer's order, the lock order."""

    @abc.abstractmethod
    async def write(self, conn: AsyncConnection, records: list[Any], now_us: int) -> Written:
        """Write `records` (arrival order) in the open transaction."""

    # Optional hooks: a step that keeps no state needs none of them.

    def reset(self, records: Sequence[Any]) -> None:  # noqa: B027
        """Forget what a failed attempt decided about `records`."""

    def committed(self) -> None:  # noqa: B027
        """The transaction that `write` ran in committed."""

    def failed(self) -> None:  # noqa: B027
        """The transaction that `write` ran in failed: what it read may never have been."""

    def canary(self) -> Any | None:
        """A record of this step's type made only of plain values, which any healthy
        database takes: written in a transaction that is rolled back, it tells a
        refusal of the data from a database that refuses everything (see
        `Writer._withdraw`). None: this step's refusals are taken as they come."""
        return None


class WriteSet(msgspec.Struct):
    """Everything one batch writes, gathered from many messages."""

    records: list[Any] = msgspec.field(default_factory=list)
    """Records of any type a step of the writer stores, in arrival order."""
    quarantine: list[QuarantineRecord] = msgspec.field(default_factory=list)


class Refusal(msgspec.Struct, frozen=True):
    """A record the database refused alone, and the class name of its error (never the
    message: that may quote the row, an alert's note)."""

    record: Any
    error: str


class Committed(msgspec.Struct):
    """What a commit wrote to the outbox: how many rows, and those leased to the caller
    for publication at once (see `outbox.add_leased`); what its steps reported; and
    what it had to leave out."""

    outbox_rows: int = 0
    leased: list[dict[str, Any]] = msgspec.field(default_factory=list)
    events: dict[str, list[Any]] = msgspec.field(default_factory=dict)
    """Each step's events, by the step's name."""
    refused: list[Refusal] = msgspec.field(default_factory=list)
    """Records the database refused alone, each rolled back; the rest is committed."""

    def add(self, part: Committed) -> None:
        """Count a part of an isolated batch into the whole."""
        self.outbox_rows += part.outbox_rows
        self.leased.extend(part.leased)
        for name, events in part.events.items():
            self.events.setdefault(name, []).extend(events)
        self.refused.extend(part.refused)


class Refused(Exception):
    """The database refused a batch for a value it holds: retrying it whole would fail
    forever. `error` is the class name of the database's error."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


def units(batch: WriteSet, steps: Sequence[Step]) -> list[WriteSet]:
    """`batch` cut into the smallest parts the database can refuse one by one: one per
    record (the same objects); last, the quarantine rows, which are never refused
    (they are where refused data goes).

    The records of urgent steps (alerts, crisis acks) come first: the halves are
    committed in order, and a crisis alert's publication (leased for a few seconds
    from its own commit) must not wait for a search among hundreds of ops."""
    rank = {step.record_type: (not step.urgent, index) for index, step in enumerate(steps)}
    ordered = sorted(batch.records, key=lambda record: rank[type(record)])
    out = [WriteSet([record]) for record in ordered]
    if batch.quarantine:
        out.append(WriteSet(quarantine=batch.quarantine))
    return out


def merge(parts: Sequence[WriteSet]) -> WriteSet:
    """One write set holding every part's records (the same objects)."""
    merged = WriteSet()
    for part in parts:
        merged.records.extend(part.records)
        merged.quarantine.extend(part.quarantine)
    return merged


FIRST_WAIT_S = 0.05
"""The pause after a failed commit before the next attempt; it doubles from there."""

DIRECT_LEASE_US = 5_000_000
"""How long the rows of the fast path stay leased to the instance that wrote them."""


class Writer:
    """Commits write sets; `healthy` is False while commits fail and are retried.

    Transactions run on a thread of their own, with an event loop and an engine
    of their own (same URL as `engine`): a commit's dozen awaited statements then
    never queue behind the intake on the gateway's event loop. Measured: a batch
    of 1000 took ~110 ms on the shared loop under load, for ~26 ms of work.
    """

    def __init__(self, engine: AsyncEngine, steps: Sequence[Step] = ()) -> None:
        self.url = engine.url.render_as_string(hide_password=False)
        self.echo = engine.echo
        self.steps = list(steps)
        self._by_type = {step.record_type: step for step in self.steps}
        self.engine: AsyncEngine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.healthy = True
        self.last_error: str | None = None
        self.commits = 0
        self.attempt_started: float | None = None
        """Monotonic start of the transaction attempt under way; None when idle."""
        self._conn: AsyncConnection | None = None
        """The connection every transaction runs on, kept from one to the next."""

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self.engine = create_engine(self.url, echo=self.echo, inline=True)
        self._started.set()
        loop.run_forever()
        loop.run_until_complete(self._let_go())
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
            counts = {step.name: 0 for step in self.steps}
            for step, records in self._grouped(batch.records):
                counts[step.name] = len(records)
            log.warning("batch refused by the database, isolating", error=exc.error, **counts)
        else:
            self.commits += 1
            return written
        written = Committed()
        tried = await self._split(units(batch, self.steps), written)
        log.warning("batch isolated", refused=len(written.refused), transactions=tried)
        if written.refused:
            await self._withdraw(written)
        self.commits += 1
        return written

    async def _withdraw(self, written: Committed) -> None:
        """Refusals that are the database's, not the data's, are withdrawn: if a canary
        of the same kind (plain values) is refused too, with the same error, the
        database refuses every record alike (a trigger or a constraint a bad migration
        added, a table it broke). Its records are then retried until they commit, as
        in an outage: unhealthy, loud, nothing rejected that a healthy database
        would take (docs/decisions/0013-refusal-or-outage.md)."""
        errors: dict[type[Any], set[str]] = {}
        for refused in written.refused:
            errors.setdefault(type(refused.record), set()).add(refused.error)
        outage: set[type[Any]] = set()
        for record_type, seen in errors.items():
            canary = self._by_type[record_type].canary()
            if canary is not None and await self._dry_run(canary) in seen:
                outage.add(record_type)
        if not outage:
            return
        held = [r.record for r in written.refused if type(r.record) in outage]
        written.refused = [r for r in written.refused if type(r.record) not in outage]
        log.error(
            "the database refuses every record alike: an outage, not bad data; retrying",
            error=sorted({e for t in outage for e in errors[t]}),
            records=len(held),
        )
        written.add(await self._retrying(WriteSet(held), refusable=False))

    async def _dry_run(self, record: Any) -> str | None:
        """Write `record` in a transaction that is always rolled back; the refusal's
        class name if the database refused it, None if it took it (or failed
        otherwise: that is not a refusal)."""
        step = self._by_type[type(record)]
        assert self.engine is not None
        try:
            async with self.engine.connect() as conn, conn.begin() as transaction:
                try:
                    await step.write(conn, [record], now_us())
                finally:
                    await transaction.rollback()
        except Exception as exc:  # noqa: BLE001 - only a refusal is an answer
            return refusal(exc)
        finally:
            step.reset([record])
            step.failed()
        return None

    async def _split(self, parts: list[WriteSet], written: Committed) -> int:
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
            alone = len(half) == 1
            tried += 1
            try:
                written.add(await self._retrying(part, refusable=not (alone and not part.records)))
            except Refused:
                if alone and part.records:
                    tried += await self._alone(part, written)
                else:
                    tried += await self._split(half, written)
        return tried

    async def _alone(self, unit: WriteSet, written: Committed) -> int:
        """A unit refused alone, tried once more before it is refused: a refusal counts
        only when it repeats. Two writers storing the same op (a redelivery racing its
        original) can both miss it in their lookup; the second insert then violates the
        unique op_id, and the next attempt finds the op stored: a duplicate."""
        try:
            written.add(await self._retrying(unit, refusable=True))
        except Refused as again:
            self._reset(unit.records)
            written.refused.append(Refusal(unit.records[0], again.error))
        return 1

    async def _retrying(self, batch: WriteSet, refusable: bool) -> Committed:
        """The batch committed, retried with backoff while the database fails. The
        first attempt runs without tenacity: its machinery, made for every commit,
        cost a tenth of a small batch's (measured); only a failure needs it."""
        try:
            try:
                written = await self._attempt(batch)
            except Exception as exc:
                if not _retryable(exc, refusable):
                    raise
                self._failed(exc, 1, len(batch.records))
                written = await self._again(batch, refusable)
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

    async def _again(self, batch: WriteSet, refusable: bool) -> Committed:
        """After a failed first attempt: until the commit succeeds (or is refused)."""
        await asyncio.sleep(FIRST_WAIT_S)
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda exc: _retryable(exc, refusable)),
            wait=wait_exponential_jitter(multiplier=FIRST_WAIT_S, max=5.0, jitter=0.1),
            before_sleep=lambda state: self._failed(
                state.outcome.exception() if state.outcome else None,
                state.attempt_number + 1,
                len(batch.records),
            ),
            reraise=True,
        )
        written = Committed()
        async for attempt in retrying:
            with attempt:
                written = await self._attempt(batch)
        return written

    def _reset(self, records: Sequence[Any]) -> None:
        for step, group in self._grouped(records):
            step.reset(group)

    def _grouped(self, records: Sequence[Any]) -> list[tuple[Step, list[Any]]]:
        """The records of each step, in step order, each group in arrival order."""
        groups: dict[type[Any], list[Any]] = {}
        for record in records:
            if type(record) not in self._by_type:
                raise TypeError(f"the writer has no step for {type(record).__name__}")
            groups.setdefault(type(record), []).append(record)
        return [
            (step, groups[step.record_type]) for step in self.steps if step.record_type in groups
        ]

    async def _attempt(self, batch: WriteSet) -> Committed:
        """One transaction, from a clean slate: what a failed attempt decided is forgotten."""
        self.attempt_started = time.monotonic()
        grouped = self._grouped(batch.records)
        for step, records in grouped:
            step.reset(records)
        try:
            written = await self._transaction(batch, grouped)
        except BaseException:
            for step in self.steps:
                step.failed()
            raise
        for step in self.steps:
            step.committed()
        return written

    async def _transaction(
        self, batch: WriteSet, grouped: list[tuple[Step, list[Any]]]
    ) -> Committed:
        now = now_us()
        rows: list[OutboxRecord] = []
        events: dict[str, list[Any]] = {}
        conn = await self._connection()
        try:
            async with conn.begin():
                for step, records in grouped:
                    written = await step.write(conn, records, now)
                    rows.extend(written.outbox)
                    if written.events:
                        events[step.name] = written.events
                await quarantine.store(conn, batch.quarantine)
                # Urgent rows are published by the caller right after the commit,
                # without waiting for the publisher's next claim.
                urgent = [row for row in rows if row.urgent]
                leased = await outbox.add_leased(conn, urgent, now, DIRECT_LEASE_US)
                await outbox.add(conn, [row for row in rows if not row.urgent], now)
        except BaseException:
            await self._let_go()
            raise
        return Committed(len(rows), leased, events)

    async def _connection(self) -> AsyncConnection:
        """The writer's connection, kept between transactions: taking one from the pool
        and handing it back (the pool's reset, a task to close) for every batch is
        work a small batch's commit need not do (docs/decisions/0019-small-batches.md)."""
        if self._conn is None:
            assert self.engine is not None
            self._conn = await self.engine.connect()
        return self._conn

    async def _let_go(self) -> None:
        """Hand the connection back: after a failed transaction (it may be the
        connection that failed, and the next attempt takes a fresh one) and at the end."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    def _failed(self, exc: BaseException | None, attempt: int, records: int) -> None:
        self.healthy = False
        self.last_error = type(exc).__name__ if exc else "unknown"
        log.warning(
            "commit failed, retrying",
            error=self.last_error,
            # The first line only: PostgreSQL's DETAIL may quote a failing row, and a
            # row of `alerts` holds a person's note.
            detail=str(getattr(exc, "orig", exc)).partition("\n")[0][:200],
            attempt=attempt,
            records=records,
        )


def _retryable(exc: BaseException, refusable: bool) -> bool:
    """Every database error is retried, except a refusal of the data when it may be refused."""
    refused = refusal(exc) is not None
    if refused:
        return not refusable
    return isinstance(exc, DBAPIError)
