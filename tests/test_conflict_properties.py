"""Property: without base_version, the conflicts do not depend on how ops arrive.

For a random set of operations, any arrival order, any grouping into commits,
random redeliveries and a restart (new engine, new detector, cold or warmed
cache) in the middle all give the same set of conflict records, and it is the
set that the brute-force oracle computes from PROTOCOL.md's text.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import migrate
from tests.conflict_harness import Store
from tests.conflict_oracle import as_expected, expected_conflicts
from tests.test_conflict_rules import at

FIELDS = ["status", "title", "notes"]
VALUES = ["a", "b", 1, 1.0, True, None]
# Offsets around the window's edges (300 s), so that edges are hit often.
# -7200: two hours before the rest, to exercise late arrivals past the cache's reach.
OFFSETS = [-7200.0, -7000.0, 0.0, 0.001, 100.0, 299.999, 300.0, 300.001, 400.0, 600.0, 600.001]


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, dict[str, Any]]]:
    count = draw(st.integers(min_value=2, max_value=9))
    out: list[tuple[str, dict[str, Any]]] = []
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
        op = {
            "op_id": f"op{index}",
            "user_id": draw(st.sampled_from(["u1", "u2"])),
            "entity_type": draw(st.sampled_from(["task", "task", "asset"])),
            "entity_id": draw(st.sampled_from(["e1", "e1", "e2"])),
            "operation": kind,
            "changes": changes,
            "edited_at": at(draw(st.sampled_from(OFFSETS))),
        }
        out.append((device, op))
    return out


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[tuple[str, dict[str, Any]]], list[list[Any]], int]:
    """The set, then how it arrives: permuted, with redeliveries, cut into commits."""
    ops = draw(operations())
    arrival = draw(st.permutations(ops))
    redelivered = draw(st.lists(st.sampled_from(ops), max_size=4))
    stream = list(arrival)
    for item in redelivered:
        stream.insert(draw(st.integers(0, len(stream))), item)
    commits: list[list[Any]] = []
    position = 0
    while position < len(stream):
        size = draw(st.integers(1, 4))
        commits.append(stream[position : position + size])
        position += size
    restart_after = draw(st.integers(0, len(commits)))
    return ops, commits, restart_after


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A migrated empty database, copied for every example (migrating costs more)."""
    path = tmp_path_factory.mktemp("template") / "empty.db"
    migrate.upgrade(f"sqlite+aiosqlite:///{path}")
    yield path


# The restarted store warms its cache as if it were T0 + 600 s: the entries then
# cover edits from T0 on, so later ops are answered from memory, earlier ones not.
WARM_AT_US = 1_795_953_600_000_000 + 600_000_000


async def play(
    url: str, commits: list[list[Any]], restart_after: int, cache_max_ops: int
) -> list[dict[str, Any]]:
    store = await Store(url, cache_max_ops=cache_max_ops).start(WARM_AT_US)
    try:
        for number, commit in enumerate(commits):
            if number == restart_after:
                await store.close()
                store = await Store(url, cache_max_ops=cache_max_ops).start(WARM_AT_US)
            await store.commit(*[(device, [op]) for device, op in commit])
        return await store.conflicts()
    finally:
        await store.close()


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=deliveries(), cache_max_ops=st.sampled_from([0, 2, 50_000]))
def test_conflicts_do_not_depend_on_arrival(
    case: tuple[list[Any], list[list[Any]], int],
    cache_max_ops: int,
    template: Path,
    tmp_path: Path,
) -> None:
    ops, commits, restart_after = case
    db = tmp_path / "p.db"
    db.unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copy(template, db)
    records = asyncio.run(play(f"sqlite+aiosqlite:///{db}", commits, restart_after, cache_max_ops))
    found = [as_expected(r) for r in records]
    assert len(found) == len(set(found)), "a pair was recorded twice"
    assert set(found) == expected_conflicts([(op, device) for device, op in ops])
