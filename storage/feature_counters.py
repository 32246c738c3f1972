"""The counters conflict prediction reads at arrival, kept in the transaction that
stores the operations.

The online scorer must compute an operation's features from what was committed
before it (ml/dataset.py) without a query per operation and without reading the
log: `bump` adds a batch to the counters (after its detection, with the members
that joined), `snapshot` reads what a batch's features need in five statements,
before the batch bumps anything, so that operations of one commit do not see each
other, exactly as the extraction for training counts them.

Per user and per device the counters are `user_counters` and `device_counters`
(bumped with detection, storage/conflicts.py); here are the others: per entity type
and field, per entity and clock hour of `edited_at`, and the users per entity and
minute of `edited_at`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert

from handlers.conflicts import OpView
from handlers.records import OpRecord
from handlers.times import HOUR_US
from storage.db import by_entity, chunks, upsert_into
from storage.schema import (
    device_counters,
    entity_editors,
    entity_hours,
    field_counters,
    user_counters,
)

SLOT_US = 60_000_000
"""The minute: `entity_editors` keeps who edited an entity per minute of `edited_at`."""

HOURS_BACK = 24
"""`entity_edit_frequency` counts the edit's clock hour and the 24 before it."""

EntityKey = tuple[str, str]


def counted_field(name: str) -> str:
    """A field's name as the counters (and the training extraction) know it: a NUL,
    which a key in `changes` may hold but a text column of PostgreSQL may not, as
    U+FFFD."""
    return name.replace("\x00", "\ufffd")


@dataclass
class Snapshot:
    """The counters a batch's operations are scored from, as committed before it."""

    users: dict[str, tuple[int, int]] = field(default_factory=dict)
    """user_id -> (operations, conflict members); absent: none."""
    devices: dict[str, int] = field(default_factory=dict)
    """device_id -> latest `received_at`; absent: the device's first operation."""
    fields: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    """(entity_type, field) -> (operations, conflict members)."""
    hours: dict[EntityKey, dict[int, int]] = field(default_factory=dict)
    """entity -> clock hour -> operations, for the hours the batch asks about."""
    editors: dict[EntityKey, dict[int, set[str]]] = field(default_factory=dict)
    """entity -> minute -> users, for the minutes the batch asks about."""


def hour_range(edited_at_us: int) -> tuple[int, int]:
    """The clock hours (inclusive) whose edits `entity_edit_frequency` counts."""
    hour = edited_at_us // HOUR_US
    return hour - HOURS_BACK, hour


def slot_range(edited_at_us: int, window_us: int) -> tuple[int, int]:
    """The minutes (inclusive) whose editors `concurrent_editors` counts: every minute
    that holds an instant within the window of the edit."""
    return (edited_at_us - window_us) // SLOT_US, (edited_at_us + window_us) // SLOT_US


async def snapshot(conn: AsyncConnection, records: Sequence[OpRecord], window_us: int) -> Snapshot:
    """What `records` are scored from, read in one statement per counter table (per
    chunk of keys, and per cluster of times when the batch's edits are far apart)."""
    found = Snapshot()
    if not records:
        return found
    users = sorted({r.user_id for r in records})
    for part in chunks(users):
        u = user_counters.c
        result = await conn.execute(
            select(u.user_id, u.ops, u.conflicts).where(u.user_id.in_(part))
        )
        found.users.update({user: (int(n), int(c)) for user, n, c in result})
    devices = sorted({r.device_id for r in records})
    for part in chunks(devices):
        d = device_counters.c
        receipts = await conn.execute(
            select(d.device_id, d.last_received_at).where(
                d.device_id.in_(part), d.last_received_at.is_not(None)
            )
        )
        found.devices.update({device: int(at) for device, at in receipts})
    per_type: dict[str, set[str]] = {}
    for record in records:
        per_type.setdefault(record.entity_type, set()).update(map(counted_field, record.changes))
    f = field_counters.c
    for kind, names in sorted(per_type.items()):
        for part in chunks(sorted(names)):
            counts = await conn.execute(
                select(f.field, f.ops, f.conflicts).where(f.entity_type == kind, f.field.in_(part))
            )
            found.fields.update({(kind, name): (int(n), int(c)) for name, n, c in counts})
    h = entity_hours.c
    for where in _clustered(h.entity_type, h.entity_id, h.hour, records, hour_range):
        for kind, name, hour, ops in await conn.execute(
            select(h.entity_type, h.entity_id, h.hour, h.ops).where(where)
        ):
            found.hours.setdefault((kind, name), {})[int(hour)] = int(ops)
    e = entity_editors.c
    for where in _clustered(
        e.entity_type, e.entity_id, e.slot, records, lambda at: slot_range(at, window_us)
    ):
        for kind, name, slot, user in await conn.execute(
            select(e.entity_type, e.entity_id, e.slot, e.user_id).where(where)
        ):
            found.editors.setdefault((kind, name), {}).setdefault(int(slot), set()).add(user)
    return found


def _clustered(
    entity_type: ColumnElement[str],
    entity_id: ColumnElement[str],
    time: ColumnElement[int],
    records: Sequence[OpRecord],
    span: Callable[[int], tuple[int, int]],
) -> Iterable[ColumnElement[bool]]:
    """WHERE clauses that cover each record's entity over its `span` of times: the
    spans merged where they overlap (live traffic: one cluster; an offline device's
    old edits: one more), each cluster asked for the entities whose spans are in it."""
    edits = [r.edited_at_us for r in records]
    earliest, latest = span(min(edits)), span(max(edits))
    if latest[0] <= earliest[1] + 1:
        # Live traffic: the spans (all of one width) of the earliest and the latest
        # edit overlap, so every span overlaps every other: one cluster, no sort.
        every = sorted({(r.entity_type, r.entity_id) for r in records})
        for where in by_entity(entity_type, entity_id, every):
            yield and_(where, time >= earliest[0], time <= latest[1])
        return
    spans = [(*span(r.edited_at_us), (r.entity_type, r.entity_id)) for r in records]
    clusters: list[tuple[int, int, set[EntityKey]]] = []
    for lo, hi, key in sorted(spans):
        if clusters and lo <= clusters[-1][1] + 1:
            first, last, keys = clusters[-1]
            keys.add(key)
            clusters[-1] = (first, max(last, hi), keys)
        else:
            clusters.append((lo, hi, {key}))
    for lo, hi, keys in clusters:
        for where in by_entity(entity_type, entity_id, sorted(keys)):
            yield and_(where, time >= lo, time <= hi)


class _Upserts(NamedTuple):
    hours: Insert
    editors: Insert
    fields: Insert


@functools.cache
def _upserts(dialect: str) -> _Upserts:
    """`bump`'s statements, built once per dialect (as storage/sync_log.py's
    `_versions_upsert`, for the same reason)."""
    hours = upsert_into(dialect, entity_hours)
    fields = upsert_into(dialect, field_counters)
    return _Upserts(
        hours=hours.on_conflict_do_update(
            index_elements=[
                entity_hours.c.entity_type,
                entity_hours.c.entity_id,
                entity_hours.c.hour,
            ],
            set_={"ops": entity_hours.c.ops + hours.excluded.ops},
        ),
        editors=upsert_into(dialect, entity_editors).on_conflict_do_nothing(),
        fields=fields.on_conflict_do_update(
            index_elements=[field_counters.c.entity_type, field_counters.c.field],
            set_={
                "ops": field_counters.c.ops + fields.excluded.ops,
                "conflicts": field_counters.c.conflicts + fields.excluded.conflicts,
            },
        ),
    )


async def bump(
    conn: AsyncConnection, stored: Sequence[OpRecord], members: Sequence[OpView]
) -> None:
    """Count the batch's stored operations, and the operations that joined a conflict in
    it (`members`, stored earlier or now). Keys are sorted: two instances take the
    counters' row locks in one order."""
    hours: dict[tuple[str, str, int], int] = {}
    editors: set[tuple[str, str, int, str]] = set()
    fields: dict[tuple[str, str], tuple[int, int]] = {}
    for record in stored:
        key = (record.entity_type, record.entity_id, record.edited_at_us // HOUR_US)
        hours[key] = hours.get(key, 0) + 1
        editors.add(
            (record.entity_type, record.entity_id, record.edited_at_us // SLOT_US, record.user_id)
        )
        for name in map(counted_field, record.changes):
            ops, joined = fields.get((record.entity_type, name), (0, 0))
            fields[(record.entity_type, name)] = (ops + 1, joined)
    for op in members:
        for name in map(counted_field, op.changes):
            ops, joined = fields.get((op.entity_type, name), (0, 0))
            fields[(op.entity_type, name)] = (ops, joined + 1)
    if not stored and not members:
        return
    dialect = conn.dialect.name
    if hours:
        await conn.execute(
            _upserts(dialect).hours,
            [
                {"entity_type": t, "entity_id": i, "hour": h, "ops": n}
                for (t, i, h), n in sorted(hours.items())
            ],
        )
    if editors:
        await conn.execute(
            _upserts(dialect).editors,
            [
                {"entity_type": t, "entity_id": i, "slot": s, "user_id": u}
                for t, i, s, u in sorted(editors)
            ],
        )
    if fields:
        await conn.execute(
            _upserts(dialect).fields,
            [
                {"entity_type": t, "field": name, "ops": n, "conflicts": c}
                for (t, name), (n, c) in sorted(fields.items())
            ],
        )
