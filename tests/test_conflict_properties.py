"""Property: the conflicts a set of operations yields are the oracle's, whatever happens.

For random workloads (creates, updates, deletes, agreeing values, window edges,
times written with a +02:00 offset, base_version, non-default rules and
strategies), any arrival order, any grouping into commits, redeliveries, and a
restart (a new detector on the same database) in the middle, the conflicts that
are not merged, each with its members, fields, severity, status and winners, are
the connected groups of the oracle's pairs; and the outbox holds the messages
PROTOCOL.md allows, one per conflict and topic per commit, counted from the
oracle's groups commit by commit, each carrying the conflict as the database
holds it after that commit. On SQLite and on PostgreSQL, with the window
summaries (fast path) and without (slow path).

`FIELDGATE_HYPOTHESIS_EXAMPLES` raises the number of examples for a long run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from storage import migrate
from storage.db import create_engine
from tests.conflict_harness import ROOT, Store
from tests.conflict_oracle import DEFAULT_CRITICAL, Expected, as_expected, expected_conflicts
from tests.support import at

EXAMPLES = int(os.environ.get("FIELDGATE_HYPOTHESIS_EXAMPLES", "80"))
FIELDS = ["status", "title", "notes"]
VALUES = ["a", "b", 1, 1.0, True, None]
# Offsets around the window's edges (300 s, or 60 s when drawn), so that edges are hit
# often; -7200: two hours before the rest, a late arrival far behind the summaries.
# Most edits fall close together: 80% or more of the examples hold a conflict.
EDGES = [-7200.0, 0.001, 59.999, 60.0, 60.001, 299.999, 300.0, 300.001, 600.0]
OFFSETS = [0.0, 0.0, 0.0, 10.0, 10.0, 20.0, 30.0, 40.0, *EDGES]
TABLES = [
    "sync_log",
    "entities",
    "quarantine",
    "outbox",
    "conflicts",
    "conflict_members",
    "conflict_windows",
    "conflict_totals",
    "op_counts",
    "user_counters",
    "device_counters",
]

Send = tuple[str, dict[str, Any]]


def plus_two(text_z: str) -> str:
    """The same instant written with a +02:00 offset."""
    moment = datetime.fromisoformat(text_z.replace("Z", "+00:00"))
    return moment.astimezone(timezone(timedelta(hours=2))).isoformat(timespec="microseconds")


@st.composite
def operations(draw: st.DrawFn) -> list[Send]:
    count = draw(st.integers(min_value=4, max_value=12))
    out: list[Send] = []
    for index in range(count):
        device = draw(st.sampled_from(["d1", "d2", "d3"]))
        kind = draw(st.sampled_from(["update", "update", "update", "create", "delete"]))
        if kind == "delete":
            changes: dict[str, Any] = {}
        else:
            names = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True))
            changes = {
                name: {
                    "old": None if kind == "create" else "old",
                    "new": draw(st.sampled_from(VALUES)),
                }
                for name in names
            }
        edited_at = at(draw(st.sampled_from(OFFSETS)))
        op: dict[str, Any] = {
            "op_id": f"op{index}",
            "user_id": draw(st.sampled_from(["u1", "u2"])),
            "entity_type": draw(st.sampled_from(["task", "task", "task", "asset"])),
            "entity_id": draw(st.sampled_from(["e1", "e1", "e1", "e1", "e2"])),
            "operation": kind,
            "changes": changes,
            "edited_at": plus_two(edited_at) if draw(st.booleans()) else edited_at,
        }
        if draw(st.integers(0, 5)) == 0:
            op["base_version"] = draw(st.integers(0, 3))
        out.append((device, op))
    return out


STRATEGIES = ["last_writer_wins", "first_writer_wins", "manual"]


@st.composite
def rules(draw: st.DrawFn) -> dict[str, Any]:
    """A config's `[conflicts]`: the defaults half the time, else drawn."""
    if draw(st.booleans()):
        return {}
    types: dict[str, Any] = {}
    for entity_type in ("task", "asset"):
        chosen: dict[str, Any] = {}
        if draw(st.booleans()):
            chosen["strategy"] = draw(st.sampled_from(STRATEGIES))
        if draw(st.integers(0, 3)) == 0:
            chosen["critical_fields"] = draw(st.lists(st.sampled_from(FIELDS), max_size=2))
        if chosen:
            types[entity_type] = chosen
    return {
        "window_s": draw(st.sampled_from([300.0, 60.0])),
        "manual_at_or_above": draw(st.sampled_from(["low", "medium", "high", "critical"])),
        "types": types,
    }


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[Send], list[list[Send]], int]:
    """The set, then how it arrives: permuted, with redeliveries, cut into commits."""
    ops = draw(operations())
    stream = list(draw(st.permutations(ops)))
    for item in draw(st.lists(st.sampled_from(ops), max_size=4)):
        stream.insert(draw(st.integers(0, len(stream))), item)
    commits: list[list[Send]] = []
    position = 0
    while position < len(stream):
        size = draw(st.integers(1, 8))
        commits.append(stream[position : position + size])
        position += size
    return ops, commits, draw(st.integers(0, len(commits)))


def oracle_rules(config: dict[str, Any]) -> dict[str, Any]:
    types = config.get("types", {})
    critical = {**DEFAULT_CRITICAL}
    critical.update(
        {t: set(c["critical_fields"]) for t, c in types.items() if "critical_fields" in c}
    )
    return {
        "window_s": config.get("window_s", 300.0),
        "manual_at_or_above": config.get("manual_at_or_above", "critical"),
        "strategies": {t: c["strategy"] for t, c in types.items() if "strategy" in c},
        "critical": critical,
    }


def expected_messages(commits: list[list[Send]], config: dict[str, Any]) -> int:
    """Messages PROTOCOL.md allows, commit by commit: a new conflict to the operators'
    topic and every member's device; a conflict that gained members to the operators'
    topic and the devices of those that joined."""
    devices: dict[str, str] = {}
    members_before: set[str] = set()
    stored: list[tuple[dict[str, Any], str]] = []
    count = 0
    for commit in commits:
        for device, op in commit:
            devices.setdefault(op["op_id"], device)
            stored.append((op, device))
        groups = expected_conflicts(stored, **oracle_rules(config))
        for found in groups:
            members = set(found.members)
            joined = members - members_before
            if not joined:
                continue
            if members & members_before:
                count += 1 + len({devices[m] for m in joined})
            else:
                count += 1 + len({devices[m] for m in members})
        members_before = {m for found in groups for m in found.members}
    return count


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A migrated empty SQLite database, copied for every example (migrating costs more)."""
    path = tmp_path_factory.mktemp("template") / "empty.db"
    migrate.upgrade(f"sqlite+aiosqlite:///{path}")
    yield path


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_db(request: pytest.FixtureRequest, template: Path, tmp_path: Path) -> Iterator[Any]:
    """`fresh_db()` -> the URL of an empty migrated database, new for each example."""
    if request.param == "sqlite":
        db = tmp_path / "p.db"

        def copy() -> str:
            for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
                path.unlink(missing_ok=True)
            shutil.copy(template, db)
            return f"sqlite+aiosqlite:///{db}"

        yield copy
        return
    url: str = request.getfixturevalue("pg_url")
    migrate.upgrade(url)

    def truncate() -> str:
        async def run() -> None:
            engine = create_engine(url)
            async with engine.begin() as conn:
                await conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY"))
            await engine.dispose()

        asyncio.run(run())
        return url

    yield truncate


async def play(
    url: str, commits: list[list[Send]], restart_after: int, config: dict[str, Any], windows: bool
) -> tuple[list[dict[str, Any]], int]:
    store = await Store(url, windows=windows, **config).start()
    try:
        seen = 0
        for number, commit in enumerate(commits):
            if number == restart_after:
                await store.close()
                store = await Store(url, windows=windows, **config).start()
            await store.commit(*[(device, [op]) for device, op in commit])
            notices = await store.notices()
            for notice in notices[seen:]:
                if notice["topic"] == f"{ROOT}/conflicts":
                    conflict = notice["payload"]["conflict"]
                    assert conflict == await store.record(conflict["conflict_id"])
            seen = len(notices)
        records = await store.conflicts()
        messages = [n for n in await store.notices() if n["channel"] == "mqtt"]
        return records, len(messages)
    finally:
        await store.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=deliveries(), config=rules(), windows=st.booleans(), plain=st.integers(0, 4))
def test_conflicts_are_the_oracles_groups(
    case: tuple[list[Send], list[list[Send]], int],
    config: dict[str, Any],
    windows: bool,
    plain: int,
    fresh_db: Any,
) -> None:
    _ops, commits, restart_after = case
    stream = [send for commit in commits for send in commit]
    expected = expected_conflicts([(op, d) for d, op in stream], **oracle_rules(config))
    # Most examples must test something: one in five without a conflict is kept.
    assume(bool(expected) or plain == 0)
    event("with a conflict" if expected else "without a conflict")
    records, messages = asyncio.run(play(fresh_db(), commits, restart_after, config, windows))
    found: list[Expected] = [as_expected(r, r["member_ids"]) for r in records]
    assert len(found) == len(set(found)), "a conflict was recorded twice"
    assert set(found) == expected
    assert messages == expected_messages(commits, config)
