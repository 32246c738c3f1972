"""The latest members of recently touched conflicts, kept in the engine between commits.

Every conflict message carries the conflict's latest 50 members
(`MEMBERS_SHOWN`). Reading them for each conflict a batch touched cost more than
all the rest of detection on a fleet's workload (docs/benchmarks.md); yet the
batch before usually wrote them. So each commit leaves here, per conflict it
touched, its member count and latest members (whole operations, since the
conflict's fields may grow), and the operations it stored, which may join a
conflict later; and each member as the last message showed it (its JSON, for
the conflict's fields then), since most members are shown again by the next
message about their conflict.

Nothing here is trusted without a check against what the batch read under the
entity's lock: a conflict's latest members are used only when the count kept is
the `member_count` just read (members are only ever added, and a conflict that
loses its members to a merge is never touched again), so a commit of another
instance, or one of ours that failed, makes it read them again. An operation
never changes once stored. Only what a commit made durable comes here
(`commit`); what a failed attempt staged is dropped (`drop`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import msgspec

from handlers.conflicts import OpView

Rendered = tuple[tuple[str, ...], msgspec.Raw]
"""A member as a message shows it: for these fields of its conflict, this JSON."""

MAX_VIEWS = 100_000
"""Operations held, in members and stored operations each; the least recently used
conflicts and operations go first."""


class MemberCache:
    def __init__(self, max_views: int = MAX_VIEWS) -> None:
        self.max_views = max_views
        self._latest: OrderedDict[str, tuple[int, list[OpView]]] = OrderedDict()
        self._held = 0
        self._ops: OrderedDict[str, OpView] = OrderedDict()
        self._rendered: OrderedDict[str, Rendered] = OrderedDict()
        self._staged_latest: dict[str, tuple[int, list[OpView]]] = {}
        self._staged_gone: list[str] = []
        self._staged_ops: list[OpView] = []
        self._staged_rendered: Mapping[str, Rendered] = {}

    def latest(self, conflict_id: str, member_count: int) -> list[OpView] | None:
        """The conflict's latest members (newest first) when it has `member_count`."""
        found = self._latest.get(conflict_id)
        if found is None or found[0] != member_count:
            return None
        self._latest.move_to_end(conflict_id)
        return found[1]

    def op(self, op_id: str) -> OpView | None:
        """A stored operation, whole."""
        return self._ops.get(op_id)

    def rendered(self, op_id: str, fields: tuple[str, ...]) -> msgspec.Raw | None:
        """A member's JSON for its conflict's `fields`, as a message showed it."""
        found = self._rendered.get(op_id)
        return found[1] if found is not None and found[0] == fields else None

    def stage(
        self,
        latest: dict[str, tuple[int, list[OpView]]],
        gone: Iterable[str],
        stored: Sequence[OpView],
        rendered: Mapping[str, Rendered],
    ) -> None:
        """What the transaction under way will have made true once committed: the
        latest members of the conflicts it touched, the conflicts it merged away, the
        operations it stored, the members its messages showed."""
        self._staged_latest = latest
        self._staged_gone = list(gone)
        self._staged_ops = list(stored)
        self._staged_rendered = rendered

    def commit(self) -> None:
        for conflict_id in self._staged_gone:
            self._forget(conflict_id)
        for conflict_id, entry in self._staged_latest.items():
            self._forget(conflict_id)
            self._latest[conflict_id] = entry
            self._held += len(entry[1])
        while self._held > self.max_views and self._latest:
            _conflict_id, (_count, views) = self._latest.popitem(last=False)
            self._held -= len(views)
        for op in self._staged_ops:
            self._ops[op.op_id] = op
        while len(self._ops) > self.max_views:
            self._ops.popitem(last=False)
        for op_id, shown in self._staged_rendered.items():
            self._rendered.pop(op_id, None)
            self._rendered[op_id] = shown
        while len(self._rendered) > self.max_views:
            self._rendered.popitem(last=False)
        self.drop()

    def drop(self) -> None:
        self._staged_latest, self._staged_gone, self._staged_ops = {}, [], []
        self._staged_rendered = {}

    def _forget(self, conflict_id: str) -> None:
        found = self._latest.pop(conflict_id, None)
        if found is not None:
            self._held -= len(found[1])
