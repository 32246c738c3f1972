"""Per entity and field, what the detector must know of recent edits: the window summary.

A new edit of field f (device d, new value v, edited at t) collides on f with a
stored edit of f from another device, with another value, edited within the
window of t. Comparing it with every such edit costs what the window holds: a
hot field edited by ten devices 50,000 times in five minutes would cost the
square of its edits. The summary answers the same question from a bounded
state, exactly:

- per conflict (group) and device, two marks of that device's edits of f in
  the group: the latest (`last`) and the latest whose value differs from it
  (`diff`). Whether the device has an edit at or after `a` whose value is not
  `v` needs nothing else: if `last` is before `a`, none; if `last`'s value is
  not `v`, yes; otherwise `diff` is the latest edit with another value than
  `v`, and the answer is whether it is at or after `a`;
- the edits of operations that are in no conflict yet (`loose`), one by one:
  when a new edit collides with one, that operation joins the conflict.

It holds every edit of the entity edited at or after the entity's
`summary_from` (storage keeps that bound); an edit whose window reaches before
it, or past the field's latest edit (`high`) by more than the window, is
answered from the database instead (storage/conflicts.py, the slow path).
"""

from __future__ import annotations

import msgspec


# gc=False: a plain record (no reference back to what holds it), kept by the thousand in
# the engine's caches, which the collector would otherwise walk at every collection
# (docs/decisions/0019-small-batches.md).
class Mark(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One edit of the field: when it was made, and its new value's key (`value_key`)."""

    at_us: int
    value: str


class Marks(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A device's edits of the field within one group: the latest, and the latest whose
    value differs from the latest one's."""

    last: Mark
    diff: Mark | None = None

    def hits(self, value: str, since_us: int) -> bool:
        """Whether an edit at or after `since_us` has a value other than `value`."""
        if self.last.at_us < since_us:
            return False
        if self.last.value != value:
            return True
        return self.diff is not None and self.diff.at_us >= since_us

    def add(self, mark: Mark) -> Marks:
        if mark.at_us >= self.last.at_us:
            if mark.value != self.last.value:
                return Marks(mark, self.last)
            return Marks(mark, self.diff)
        if mark.value != self.last.value and (self.diff is None or mark.at_us > self.diff.at_us):
            return Marks(self.last, mark)
        return self

    def merge(self, other: Marks) -> Marks:
        ours, theirs = (self, other) if self.last.at_us >= other.last.at_us else (other, self)
        value = ours.last.value
        candidate = theirs.last if theirs.last.value != value else theirs.diff
        diff = ours.diff
        if candidate is not None and (diff is None or candidate.at_us > diff.at_us):
            diff = candidate
        return Marks(ours.last, diff)


class Loose(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """An edit of the field by an operation that is in no conflict (yet)."""

    at_us: int
    device_id: str
    value: str
    op_id: str
    user_id: str
    version: int


class FieldWindow(msgspec.Struct, gc=False):
    """The summary of one field of one entity (see the module's docstring)."""

    high: int | None = None
    """The latest `edited_at` of an edit of the field; None before the first."""
    groups: dict[str, dict[str, Marks]] = msgspec.field(default_factory=dict)
    """conflict_id -> device_id -> marks."""
    loose: list[Loose] = msgspec.field(default_factory=list)

    def hits(self, device_id: str, value: str, since_us: int) -> tuple[set[str], list[Loose]]:
        """The groups and loose edits that an edit (`device_id`, `value`) collides with
        on this field, among edits made at or after `since_us`."""
        groups = {
            conflict_id
            for conflict_id, devices in self.groups.items()
            if any(d != device_id and m.hits(value, since_us) for d, m in devices.items())
        }
        loose = [
            e
            for e in self.loose
            if e.device_id != device_id and e.value != value and e.at_us >= since_us
        ]
        return groups, loose

    def seen(self, at_us: int) -> None:
        self.high = at_us if self.high is None else max(self.high, at_us)

    def add_member(self, conflict_id: str, device_id: str, mark: Mark) -> None:
        self.seen(mark.at_us)
        devices = self.groups.setdefault(conflict_id, {})
        known = devices.get(device_id)
        devices[device_id] = Marks(mark) if known is None else known.add(mark)

    def add_loose(self, edit: Loose) -> None:
        self.seen(edit.at_us)
        self.loose.append(edit)

    def drop_loose(self, edit: Loose) -> None:
        """The operation of a loose edit joined a conflict: the edit is a member's now."""
        self.loose.remove(edit)

    def fold(self, absorbed: str, into: str) -> None:
        """Group `absorbed` merged into `into`: its marks become `into`'s."""
        gone = self.groups.pop(absorbed, None)
        if not gone:
            return
        devices = self.groups.setdefault(into, {})
        for device_id, marks in gone.items():
            known = devices.get(device_id)
            devices[device_id] = marks if known is None else known.merge(marks)

    def prune(self, since_us: int) -> None:
        """Forget what lies before `since_us`: the entity's summary starts there now."""
        self.loose = [e for e in self.loose if e.at_us >= since_us]
        for conflict_id in list(self.groups):
            devices = {
                d: m for d, m in self.groups[conflict_id].items() if m.last.at_us >= since_us
            }
            if devices:
                self.groups[conflict_id] = devices
            else:
                del self.groups[conflict_id]


windows_decoder = msgspec.json.Decoder(dict[str, FieldWindow])
"""An entity's windows, field by field, as storage keeps them."""
