"""The five features of every stored operation, in bulk: what training reads.

`extract` reads the sync log and the conflict members in a few big statements
(chunked by id, for progress) and computes the features of `ml.dataset` with sorts,
`searchsorted` and cumulative maxima over integer keys, never a statement or a Python
step per operation: a million operations in seconds, on SQLite and PostgreSQL alike.
The arithmetic is in numpy rather than in window functions: the per-user and
per-device counts would be window frames (`RANGE ... 1 PRECEDING` over `stored_at`),
but the entity features ask two things at once (edited within a range *and*
committed earlier), which no frame expresses without a self-join, and a sort of a
million integers costs numpy ~0.1 s where SQLite spends seconds in a temporary B-tree
per partitioning. The log may be read while the daemon writes: a row committed
during the read may be in it or not, and every row's features are its own either
way (they depend only on what was committed before it).

`reference_features` computes the same numbers the obvious way, one operation at a
time against the whole log: the oracle `extract` is tested against.

Times are compared through ranks: every `stored_at` and `joined_at` (and, for the
entity windows, every `edited_at`) is replaced by its rank among them, so that a
group and a time fit in one int64 key (`group * span + rank`) and one sorted array
answers "how many of this group before this time" for every operation at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import numpy as np
import numpy.typing as npt
import pandas as pd
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.times import HOUR_US
from ml.dataset import DEFAULT_FIRST_SYNC_HOURS, FEATURES, Dataset
from storage.feature_counters import HOURS_BACK, SLOT_US, counted_field, hour_range, slot_range

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

NEVER = np.iinfo(np.int64).max
"""`joined_at` of an operation that is in no conflict."""

CHUNK_IDS = 100_000
"""Ids of the log read per statement: the unit of `progress`."""

PAIRS_PER_ROUND = 2_000_000
"""Candidate pairs held at once when counting concurrent editors (memory bound)."""

_SELECT = (
    "SELECT s.id, s.op_id, s.device_id, s.user_id, s.entity_type, s.entity_id, s.changes,"
    " s.edited_at, s.received_at, s.stored_at, m.joined_at"
    " FROM sync_log s LEFT JOIN conflict_members m ON m.op_id = s.op_id"
)
_CHUNK = (
    "SELECT id, op_id, device_id, user_id, entity_type, entity_id, changes, edited_at,"
    " received_at, stored_at FROM sync_log WHERE id >= {lo} AND id < {hi} ORDER BY id"
)
_MEMBERS = "SELECT s.id, m.joined_at FROM conflict_members m JOIN sync_log s ON s.op_id = m.op_id"
_CHANGES = msgspec.json.Decoder(list[dict[str, msgspec.Raw]])


@dataclass
class _Log:
    """The whole log as columns, in id order; strings as integer codes."""

    op_ids: npt.NDArray[np.object_]
    device: I64
    user: I64
    entity: I64
    entity_type: I64
    edited: I64
    received: I64
    stored: I64
    joined: I64
    """NEVER for an operation in no conflict."""
    field_op: I64
    """One entry per (operation, changed field): the operation's row..."""
    field: I64
    """...and the field's code."""


async def extract(
    engine: AsyncEngine,
    *,
    window_s: float,
    first_sync_hours: float = DEFAULT_FIRST_SYNC_HOURS,
    since_us: int | None = None,
    as_of_us: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Dataset:
    """The dataset of the log behind `engine` (ml/dataset.py defines every number).

    Every stored operation is history for the features; the rows returned are those
    stored at or after `since_us` (all when None) whose window has closed by
    `as_of_us` (default: the latest `received_at` of the log). `progress(done,
    total)` after each chunk of the log read.
    """
    log = await _read(engine, progress)
    return _dataset(log, window_s, first_sync_hours, since_us, as_of_us)


async def _read(engine: AsyncEngine, progress: Callable[[int, int], None] | None) -> _Log:
    """The log in chunks of ids, then the members' rows in one statement."""
    blocks = []
    async with engine.connect() as conn:
        bounds = await conn.exec_driver_sql("SELECT min(id), max(id), count(*) FROM sync_log")
        first, last, total = tuple(bounds.one())
        done = 0
        if total:
            for lo in range(int(first), int(last) + 1, CHUNK_IDS):
                rows = await conn.run_sync(_fetch, _CHUNK.format(lo=lo, hi=lo + CHUNK_IDS))
                if rows:
                    # One C loop into a 2-D object array: 3.6x faster than zip(*rows).
                    blocks.append(np.array(rows, dtype=object))
                done += len(rows)
                if progress is not None:
                    progress(done, int(total))
        members = await conn.run_sync(_fetch, _MEMBERS)
    table = np.concatenate(blocks) if blocks else np.empty((0, 10), dtype=object)
    ids = table[:, 0].astype(np.int64)
    joined = np.full(len(ids), NEVER, dtype=np.int64)
    if members:
        pairs = np.array(members, dtype=np.int64)
        # Members of rows committed after the log was read are not in it.
        at = np.minimum(np.searchsorted(ids, pairs[:, 0]), len(ids) - 1)
        found = ids[at] == pairs[:, 0]
        joined[at[found]] = pairs[found, 1]
    entity_type = _codes(table[:, 4])
    field_op, field = _fields(table[:, 6])
    return _Log(
        op_ids=table[:, 1],
        device=_codes(table[:, 2]),
        user=_codes(table[:, 3]),
        entity=_pair_codes(entity_type, _codes(table[:, 5])),
        entity_type=entity_type,
        edited=table[:, 7].astype(np.int64),
        received=table[:, 8].astype(np.int64),
        stored=table[:, 9].astype(np.int64),
        joined=joined,
        field_op=field_op,
        field=field,
    )


def _fetch(conn: Connection, sql: str) -> list[tuple[Any, ...]]:
    """The rows of `sql` as the driver gives them: plain tuples, without SQLAlchemy's
    row objects (they doubled the time of reading a million rows)."""
    cursor = conn.connection.cursor()
    try:
        cursor.execute(sql)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def _codes(values: npt.NDArray[np.object_]) -> I64:
    """Each value's code: equal values, equal codes (hashed, not sorted: a sort of a
    million Python strings costs seconds)."""
    codes, _uniques = pd.factorize(values)
    return np.asarray(codes, dtype=np.int64)


def _distinct(values: I64) -> I64:
    """The sorted distinct values (`np.unique` hashes, and took 2 s a million here)."""
    ordered = np.sort(values)
    if not len(ordered):
        return ordered
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


def _search(keys: I64, needles: I64, side: Literal["left", "right"] = "left") -> I64:
    """`np.searchsorted` with the needles taken in order: each search then starts
    where the previous one left the cache (2.6x faster on a million random needles)."""
    order = np.argsort(needles, kind="stable")
    found = np.empty(len(needles), dtype=np.int64)
    found[order] = np.searchsorted(keys, needles[order], side=side)
    return found


def _pair_codes(major: I64, minor: I64) -> I64:
    return major * (int(minor.max(initial=0)) + 1) + minor


def _fields(changes: npt.NDArray[np.object_]) -> tuple[I64, I64]:
    """(operation row, field code) for every field each operation's `changes` names,
    all of them decoded in one call."""
    if not len(changes):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    text = "[" + ",".join(changes) + "]"
    decoded = _CHANGES.decode(text.encode())
    lengths = np.fromiter(map(len, decoded), dtype=np.int64, count=len(decoded))
    names = list(itertools.chain.from_iterable(decoded))
    if "\\u0000" in text:  # a key with a NUL (JSON escapes it): named as the counters do
        names = [counted_field(name) for name in names]
    op = np.repeat(np.arange(len(decoded), dtype=np.int64), lengths)
    return op, _codes(np.array(names, dtype=object)) if names else np.zeros(0, np.int64)


def _dataset(
    log: _Log,
    window_s: float,
    first_sync_hours: float,
    since_us: int | None,
    as_of_us: int | None,
) -> Dataset:
    n = len(log.op_ids)
    if n == 0:
        return _empty()
    window_us = round(window_s * 1_000_000)
    # One time axis for "committed before" and "joined before".
    axis = _distinct(np.concatenate([log.stored, log.joined[log.joined != NEVER]]))
    stored = _search(axis, log.stored)
    joined = np.where(log.joined == NEVER, NEVER, _search(axis, log.joined))
    X = np.empty((n, len(FEATURES)), dtype=np.float64)
    X[:, 0] = _concurrent_editors(log, stored, window_us)
    X[:, 1] = _hours_since_last_sync(log, stored, first_sync_hours)
    X[:, 2] = _user_conflict_rate(log, stored, joined)
    X[:, 3] = _entity_edit_frequency(log, stored)
    X[:, 4] = _field_overlap_score(log, stored, joined)
    as_of = int(log.received.max()) if as_of_us is None else as_of_us
    keep = log.edited + window_us <= as_of
    if since_us is not None:
        keep &= log.stored >= since_us
    rows = np.flatnonzero(keep)
    return Dataset(
        X=X[rows],
        y=(log.joined[rows] != NEVER).astype(np.int8),
        stored_at=log.stored[rows],
        op_ids=log.op_ids[rows].tolist(),
    )


def _empty() -> Dataset:
    return Dataset(
        X=np.zeros((0, len(FEATURES)), dtype=np.float64),
        y=np.zeros(0, dtype=np.int8),
        stored_at=np.zeros(0, dtype=np.int64),
        op_ids=[],
    )


# -- counting ---------------------------------------------------------------------


def _before(item_group: I64, item_time: I64, query_group: I64, query_time: I64) -> I64:
    """For each query, how many items of its group have a time rank below its own."""
    span = int(max(item_time.max(initial=0), query_time.max(initial=0))) + 1
    keys = np.sort(item_group * span + item_time)
    return _search(keys, query_group * span + query_time) - _search(keys, query_group * span)


def _count_less_in_ranges(values: I64, lo: I64, hi: I64, limit: I64) -> I64:
    """For each query i, how many positions p in [lo_i, hi_i) have values[p] < limit_i.

    A merge-sort tree walked bottom-up for all queries at once: at level k the
    positions form blocks of 2^k, each sorted by value in one array, and each query
    takes at most two blocks per level (the classic decomposition of a range), so
    every query costs O(log^2 n) in a handful of vectorized calls per level.
    """
    n = len(values)
    counts = np.zeros(len(lo), dtype=np.int64)
    lo, hi = lo.copy(), hi.copy()
    span = int(max(values.max(initial=0), limit.max(initial=0))) + 1
    positions = np.arange(n, dtype=np.int64)
    level = 0
    while (lo < hi).any():
        keys = np.sort((positions >> level) * span + values)
        for side in ("lo", "hi"):
            if side == "lo":
                take = (lo < hi) & (lo & 1 == 1)
                block = lo[take]
                lo[take] += 1
            else:
                take = (lo < hi) & (hi & 1 == 1)
                hi[take] -= 1
                block = hi[take]
            found = np.searchsorted(keys, block * span + limit[take], side="left")
            counts[take] += found - np.minimum(block << level, n)
        lo >>= 1
        hi >>= 1
        level += 1
    return counts


def _by_entity_and_edit(log: _Log) -> tuple[I64, I64, I64, int]:
    """The log sorted by (entity, edited_at): the order, the sorted keys, the edit
    axis (sorted distinct `edited_at`) and the span of a key's edit part."""
    edits = _distinct(log.edited)
    span = len(edits) + 1
    key = log.entity * span + _search(edits, log.edited)
    order = np.argsort(key, kind="stable")
    return order.astype(np.int64), key[order], edits.astype(np.int64), span


def _edit_range(
    log: _Log,
    keys: I64,
    edits: I64,
    span: int,
    low_us: I64,
    high_us: I64,
    high_side: Literal["left", "right"],
) -> tuple[I64, I64]:
    """Per operation, the positions in (entity, edited_at) order of its entity's
    operations edited in [low, high] (`high_side` "right") or [low, high) ("left")."""
    base = log.entity * span
    lo = _search(keys, base + _search(edits, low_us))
    hi = _search(keys, base + _search(edits, high_us, high_side))
    return lo, hi


# -- the five features --------------------------------------------------------------


def _concurrent_editors(log: _Log, stored: I64, window_us: int) -> F64:
    """Distinct other users before, on the entity, edited in a minute within the window.

    The candidates of an operation are its entity's operations edited in the minutes
    that reach within W of it: a contiguous range in (entity, edited_at) order, a few
    on most entities. The
    pairs are enumerated in rounds of PAIRS_PER_ROUND, kept when the other side was
    committed earlier by another user, and their distinct users counted.
    """
    n = len(stored)
    order, keys, edits, span = _by_entity_and_edit(log)
    first = (log.edited - window_us) // SLOT_US * SLOT_US
    after = ((log.edited + window_us) // SLOT_US + 1) * SLOT_US
    lo, hi = _edit_range(log, keys, edits, span, first, after, "left")
    sizes = hi - lo
    users = int(log.user.max()) + 1
    out = np.zeros(n, dtype=np.float64)
    ends = np.cumsum(sizes)
    start = 0
    while start < n:
        limit = (ends[start - 1] if start else 0) + PAIRS_PER_ROUND
        stop = max(start + 1, int(np.searchsorted(ends, limit, side="right")))
        query = np.arange(start, stop, dtype=np.int64)
        counts = sizes[start:stop]
        q = np.repeat(query, counts)
        firsts = np.cumsum(counts) - counts
        offset = np.arange(len(q), dtype=np.int64) - np.repeat(firsts, counts)
        other = order[np.repeat(lo[start:stop], counts) + offset]
        kept = (stored[other] < stored[q]) & (log.user[other] != log.user[q])
        distinct = _distinct(q[kept] * users + log.user[other[kept]])
        out += np.bincount(distinct // users, minlength=n).astype(np.float64)
        start = stop
    return out


def _hours_since_last_sync(log: _Log, stored: I64, cap_hours: float) -> F64:
    """Hours from the device's latest receipt committed before, capped; the cap first.

    Sorted by (device, commit), a running maximum of the receipts (encoded with the
    device as the major part, so that it restarts with each device) read at the last
    position committed before each operation."""
    receipts = _distinct(log.received)
    received = _search(receipts, log.received)
    span = int(stored.max()) + 1
    order = np.argsort(log.device * span + stored, kind="stable")
    keys = (log.device * span + stored)[order]
    rspan = len(receipts) + 1
    running = np.maximum.accumulate(log.device[order] * rspan + received[order])
    at = _search(keys, log.device * span + stored)
    start = _search(keys, log.device * span)
    seen = at > start
    # Where the device has nothing before (not `seen`), the position before is another
    # device's: its rank would index nowhere useful, or out of bounds.
    latest = receipts[np.where(seen, running[np.maximum(at - 1, 0)] - log.device * rspan, 0)]
    hours = np.full(len(stored), cap_hours, dtype=np.float64)
    gap = (log.received - latest).astype(np.float64) / HOUR_US
    hours[seen] = np.clip(gap[seen], 0.0, cap_hours)
    return hours


def _user_conflict_rate(log: _Log, stored: I64, joined: I64) -> F64:
    """(members of the user joined before + 1) / (operations of the user before + 2)."""
    ops = _before(log.user, stored, log.user, stored)
    member = joined != NEVER
    conflicts = _before(log.user[member], joined[member], log.user, stored)
    return (conflicts + 1.0) / (ops + 2.0)


def _entity_edit_frequency(log: _Log, stored: I64) -> F64:
    """Operations before on the entity edited in this one's clock hour or the 24 before
    it: a range in (entity, edited_at) order, counted where committed earlier."""
    order, keys, edits, span = _by_entity_and_edit(log)
    hour = log.edited // HOUR_US
    first, after = (hour - HOURS_BACK) * HOUR_US, (hour + 1) * HOUR_US
    lo, hi = _edit_range(log, keys, edits, span, first, after, "left")
    # Asked in (entity, edited_at) order, the ranges' blocks come in order too.
    counts = np.empty(len(stored), dtype=np.float64)
    counts[order] = _count_less_in_ranges(stored[order], lo[order], hi[order], stored[order])
    return counts


def _field_overlap_score(log: _Log, stored: I64, joined: I64) -> F64:
    """Mean over the changed fields of (members of (type, field) joined before) /
    (operations of (type, field) before); 0 for a field never seen and for no field."""
    n = len(stored)
    if not len(log.field_op):
        return np.zeros(n, dtype=np.float64)
    op = log.field_op
    group = _pair_codes(log.entity_type[op], log.field)
    seen = _before(group, stored[op], group, stored[op])
    member = joined[op] != NEVER
    conflicts = _before(group[member], joined[op][member], group, stored[op])
    ratio = np.divide(conflicts, seen, out=np.zeros(len(op), np.float64), where=seen > 0)
    total = np.bincount(op, weights=ratio, minlength=n)
    fields = np.bincount(op, minlength=n)
    return np.divide(total, fields, out=np.zeros(n, np.float64), where=fields > 0)


# -- the oracle ---------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedOp:
    """One operation of the log as the definitions speak of it."""

    op_id: str
    device_id: str
    user_id: str
    entity_type: str
    entity_id: str
    fields: frozenset[str]
    edited_at: int
    received_at: int
    stored_at: int
    joined_at: int | None
    """When it became a conflict member; None if it never did."""


async def read_log(engine: AsyncEngine) -> list[LoggedOp]:
    """The whole log with each operation's membership, in id order, in one statement."""
    async with engine.connect() as conn:
        rows = [tuple(row) for row in await conn.exec_driver_sql(_SELECT + " ORDER BY s.id")]
    return [
        LoggedOp(
            op_id=op_id,
            device_id=device,
            user_id=user,
            entity_type=kind,
            entity_id=name,
            fields=frozenset(map(counted_field, msgspec.json.decode(changes))),
            edited_at=edited,
            received_at=received,
            stored_at=stored,
            joined_at=joined,
        )
        for _id, op_id, device, user, kind, name, changes, edited, received, stored, joined in rows
    ]


def reference_features(
    log: Sequence[LoggedOp],
    *,
    window_s: float,
    first_sync_hours: float = DEFAULT_FIRST_SYNC_HOURS,
    since_us: int | None = None,
    as_of_us: int | None = None,
) -> Dataset:
    """`extract`'s dataset computed literally from the definitions, one operation at
    a time against every other: quadratic, for tests only."""
    window_us = round(window_s * 1_000_000)
    as_of = max((op.received_at for op in log), default=0) if as_of_us is None else as_of_us
    rows: list[list[float]] = []
    labels: list[int] = []
    stored_at: list[int] = []
    op_ids: list[str] = []
    for op in log:
        if op.edited_at + window_us > as_of:
            continue
        if since_us is not None and op.stored_at < since_us:
            continue
        before = [other for other in log if other.stored_at < op.stored_at]
        same_entity = [
            other
            for other in before
            if (other.entity_type, other.entity_id) == (op.entity_type, op.entity_id)
        ]
        slots = slot_range(op.edited_at, window_us)
        editors = {
            other.user_id
            for other in same_entity
            if other.user_id != op.user_id and slots[0] <= other.edited_at // SLOT_US <= slots[1]
        }
        receipts = [other.received_at for other in before if other.device_id == op.device_id]
        if receipts:
            gap = (op.received_at - max(receipts)) / HOUR_US
            hours = min(max(gap, 0.0), first_sync_hours)
        else:
            hours = first_sync_hours
        n_user = sum(1 for other in before if other.user_id == op.user_id)
        c_user = sum(
            1
            for other in log
            if other.user_id == op.user_id
            and other.joined_at is not None
            and other.joined_at < op.stored_at
        )
        hours_in = hour_range(op.edited_at)
        frequency = sum(
            1 for other in same_entity if hours_in[0] <= other.edited_at // HOUR_US <= hours_in[1]
        )
        ratios = []
        for name in op.fields:
            seen = [
                other
                for other in before
                if other.entity_type == op.entity_type and name in other.fields
            ]
            n_f = len(seen)
            c_f = sum(
                1
                for other in seen
                if other.joined_at is not None and other.joined_at < op.stored_at
            )
            ratios.append(c_f / n_f if n_f else 0.0)
        overlap = sum(ratios) / len(ratios) if ratios else 0.0
        rows.append(
            [float(len(editors)), hours, (c_user + 1) / (n_user + 2), float(frequency), overlap]
        )
        labels.append(int(op.joined_at is not None))
        stored_at.append(op.stored_at)
        op_ids.append(op.op_id)
    if not rows:
        return _empty()
    return Dataset(
        X=np.array(rows, dtype=np.float64),
        y=np.array(labels, dtype=np.int8),
        stored_at=np.array(stored_at, dtype=np.int64),
        op_ids=op_ids,
    )
