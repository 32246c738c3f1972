"""Incremental conflict detection (v2: groups), inside the transaction that stores the ops.

Called by the writer's sync step right after `sync_log.store_ops`, whose version
upsert has locked every touched entity row (PostgreSQL: until commit). A
concurrent writer of the same entity, on this instance or another, waits for our
commit: every pair is judged exactly once, by the transaction that stores the
later of the two (higher version), and an entity's conflicts, members and
windows only ever change under its lock.

Each new operation N is judged against the entity's stored operations one of two
ways, both exact:

- **fast** (the common case): with a `base_version`, from the entity's latest
  versions (`handlers.conflict_versions`) when they reach back to it; without,
  from its window summaries (`handlers.conflict_windows`) when they hold N's
  whole window: N is not a delete, no delete lies in its window, the summaries
  start before its window and no edit of its fields lies past its window. The
  cost depends on the devices and conflicts in the window, not on its edits;
- **slow**: the stored operations in N's window from the database, each judged
  with N (`handlers.conflicts.judge`), as v1 did. It serves deletes, older
  `base_version`s, late arrivals, and entities whose summaries do not exist yet
  (they are built from what it read).

Either way N then joins the conflicts it collides with: a new one, or the
oldest of them (ties: the smaller id), which absorbs the others; the operations
in no conflict that it collides with join too. The batch's conflicts, members,
windows and counters are written with a few statements at the end, and its
messages (one per conflict and topic) go to the outbox.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncConnection

from handlers.conflict_versions import Version, Versions, colliding
from handlers.conflict_windows import FieldWindow, Loose, Mark
from handlers.conflicts import (
    MEMBERS_SHOWN,
    RANK,
    ConflictNotices,
    Group,
    OpView,
    Rules,
    Severity,
    automatic_status,
    higher,
    judge,
    new_conflict_id,
    new_value,
    pair_severity,
    value_key,
)
from handlers.records import OpRecord, OutboxRecord
from handlers.times import rfc3339
from storage import conflict_store, conflict_summaries, driver, feature_counters
from storage.db import by_entity, chunks, driver_rows, marks
from storage.member_cache import Latest, MemberCache, Rendered
from storage.schema import (
    SUMMARY_ALL,
    conflicts,
)
from storage.summary_cache import SummaryCache
from storage.sync_log import Before, Prior, op_view

EntityKey = tuple[str, str]

PRUNE_AFTER = 4
"""Windows forget what lies more than two windows behind their latest edit once they
span this many windows."""
LOOSE_MAX = 512
"""Loose edits a field's window holds; past it the entity's summaries are dropped and
rebuilt on demand (an entity one device edits alone, very often)."""

_encode = msgspec.json.Encoder().encode
_decode_group = msgspec.json.Decoder(Group).decode


class Detected(msgspec.Struct):
    """What a batch's detection wrote to the outbox, and its events for the metrics:
    `{"event": "detected", "severity"}` per new conflict, `{"event": "joined" |
    "merged", "count"}` per batch."""

    outbox: list[OutboxRecord] = msgspec.field(default_factory=list)
    events: list[dict[str, Any]] = msgspec.field(default_factory=list)


class _Conflict:
    """A conflict as this batch holds it: its row's columns and its group."""

    __slots__ = (
        "changed",
        "conflict_id",
        "detected_at",
        "entity",
        "group",
        "loaded_count",
        "merged_into",
        "new",
        "note",
        "resolved_at",
        "resolved_by",
        "status",
        "strategy",
        "winners",
    )

    def __init__(self, row: Any | None = None, *, entity: EntityKey | None = None) -> None:
        self.changed = False
        self.new = row is None
        if row is None:
            assert entity is not None
            self.conflict_id = new_conflict_id()
            self.entity = entity
            self.group = Group()
            self.status = "open"
            self.strategy = "last_writer_wins"
            self.winners: dict[str, str] = {}
            self.detected_at = 0
            self.resolved_at: int | None = None
            self.resolved_by: str | None = None
            self.merged_into: str | None = None
            self.note: str | None = None
            self.loaded_count = 0
            return
        self.conflict_id = row["conflict_id"]
        self.entity = (row["entity_type"], row["entity_id"])
        self.group = _decode_group(row["state"])
        self.loaded_count = self.group.member_count
        """Its members as read under the entity's lock, before this batch."""
        self.status = row["status"]
        self.strategy = row["strategy"]
        self.winners = msgspec.json.decode(row["winners"], type=dict[str, str])
        self.detected_at = row["detected_at"]
        self.resolved_at = row["resolved_at"]
        self.resolved_by = row["resolved_by"]
        self.merged_into = row["merged_into"]
        self.note = row["note"]

    def order(self) -> tuple[int, str]:
        """Which absorbs which: detected first, ties to the smaller conflict_id."""
        return (self.detected_at, self.conflict_id)


class _Touch:
    """What happened to a root conflict in this batch: what its message says."""

    __slots__ = ("absorbed", "fresh", "joined", "severity_before")

    def __init__(self, severity_before: Severity | None) -> None:
        self.joined: list[str] = []
        self.absorbed: list[str] = []
        self.fresh: list[OpView] = []
        """The members stored by this very batch: the latest of all its members."""
        self.severity_before = severity_before


class _Hits(msgspec.Struct):
    """What a new operation collides with: conflicts (roots), operations in none yet
    (by op_id, as views), and the fields and highest severity of those pairs."""

    groups: set[str] = msgspec.field(default_factory=set)
    loose: dict[str, OpView] = msgspec.field(default_factory=dict)
    fields: set[str] = msgspec.field(default_factory=set)
    severity: Severity | None = None

    def pair(self, fields: Iterable[str], level: Severity) -> None:
        self.fields.update(fields)
        self.severity = level if self.severity is None else higher(self.severity, level)


class _Entity:
    """One entity's state in this batch."""

    __slots__ = (
        "candidates",
        "delete_max",
        "key",
        "loose_index",
        "rebuild",
        "stored_from",
        "summary_from",
        "upto",
        "versions",
        "windows",
    )

    def __init__(
        self,
        key: EntityKey,
        summary_from: int | None,
        delete_max: int | None,
        stored_from: int | None,
        version: int,
    ) -> None:
        self.key = key
        self.upto = version
        """The last version this batch judges: the log's later operations (stored, not
        yet judged) are left to the batch that judges them."""
        self.versions = Versions(since=version + 1)
        """Its latest operations; until the summary is read, from this batch's on."""
        self.summary_from = summary_from
        self.stored_from = stored_from
        """`summary_from` as stored: the row is written only when it moved."""
        self.delete_max = delete_max
        self.windows: dict[str, FieldWindow] = {}
        self.loose_index: dict[str, dict[str, Loose]] | None = None
        """op_id -> its loose edits by field, built when first needed: finding an op's
        edits by scanning every window's loose list cost more than judging it."""
        self.candidates: list[tuple[OpView, str | None]] | None = None
        """The slow path's stored operations (with their conflict), once read."""
        self.rebuild = summary_from is None
        """No summaries yet: every op goes the slow path, and the summaries are built
        from what it read."""

    def window(self, field: str) -> FieldWindow:
        found = self.windows.get(field)
        if found is None:
            found = self.windows[field] = FieldWindow()
        return found

    def loose_of(self, op_id: str) -> dict[str, Loose]:
        """The loose edits of `op_id`, by field."""
        if self.loose_index is None:
            index: dict[str, dict[str, Loose]] = {}
            for name, window in self.windows.items():
                for edit in window.loose:
                    index.setdefault(edit.op_id, {})[name] = edit
            self.loose_index = index
        return self.loose_index.get(op_id, {})

    def add_loose(self, field: str, edit: Loose) -> None:
        self.window(field).add_loose(edit)
        if self.loose_index is not None:
            self.loose_index.setdefault(edit.op_id, {})[field] = edit

    def take_loose(self, op_id: str) -> dict[str, Loose]:
        """The loose edits of `op_id`, which joined a conflict, out of the windows."""
        edits = self.loose_of(op_id)
        assert self.loose_index is not None
        self.loose_index.pop(op_id, None)
        for name, edit in edits.items():
            self.windows[name].drop_loose(edit)
        return edits


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


class Detector:
    """Finds, records and announces the conflicts of each committed batch."""

    def __init__(
        self,
        rules: Rules,
        notices: ConflictNotices,
        *,
        enabled: bool = True,
        in_commit: bool = False,
        windows: bool = True,
    ) -> None:
        self.rules = rules
        self.notices = notices
        self.enabled = enabled
        self.in_commit = in_commit
        """True: the operations are judged in the transaction that stores them; False:
        after the ack, by passes of `storage.detection.DetectionStep`."""
        self.windows = windows
        """False: every operation takes the slow path (tests hold the two against each
        other: they must agree exactly)."""
        self.fast = 0
        self.slow = 0
        """Operations judged each way since start (the benchmarks read them)."""
        self.cache = MemberCache()
        self.summaries = SummaryCache()

    async def detect(
        self, conn: AsyncConnection, ops: Sequence[OpView], now_us: int, prior: Prior
    ) -> Detected:
        """Judge `ops` and store their conflicts, under their entities' row locks.

        Each entity's operations are the next ones after `prior`'s version that
        detection has not judged (`entities.detected_version`), which they then move
        to. The operations' own counts were bumped when they were stored; here only
        those of the members that joined.
        """
        self.failed()
        if not ops:
            return Detected()
        batch = _Batch(self, conn, now_us)
        per_entity: dict[EntityKey, list[OpView]] = {}
        for op in sorted(ops, key=lambda o: (o.entity_type, o.entity_id, o.version)):
            batch.stored[op.op_id] = op
            per_entity.setdefault((op.entity_type, op.entity_id), []).append(op)
        await batch.load(per_entity, prior)
        await batch.prefetch(per_entity)
        for key, entity_ops in per_entity.items():
            await batch.entity(key, entity_ops)
        await batch.write()
        await bump_counters(conn, (), batch.user_members, now_us)
        await feature_counters.bump(conn, (), [op for op, _conflict in batch.members])
        await _judged(conn, {key: entity_ops[-1].version for key, entity_ops in per_entity.items()})
        events = batch.events + [
            {"event": event, "count": n} for event, n in sorted(batch.tallies.items())
        ]
        outbox = await batch.announce()
        loose = [op for op_id, op in batch.stored.items() if op_id not in batch.roots]
        self.cache.stage(batch.latest, batch.absorbed, loose, batch.roots)
        return Detected(outbox, events)

    def committed(self) -> None:
        """What the batch staged in memory is true now."""
        self.cache.commit()
        self.summaries.commit()

    def failed(self) -> None:
        self.cache.drop()
        self.summaries.drop()


class _Batch:
    """The detection of one batch: loaded state, decisions, then the writes."""

    def __init__(self, detector: Detector, conn: AsyncConnection, now_us: int) -> None:
        self.detector = detector
        self.rules = detector.rules
        self.conn = conn
        self.now_us = now_us
        self.entities: dict[EntityKey, _Entity] = {}
        self.conflicts: dict[str, _Conflict] = {}
        self.roots: dict[str, str] = {}
        """op_id -> conflict of the members that joined in this batch."""
        self.absorbed: dict[str, str] = {}
        """conflict_id -> the conflict that absorbed it in this batch."""
        self.members: list[tuple[OpView, str]] = []
        """Operations that joined, with the conflict they joined (its root at the end)."""
        self.partial: set[str] = set()
        """Joiners seen only in the summaries: their views name the fields they change,
        without the values."""
        self.stored: dict[str, OpView] = {}
        """The operations this batch stores, whole."""
        self.latest: dict[str, Latest] = {}
        """Per touched conflict, its member count and latest members as its message
        shows them, once announced."""
        self.touched: dict[str, _Touch] = {}
        self.events: list[dict[str, Any]] = []
        self.user_members: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self.tallies: dict[str, int] = {}
        """Members joined and conflicts merged in this batch, for the metrics."""
        self.values: dict[str, dict[str, str]] = {}

    # -- loading ----------------------------------------------------------------------

    async def load(self, per_entity: dict[EntityKey, list[OpView]], prior: Prior) -> None:
        """Each entity's summaries (windows and versions) and the conflicts they name:
        as this engine's last commit left them when no operation was stored since
        (`storage.summary_cache`), else read."""
        summarized: list[EntityKey] = []
        names: set[str] = set()
        window_us = self.rules.window_us
        for key, ops in per_entity.items():
            before = prior.get(key, Before(0, None, None, None, 0))
            summary_from = before.summary_from
            if before.version == 0:
                summary_from = SUMMARY_ALL
            elif summary_from is None:
                # No summaries: when nothing stored is within the window of any new edit,
                # they start empty from there; else the slow path builds them from the log.
                lo = min(op.edited_at_us for op in ops) - window_us
                if before.edited_max is None or before.edited_max < lo:
                    summary_from = lo
            state = self.entities[key] = _Entity(
                key, summary_from, before.delete_max, before.summary_from, before.version
            )
            state.upto = ops[-1].version
            if before.version and before.summary_from is not None:
                kept = self.detector.summaries.take(key, before.version)
                if kept is None:
                    summarized.append(key)
                else:
                    self._summarize(state, kept, names)
        for keys, params in by_entity(summarized):
            sql = _WINDOWS.format(keys=keys)
            for entity_type, entity_id, body in await driver.fetch(self.conn, sql, params):
                state = self.entities[(entity_type, entity_id)]
                self._summarize(state, conflict_summaries.decode(body), names)
        await self._load_conflicts(names)

    @staticmethod
    def _summarize(state: _Entity, summary: conflict_summaries.Summary, names: set[str]) -> None:
        """`state` takes its stored summary; `names` gains the conflicts it names."""
        state.windows = summary.windows
        for window in summary.windows.values():
            names.update(window.groups)
        versions = summary.versions
        if versions is not None and versions.ends_at(state.versions.since - 1):
            state.versions = versions
            names.update(op.conflict_id for op in versions.ops if op.conflict_id)

    async def _load_conflicts(self, names: Iterable[str]) -> None:
        missing = sorted(set(names) - self.conflicts.keys())
        for part in chunks(missing):
            sql = _CONFLICTS.format(keys=marks(part))
            for row in await driver_rows(self.conn, sql, part, _CONFLICT_COLUMNS):
                self.conflicts[row["conflict_id"]] = _Conflict(row)

    def root(self, conflict_id: str) -> str:
        """Where a conflict lives now, after this batch's absorptions."""
        while conflict_id in self.absorbed:
            conflict_id = self.absorbed[conflict_id]
        return conflict_id

    def conflict_of(self, op_id: str, stored: str | None) -> str | None:
        """The conflict an operation is in now: joined in this batch, or as stored
        (`stored`), followed through this batch's absorptions."""
        found = self.roots.get(op_id) or stored
        return None if found is None else self.root(found)

    # -- one entity -------------------------------------------------------------------

    async def entity(self, key: EntityKey, ops: list[OpView]) -> None:
        state = self.entities[key]
        for index, op in enumerate(ops):
            hits = self._fast(state, op)
            if hits is None:
                self.detector.slow += 1
                hits = await self._slow(state, op, ops[index:])
            else:
                self.detector.fast += 1
            self._apply(state, op, hits)
            delete = op.operation == "delete"
            state.versions.add(
                Version(
                    op.version,
                    op.op_id,
                    op.device_id,
                    op.user_id,
                    op.operation,
                    op.edited_at_us,
                    {} if delete else self._values(op),
                    self.roots.get(op.op_id),
                )
            )
        if state.rebuild:
            self._build_windows(state, ops)
        else:
            self._prune(state)

    def _needs_log(self, state: _Entity, op: OpView) -> bool:
        """Whether the summaries cannot judge `op`: no summaries (yet), a `base_version`
        older than the versions they keep, a delete (without `base_version`), an edit
        older than where they start, or a delete in its window."""
        if not self.detector.windows or state.rebuild:
            return True
        if op.base_version is not None:
            return not state.versions.holds(op.base_version)
        if op.operation == "delete":
            return True
        since = op.edited_at_us - self.rules.window_us
        assert state.summary_from is not None
        if state.summary_from > since:
            return True
        return state.delete_max is not None and state.delete_max >= since

    def _fast(self, state: _Entity, op: OpView) -> _Hits | None:
        """The pairs of `op` from the windows, or None when they cannot tell exactly."""
        if self._needs_log(state, op):
            return None
        if op.base_version is not None:
            return self._by_version(state, op, op.base_version)
        window_us = self.rules.window_us
        since = op.edited_at_us - window_us
        hits = _Hits()
        critical = self.rules.for_type(op.entity_type).critical_fields
        group_fields: dict[str, int] = {}
        loose: dict[str, list[str]] = {}
        for name in op.changes:
            window = state.windows.get(name)
            if window is None:
                continue
            if window.high is not None and window.high > op.edited_at_us + window_us:
                return None
            groups, edits = window.hits(op.device_id, self._values(op)[name], since)
            for conflict_id in groups:
                group_fields[conflict_id] = group_fields.get(conflict_id, 0) + 1
                hits.groups.add(conflict_id)
                hits.pair([name], "high" if name in critical else "low")
            for edit in edits:
                loose.setdefault(edit.op_id, []).append(name)
        for op_id, names in loose.items():
            hits.loose[op_id] = self._loose_view(state, op, op_id)
            self.partial.add(op_id)
            hits.pair(names, pair_severity(False, names, critical))
        level: Severity = hits.severity or "low"
        for conflict_id in hits.groups:
            level = higher(level, self.conflicts[conflict_id].group.severity)
        if RANK[level] < RANK["medium"] and any(n >= 2 for n in group_fields.values()):
            return None  # a member may collide on two fields: only the members can tell
        return hits

    def _by_version(self, state: _Entity, op: OpView, base_version: int) -> _Hits:
        """The pairs of `op` from the entity's latest versions: those above its
        `base_version` are concurrent with it, whenever they were edited."""
        hits = _Hits()
        critical = self.rules.for_type(op.entity_type).critical_fields
        delete = op.operation == "delete"
        values = {} if delete else self._values(op)
        for stored in state.versions.above(base_version, op.version):
            fields = colliding(stored, op.device_id, delete, values)
            if not fields:
                continue
            one_deletes = delete != (stored.operation == "delete")
            hits.pair(fields, pair_severity(one_deletes, fields, critical))
            root = self.conflict_of(stored.op_id, stored.conflict_id)
            if root:
                hits.groups.add(root)
            else:
                hits.loose[stored.op_id] = OpView(
                    op_id=stored.op_id,
                    device_id=stored.device_id,
                    user_id=stored.user_id,
                    entity_type=op.entity_type,
                    entity_id=op.entity_id,
                    operation=stored.operation,
                    changes=dict.fromkeys(stored.values),
                    edited_at_us=stored.at_us,
                    version=stored.version,
                )
                self.partial.add(stored.op_id)
        return hits

    def _values(self, op: OpView) -> dict[str, str]:
        """The keys of the new values `op` sets, per field (computed once per op)."""
        found = self.values.get(op.op_id)
        if found is None:
            found = self.values[op.op_id] = {
                name: value_key(new_value(change)) for name, change in op.changes.items()
            }
        return found

    def _loose_view(self, state: _Entity, op: OpView, op_id: str) -> OpView:
        """A loose operation as the group needs it, from its edits in the windows."""
        edits = state.loose_of(op_id)
        first = next(iter(edits.values()))
        return OpView(
            op_id=op_id,
            device_id=first.device_id,
            user_id=first.user_id,
            entity_type=op.entity_type,
            entity_id=op.entity_id,
            operation="update",
            changes={name: None for name in edits},
            edited_at_us=first.at_us,
            version=first.version,
        )

    async def _slow(self, state: _Entity, op: OpView, remaining: list[OpView]) -> _Hits:
        """The pairs of `op` judged one by one against the stored operations."""
        if state.candidates is None:
            state.candidates = await self._candidates(state, remaining)
        hits = _Hits()
        for other, conflict_id in state.candidates:
            if other.version >= op.version:
                continue
            pair = judge(other, op, self.rules)
            if pair is None:
                continue
            hits.pair(pair.fields, pair.severity)
            root = self.conflict_of(other.op_id, conflict_id)
            if root:
                hits.groups.add(root)
            else:
                hits.loose[other.op_id] = other
        await self._load_conflicts(hits.groups)
        return hits

    async def prefetch(self, per_entity: dict[EntityKey, list[OpView]]) -> None:
        """The slow path's stored operations for every entity that will need them, in
        a few statements for the whole batch rather than one per entity."""
        wanted: dict[EntityKey, tuple[int | None, int | None, int | None]] = {}
        for key, ops in per_entity.items():
            state = self.entities[key]
            if any(self._needs_log(state, op) for op in ops):
                wanted[key] = self._candidate_range(state, ops)
        await self._fill_candidates(wanted)

    async def _candidates(
        self, state: _Entity, remaining: list[OpView]
    ) -> list[tuple[OpView, str | None]]:
        """The stored operations that any of `remaining` may collide with, when the
        prefetch did not foresee that the summaries would not do."""
        await self._fill_candidates({state.key: self._candidate_range(state, remaining)})
        assert state.candidates is not None
        return state.candidates

    def _candidate_range(
        self, state: _Entity, remaining: list[OpView]
    ) -> tuple[int | None, int | None, int | None]:
        """(lo, hi, above_version) of the stored operations that `remaining` may collide
        with; all of them from the window's start when the summaries are to be built
        from them (which then start there)."""
        window_us = self.rules.window_us
        plain = [op.edited_at_us for op in remaining if op.base_version is None]
        based = [op.base_version for op in remaining if op.base_version is not None]
        lo = min(plain) - window_us if plain else None
        hi = None if state.rebuild or not plain else max(plain) + window_us
        if state.rebuild:
            lo = min(op.edited_at_us for op in remaining) - window_us
            state.summary_from = lo
        return lo, hi, min(based) if based else None

    async def _fill_candidates(
        self, wanted: dict[EntityKey, tuple[int | None, int | None, int | None]]
    ) -> None:
        if not wanted:
            return
        found = await conflict_store.entities_ops(self.conn, wanted)
        conflict_ids: set[str] = set()
        for key in wanted:
            rows = found.get(key, [])
            views = sorted(
                ((op_view(row), row["conflict_id"]) for row in rows),
                key=lambda item: item[0].version,
            )
            upto = self.entities[key].upto
            self.entities[key].candidates = [v for v in views if v[0].version <= upto]
            conflict_ids.update(c for _v, c in views if c)
        await self._load_conflicts(conflict_ids)

    # -- joining ----------------------------------------------------------------------

    def _apply(self, state: _Entity, op: OpView, hits: _Hits) -> None:
        if not hits.groups and not hits.loose:
            if not state.rebuild:
                self._mark_loose(state, op)
            return
        groups = [self.conflicts[c] for c in sorted(hits.groups)]
        target = min(groups, key=_Conflict.order) if groups else self._new(state.key)
        for other in groups:
            if other is not target:
                self._absorb(state, target, other)
        touch = self._touch(target)
        for joiner in hits.loose.values():
            self._join(state, target, joiner, touch, fresh=False)
        self._join(state, target, op, touch, fresh=True)
        assert hits.severity is not None
        target.group.collide(hits.fields, hits.severity)
        target.changed = True

    def _new(self, key: EntityKey) -> _Conflict:
        created = _Conflict(entity=key)
        created.detected_at = self.now_us
        created.changed = True
        self.conflicts[created.conflict_id] = created
        self.touched[created.conflict_id] = _Touch(None)
        return created

    def _touch(self, conflict: _Conflict) -> _Touch:
        touch = self.touched.get(conflict.conflict_id)
        if touch is None:
            touch = self.touched[conflict.conflict_id] = _Touch(conflict.group.severity)
        return touch

    def _absorb(self, state: _Entity, target: _Conflict, other: _Conflict) -> None:
        self._touch(target).absorbed.append(other.conflict_id)
        target.group.absorb(other.group)
        other.status = "merged"
        other.merged_into = target.conflict_id
        other.changed = True
        self.absorbed[other.conflict_id] = target.conflict_id
        for window in state.windows.values():
            window.fold(other.conflict_id, target.conflict_id)
        state.versions.fold(other.conflict_id, target.conflict_id)
        gone = self.touched.pop(other.conflict_id, None)
        if gone is not None:
            # Absorbed in the batch that made or changed it: its news is the target's.
            self._touch(target).joined.extend(gone.joined)
            self._touch(target).absorbed.extend(gone.absorbed)
            self._touch(target).fresh.extend(gone.fresh)
            if gone.severity_before is not None:
                self._count(f"severity:{gone.severity_before}", -1)
        else:
            self._count(f"severity:{other.group.severity}", -1)
        self._count_event("merged")

    def _join(
        self, state: _Entity, target: _Conflict, op: OpView, touch: _Touch, *, fresh: bool
    ) -> None:
        """`op` joins `target`; `fresh`: it is the operation being judged (in no window
        yet), else a stored one whose loose edits move into the target's marks."""
        target.group.add(op)
        touch.joined.append(op.op_id)
        if fresh:
            touch.fresh.append(op)
        self.roots[op.op_id] = target.conflict_id
        self.user_members[op.user_id] = self.user_members.get(op.user_id, 0) + 1
        self._count("members", 1)
        self._count_event("joined")
        self.members.append((op, target.conflict_id))
        if not fresh:
            state.versions.join(op.op_id, target.conflict_id)
        if state.rebuild or op.operation == "delete":
            return
        assert state.summary_from is not None
        if not fresh:
            for name, edit in state.take_loose(op.op_id).items():
                mark = Mark(edit.at_us, edit.value)
                state.windows[name].add_member(target.conflict_id, edit.device_id, mark)
            return
        if op.edited_at_us < state.summary_from:
            return
        for name, value in self._values(op).items():
            state.window(name).add_member(
                target.conflict_id, op.device_id, Mark(op.edited_at_us, value)
            )

    def _mark_loose(self, state: _Entity, op: OpView) -> None:
        assert state.summary_from is not None
        if op.operation == "delete" or op.edited_at_us < state.summary_from:
            return
        for name, value in self._values(op).items():
            state.add_loose(
                name,
                Loose(op.edited_at_us, op.device_id, value, op.op_id, op.user_id, op.version),
            )

    def _settle(self, conflict: _Conflict) -> None:
        """Status and winners again, once per batch, after members joined: automatic
        when the rules allow it, `open` for an operator otherwise, and always `open`
        again for a conflict an operator had resolved."""
        rules = self.rules.for_type(conflict.entity[0])
        conflict.strategy = rules.strategy
        if conflict.status == "resolved":
            conflict.note = (
                f"open again: new members after the resolution by {conflict.resolved_by}"
            )
            conflict.status = "open"
            conflict.resolved_at = None
            conflict.resolved_by = None
        else:
            conflict.status = automatic_status(conflict.group.severity, rules.strategy, self.rules)
        auto = conflict.status == "auto_resolved"
        conflict.winners = conflict.group.winners(rules.strategy) if auto else {}

    def _count(self, key: str, delta: int) -> None:
        self.totals[key] = self.totals.get(key, 0) + delta

    def _count_event(self, event: str) -> None:
        self.tallies[event] = self.tallies.get(event, 0) + 1

    # -- summaries ----------------------------------------------------------------------

    def _build_windows(self, state: _Entity, ops: list[OpView]) -> None:
        """The summaries of an entity that had none, from what the slow path read."""
        assert state.candidates is not None and state.summary_from is not None
        state.windows = {}
        state.loose_index = None
        known = {view.op_id: (view, conflict_id) for view, conflict_id in state.candidates}
        for op in ops:
            known.setdefault(op.op_id, (op, None))
        for view, conflict_id in sorted(known.values(), key=lambda item: item[0].version):
            if view.operation == "delete" or view.edited_at_us < state.summary_from:
                continue
            root = self.conflict_of(view.op_id, conflict_id)
            for name, change in view.changes.items():
                value = value_key(change.get("new") if isinstance(change, dict) else None)
                if root:
                    state.window(name).add_member(
                        root, view.device_id, Mark(view.edited_at_us, value)
                    )
                else:
                    state.window(name).add_loose(
                        Loose(
                            view.edited_at_us,
                            view.device_id,
                            value,
                            view.op_id,
                            view.user_id,
                            view.version,
                        )
                    )
        state.rebuild = False
        self._prune(state)

    def _prune(self, state: _Entity) -> None:
        """Keep the summaries about two windows deep; drop them when loose edits pile up."""
        window_us = self.rules.window_us
        state.loose_index = None
        highs = [w.high for w in state.windows.values() if w.high is not None]
        assert state.summary_from is not None
        if highs:
            since = max(highs) - 2 * window_us
            if since - state.summary_from > (PRUNE_AFTER - 2) * window_us:
                state.summary_from = since
                for window in state.windows.values():
                    window.prune(since)
        if any(len(w.loose) > LOOSE_MAX for w in state.windows.values()):
            state.summary_from = None
            state.windows = {}

    # -- writing ------------------------------------------------------------------------

    async def write(self) -> None:
        conn = self.conn
        for conflict_id in self.touched:
            self._settle(self.conflicts[conflict_id])
        for conflict in self.conflicts.values():
            if conflict.merged_into is not None:
                conflict.merged_into = self.root(conflict.merged_into)
        fresh = [c for c in self.conflicts.values() if c.changed and c.new]
        changed = [c for c in self.conflicts.values() if c.changed and not c.new]
        for conflict in fresh:
            if conflict.conflict_id in self.touched:
                self._count(f"severity:{conflict.group.severity}", 1)
                self.events.append({"event": "detected", "severity": conflict.group.severity})
        for conflict in changed:
            touch = self.touched.get(conflict.conflict_id)
            before = touch.severity_before if touch else None
            if before is not None and before != conflict.group.severity:
                self._count(f"severity:{before}", -1)
                self._count(f"severity:{conflict.group.severity}", 1)
        if fresh:
            rows = [_conflict_row(c, self.now_us) for c in fresh]
            await driver.execute_many(
                conn, _INSERT_CONFLICT, [[row[c] for c in _CONFLICT_COLUMNS] for row in rows]
            )
        if changed:
            await driver.execute_many(
                conn, _UPDATE_CONFLICT, [_conflict_update(c, self.now_us) for c in changed]
            )
        moves = [
            (self.root(target), absorbed) for absorbed, target in sorted(self.absorbed.items())
        ]
        if moves:
            await driver.execute_many(conn, _MOVE_MERGED_INTO, moves)
            await driver.execute_many(conn, _MOVE_MEMBERS, moves)
        if self.members:
            # Plain SQL, one executemany: a row per joining op, and SQLAlchemy's work
            # per row would cost more than the database's (measured).
            await driver.execute_many(
                conn,
                _INSERT_MEMBERS,
                [
                    (
                        op.op_id,
                        self.root(conflict_id),
                        op.entity_type,
                        op.entity_id,
                        op.device_id,
                        op.user_id,
                        op.version,
                        self.now_us,
                    )
                    for op, conflict_id in self.members
                ],
            )
        await self._write_windows()
        await _add_totals(conn, self.totals)

    async def _write_windows(self) -> None:
        """Each entity's summaries, and where they start when that moved. Plain SQL,
        one executemany each: a row per entity of the batch (measured: SQLAlchemy's
        work per row cost more than the database's)."""
        conn = self.conn
        rows: list[tuple[str, str, bytes]] = []
        kept: list[tuple[EntityKey, int, conflict_summaries.Summary]] = []
        bounds: list[tuple[int | None, str, str]] = []
        dropped: list[EntityKey] = []
        for key, state in sorted(self.entities.items()):
            if state.summary_from != state.stored_from:
                bounds.append((state.summary_from, *key))
            if state.summary_from is None:
                dropped.append(key)
                continue
            for op in state.versions.ops:
                if op.conflict_id is not None:
                    op.conflict_id = self.root(op.conflict_id)
            summary = conflict_summaries.Summary(state.windows, state.versions)
            rows.append((*key, conflict_summaries.encode(summary)))
            # The versions end with this batch's last op: the entity's version once committed.
            kept.append((key, state.versions.ops[-1].version, summary))
        self.detector.summaries.stage(kept)
        if bounds:
            await driver.execute_many(conn, _UPDATE_SUMMARY_FROM, bounds)
        for keys, params in by_entity(dropped):
            await driver.fetch(conn, _DROP_WINDOWS.format(keys=keys), params)
        if rows:
            await driver.execute_many(conn, _UPSERT_WINDOWS, rows)

    # -- messages -----------------------------------------------------------------------

    async def announce(self) -> list[OutboxRecord]:
        """One message per conflict and topic: `conflict.detected` for a conflict this
        batch made (to every member's device), `conflict.updated` for one it changed
        (to the devices of the members that joined)."""
        records = await self._records()
        out: list[OutboxRecord] = []
        notices = self.detector.notices
        for conflict_id, touch in self.touched.items():
            conflict = self.conflicts[conflict_id]
            record = records[conflict_id]
            if conflict.new:
                out += notices.event("conflict.detected", record, conflict.group.device_ids)
                continue
            joined = set(touch.joined)
            devices = {op.device_id for op, _c in self.members if op.op_id in joined}
            out += notices.event(
                "conflict.updated",
                record,
                devices,
                joined=touch.joined,
                absorbed=touch.absorbed,
            )
        return out

    async def _records(self) -> dict[str, dict[str, Any]]:
        """Each touched conflict's record as its message carries it, with its latest
        members: from memory when this batch and the cache hold them (`_latest`), else
        read, for all such conflicts in one go."""
        records: dict[str, dict[str, Any]] = {}
        joiners: dict[str, list[OpView]] = {}
        for op, conflict_id in self.members:
            joiners.setdefault(self.root(conflict_id), []).append(op)
        parts: dict[str, list[_Conflict]] = {}
        for absorbed in self.absorbed:
            parts.setdefault(self.root(absorbed), []).append(self.conflicts[absorbed])
        latest: dict[str, list[OpView]] = {}
        unread: list[str] = []
        for conflict_id, touch in self.touched.items():
            conflict = self.conflicts[conflict_id]
            records[conflict_id] = conflict_store.record(_conflict_row(conflict, self.now_us))
            found = self._latest(
                conflict, touch, joiners.get(conflict_id, []), parts.get(conflict_id, [])
            )
            if found is None:
                unread.append(conflict_id)
            else:
                latest[conflict_id] = found
        if unread:
            read = await conflict_store.latest_members(self.conn, unread)
            for conflict_id in unread:
                latest[conflict_id] = read.get(conflict_id, [])
        for conflict_id, record in records.items():
            fields = tuple(record["fields"])
            shown = {op.op_id: self._render(conflict_id, op, fields) for op in latest[conflict_id]}
            record["members"] = [raw for _fields, raw in shown.values()]
            count = self.conflicts[conflict_id].group.member_count
            self.latest[conflict_id] = Latest(count, latest[conflict_id], shown)
        return records

    def _render(self, conflict_id: str, op: OpView, fields: tuple[str, ...]) -> Rendered:
        """A member's JSON in a message: as the conflict's last message showed it, when
        it showed the same fields."""
        shown = self.detector.cache.rendered(conflict_id, op.op_id, fields)
        if shown is None:
            shown = msgspec.Raw(_encode(_member(op, fields)))
        return fields, shown

    def _latest(
        self,
        conflict: _Conflict,
        touch: _Touch,
        joiners: list[OpView],
        absorbed: list[_Conflict],
    ) -> list[OpView] | None:
        """The conflict's latest members, newest first, without reading them, or None.

        The ops this batch stored are the entity's newest: when they are enough, they
        are the answer. Else the latest of the conflict's members before the batch and
        of those of the conflicts it absorbed (from the cache, each only when its count
        is the one read under the lock), and of the ops that joined in the batch (whole:
        from the cache for those the summaries named), when they add up to its count.
        """
        shown = min(MEMBERS_SHOWN, conflict.group.member_count)
        fresh = sorted(touch.fresh, key=lambda op: op.version, reverse=True)
        if len(fresh) >= shown:
            return fresh[:shown]
        cache = self.detector.cache
        views: list[OpView] = []
        for op in joiners:
            whole: OpView | None = op
            if op.op_id in self.partial:
                whole = self.stored.get(op.op_id) or cache.op(op.op_id)
            if whole is None:
                return None
            views.append(whole)
        count = len(joiners)
        for part in [conflict, *absorbed]:
            if part.new:
                continue
            kept = cache.latest(part.conflict_id, part.loaded_count)
            if kept is None:
                return None
            views.extend(kept)
            count += part.loaded_count
        if count != conflict.group.member_count:
            return None
        views.sort(key=lambda op: op.version, reverse=True)
        return views[:shown]


def _member(op: OpView, fields: Sequence[str]) -> dict[str, Any]:
    """A member as `conflict_store.member` shows it, from the operation in hand."""
    return {
        "op_id": op.op_id,
        "device_id": op.device_id,
        "user_id": op.user_id,
        "operation": op.operation,
        "version": op.version,
        "edited_at": rfc3339(op.edited_at_us),
        "changes": {name: op.changes[name] for name in fields if name in op.changes},
    }


_INSERT_MEMBERS = (
    "INSERT INTO conflict_members (op_id, conflict_id, entity_type, entity_id, device_id,"
    " user_id, version, joined_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_MOVE_MERGED_INTO = "UPDATE conflicts SET merged_into = ? WHERE merged_into = ?"
_MOVE_MEMBERS = "UPDATE conflict_members SET conflict_id = ? WHERE conflict_id = ?"
_UPSERT_WINDOWS = (
    "INSERT INTO conflict_windows (entity_type, entity_id, body) VALUES (?, ?, ?)"
    " ON CONFLICT (entity_type, entity_id) DO UPDATE SET body = excluded.body"
)
_UPDATE_SUMMARY_FROM = (
    "UPDATE entities SET summary_from = ? WHERE entity_type = ? AND entity_id = ?"
)
_UPDATED = (
    "status",
    "severity",
    "strategy",
    "fields",
    "winners",
    "member_count",
    "device_ids",
    "user_ids",
    "state",
    "updated_at",
    "resolved_at",
    "resolved_by",
    "merged_into",
    "note",
)
_ASSIGNMENTS = ", ".join(f"{name} = ?" for name in _UPDATED)
_UPDATE_CONFLICT = "UPDATE conflicts SET " + _ASSIGNMENTS + " WHERE conflict_id = ?"  # noqa: S608


def _conflict_update(conflict: _Conflict, now_us: int) -> tuple[Any, ...]:
    row = _conflict_row(conflict, now_us)
    return (*(row[name] for name in _UPDATED), conflict.conflict_id)


def _conflict_row(conflict: _Conflict, now_us: int) -> dict[str, Any]:
    group = conflict.group
    return {
        "conflict_id": conflict.conflict_id,
        "entity_type": conflict.entity[0],
        "entity_id": conflict.entity[1],
        "status": conflict.status,
        "severity": group.severity,
        "strategy": conflict.strategy,
        "fields": _encode(group.fields).decode(),
        "winners": _encode(conflict.winners).decode(),
        "member_count": group.member_count,
        "device_ids": _encode(group.device_ids).decode(),
        "user_ids": _encode(group.user_ids).decode(),
        "state": _encode(group).decode(),
        "detected_at": conflict.detected_at,
        "updated_at": now_us,
        "resolved_at": conflict.resolved_at,
        "resolved_by": conflict.resolved_by,
        "merged_into": conflict.merged_into,
        "note": conflict.note,
    }


_CONFLICT_COLUMNS = tuple(c.name for c in conflicts.c if c.name != "id")
_INSERT_CONFLICT = (
    f"INSERT INTO conflicts ({', '.join(_CONFLICT_COLUMNS)})"  # noqa: S608 - constant names
    f" VALUES ({', '.join('?' * len(_CONFLICT_COLUMNS))})"
)
_CONFLICTS = (
    f"SELECT {', '.join(_CONFLICT_COLUMNS)} FROM conflicts"  # noqa: S608 - constant names
    " WHERE conflict_id IN ({keys})"
)
_WINDOWS = (
    "SELECT entity_type, entity_id, body FROM conflict_windows"
    " WHERE entity_type = ? AND entity_id IN ({keys})"
)
_DROP_WINDOWS = "DELETE FROM conflict_windows WHERE entity_type = ? AND entity_id IN ({keys})"


async def skip(conn: AsyncConnection, keys: Sequence[EntityKey]) -> None:
    """Detection is off: the entities' operations are never judged, and are in no
    window, so their summaries no longer hold every edit and are rebuilt when
    detection is on again."""
    for marked, params in by_entity(sorted(keys)):
        await driver.fetch(conn, _SKIP.format(keys=marked), params)


_SKIP = (
    "UPDATE entities SET summary_from = NULL, detected_version = version"
    " WHERE entity_type = ? AND entity_id IN ({keys})"
)


async def _judged(conn: AsyncConnection, upto: dict[EntityKey, int]) -> None:
    """Each entity's operations are judged up to its version in `upto`."""
    await driver.execute_many(conn, _JUDGED, [(v, t, i) for (t, i), v in sorted(upto.items())])


_JUDGED = "UPDATE entities SET detected_version = ? WHERE entity_type = ? AND entity_id = ?"


async def _add_totals(conn: AsyncConnection, deltas: dict[str, int]) -> None:
    changes = [(key, n) for key, n in sorted(deltas.items()) if n]
    await driver.execute_many(conn, _TOTALS, changes)


_TOTALS = (
    "INSERT INTO conflict_totals (key, n) VALUES (?, ?)"
    " ON CONFLICT (key) DO UPDATE SET n = conflict_totals.n + excluded.n"
)


async def bump_counters(
    conn: AsyncConnection,
    stored: Sequence[OpRecord],
    user_members: dict[str, int],
    now_us: int,
) -> None:
    """Per user: +ops, +ops that joined a conflict; per device: +ops, the last sync and
    the latest receipt.

    Atomic upserts, keys sorted so that two instances lock counter rows in the same
    order (users, then devices: after every conflict row of the batch).
    """
    users: dict[str, tuple[int, int]] = {}
    devices: dict[str, tuple[int, int]] = {}
    for record in stored:
        ops, joined = users.get(record.user_id, (0, 0))
        users[record.user_id] = (ops + 1, joined)
        count, received = devices.get(record.device_id, (0, record.received_at_us))
        devices[record.device_id] = (count + 1, max(received, record.received_at_us))
    for user, joined in user_members.items():
        ops, before = users.get(user, (0, 0))
        users[user] = (ops, before + joined)
    await driver.execute_many(conn, _USERS, [(u, *users[u]) for u in sorted(users)])
    rows = [(d, devices[d][0], now_us, devices[d][1]) for d in sorted(devices)]
    await driver.execute_many(conn, _DEVICES.format(greatest=driver.greatest(conn)), rows)


_USERS = (
    "INSERT INTO user_counters (user_id, ops, conflicts) VALUES (?, ?, ?)"
    " ON CONFLICT (user_id) DO UPDATE SET ops = user_counters.ops + excluded.ops,"
    " conflicts = user_counters.conflicts + excluded.conflicts"
)
_DEVICES = (
    "INSERT INTO device_counters (device_id, ops, last_sync_at, last_received_at)"
    " VALUES (?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET"
    " ops = device_counters.ops + excluded.ops,"
    " last_sync_at = {greatest}(device_counters.last_sync_at, excluded.last_sync_at),"
    " last_received_at = {greatest}("
    "coalesce(device_counters.last_received_at, excluded.last_received_at),"
    " excluded.last_received_at)"
)
