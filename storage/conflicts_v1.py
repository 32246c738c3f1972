"""From v1's conflict records (one per colliding pair) to v2's (one per group): migration 0005.

A v2 conflict is a connected group of colliding operations, so the groups of a v1
database are the connected groups of its pairs, entity by entity (the pairs are
the collide relation, judged when each was stored). Each group gets the v2
record: the union of its pairs' fields, the highest severity, and its members.

What an operator decided is kept where it still means what it meant: a group of
one pair that was resolved stays resolved, its winner winning the pair's fields.
A group in which one pair was resolved and others were not was never seen whole
by that operator: it is `open`, and its `note` says why. Any other group is
`open` when one of its pairs was (the strategy was `manual` or the severity at or
above `manual_at_or_above` when it was judged), and `auto_resolved` otherwise,
with the winners of v2 (per field, among the members that change it).

A group keeps the `conflict_id` of its first pair (the earliest detected), so a
resolved pair, and the first of every knot, is found again under the id that an
operator, a ticket or a webhook receiver knew; the later pairs' ids are gone, and
`conflicts/list` by entity finds their group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import msgspec

from handlers.conflicts import Group, OpView, Severity, Strategy


class V1Pair(msgspec.Struct, frozen=True, kw_only=True):
    """A v1 conflict row, as much of it as v2 needs."""

    conflict_id: str
    op_a: str
    op_b: str
    entity_type: str
    entity_id: str
    fields: list[str]
    severity: Severity
    strategy: Strategy
    status: str
    winner_op_id: str | None
    detected_at: int
    resolved_at: int | None
    resolved_by: str | None


class Migrated(msgspec.Struct, kw_only=True):
    """A v2 conflict made of v1 pairs: its row's columns, and its members' op_ids."""

    conflict_id: str
    entity_type: str
    entity_id: str
    status: str
    strategy: Strategy
    group: Group
    winners: dict[str, str]
    detected_at: int
    updated_at: int
    resolved_at: int | None
    resolved_by: str | None
    note: str | None
    members: list[str]


def groups(pairs: Iterable[V1Pair], ops: Mapping[str, OpView]) -> list[Migrated]:
    """The v2 conflicts of `pairs`, whose operations are in `ops` (by op_id); pairs whose
    operations are missing from the log are left out."""
    parent: dict[str, str] = {}

    def find(op_id: str) -> str:
        while parent.setdefault(op_id, op_id) != op_id:
            parent[op_id] = parent[parent[op_id]]
            op_id = parent[op_id]
        return op_id

    kept = [p for p in pairs if p.op_a in ops and p.op_b in ops]
    for pair in kept:
        parent[find(pair.op_a)] = find(pair.op_b)
    by_root: dict[str, list[V1Pair]] = {}
    for pair in kept:
        by_root.setdefault(find(pair.op_a), []).append(pair)
    out = [_migrated(found, ops) for found in by_root.values()]
    return sorted(out, key=lambda m: (m.detected_at, m.conflict_id))


def _migrated(pairs: Sequence[V1Pair], ops: Mapping[str, OpView]) -> Migrated:
    first = min(pairs, key=lambda p: p.detected_at)
    group = Group()
    member_ids = sorted({op_id for p in pairs for op_id in (p.op_a, p.op_b)})
    for op_id in member_ids:
        group.add(ops[op_id])
    for pair in pairs:
        level: Severity = pair.severity
        group.collide(pair.fields, level)
    resolved = [p for p in pairs if p.status == "resolved"]
    note: str | None = None
    winners: dict[str, str] = {}
    resolved_at = resolved_by = None
    if resolved and len(pairs) == 1:
        (pair,) = resolved
        status = "resolved"
        winners = {name: pair.winner_op_id for name in pair.fields if pair.winner_op_id}
        resolved_at, resolved_by = pair.resolved_at, pair.resolved_by
    elif resolved:
        status = "open"
        names = ", ".join(f"{p.op_a}/{p.op_b} by {p.resolved_by}" for p in resolved)
        note = (
            "migrated from v1: the resolution of "
            f"{names} covered one pair of this conflict, not all of it"
        )
    elif any(p.status == "open" for p in pairs):
        status = "open"
    else:
        status = "auto_resolved"
        winners = group.winners(first.strategy)
    times = [p.detected_at for p in pairs] + [p.resolved_at for p in resolved if p.resolved_at]
    return Migrated(
        conflict_id=first.conflict_id,
        entity_type=first.entity_type,
        entity_id=first.entity_id,
        status=status,
        strategy=first.strategy,
        group=group,
        winners=winners,
        detected_at=first.detected_at,
        updated_at=max(times),
        resolved_at=resolved_at,
        resolved_by=resolved_by,
        note=note,
        members=member_ids,
    )


def severity_counts(migrated: Iterable[Migrated]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for conflict in migrated:
        key = f"severity:{conflict.group.severity}"
        counts[key] = counts.get(key, 0) + 1
    return counts
