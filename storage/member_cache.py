"""The latest members of recently touched conflicts, kept in the engine between commits.

Every conflict message carries the conflict's latest 50 members
(`MEMBERS_SHOWN`). Reading them for each conflict a batch touched cost more than
all the rest of detection on a fleet's workload (docs/benchmarks.md); yet the
batch before usually wrote them. So each commit leaves here, per conflict it
touched, its member count and latest members (whole operations, since the
conflict's fields may grow) with each as the last message showed it (its JSON,
for the conflict's fields then: most are shown again by the next message about
their conflict); and the operations it stored in no conflict, which may join
one later.

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
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import msgspec

from handlers.conflicts import OpView

Rendered = tuple[tuple[str, ...], msgspec.Raw]
"""A member as a message shows it: for these fields of its conflict, this JSON."""

MAX_VIEWS = 100_000
"""Operations held, as members and as operations in no conflict each; the least
recently used conflicts and operations go first."""


class Latest(NamedTuple):
    """A conflict's member count, its latest members (newest first), and those members
    as its last message showed them."""

    member_count: int
    views: list[OpView]
    shown: dict[str, Rendered]


class MemberCache:
    def __init__(self, max_views: int = MAX_VIEWS) -> None:
        self.max_views = max_views
        self._latest: OrderedDict[str, Latest] = OrderedDict()
        self._held = 0
        self._ops: OrderedDict[str, OpView] = OrderedDict()
        self._staged_latest: dict[str, Latest] = {}
        self._staged_gone: list[str] = []
        self._staged_ops: list[OpView] = []
        self._staged_joined: list[str] = []

    def latest(self, conflict_id: str, member_count: int) -> list[OpView] | None:
        """The conflict's latest members (newest first) when it has `member_count`."""
        found = self._latest.get(conflict_id)
        if found is None or found.member_count != member_count:
            return None
        self._latest.move_to_end(conflict_id)
        return found.views

    def op(self, op_id: str) -> OpView | None:
        """A stored operation in no conflict (when last committed), whole."""
        return self._ops.get(op_id)

    def rendered(self, conflict_id: str, op_id: str, fields: tuple[str, ...]) -> msgspec.Raw | None:
        """A member's JSON, as the conflict's last message showed it for `fields`."""
        found = self._latest.get(conflict_id)
        shown = found.shown.get(op_id) if found is not None else None
        return shown[1] if shown is not None and shown[0] == fields else None

    def stage(
        self,
        latest: dict[str, Latest],
        gone: Iterable[str],
        loose: Sequence[OpView],
        joined: Iterable[str],
    ) -> None:
        """What the transaction under way will have made true once committed: the
        latest members of the conflicts it touched, the conflicts it merged away, the
        operations it stored that are in no conflict, and those that joined one."""
        self._staged_latest = latest
        self._staged_gone = list(gone)
        self._staged_ops = list(loose)
        self._staged_joined = list(joined)

    def commit(self) -> None:
        for conflict_id in self._staged_gone:
            self._forget(conflict_id)
        for conflict_id, entry in self._staged_latest.items():
            self._forget(conflict_id)
            self._latest[conflict_id] = entry
            self._held += len(entry.views)
        while self._held > self.max_views and self._latest:
            _conflict_id, entry = self._latest.popitem(last=False)
            self._held -= len(entry.views)
        for op_id in self._staged_joined:
            self._ops.pop(op_id, None)
        for op in self._staged_ops:
            self._ops[op.op_id] = op
        while len(self._ops) > self.max_views:
            self._ops.popitem(last=False)
        self.drop()

    def drop(self) -> None:
        self._staged_latest, self._staged_gone = {}, []
        self._staged_ops, self._staged_joined = [], []

    def _forget(self, conflict_id: str) -> None:
        found = self._latest.pop(conflict_id, None)
        if found is not None:
            self._held -= len(found.views)
