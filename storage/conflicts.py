"""Incremental conflict detection, inside the transaction that stores the operations.

Called by the writer right after `sync_log.store_ops`, whose version upsert has
locked every touched entity row (PostgreSQL: until commit). A concurrent writer
of the same entity, on this instance or another, therefore waits for our commit
and then, under READ COMMITTED, sees our rows in its own candidate query: every
pair is compared exactly once, by the transaction that stores the later of the
two (higher version), whatever the timing.

Per batch, one candidate query per 150 entities (not per operation): the
entity's rows whose `edited_at` lies within the window of the batch's
operations, and, only if some operation carries `base_version`, a second one
for the entity's rows above it. Both are ranges on an index, so the cost does not grow with the log.
The window cache (`storage.window`) answers instead of the database when it
provably holds every candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from handlers.conflicts import OpView, Rules, Verdict, conflict_id, judge, notices, record_json
from handlers.records import OpRecord, OutboxRecord
from handlers.times import rfc3339
from storage.db import chunks
from storage.schema import conflicts, device_counters, sync_log, user_counters
from storage.sync_log import Prior
from storage.window import NEVER, Bounds, WindowCache

ENTITIES_PER_QUERY = 150
"""Entities per candidate statement (4 parameters each; SQLite allows 32,766)."""

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(dict[str, Any]).decode

_CANDIDATE_COLUMNS = (
    sync_log.c.op_id,
    sync_log.c.device_id,
    sync_log.c.user_id,
    sync_log.c.entity_type,
    sync_log.c.entity_id,
    sync_log.c.operation,
    sync_log.c.changes,
    sync_log.c.edited_at,
    sync_log.c.version,
    sync_log.c.base_version,
)

EntityKey = tuple[str, str]


def view(record: OpRecord) -> OpView:
    assert record.version is not None
    return OpView(
        op_id=record.op_id,
        device_id=record.device_id,
        user_id=record.user_id,
        entity_type=record.entity_type,
        entity_id=record.entity_id,
        operation=record.operation,
        changes=record.changes,
        edited_at_us=record.edited_at_us,
        version=record.version,
        base_version=record.base_version,
    )


def row_view(row: Sequence[Any]) -> OpView:
    op_id, device_id, user_id, entity_type, entity_id, operation, changes, edited, ver, base = row
    return OpView(
        op_id=op_id,
        device_id=device_id,
        user_id=user_id,
        entity_type=entity_type,
        entity_id=entity_id,
        operation=operation,
        changes=_decode(changes),
        edited_at_us=edited,
        version=ver,
        base_version=base,
    )


class Detector:
    """Finds, records and announces the conflicts of one committed batch.

    `use_cache` may only be true when this process is the database's one writer
    (SQLite, no shared subscription): the cache cannot see other writers' rows.
    """

    def __init__(
        self,
        rules: Rules,
        topic_root: str,
        *,
        enabled: bool = True,
        cache: WindowCache | None = None,
    ) -> None:
        self.rules = rules
        self.root = topic_root
        self.enabled = enabled
        self.cache = cache
        self.queries = 0
        self.skipped = 0
        """Entities not looked up: nothing stored before could be concurrent."""

    async def run(
        self,
        conn: AsyncConnection,
        records: Sequence[OpRecord],
        now_us: int,
        prior: Prior | None = None,
    ) -> tuple[list[dict[str, Any]], list[OutboxRecord]]:
        """Detect and store the batch's conflicts; return their records (for metrics)
        and their notices, for the writer to put in the outbox.

        `prior` (from `store_ops`) says what each entity held before the batch;
        without it every entity is looked up.
        """
        stored = [record for record in records if record.status == "stored"]
        if not stored:
            return [], []
        found: list[dict[str, Any]] = []
        if not self.enabled and self.cache is not None and len(self.cache):
            # Ops stored without detection never reach the cache: forget it all,
            # so that detection turned back on asks the database again.
            self.cache.discard()
        if self.enabled:
            per_entity: dict[EntityKey, list[OpView]] = {}
            for record in stored:
                key = (record.entity_type, record.entity_id)
                per_entity.setdefault(key, []).append(view(record))
            candidates = await self._candidates(conn, per_entity, prior or {})
            verdicts: list[Verdict] = []
            for key, fresh in per_entity.items():
                verdicts.extend(self._compare(fresh, candidates.get(key, [])))
            if verdicts:
                found = await self._record(conn, verdicts, now_us)
        # Counters last, users then devices, keys sorted, one statement each: the
        # same lock order in every transaction, so two instances cannot deadlock.
        await bump_counters(conn, stored, found, now_us)
        rows = [row for record in found for row in notices(self.root, "conflict.detected", record)]
        return found, rows

    def _compare(self, fresh: list[OpView], candidates: list[OpView]) -> list[Verdict]:
        """Each new op against every candidate stored before it (lower version)."""
        by_id = {op.op_id: op for op in candidates}
        by_id.update({op.op_id: op for op in fresh})
        ordered = sorted(by_id.values(), key=lambda op: op.version)
        out: list[Verdict] = []
        for new in fresh:
            for old in ordered:
                if old.version >= new.version:
                    break
                verdict = judge(old, new, self.rules)
                if verdict is not None:
                    out.append(verdict)
        return out

    async def _candidates(
        self,
        conn: AsyncConnection,
        per_entity: dict[EntityKey, list[OpView]],
        prior: Prior,
    ) -> dict[EntityKey, list[OpView]]:
        window = self.rules.window_us
        bounds: dict[EntityKey, Bounds] = {}
        for key, fresh in per_entity.items():
            plain = [op.edited_at_us for op in fresh if op.base_version is None]
            based = [op.base_version for op in fresh if op.base_version is not None]
            wanted = Bounds(
                lo=min(plain) - window if plain else None,
                hi=max(plain) + window if plain else None,
                above_version=min(based) if based else None,
                first_new_version=min(op.version for op in fresh),
            )
            if not _may_have_candidates(wanted, prior.get(key)):
                self.skipped += 1
                continue
            bounds[key] = wanted
        found: dict[EntityKey, list[OpView]] = {}
        missing = list(bounds)
        cache = self.cache
        if cache is not None:
            missing = []
            for key, wanted in bounds.items():
                answer = cache.lookup(key, wanted)
                if answer is None:
                    missing.append(key)
                    bounds[key] = cache.fill_bounds(wanted)
                else:
                    found[key] = answer
        windows = [(key, bounds[key]) for key in sorted(missing) if bounds[key].lo is not None]
        versioned = [
            (key, bounds[key]) for key in sorted(missing) if bounds[key].above_version is not None
        ]
        for op in await self._fetch(conn, windows, by_version=False):
            found.setdefault((op.entity_type, op.entity_id), []).append(op)
        for op in await self._fetch(conn, versioned, by_version=True):
            found.setdefault((op.entity_type, op.entity_id), []).append(op)
        if cache is not None:
            for key in missing:
                cache.stage_fill(key, bounds[key], found.get(key, []))
            for key, fresh in per_entity.items():
                cache.stage_add(key, fresh)
        return found

    async def _fetch(
        self, conn: AsyncConnection, wanted: list[tuple[EntityKey, Bounds]], *, by_version: bool
    ) -> list[OpView]:
        """The stored ops of each entity in its edited_at range (or above its version).

        Plain SQL joined to a VALUES list: one statement per chunk of entities, an
        index range per entity, and nothing for SQLAlchemy to build per row (which
        cost more than the query itself, measured).
        """
        out: list[OpView] = []
        postgres = conn.dialect.name == "postgresql"
        for part in chunks(wanted, ENTITIES_PER_QUERY):
            self.queries += 1
            params: list[Any] = []
            for (entity_type, entity_id), b in part:
                if by_version:
                    params += (entity_type, entity_id, b.above_version)
                else:
                    assert b.lo is not None
                    params += (entity_type, entity_id, b.lo, NEVER if b.hi is None else b.hi)
            sql = _candidate_sql(len(part), postgres=postgres, by_version=by_version)
            result = await conn.exec_driver_sql(sql, tuple(params))
            out.extend(row_view(row) for row in result)
        return out

    async def warm(self, engine: AsyncEngine, now_us: int) -> int:
        """Fill the cache for the most recently written entities; return how many.

        Each gets every operation edited since `now - keep` (and later), so
        operations arriving in real time are answered from memory at once.
        """
        cache = self.cache
        if cache is None or cache.max_ops == 0:
            return 0
        recent = (
            select(sync_log.c.entity_type, sync_log.c.entity_id)
            .order_by(sync_log.c.id.desc())
            .limit(cache.max_ops)
            .subquery()
        )
        async with engine.connect() as conn:
            result = await conn.execute(select(recent.c.entity_type, recent.c.entity_id).distinct())
            keys: list[EntityKey] = sorted(result)
            lo = now_us - cache.keep_us
            for part in chunks(keys, ENTITIES_PER_QUERY):
                found: dict[EntityKey, list[OpView]] = {}
                asked = [(key, Bounds(lo, NEVER, None, NEVER)) for key in part]
                for op in await self._fetch(conn, asked, by_version=False):
                    found.setdefault((op.entity_type, op.entity_id), []).append(op)
                for entity_type, entity_id, version in await _versions(conn, part):
                    key = (entity_type, entity_id)
                    filled = Bounds(lo, NEVER, None, first_new_version=version + 1)
                    cache.stage_fill(key, filled, found.get(key, []))
            cache.commit()
        return len(keys)

    def committed(self) -> None:
        """The writer's transaction committed: what it staged in the cache is true now."""
        if self.cache is not None:
            self.cache.commit()

    def failed(self) -> None:
        if self.cache is not None:
            self.cache.discard()

    async def _record(
        self, conn: AsyncConnection, verdicts: list[Verdict], now_us: int
    ) -> list[dict[str, Any]]:
        detected_at = rfc3339(now_us)
        unique: dict[str, Verdict] = {}
        for verdict in verdicts:
            unique.setdefault(conflict_id(*verdict.op_ids), verdict)
        candidates = [record_json(verdict, detected_at) for verdict in unique.values()]
        insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        stmt = (
            insert(conflicts)
            .on_conflict_do_nothing()
            .returning(conflicts.c.conflict_id, sort_by_parameter_order=True)
        )
        # RETURNING lists only the rows actually inserted: a pair already
        # recorded gets no second record and no second notice.
        result = await conn.execute(
            stmt, [_conflict_row(r, unique[r["conflict_id"]], now_us) for r in candidates]
        )
        inserted = set(result.scalars())
        return [r for r in candidates if r["conflict_id"] in inserted]


def _may_have_candidates(wanted: Bounds, before: tuple[int, int | None] | None) -> bool:
    """False when the entity's earlier ops provably hold no candidate.

    No earlier op at all; or every earlier op edited before the window opens
    (`max_edited_at < lo`) and no op here reaches back by `base_version` to a
    version that exists. Unknown history (`None`) is always looked up.
    """
    if before is None:
        return True
    versions, max_edited = before
    if versions == 0:
        return False
    if wanted.above_version is not None and wanted.above_version < versions:
        return True
    if wanted.lo is None:
        return False
    return max_edited is None or max_edited >= wanted.lo


_SQL_CACHE: dict[tuple[int, bool, bool], str] = {}


async def _versions(conn: AsyncConnection, keys: Sequence[EntityKey]) -> list[Any]:
    """The current version of each entity, by index lookups (a row-value IN list
    made SQLite scan the whole entities table, measured: seconds at 500k entities)."""
    postgres = conn.dialect.name == "postgresql"
    text_p, join = ("%s::varchar", "JOIN") if postgres else ("?", "CROSS JOIN")
    rows = ", ".join([f"({text_p}, {text_p})"] * len(keys))
    sql = (
        f"WITH w(t, i) AS (VALUES {rows}) "  # noqa: S608 - placeholders only
        f"SELECT e.entity_type, e.entity_id, e.version FROM w {join} entities AS e "
        "ON e.entity_type = w.t AND e.entity_id = w.i"
    )
    params = tuple(part for key in keys for part in key)
    return list(await conn.exec_driver_sql(sql, params))


def _candidate_sql(count: int, *, postgres: bool, by_version: bool) -> str:
    key = (count, postgres, by_version)
    sql = _SQL_CACHE.get(key)
    if sql is not None:
        return sql
    if postgres:
        text_p, int_p, join = "%s::varchar", "%s::bigint", "JOIN"
    else:
        # CROSS JOIN makes SQLite loop over the small VALUES list, using the index inside.
        text_p, int_p, join = "?", "?", "CROSS JOIN"
    columns = ", ".join(f"s.{c.name}" for c in _CANDIDATE_COLUMNS)
    if by_version:
        row = f"({text_p}, {text_p}, {int_p})"
        names, match = "t, i, v", "s.version > w.v"
    else:
        row = f"({text_p}, {text_p}, {int_p}, {int_p})"
        names, match = "t, i, lo, hi", "s.edited_at >= w.lo AND s.edited_at <= w.hi"
    # Only placeholders and this module's constant identifiers go into the text.
    sql = (
        f"WITH w({names}) AS (VALUES {', '.join([row] * count)}) "  # noqa: S608
        f"SELECT {columns} FROM w {join} sync_log AS s "
        f"ON s.entity_type = w.t AND s.entity_id = w.i AND {match}"
    )
    if len(_SQL_CACHE) < 4096:
        _SQL_CACHE[key] = sql
    return sql


def _conflict_row(record: dict[str, Any], verdict: Verdict, now_us: int) -> dict[str, Any]:
    return {
        "conflict_id": record["conflict_id"],
        "entity_type": record["entity_type"],
        "entity_id": record["entity_id"],
        "op_a": verdict.a.op_id,
        "op_b": verdict.b.op_id,
        "device_a": verdict.a.device_id,
        "device_b": verdict.b.device_id,
        "user_a": verdict.a.user_id,
        "user_b": verdict.b.user_id,
        "fields": _encode(record["fields"]).decode(),
        "field_values": _encode(record["values"]).decode(),
        "severity": record["severity"],
        "strategy": record["strategy"],
        "status": record["status"],
        "winner_op_id": record["winner_op_id"],
        "detected_at": now_us,
        "resolved_at": None,
        "resolved_by": None,
    }


async def bump_counters(
    conn: AsyncConnection,
    stored: Sequence[OpRecord],
    found: Sequence[dict[str, Any]],
    now_us: int,
) -> None:
    """Per user: +ops, +conflicts; per device: +ops and the last sync; atomic upserts.

    Keys are sorted so that two instances lock counter rows in the same order.
    """
    users: dict[str, tuple[int, int]] = {}
    devices: dict[str, int] = {}
    for record in stored:
        ops, conflicts_n = users.get(record.user_id, (0, 0))
        users[record.user_id] = (ops + 1, conflicts_n)
        devices[record.device_id] = devices.get(record.device_id, 0) + 1
    for conflict in found:
        for user in set(conflict["user_ids"]):
            ops, conflicts_n = users.get(user, (0, 0))
            users[user] = (ops, conflicts_n + 1)
    await _bump_users(conn, users)
    postgres = conn.dialect.name == "postgresql"
    insert = postgresql.insert if postgres else sqlite.insert
    base = insert(device_counters)
    latest = _greatest(postgres, device_counters.c.last_sync_at, base.excluded.last_sync_at)
    stmt = base.on_conflict_do_update(
        index_elements=[device_counters.c.device_id],
        set_={"ops": device_counters.c.ops + base.excluded.ops, "last_sync_at": latest},
    )
    for part in chunks(sorted(devices)):
        await conn.execute(
            stmt, [{"device_id": d, "ops": devices[d], "last_sync_at": now_us} for d in part]
        )


async def _bump_users(conn: AsyncConnection, deltas: dict[str, tuple[int, int]]) -> None:
    if not deltas:
        return
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    base = insert(user_counters)
    stmt = base.on_conflict_do_update(
        index_elements=[user_counters.c.user_id],
        set_={
            "ops": user_counters.c.ops + base.excluded.ops,
            "conflicts": user_counters.c.conflicts + base.excluded.conflicts,
        },
    )
    for part in chunks(sorted(deltas)):
        await conn.execute(
            stmt,
            [{"user_id": u, "ops": deltas[u][0], "conflicts": deltas[u][1]} for u in part],
        )


def _greatest(postgres: bool, left: Any, right: Any) -> Any:
    return func.greatest(left, right) if postgres else func.max(left, right)
