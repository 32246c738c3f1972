"""The kept versions (`handlers.conflict_versions`) against the operations they keep.

An operation with `base_version` judged from the entity's kept versions must find
exactly the pairs that the rule (`handlers.conflicts.judge`) finds among every
stored operation, whenever the kept versions reach back to its base_version:
checked by brute force on random operations, with values that are equal as JSON
without being equal as Python (`1` and `1.0`) and values that are not (`true`
and `1`).
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.conflict_versions import KEPT, Version, Versions, colliding
from handlers.conflicts import (
    OpView,
    Rules,
    TypeRules,
    judge,
    new_value,
    pair_severity,
    value_key,
)

FIELDS = ["status", "title", "notes"]
VALUES: list[Any] = ["a", "b", 1, 1.0, True, None, {"x": [1, 2]}, {"x": [1.0, 2]}]
RULES = Rules(
    window_us=300_000_000,
    manual_at_or_above="critical",
    types={"task": TypeRules("last_writer_wins", frozenset({"status"}))},
)


@st.composite
def op_views(draw: st.DrawFn, version: int) -> OpView:
    operation = draw(st.sampled_from(["update", "update", "create", "delete"]))
    changes: dict[str, Any] = {}
    if operation != "delete":
        names = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True))
        changes = {name: {"old": None, "new": draw(st.sampled_from(VALUES))} for name in names}
    return OpView(
        op_id=f"op{version}",
        device_id=draw(st.sampled_from(["d1", "d2", "d3"])),
        user_id="u1",
        entity_type="task",
        entity_id="t1",
        operation=operation,
        changes=changes,
        edited_at_us=draw(st.integers(0, 10**9)),
        version=version,
    )


def kept(op: OpView) -> Version:
    values = {name: value_key(new_value(change)) for name, change in op.changes.items()}
    delete = op.operation == "delete"
    return Version(
        op.version,
        op.op_id,
        op.device_id,
        op.user_id,
        op.operation,
        op.edited_at_us,
        {} if delete else values,
    )


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[OpView], OpView]:
    count = draw(st.integers(0, KEPT + 6))
    stored = [draw(op_views(version)) for version in range(1, count + 1)]
    new = draw(op_views(count + 1))
    base = draw(st.integers(0, count + 1))
    return stored, OpView(**{**_fields(new), "base_version": base})


def _fields(op: OpView) -> dict[str, Any]:
    return {name: getattr(op, name) for name in op.__struct_fields__}


@settings(max_examples=400, deadline=None)
@given(history=histories())
def test_kept_versions_find_the_rules_pairs(history: tuple[list[OpView], OpView]) -> None:
    stored, new = history
    assert new.base_version is not None
    versions = Versions(since=1)
    for op in stored:
        versions.add(kept(op))
    assert versions.since == max(1, len(stored) - KEPT + 1)
    assert versions.ends_at(len(stored))
    if not versions.holds(new.base_version):
        assert new.base_version + 1 < versions.since
        return
    delete = new.operation == "delete"
    values = {} if delete else kept(new).values
    critical = RULES.for_type("task").critical_fields
    found = {}
    for kept_op in versions.above(new.base_version, new.version):
        fields = colliding(kept_op, new.device_id, delete, values)
        if fields:
            one_deletes = delete != (kept_op.operation == "delete")
            found[kept_op.op_id] = (tuple(fields), pair_severity(one_deletes, fields, critical))
    expected = {}
    for other in stored:
        pair = judge(other, new, RULES)
        if pair is not None:
            expected[other.op_id] = (pair.fields, pair.severity)
    assert found == expected


def test_a_gap_starts_the_versions_again() -> None:
    """An operation that does not follow the last kept (stored without detection) is
    where the kept versions start from then on."""
    versions = Versions(since=1)
    versions.add(Version(1, "a", "d1", "u1", "update", 0, {"title": '"x"'}))
    versions.add(Version(3, "c", "d1", "u1", "update", 0, {"title": '"y"'}))
    assert (versions.since, [op.op_id for op in versions.ops]) == (3, ["c"])
    assert not versions.holds(1)
    assert versions.holds(2)
