"""A brute-force reading of PROTOCOL.md's Conflicts section, written from the text.

Deliberately independent of `handlers.conflicts`: every pair of stored operations
is checked against the definition as a person would read it, with nothing shared
but the words. Tests compare the gateway's records with what this computes.
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

    op_ids: tuple[str, str]
    fields: tuple[str, ...]
    severity: str
    status: str
    winner: str | None


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
    out: set[Expected] = set()
    for (vi, a, da), (_vj, b, db) in itertools.combinations(log, 2):
        if (a["entity_type"], a["entity_id"]) != (b["entity_type"], b["entity_id"]):
            continue
        if da == db:
            continue
        later, v_earlier = b, vi  # combinations keep the storing order: b came later
        if later.get("base_version") is not None:
            if not v_earlier > later["base_version"]:
                continue
        elif abs(_micros(a["edited_at"]) - _micros(b["edited_at"])) > round(window_s * 1e6):
            continue
        a_del, b_del = a["operation"] == "delete", b["operation"] == "delete"
        if a_del and b_del:
            continue
        if a_del:
            fields = set(b.get("changes") or {})
        elif b_del:
            fields = set(a.get("changes") or {})
        else:
            both = set(a["changes"]) & set(b["changes"])
            fields = {
                f for f in both if not _same_json(a["changes"][f]["new"], b["changes"][f]["new"])
            }
        if not fields:
            continue
        if a_del != b_del:
            level = "critical"
        elif fields & critical.get(a["entity_type"], set()):
            level = "high"
        elif len(fields) >= 2:
            level = "medium"
        else:
            level = "low"
        strategy = strategies.get(a["entity_type"], "last_writer_wins")
        if strategy == "manual" or LEVELS.index(level) >= LEVELS.index(manual_at_or_above):
            status, winner = "open", None
        else:
            status = "auto_resolved"
            ka = (_micros(a["edited_at"]), a["op_id"])
            kb = (_micros(b["edited_at"]), b["op_id"])
            last, first = (a, b) if ka > kb else (b, a)
            winner = last["op_id"] if strategy == "last_writer_wins" else first["op_id"]
        pair = sorted((a["op_id"], b["op_id"]))
        out.add(Expected((pair[0], pair[1]), tuple(sorted(fields)), level, status, winner))
    return out


def as_expected(record: dict[str, Any]) -> Expected:
    return Expected(
        (record["op_ids"][0], record["op_ids"][1]),
        tuple(record["fields"]),
        record["severity"],
        record["status"],
        record["winner_op_id"],
    )
