"""The window cache: recent operations per entity, in memory, an LRU with a cap.

It answers the detector's candidate question instead of the database only when
it provably holds every candidate. An entry for an entity keeps the invariant

    it holds every stored operation of the entity whose `edited_at` is at or
    after `from_us`, and every one whose version is at or above `from_version`,

which holds only while this process is the database's one writer (SQLite, no
shared subscription): the daemon builds no cache otherwise. Entries are filled
from the database (on first use, and at start for the most recently written
entities) and changed only after the transaction that stored the operations has
committed (`stage` then `commit`); any failed transaction empties the cache.
Eviction drops whole entities, least recently used first, so the invariant of
what stays is untouched; pruning old operations of a busy entity raises its
bounds instead.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import msgspec

from handlers.conflicts import OpView

EntityKey = tuple[str, str]
NEVER = 2**63 - 1


class Bounds(msgspec.Struct, frozen=True):
    """What the detector needs of one entity, stored before `first_new_version`."""

    lo: int | None
    hi: int | None
    above_version: int | None
    first_new_version: int


class _Entry:
    __slots__ = ("from_us", "from_version", "newest_us", "ops")

    def __init__(self, from_us: int, from_version: int) -> None:
        self.from_us = from_us
        self.from_version = from_version
        self.ops: dict[str, OpView] = {}
        self.newest_us = -NEVER


class WindowCache:
    def __init__(self, max_ops: int, keep_us: int) -> None:
        """`keep_us`: how far behind an entity's newest edit its operations are kept."""
        self.max_ops = max_ops
        self.keep_us = keep_us
        self.size = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[EntityKey, _Entry] = OrderedDict()
        self._staged: list[tuple[EntityKey, _Entry | None, list[OpView]]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: EntityKey, wanted: Bounds) -> list[OpView] | None:
        entry = self._entries.get(key)
        if entry is None or (wanted.lo is not None and wanted.lo < entry.from_us):
            self.misses += 1
            return None
        if wanted.above_version is not None and wanted.above_version + 1 < entry.from_version:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return list(entry.ops.values())

    # -- changes, applied only after the commit ------------------------------

    def fill_bounds(self, wanted: Bounds) -> Bounds:
        """The query to run for an entity the cache does not cover: open-ended above."""
        return Bounds(
            lo=wanted.lo,
            hi=NEVER if wanted.lo is not None else None,
            above_version=wanted.above_version,
            first_new_version=wanted.first_new_version,
        )

    def stage_fill(self, key: EntityKey, asked: Bounds, rows: Sequence[OpView]) -> None:
        """`rows` answered `fill_bounds(asked)` from the database, within the transaction."""
        if key in self._entries:
            # A late operation missed a live entry: the entry stays as it is.
            return
        from_us = asked.lo if asked.lo is not None else NEVER
        from_version = (
            asked.above_version + 1 if asked.above_version is not None else asked.first_new_version
        )
        entry = _Entry(from_us, from_version)
        self._staged.append((key, entry, list(rows)))

    def stage_add(self, key: EntityKey, ops: Iterable[OpView]) -> None:
        self._staged.append((key, None, list(ops)))

    def commit(self) -> None:
        for key, fresh_entry, ops in self._staged:
            entry = self._entries.get(key)
            if entry is None:
                if fresh_entry is None:
                    continue
                entry = self._entries[key] = fresh_entry
            for op in ops:
                if op.op_id not in entry.ops:
                    entry.ops[op.op_id] = op
                    self.size += 1
                entry.newest_us = max(entry.newest_us, op.edited_at_us)
            self._entries.move_to_end(key)
            self._prune(entry)
        self._staged.clear()
        self._evict()

    def discard(self) -> None:
        """The transaction failed: what it read or wrote may never have been."""
        self._staged.clear()
        self._entries.clear()
        self.size = 0

    def _prune(self, entry: _Entry) -> None:
        cut = entry.newest_us - self.keep_us
        if cut <= entry.from_us:
            return
        old = [op for op in entry.ops.values() if op.edited_at_us < cut]
        for op in old:
            del entry.ops[op.op_id]
            if op.version >= entry.from_version:
                entry.from_version = op.version + 1
        self.size -= len(old)
        entry.from_us = cut

    def _evict(self) -> None:
        while self.size > self.max_ops and self._entries:
            _key, entry = self._entries.popitem(last=False)
            self.size -= len(entry.ops)
