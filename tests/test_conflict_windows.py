"""The window summary (`handlers.conflict_windows`) against the edits it summarizes.

A device's marks must answer "is there an edit at or after `since` whose value
is not `v`?" exactly as the edits themselves do, whatever order the edits came
in and however the marks were merged: checked by brute force on random edits.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.conflict_windows import FieldWindow, Loose, Mark, Marks

VALUES = ["a", "b", "c"]
TIMES = st.integers(0, 20)
edits = st.lists(st.tuples(TIMES, st.sampled_from(VALUES)), min_size=1, max_size=12)


def brute(found: list[tuple[int, str]], value: str, since: int) -> bool:
    return any(at >= since and seen != value for at, seen in found)


def built(found: list[tuple[int, str]]) -> Marks:
    marks = Marks(Mark(found[0][0], found[0][1]))
    for at, value in found[1:]:
        marks = marks.add(Mark(at, value))
    return marks


@settings(max_examples=500, deadline=None)
@given(found=edits)
def test_marks_answer_as_the_edits_do(found: list[tuple[int, str]]) -> None:
    """Checked against: a late edit (before the latest) not updating `diff`; `hits`
    ignoring `diff`."""
    marks = built(found)
    for value in VALUES:
        for since in range(-1, 22):
            assert marks.hits(value, since) == brute(found, value, since), (found, value, since)


@settings(max_examples=500, deadline=None)
@given(first=edits, second=edits)
def test_merged_marks_answer_as_both_sets_do(
    first: list[tuple[int, str]], second: list[tuple[int, str]]
) -> None:
    """Checked against: a merge that keeps only the other side's `diff`."""
    merged = built(first).merge(built(second))
    for value in VALUES:
        for since in range(-1, 22):
            assert merged.hits(value, since) == brute(first + second, value, since)


def test_a_window_folds_an_absorbed_group_and_forgets_what_is_pruned() -> None:
    window = FieldWindow()
    window.add_member("old", "d1", Mark(10, "a"))
    window.add_member("new", "d1", Mark(20, "b"))
    window.add_member("new", "d2", Mark(5, "c"))
    window.add_loose(Loose(3, "d3", "a", "op-1", "u3", 7))
    window.add_loose(Loose(30, "d3", "b", "op-2", "u3", 8))
    window.fold("new", "old")
    assert set(window.groups) == {"old"}
    assert window.groups["old"]["d1"] == Marks(Mark(20, "b"), Mark(10, "a"))
    assert window.high == 30
    window.prune(6)
    assert window.groups == {"old": {"d1": Marks(Mark(20, "b"), Mark(10, "a"))}}
    assert [e.op_id for e in window.loose] == ["op-2"]
    window.drop_loose(Loose(30, "d3", "b", "op-2", "u3", 8))
    assert window.loose == []
    assert window.hits("d9", "c", 15) == ({"old"}, [])
    # d1's edit since 15 agrees with "b"; the one that differs (10) is before.
    assert window.hits("d9", "b", 15) == (set(), [])
    assert window.hits("d9", "b", 10) == ({"old"}, [])
    # No edit of a device collides with its own.
    assert window.hits("d1", "a", 0) == (set(), [])
