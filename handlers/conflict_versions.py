"""Per entity, its latest stored operations by version: what a `base_version` needs.

An operation X with `base_version` b is concurrent with exactly the stored
operations of its entity whose version lies above b (and below X's own). Devices
sync soon after they read: on a fleet's workload b is X's version less one or two
(docs/benchmarks.md). Reading the log for those few operations cost more than
the rest of the detection of X; the entity's summary keeps its last `KEPT`
operations instead, with what the pair rule needs of each (device, delete or not,
the fields changed and their values' keys, the conflict it is in), and X is
judged from them whenever they reach back to b. An older b reads the log.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

KEPT = 16
"""Operations kept per entity: a `base_version` further back reads the log."""


# gc=False: a plain record (no reference back to what holds it), kept by the thousand in
# the engine's caches, which the collector would otherwise walk at every collection
# (docs/decisions/0019-small-batches.md).
class Version(msgspec.Struct, array_like=True, gc=False):
    """A stored operation, as a later operation's `base_version` judges it."""

    version: int
    op_id: str
    device_id: str
    user_id: str
    operation: str
    at_us: int
    values: dict[str, str]
    """Field -> the key of its new value (`handlers.conflicts.value_key`); empty for a
    delete, whose fields are those of the other side."""
    conflict_id: str | None = None
    """The conflict it is a member of (kept current through merges); None: none yet."""


class Versions(msgspec.Struct, array_like=True, gc=False):
    """Every operation of the entity from version `since` on, the latest `KEPT` of them."""

    since: int
    ops: list[Version] = msgspec.field(default_factory=list)

    def holds(self, base_version: int) -> bool:
        """Whether every operation above `base_version` is here (or is yet to come)."""
        return self.since <= base_version + 1

    def above(self, base_version: int, below: int) -> list[Version]:
        """The operations with a version in (`base_version`, `below`)."""
        return [op for op in self.ops if base_version < op.version < below]

    def add(self, op: Version) -> None:
        """The entity's next operation; the oldest kept is forgotten past `KEPT`. One
        that does not follow the last starts the list again from itself (an operation
        stored without detection never does: the summary is rebuilt then)."""
        last = self.ops[-1].version if self.ops else self.since - 1
        if op.version != last + 1:
            self.since, self.ops = op.version, []
        self.ops.append(op)
        if len(self.ops) > KEPT:
            del self.ops[0]
            self.since = self.ops[0].version

    def join(self, op_id: str, conflict_id: str) -> None:
        """A kept operation that was in no conflict joined `conflict_id`."""
        for op in self.ops:
            if op.op_id == op_id:
                op.conflict_id = conflict_id

    def fold(self, absorbed: str, into: str) -> None:
        """Conflict `absorbed` merged into `into`: its members are `into`'s now."""
        for op in self.ops:
            if op.conflict_id == absorbed:
                op.conflict_id = into

    def ends_at(self, version: int) -> bool:
        """Whether the last operation kept is `version` (nothing stored since)."""
        return (self.ops[-1].version if self.ops else self.since - 1) == version


def colliding(
    stored: Version, device_id: str, delete: bool, values: Mapping[str, str]
) -> list[str]:
    """The sorted fields on which an operation (`device_id`, a `delete` or not, setting
    `values`) collides with `stored`, concurrent with it: the rule of
    `handlers.conflicts.colliding_fields`, with values compared by their keys (equal
    exactly when equal as JSON)."""
    if stored.device_id == device_id:
        return []
    stored_delete = stored.operation == "delete"
    if stored_delete and delete:
        return []
    if stored_delete:
        return sorted(values)
    if delete:
        return sorted(stored.values)
    theirs = stored.values
    return sorted(name for name, key in values.items() if name in theirs and theirs[name] != key)
