"""The causal scenario: conflicts that arise from causes a model can learn.

The default scenario makes conflicts on purpose (a share of deliberate concurrent
pairs), so nothing about an edit says whether it will collide: a model trained on it
can only learn noise. Here nothing is forced. Devices edit, and conflicts come out of
the real detection rules (docs/conflicts.md) because of four causes, each with a
strength set in `Causes` (docs/ml.md, "The causal scenario", has their measured
effect):

- **offline devices**: a device drops out of coverage for hours, keeps working,
  and syncs its backlog when it comes back: old `edited_at`, and a `base_version`
  from before it left, so every edit of the same field stored meanwhile collides
  with it (`hours_since_last_sync` is high for the whole backlog);
- **hot entities**: a few entities take a large share of the edits, so their edits
  meet others within the window (`concurrent_editors`, `entity_edit_frequency`);
- **careless users**: a few users never send `base_version`, so their edits collide
  with any other device's edit of the field within the window, where a careful
  user's edit, which names the version it saw, does not (`user_conflict_rate`);
- **fields edited together**: dispatch fields (status, assignment, priority) are
  edited together and set to values crews disagree on; observed fields (a meter
  reading, a check-in time) are set to what everyone observes, so concurrent edits of
  them agree and do not collide (`field_overlap_score`).

Deterministic by seed, like the default scenario. With the simulated clock (the
default) each payload is sent at `clock_us`, which a bulk loader uses as the
receipt time; with a live clock (`fieldgate simulate`), offline backlogs are
backdated by their simulated hours, but the gateway stamps receipt with the real
time, so `hours_since_last_sync` only grows with the real length of the run.
"""

from __future__ import annotations

import bisect
import heapq
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from loadgen.generator import Expected, GeneratorOptions, Payload, device_time

_SECOND_US = 1_000_000
_HOUR_US = 3600 * _SECOND_US

_TYPE_WEIGHTS = {"task": 0.4, "work_order": 0.3, "asset": 0.2, "attendance": 0.1}
_ID_PREFIX = {"task": "task", "work_order": "wo", "asset": "asset", "attendance": "att"}

# Per type, the groups of fields one edit changes together, and how often each group
# is edited. Dispatch groups (status with assignment or priority) are where crews
# collide; observed fields are set to what the crew reads off the world.
_GROUPS: dict[str, tuple[tuple[tuple[str, ...], float], ...]] = {
    "task": (
        (("status", "assigned_to"), 3),
        (("status",), 3),
        (("priority", "due_at"), 2),
        (("notes",), 2),
    ),
    "work_order": (
        (("status", "assigned_to", "priority"), 3),
        (("status",), 2),
        (("parts_used",), 2),
        (("notes",), 2),
    ),
    "asset": (
        (("status", "location"), 2),
        (("meter_reading",), 4),
        (("last_inspected_at",), 2),
        (("notes",), 1),
    ),
    "attendance": (
        (("check_in",), 4),
        (("check_out",), 4),
        (("status",), 1),
    ),
}
_GENERIC_GROUPS: tuple[tuple[tuple[str, ...], float], ...] = ((("status",), 1), (("notes",), 1))
_OBSERVED = frozenset({"meter_reading", "last_inspected_at", "check_in", "check_out"})
"""Fields whose new value is what the world shows this hour: concurrent edits agree."""
_CHOICES: dict[str, tuple[Any, ...]] = {
    "status": ("open", "in_progress", "blocked", "done", "cancelled"),
    "priority": ("low", "medium", "high", "urgent"),
    "notes": (
        "waiting for parts",
        "customer not on site",
        "leak isolated",
        "no fault found",
        "needs a second technician",
        "photos attached",
    ),
    "parts_used": ("filter-a12", "valve-dn50", "gasket-kit", "fuse-16a"),
    "location": ("depot-north", "depot-south", "site-a", "site-b", "site-c"),
}


@dataclass(frozen=True)
class Causes:
    """The strength of each cause. The defaults are the documented scenario."""

    hot_entities: float = 0.02
    """Share of the entities that are hot..."""
    hot_edits: float = 0.3
    """...and the share of online edits that go to them."""
    careless_users: float = 0.1
    """Share of the users who never send `base_version` (at least one)."""
    offline_share: float = 0.1
    """Long-run share of device time spent out of coverage."""
    offline_hours: tuple[float, float] = (1.0, 8.0)
    """An outage lasts a uniform draw from this range."""
    offline_edit_every_s: float = 180.0
    """A device out of coverage makes an edit every this many seconds, on average."""
    online_delay_s: float = 20.0
    """An online device syncs an edit within this many seconds of making it."""
    view_age_s: float = 120.0
    """A careful user's `base_version` is the version the entity had when the screen
    was opened, up to this many seconds before the edit: on a hot entity, others have
    often stored an edit since."""

    def __post_init__(self) -> None:
        for name in ("hot_entities", "hot_edits", "careless_users"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if not 0.0 <= self.offline_share < 1.0:
            raise ValueError("offline_share must be at least 0 and below 1")
        low, high = self.offline_hours
        if not 0.0 < low <= high:
            raise ValueError("offline_hours must be an increasing range of positive hours")


@dataclass
class Device:
    """A crew's device and its one user."""

    device_id: str
    user_id: str
    careless: bool
    offline_since: int | None = None


@dataclass
class _Entity:
    entity_type: str
    entity_id: str
    created_us: int | None = None
    version: int = 0
    values: dict[str, Any] = field(default_factory=dict)
    times: list[int] = field(default_factory=list)
    """When (simulated) each version was stored: the version a device saw at a time."""

    def version_at(self, at_us: int) -> int:
        return bisect.bisect_right(self.times, at_us)


class CausalGenerator:
    """The stream of payloads of the causal scenario for one seed.

    Takes `GeneratorOptions` for what the scenarios share (devices, entities, seed,
    `max_ops`, the simulated clock's start and pace, `max_batch`, `device_prefix`,
    `entity_types`); its shares of malformed, duplicate, concurrent and batched
    payloads are the default scenario's and are not used here.
    """

    def __init__(
        self,
        options: GeneratorOptions,
        clock: Callable[[], int] | None = None,
        causes: Causes | None = None,
    ) -> None:
        self.options = options
        self.causes = causes = causes or Causes()
        self._live_clock = clock
        self._rng = random.Random(options.seed)
        self._clock_rng = random.Random(options.seed ^ 0xCA05A1)
        self._sim_us = options.start_us
        self._ops_made = 0
        self._returns: list[tuple[int, int]] = []
        """(back at, device index) of the devices out of coverage."""
        rng = self._rng
        careless = max(1, round(options.devices * causes.careless_users))
        flags = [i < careless for i in range(options.devices)]
        rng.shuffle(flags)
        self.devices = [
            Device(f"{options.device_prefix}{i + 1}", f"crew-{i + 1:04d}", flags[i])
            for i in range(options.devices)
        ]
        types = [t for t in options.entity_types if t in _TYPE_WEIGHTS] or list(
            options.entity_types
        )
        weights = [_TYPE_WEIGHTS.get(t, 0.1) for t in types]
        self.entities: list[_Entity] = []
        for slot in range(options.entities):
            kind = rng.choices(types, weights)[0]
            self.entities.append(_Entity(kind, f"{_ID_PREFIX.get(kind, kind)}-{slot:06d}"))
        self.hot = max(1, round(options.entities * causes.hot_entities))
        # An online device's edits come every devices / pace seconds; going offline at
        # p per edit for a mean outage D gives the share D p / (D p + interval).
        mean_outage_s = sum(causes.offline_hours) / 2 * 3600
        interval_s = options.devices / options.payloads_per_s
        share = causes.offline_share
        self._p_offline = share * interval_s / ((1 - share) * mean_outage_s) if share else 0.0

    @property
    def clock_us(self) -> int:
        """The simulated time at which the last payload was sent (its receipt time)."""
        return self._sim_us

    @property
    def ops_made(self) -> int:
        return self._ops_made

    def __iter__(self) -> Iterator[Payload]:
        while True:
            payloads = self.next_payloads()
            if not payloads:
                return
            yield from payloads

    def next_payloads(self) -> list[Payload]:
        """The next step: one online edit, or a returning device's backlog; [] at the end."""
        remaining = self._remaining()
        if remaining is not None and remaining <= 0:
            return []
        self._sim_us += int(self._clock_rng.expovariate(self.options.payloads_per_s) * 1e6)
        if self._returns and self._returns[0][0] <= self._sim_us:
            return self._backlog(self.devices[heapq.heappop(self._returns)[1]], remaining)
        device = self._online_device()
        if device is not None and self._rng.random() < self._p_offline:
            # An outage sends nothing: the step goes on with another device.
            self._go_offline(device)
            device = self._online_device()
        if device is None:
            # Every device is out of coverage: time runs on to the first return.
            back_at, index = heapq.heappop(self._returns)
            self._sim_us = max(self._sim_us, back_at)
            return self._backlog(self.devices[index], remaining)
        return [self._single(device)]

    # -- devices -------------------------------------------------------------

    def _online_device(self) -> Device | None:
        if len(self._returns) >= len(self.devices):
            return None
        while True:
            device = self._rng.choice(self.devices)
            if device.offline_since is None:
                return device

    def _go_offline(self, device: Device) -> None:
        low, high = self.causes.offline_hours
        hours = self._rng.uniform(low, high)
        device.offline_since = self._sim_us
        index = self.devices.index(device)
        heapq.heappush(self._returns, (self._sim_us + int(hours * _HOUR_US), index))

    def _backlog(self, device: Device, remaining: int | None) -> list[Payload]:
        """What a device made out of coverage, sent as batches when it is back."""
        rng = self._rng
        since = device.offline_since
        assert since is not None
        device.offline_since = None
        span_s = (self._sim_us - since) / _SECOND_US
        mean = span_s / self.causes.offline_edit_every_s
        count = max(1, round(rng.uniform(0.5, 1.5) * mean))
        if remaining is not None:
            count = min(count, remaining)
        times = sorted(rng.randint(since, self._sim_us) for _ in range(count))
        ops = []
        for edited in times:
            entity = self._pick(existing_at=since)
            if entity is None:
                continue
            base = None if device.careless else entity.version_at(since)
            ops.append(self._edit(device, entity, edited, base))
        if not ops:
            # Nothing it could edit existed when it left: back, it edits as online.
            return [self._single(device)]
        out = []
        size = self.options.max_batch
        for start in range(0, len(ops), size):
            part = ops[start : start + size]
            batch_id = f"b-{self._uuid()[:13]}"
            body = msgspec.json.encode({"batch_id": batch_id, "ops": part})
            expected = tuple(Expected(op["op_id"], "stored") for op in part)
            out.append(Payload(device.device_id, body, "batch", expected, tuple(part)))
        self._ops_made += len(ops)
        return out

    # -- edits ---------------------------------------------------------------

    def _single(self, device: Device) -> Payload:
        rng = self._rng
        entity = self._pick()
        assert entity is not None
        edited = self._sim_us - int(rng.uniform(0, self.causes.online_delay_s) * _SECOND_US)
        opened = edited - int(rng.uniform(0, self.causes.view_age_s) * _SECOND_US)
        base = None if device.careless else entity.version_at(opened)
        op = self._edit(device, entity, edited, base)
        self._ops_made += 1
        return Payload(
            device.device_id,
            msgspec.json.encode(op),
            "single",
            (Expected(op["op_id"], "stored"),),
            (op,),
        )

    def _pick(self, existing_at: int | None = None) -> _Entity | None:
        """An entity to edit: online, a hot one at `hot_edits`; out of coverage (with
        `existing_at`), one of the crew's own cold jobs that existed when it left (a
        device edits only what it has seen, and the hot ones are where the crowd is)."""
        rng = self._rng
        n = len(self.entities)
        for _ in range(8):
            if self.hot >= n or (existing_at is None and rng.random() < self.causes.hot_edits):
                entity = self.entities[rng.randrange(self.hot)]
            else:
                entity = self.entities[rng.randrange(self.hot, n)]
            if existing_at is None:
                return entity
            if entity.created_us is not None and entity.created_us <= existing_at:
                return entity
        return None

    def _edit(
        self, device: Device, entity: _Entity, edited_us: int, base: int | None
    ) -> dict[str, Any]:
        rng = self._rng
        if entity.created_us is None:
            names = [name for group, _ in self._groups(entity) for name in group]
            changes = {
                name: {"old": None, "new": self._value(entity, name, edited_us)}
                for name in dict.fromkeys(names)
            }
            operation, base = "create", None
            entity.created_us = self._sim_us
        else:
            groups = self._groups(entity)
            chosen = rng.choices([g for g, _ in groups], [w for _, w in groups])[0]
            changes = {
                name: {"old": entity.values.get(name), "new": self._value(entity, name, edited_us)}
                for name in chosen
            }
            operation = "update"
        for name, change in changes.items():
            entity.values[name] = change["new"]
        entity.version += 1
        entity.times.append(self._sim_us)
        op: dict[str, Any] = {
            "op_id": self._uuid(),
            "user_id": device.user_id,
            "entity_type": entity.entity_type,
            "entity_id": entity.entity_id,
            "operation": operation,
            "changes": changes,
            "edited_at": device_time(self._stamp(edited_us)),
        }
        if base is not None:
            op["base_version"] = base
        return op

    def _groups(self, entity: _Entity) -> tuple[tuple[tuple[str, ...], float], ...]:
        return _GROUPS.get(entity.entity_type, _GENERIC_GROUPS)

    def _value(self, entity: _Entity, name: str, edited_us: int) -> Any:
        if name in _OBSERVED:
            # What the world shows this hour: the same for every crew that looks.
            hour = edited_us // _HOUR_US
            if name == "meter_reading":
                return float(1000 + (hash_of(entity.entity_id) % 500) + hour % 100_000)
            return device_time(hour * _HOUR_US)
        if name == "assigned_to":
            return self._rng.choice(self.devices).user_id
        if name == "due_at":
            return device_time((edited_us // _HOUR_US + self._rng.randint(24, 336)) * _HOUR_US)
        return self._rng.choice(_CHOICES.get(name, _CHOICES["notes"]))

    # -- helpers -------------------------------------------------------------

    def _stamp(self, sim_us: int) -> int:
        """A simulated time as the device writes it: itself, or with a live clock, as
        far before the live now as it is before the simulated now."""
        if self._live_clock is None:
            return sim_us
        return self._live_clock() - (self._sim_us - sim_us)

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _remaining(self) -> int | None:
        limit = self.options.max_ops
        return None if limit is None else limit - self._ops_made


def hash_of(text: str) -> int:
    """A hash that is the same in every process (`hash()` of a str is salted)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(text)) % 1_000_003
