"""A brute-force reading of PROTOCOL.md's "Conflicts (v2)", written from the text.

Deliberately independent of `handlers.conflicts`: every pair of stored operations
is checked against the definition as a person would read it, the pairs are
joined into connected groups, and each group's fields, severity, status and
winners follow from the words. Tests compare the gateway's records with it.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

DEFAULT_CRITICAL = {
    "work_order": {"status", "assigned_to", "priority"},
    "task": {"status", "assigned_to", "due_at"},
    "asset": {"status", "location"},
    "attendance": {"check_in", "check_out", "status"},
}
LEVELS = ["low", "medium", "high", "critical"]


@dataclass(frozen=True)
class Expected:
    """What a conflict record must say, apart from its id and times."""

    members: tuple[str, ...]
    fields: tuple[str, ...]
    severity: str
    status: str
    winners: tuple[tuple[str, str], ...] = ()


def _micros(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _same_json(x: Any, y: Any) -> bool:
    """Equal as JSON, numbers by value: compare canonical dumps with numbers as floats."""

    def canon(v: Any) -> Any:
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, int | float):
            return ("num", float(v))
        if isinstance(v, list):
            return [canon(i) for i in v]
        return {k: canon(i) for k, i in v.items()}

    return json.dumps(canon(x), sort_keys=True) == json.dumps(canon(y), sort_keys=True)


def _pair(
    earlier: tuple[int, dict[str, Any], str],
    later: tuple[int, dict[str, Any], str],
    window_s: float,
    critical: dict[str, set[str]],
) -> tuple[set[str], str] | None:
    """The colliding fields and severity of two stored ops (`later` stored after)."""
    (v_earlier, a, da), (_v_later, b, db) = earlier, later
    if (a["entity_type"], a["entity_id"]) != (b["entity_type"], b["entity_id"]) or da == db:
        return None
    if b.get("base_version") is not None:
        if not v_earlier > b["base_version"]:
            return None
    elif abs(_micros(a["edited_at"]) - _micros(b["edited_at"])) > round(window_s * 1e6):
        return None
    a_del, b_del = a["operation"] == "delete", b["operation"] == "delete"
    if a_del and b_del:
        return None
    if a_del:
        fields = set(b.get("changes") or {})
    elif b_del:
        fields = set(a.get("changes") or {})
    else:
        both = set(a["changes"]) & set(b["changes"])
        fields = {f for f in both if not _same_json(a["changes"][f]["new"], b["changes"][f]["new"])}
    if not fields:
        return None
    if a_del != b_del:
        return fields, "critical"
    if fields & critical.get(a["entity_type"], set()):
        return fields, "high"
    return fields, "medium" if len(fields) >= 2 else "low"


def expected_conflicts(
    stored: list[tuple[dict[str, Any], str]],
    *,
    window_s: float = 300.0,
    manual_at_or_above: str = "critical",
    strategies: dict[str, str] | None = None,
    critical: dict[str, set[str]] | None = None,
) -> set[Expected]:
    """`stored`: the operations in the order they were stored, each with its device."""
    strategies = strategies or {}
    critical = DEFAULT_CRITICAL if critical is None else critical
    seen: set[str] = set()
    log: list[tuple[int, dict[str, Any], str]] = []
    versions: dict[tuple[str, str], int] = {}
    for op, device in stored:
        if op["op_id"] in seen:
            continue  # a duplicate is not stored again
        seen.add(op["op_id"])
        key = (op["entity_type"], op["entity_id"])
        versions[key] = versions.get(key, 0) + 1
        log.append((versions[key], op, device))
    parent: dict[str, str] = {}

    def find(op_id: str) -> str:
        while parent.setdefault(op_id, op_id) != op_id:
            op_id = parent[op_id]
        return op_id

    pairs: list[tuple[str, str, set[str], str]] = []
    for earlier, later in itertools.combinations(log, 2):  # in storing order
        found = _pair(earlier, later, window_s, critical)
        if found is not None:
            a, b = earlier[1]["op_id"], later[1]["op_id"]
            pairs.append((a, b, *found))
            parent[find(a)] = find(b)
    by_op = {op["op_id"]: op for _v, op, _d in log}
    groups: dict[str, list[tuple[str, str, set[str], str]]] = {}
    for pair in pairs:
        groups.setdefault(find(pair[0]), []).append(pair)
    out: set[Expected] = set()
    for group in groups.values():
        members = sorted({op_id for a, b, _f, _s in group for op_id in (a, b)})
        fields = sorted(set().union(*(f for _a, _b, f, _s in group)))
        level = max((s for _a, _b, _f, s in group), key=LEVELS.index)
        entity_type = by_op[members[0]]["entity_type"]
        strategy = strategies.get(entity_type, "last_writer_wins")
        if strategy == "manual" or LEVELS.index(level) >= LEVELS.index(manual_at_or_above):
            out.add(Expected(tuple(members), tuple(fields), level, "open"))
            continue
        winners = []
        for name in fields:
            changing = [
                by_op[m] for m in members
                if by_op[m]["operation"] == "delete" or name in (by_op[m].get("changes") or {})
            ]  # fmt: skip
            # the latest (or earliest) edited_at; ties to the greater op_id either way
            times = [_micros(op["edited_at"]) for op in changing]
            when = max(times) if strategy == "last_writer_wins" else min(times)
            tied = [op for op, at in zip(changing, times, strict=True) if at == when]
            winner = max(tied, key=lambda op: op["op_id"])
            winners.append((name, winner["op_id"]))
        out.add(Expected(tuple(members), tuple(fields), level, "auto_resolved", tuple(winners)))
    return out


def as_expected(record: dict[str, Any], members: list[str]) -> Expected:
    """A gateway record (and all its members' op_ids) in the oracle's terms; the count it
    keeps must be the members it has."""
    assert record["member_count"] == len(members), (record, members)
    return Expected(
        tuple(sorted(members)),
        tuple(record["fields"]),
        record["severity"],
        record["status"],
        tuple(sorted(record["winners"].items())),
    )
