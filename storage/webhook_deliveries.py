"""Webhook deliveries: one row per event and endpoint, from fan-out to delivered or dead.

The event itself is an outbox row (channel `webhook`), written in the transaction
of its cause; `fan_out` turns it into one delivery per endpoint that subscribes to
it, and marks the outbox row sent, in one transaction: a crash before leaves the
event to fan out again, a crash after leaves the deliveries. The engine's hot path
writes one row per event whatever the number of endpoints.

A delivery is a small row that names its event's outbox row (`outbox_id`): the body
is built from that row's type, time and payload when the delivery is claimed, not
copied per endpoint (a claim that sets a lease rewrote each copied body whole:
docs/benchmarks.md). The outbox's cleanup keeps a row that a delivery names.

A delivery is claimed with a lease (`claimed_until`) for one attempt, so that two
instances never send it at once and one that dies lets the lease lapse. Its outcome
is settled after: delivered (the row goes), retried later (`due_at`), or dead
(`dead_at`: the row stays as the spool of the dead-letter queue until Redis holds
its entry, and a `webhook.dead` notice goes to the outbox in the same transaction).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Any, Literal, NamedTuple, cast

import msgspec
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from handlers import webhooks
from handlers.records import OutboxRecord
from handlers.times import rfc3339
from storage import driver, outbox
from storage.db import marks
from storage.dlq import DlqEntry
from storage.schema import webhook_deliveries as deliveries

_encode = msgspec.json.Encoder().encode


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """A claimed delivery: what the sender needs for one attempt, and for its outcome."""

    id: int
    event_id: str
    endpoint: str
    event_type: str
    body: bytes
    created_at: int
    attempts: int
    """Attempts made before this one."""
    first_attempt_at: int | None


class Target(NamedTuple):
    """An endpoint an event goes to, and the wait before its first attempt."""

    name: str
    url: str
    first_wait_us: int


class Settled(msgspec.Struct, frozen=True, kw_only=True):
    """An attempt's outcome, to write: `retry` needs `due_at`, the others not."""

    delivery: Delivery
    outcome: Literal["delivered", "retry", "dead"]
    attempted_at: int
    status: int | None = None
    error: str | None = None
    due_at: int = 0
    url: str = ""
    attempt: bool = True
    """False for a delivery given up without an attempt (its endpoint was removed)."""


def new_id(prefix: str) -> str:
    """`msg_<32 hex>`: unique without coordination between instances."""
    return f"{prefix}_{uuid.uuid4().hex}"


async def fan_out(
    engine: AsyncEngine,
    subscribers: Mapping[str, Sequence[Target]],
    limit: int,
    now_us: int,
    *,
    only: Collection[str] = (),
) -> tuple[int, dict[str, set[str]]]:
    """Turn up to `limit` unsent webhook events of the outbox (with `only`, of those
    types alone) into deliveries, one per subscribed endpoint (`subscribers`: event
    type -> targets), and mark the events sent. Returns the events taken and, per
    endpoint, the event types of its new deliveries.

    An event no endpoint subscribes to any more (a reload removed it) is marked sent
    with no delivery. The rows are locked (PostgreSQL: SKIP LOCKED), so instances fan
    out different events.
    """
    added: dict[str, set[str]] = {}
    async with engine.begin() as conn:
        lock = " FOR UPDATE SKIP LOCKED" if conn.dialect.name == "postgresql" else ""
        types = sorted(only)
        where = f" AND event_type IN ({marks(types)})" if types else ""
        sql = driver.portable(conn, _DUE.format(lock=lock, only=where))
        found = await conn.exec_driver_sql(sql, (*types, limit))
        events = cast(list[tuple[Any, ...]], found.all())
        if not events:
            return 0, added
        rows: list[tuple[Any, ...]] = []
        shown: dict[str, str] = {}
        for outbox_id, event_type in events:
            targets = subscribers.get(event_type or "", ())
            if not targets:
                continue
            event_id = new_id("msg")
            for name, url, first_wait_us in targets:
                if url not in shown:
                    shown[url] = webhooks.public_url(url)
                rows.append((outbox_id, event_id, name, now_us + first_wait_us, 0, shown[url]))
                added.setdefault(name, set()).add(event_type)
        if rows:
            # Past SQLAlchemy's compiler: its work per row was a delivery's largest cost
            # on the sender's side after aiohttp's (storage.driver.portable).
            await conn.exec_driver_sql(driver.portable(conn, _INSERT), rows)
        ids = tuple(row_id for row_id, _ in events)
        sql = f"UPDATE outbox SET sent_at = ? WHERE id IN ({marks(ids)})"  # noqa: S608 - placeholders only
        await conn.exec_driver_sql(driver.portable(conn, sql), (now_us, *ids))
    return len(events), added


_DUE = (
    "SELECT id, event_type FROM outbox WHERE channel = 'webhook' AND sent_at IS NULL{only}"
    " ORDER BY id LIMIT ?{lock}"
)


_INSERT = (
    "INSERT INTO webhook_deliveries"
    " (outbox_id, event_id, endpoint, due_at, attempts, url)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)

_CLAIMED = (
    deliveries.c.id,
    deliveries.c.outbox_id,
    deliveries.c.event_id,
    deliveries.c.endpoint,
    deliveries.c.attempts,
    deliveries.c.first_attempt_at,
)

_CLAIM = (
    "UPDATE webhook_deliveries SET claimed_until = ? WHERE id IN ("  # noqa: S608 - constant column names
    "SELECT id FROM webhook_deliveries"
    " WHERE endpoint = ? AND dead_at IS NULL AND due_at <= ?"
    " AND (claimed_until IS NULL OR claimed_until < ?){only}"
    " ORDER BY due_at, id LIMIT ?{lock})"
    # due_at first, to sort by; then `_CLAIMED`'s columns, in the order `_delivery` reads
    f" RETURNING due_at, {', '.join(column.name for column in _CLAIMED)}"
)


_ONLY = (
    " AND EXISTS (SELECT 1 FROM outbox WHERE outbox.id = webhook_deliveries.outbox_id"
    " AND outbox.event_type IN ({marks}))"
)


async def claim(
    engine: AsyncEngine,
    endpoint: str,
    limit: int,
    now_us: int,
    lease_us: int,
    *,
    only: Collection[str] = (),
    autocommit: AsyncEngine | None = None,
) -> list[Delivery]:
    """Lease up to `limit` of the endpoint's due deliveries, the longest due first;
    with `only`, of those event types alone (each candidate's event looked up by its
    key).

    One statement, committed by itself (autocommit): SQLite's one write lock is held
    for one driver call, not across the event loop's turns between the statements
    of a transaction, while the engine process waits for it to commit a batch
    (docs/benchmarks.md, "Webhook delivery"). PostgreSQL: the rows are locked with
    SKIP LOCKED, so instances claim different ones. Their events are read after, on
    the same connection: the outbox's cleanup keeps them while the deliveries wait.
    Both statements go past SQLAlchemy's compiler, and rows come back as tuples:
    its work per row was a tenth of the sender's CPU. `autocommit`: `engine`'s
    `storage.db.autocommit_twin`, when the caller keeps one.
    """
    lock = " FOR UPDATE SKIP LOCKED" if engine.dialect.name == "postgresql" else ""
    types = sorted(only)
    params = (now_us + lease_us, endpoint, now_us, now_us, *types, limit)
    where = _ONLY.format(marks=marks(types)) if types else ""
    async with _autocommit(engine, autocommit) as auto:
        sql = driver.portable(auto, _CLAIM.format(lock=lock, only=where))
        result = await auto.exec_driver_sql(sql, params)
        rows = sorted(tuple(row) for row in result.all())
        events = await _events(auto, {row[2] for row in rows})
    return [_delivery(row[1:], events[row[2]]) for row in rows]


@contextlib.asynccontextmanager
async def _autocommit(
    engine: AsyncEngine, autocommit: AsyncEngine | None
) -> AsyncIterator[AsyncConnection]:
    """A connection on which each statement commits by itself: `autocommit`'s, else
    one of `engine`'s switched to it for the while."""
    if autocommit is not None:
        async with autocommit.connect() as conn:
            yield conn
        return
    async with engine.connect() as conn:
        yield await conn.execution_options(isolation_level="AUTOCOMMIT")


class _Event(NamedTuple):
    event_type: str
    body: bytes
    created_at: int


async def _events(conn: AsyncConnection, ids: set[int]) -> dict[int, _Event]:
    """The events these outbox rows hold, each with the body its deliveries POST."""
    if not ids:
        return {}
    sql = f"SELECT id, event_type, payload, created_at FROM outbox WHERE id IN ({marks(ids)})"  # noqa: S608 - placeholders only
    result = await conn.exec_driver_sql(driver.portable(conn, sql), tuple(ids))
    rows = cast(list[tuple[Any, ...]], result.all())
    return {
        row_id: _Event(event_type, webhooks.body(event_type, created_at, payload), created_at)
        for row_id, event_type, payload, created_at in rows
    }


def _delivery(claimed: Sequence[Any], event: _Event) -> Delivery:
    """A delivery from its row's `_CLAIMED` columns (in that order) and its event."""
    row_id, _, event_id, endpoint, attempts, first_attempt_at = claimed[:6]
    return Delivery(
        id=row_id,
        event_id=event_id,
        endpoint=endpoint,
        event_type=event.event_type,
        body=event.body,
        created_at=event.created_at,
        attempts=attempts,
        first_attempt_at=first_attempt_at,
    )


async def release(
    engine: AsyncEngine,
    leases: Mapping[int, Sequence[int]],
    *,
    autocommit: AsyncEngine | None = None,
) -> None:
    """Give claimed deliveries back unattempted (a paused, disabled or stopping
    endpoint's queue), so that they need not wait for their leases to lapse.
    `leases`: the lease each was claimed with -> their ids; a delivery whose lease
    lapsed and that another instance claimed since keeps that instance's lease."""
    if leases:
        async with _autocommit(engine, autocommit) as auto:
            for until, ids in leases.items():
                await auto.execute(
                    update(deliveries)
                    .where(deliveries.c.id.in_(ids), deliveries.c.claimed_until == until)
                    .values(claimed_until=None)
                )


async def settle(
    engine: AsyncEngine,
    settled: Sequence[Settled],
    dead_topic: str,
    *,
    autocommit: AsyncEngine | None = None,
) -> None:
    """Write attempts' outcomes: the delivered ones' rows go in one statement; the
    retries and the dead (with their `webhook.dead` notices, to `dead_topic`) in one
    transaction."""
    if not settled:
        return
    delivered = [s.delivery.id for s in settled if s.outcome == "delivered"]
    if delivered:
        # The common outcome, one statement: committed by itself (see `claim`), past
        # SQLAlchemy's compiler (an IN of a new length each time is compiled anew).
        async with _autocommit(engine, autocommit) as auto:
            sql = f"DELETE FROM webhook_deliveries WHERE id IN ({marks(delivered)})"  # noqa: S608 - placeholders only
            await auto.exec_driver_sql(driver.portable(auto, sql), tuple(delivered))
    failed = [s for s in settled if s.outcome != "delivered"]
    if not failed:
        return
    async with engine.begin() as conn:
        for s in failed:
            if s.outcome == "retry":
                await conn.execute(
                    update(deliveries)
                    .where(deliveries.c.id == s.delivery.id, deliveries.c.dead_at.is_(None))
                    .values(**_attempted(s), due_at=s.due_at)
                )
        await bury(conn, [s for s in failed if s.outcome == "dead"], dead_topic)


def _attempted(s: Settled) -> dict[str, Any]:
    first = s.delivery.first_attempt_at
    return {
        "attempts": s.delivery.attempts + int(s.attempt),
        "claimed_until": None,
        "first_attempt_at": first or (s.attempted_at if s.attempt else None),
        "last_status": s.status,
        "last_error": s.error[:300] if s.error else None,
    }


async def bury(conn: AsyncConnection, dead: Sequence[Settled], dead_topic: str) -> None:
    """Mark deliveries dead, each with its dead-letter entry's id, and write their
    `webhook.dead` notices: the entry as it will be in Redis."""
    notices: list[OutboxRecord] = []
    for s in dead:
        values = {**_attempted(s), "dead_at": s.attempted_at, "dlq_id": new_id("dlq"), "url": s.url}
        await conn.execute(
            update(deliveries).where(deliveries.c.id == s.delivery.id).values(**values)
        )
        entry = entry_of({**msgspec.structs.asdict(s.delivery), **values})
        body = _encode({"event": "webhook.dead", "entry": entry})
        notices.append(OutboxRecord(channel="mqtt", topic=dead_topic, payload=body))
    await outbox.add(conn, notices, dead[0].attempted_at if dead else 0)


def entry_of(row: Mapping[Any, Any]) -> DlqEntry:
    """The dead-letter entry of a dead delivery row (PROTOCOL.md's layout)."""
    return DlqEntry(
        id=row["dlq_id"],
        webhook=row["endpoint"],
        url=row["url"] or "",
        event_type=row["event_type"],
        payload=msgspec.Raw(row["body"]),
        attempts=row["attempts"],
        first_attempt_at=rfc3339(row["first_attempt_at"] or row["dead_at"]),
        failed_at=rfc3339(row["dead_at"]),
        last_status=row["last_status"],
        last_error=row["last_error"],
        webhook_id=row["event_id"],
    )


async def spooled(engine: AsyncEngine, limit: int) -> list[DlqEntry]:
    """Dead deliveries not yet in Redis, oldest first."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(deliveries)
                .where(deliveries.c.dead_at.is_not(None))
                .order_by(deliveries.c.dead_at, deliveries.c.id)
                .limit(limit)
            )
        ).all()
        events = await _events(conn, {row.outbox_id for row in rows})
    return [entry_of({**row._mapping, **events[row.outbox_id]._asdict()}) for row in rows]


async def unspool(engine: AsyncEngine, dlq_ids: Sequence[str]) -> None:
    """Forget dead deliveries that Redis now holds."""
    if dlq_ids:
        async with engine.begin() as conn:
            await conn.execute(delete(deliveries).where(deliveries.c.dlq_id.in_(dlq_ids)))


async def abandon(
    engine: AsyncEngine, configured: Sequence[str], now_us: int, dead_topic: str
) -> int:
    """Dead-letter the waiting deliveries of endpoints no longer configured (a reload
    or restart removed them): they would wait forever, and their entries keep them
    replayable. An attempt under way is left to finish (its outcome may be
    `delivered`); a later call takes it if it is to be retried. Returns how many."""
    async with engine.begin() as conn:
        rows = (
            await conn.execute(
                select(*_CLAIMED, deliveries.c.url, deliveries.c.last_status).where(
                    deliveries.c.dead_at.is_(None),
                    deliveries.c.endpoint.not_in(configured),
                    # one in flight is left to its outcome: it is given up after that
                    or_(deliveries.c.claimed_until.is_(None), deliveries.c.claimed_until < now_us),
                )
            )
        ).all()
        events = await _events(conn, {row.outbox_id for row in rows})
        dead = [
            Settled(
                delivery=_delivery(row, events[row.outbox_id]),
                outcome="dead",
                attempted_at=now_us,
                status=row.last_status,
                error="the endpoint is no longer configured",
                url=row.url or "",
                attempt=False,
            )
            for row in rows
        ]
        if dead:
            await bury(conn, dead, dead_topic)
        return len(dead)


class Counts(msgspec.Struct, frozen=True):
    """An endpoint's deliveries waiting in the database."""

    pending: int
    """Not dead: due now, later, or being attempted."""
    retrying: int
    """Of those, attempted before and failed."""


async def counts(conn: AsyncConnection) -> dict[str, Counts]:
    """Waiting deliveries per endpoint (one grouped query)."""
    rows = await conn.execute(
        select(
            deliveries.c.endpoint,
            func.count(),
            func.count().filter(deliveries.c.attempts > 0),
        )
        .where(deliveries.c.dead_at.is_(None))
        .group_by(deliveries.c.endpoint)
    )
    return {name: Counts(int(p), int(r)) for name, p, r in rows}


async def spool_size(conn: AsyncConnection) -> int:
    result = await conn.execute(
        select(func.count()).select_from(deliveries).where(deliveries.c.dead_at.is_not(None))
    )
    return int(result.scalar_one())
