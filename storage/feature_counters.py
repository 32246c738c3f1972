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

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.ext.asyncio import AsyncConnection

from handlers.conflicts import OpView
from handlers.records import OpRecord
from handlers.times import HOUR_US
from storage import driver
from storage.db import chunks, marks, per_type

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
    editors: dict[EntityKey, dict[int, int]] = field(default_factory=dict)
    """entity -> minute -> its users as a bit mask (`user_bits`), for the minutes
    the batch asks about: a record's editors are an OR of a few ints, not a union
    of sets (the scorer's hottest loop)."""
    user_bits: dict[str, int] = field(default_factory=dict)
    """user_id -> its bit in `editors`' masks."""


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
    chunk of keys, and per cluster of times when the batch's edits are far apart).

    Driver SQL: a batch's statements differ in their IN lists every time, and
    SQLAlchemy's compiling and row objects cost three times what SQLite's answers
    do (measured: 27 against 6 ms for a batch of 3,500 operations)."""
    found = Snapshot()
    if not records:
        return found
    for user, n, c in await _rows(conn, _USERS, (), sorted({r.user_id for r in records})):
        found.users[user] = (int(n), int(c))
    devices = sorted({r.device_id for r in records})
    for device, at in await _rows(conn, _DEVICES, (), devices):
        found.devices[device] = int(at)
    fields_of: dict[str, set[str]] = {}
    for record in records:
        fields_of.setdefault(record.entity_type, set()).update(map(counted_field, record.changes))
    for kind, names in sorted(fields_of.items()):
        for name, n, c in await _rows(conn, _FIELDS, (kind,), sorted(names)):
            found.fields[kind, name] = (int(n), int(c))
    for kind, lo, hi, ids in _clustered(records, HOUR_US, HOURS_BACK * HOUR_US, 0):
        for name, hour, ops in await _rows(conn, _HOURS, (kind, lo, hi), ids):
            found.hours.setdefault((kind, name), {})[int(hour)] = int(ops)
    for kind, lo, hi, ids in _clustered(records, SLOT_US, window_us, window_us):
        bits = found.user_bits
        for name, slot, user in await _rows(conn, _EDITORS, (kind, lo, hi), ids):
            bit = bits.get(user)
            if bit is None:
                bit = bits[user] = 1 << len(bits)
            slots = found.editors.setdefault((kind, name), {})
            slots[slot] = slots.get(slot, 0) | bit
    return found


_USERS = "SELECT user_id, ops, conflicts FROM user_counters WHERE user_id IN ({keys})"
_DEVICES = (
    "SELECT device_id, last_received_at FROM device_counters"
    " WHERE device_id IN ({keys}) AND last_received_at IS NOT NULL"
)
_FIELDS = (
    "SELECT field, ops, conflicts FROM field_counters WHERE entity_type = ? AND field IN ({keys})"
)
_HOURS = (
    "SELECT entity_id, hour, ops FROM entity_hours"
    " WHERE entity_type = ? AND hour >= ? AND hour <= ? AND entity_id IN ({keys})"
)
_EDITORS = (
    "SELECT entity_id, slot, user_id FROM entity_editors"
    " WHERE entity_type = ? AND slot >= ? AND slot <= ? AND entity_id IN ({keys})"
)


async def _rows(
    conn: AsyncConnection, sql: str, fixed: tuple[Any, ...], keys: Sequence[str]
) -> list[tuple[Any, ...]]:
    """The rows of `sql` for `keys`, in chunks under the bound-parameter limits (each
    key in one IN list, after the `fixed` parameters)."""
    rows: list[tuple[Any, ...]] = []
    for part in chunks(keys):
        rows.extend(await driver.fetch(conn, sql.format(keys=marks(part)), (*fixed, *part)))
    return rows


def _clustered(
    records: Sequence[OpRecord], unit_us: int, before_us: int, after_us: int
) -> Iterable[tuple[str, int, int, list[str]]]:
    """(entity type, first, last, entity ids) that cover each record's entity over its
    span of times, from `(edited_at - before) // unit` to `(edited_at + after) // unit`:
    the spans merged where they overlap (live traffic: one cluster; an offline
    device's old edits: one more), each cluster asked for the entities whose spans
    are in it. Every span has the same width, so in the order of `edited_at` a
    cluster ends where a span starts past the one before it."""
    at = np.fromiter((r.edited_at_us for r in records), dtype=np.int64, count=len(records))
    order = np.argsort(at, kind="stable")
    at = at[order]
    first, last = (at - before_us) // unit_us, (at + after_us) // unit_us
    bounds = [0, *(np.flatnonzero(first[1:] > last[:-1] + 1) + 1).tolist(), len(at)]
    keys = [(records[i].entity_type, records[i].entity_id) for i in order.tolist()]
    for start, end in itertools.pairwise(bounds):
        for kind, ids in per_type(sorted(set(keys[start:end]))):
            yield kind, int(first[start]), int(last[end - 1]), ids


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
    await driver.execute_many(conn, _HOURS_UPSERT, [(*k, n) for k, n in sorted(hours.items())])
    await driver.execute_many(conn, _EDITORS_INSERT, sorted(editors))
    rows = [(t, name, n, c) for (t, name), (n, c) in sorted(fields.items())]
    await driver.execute_many(conn, _FIELDS_UPSERT, rows)


_HOURS_UPSERT = (
    "INSERT INTO entity_hours (entity_type, entity_id, hour, ops) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (entity_type, entity_id, hour) DO UPDATE SET"
    " ops = entity_hours.ops + excluded.ops"
)
_EDITORS_INSERT = (
    "INSERT INTO entity_editors (entity_type, entity_id, slot, user_id) VALUES (?, ?, ?, ?)"
    " ON CONFLICT DO NOTHING"
)
_FIELDS_UPSERT = (
    "INSERT INTO field_counters (entity_type, field, ops, conflicts) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (entity_type, field) DO UPDATE SET ops = field_counters.ops + excluded.ops,"
    " conflicts = field_counters.conflicts + excluded.conflicts"
)
