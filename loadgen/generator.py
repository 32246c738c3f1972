"""Simulated field devices: a deterministic generator of sync payloads.

`generate(GeneratorOptions(...))` yields `Payload`s: the bytes a device would
publish on `<root>/devices/<device_id>/sync`, with the results the gateway must
answer for them (`expected`). Same options (and seed), same payloads, byte for
byte, when the clock is the simulated one (the default); with a live clock only
the times differ, never which payloads are made. No broker, no clock, no I/O:
bulk loaders, benchmarks and ML training sets use it as it is, and
`loadgen.runner` (the `fieldgate simulate` command) publishes it.

The stream is meant to look like crews at work: tasks, work orders, assets
and attendance records, created, edited field by field (old and new values
that follow each entity's state) and now and then deleted; a few hot
entities take most edits, so devices really do edit the same things; a share
of deliberately concurrent edits (two devices, one entity and field, seconds
apart), batches as an offline device syncs its backlog, and a share of bad
payloads (not JSON, wrong types, unknown entity types).
"""

from __future__ import annotations

import random
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from handlers.times import DAY_US, rfc3339

Status = Literal["stored", "duplicate", "rejected"]
Kind = Literal["single", "batch", "concurrent", "duplicate", "malformed"]

DEFAULT_ENTITY_TYPES: tuple[str, ...] = ("task", "work_order", "asset", "attendance")
_TYPE_WEIGHTS = {"task": 0.4, "work_order": 0.3, "asset": 0.2, "attendance": 0.1}
_ID_PREFIX = {"task": "task", "work_order": "wo", "asset": "asset", "attendance": "att"}

# Fields each entity type has, and how often an update touches each one
# (status and assignment change most: that is where crews collide).
_FIELDS: dict[str, dict[str, float]] = {
    "task": {
        "status": 5,
        "assigned_to": 3,
        "priority": 2,
        "due_at": 2,
        "notes": 2,
        "location": 1,
    },
    "work_order": {
        "status": 5,
        "assigned_to": 3,
        "priority": 2,
        "due_at": 1,
        "location": 1,
        "notes": 2,
        "parts_used": 1,
    },
    "asset": {
        "status": 4,
        "location": 3,
        "meter_reading": 2,
        "last_inspected_at": 1,
        "notes": 1,
    },
    "attendance": {
        "check_in": 3,
        "check_out": 3,
        "status": 2,
        "location": 1,
        "notes": 1,
    },
}
_GENERIC_FIELDS = {"status": 3, "notes": 2, "location": 1}
_STATUSES = {
    "task": ("open", "in_progress", "blocked", "done", "cancelled"),
    "work_order": ("new", "scheduled", "in_progress", "on_hold", "completed", "cancelled"),
    "asset": ("in_service", "maintenance", "out_of_service", "retired"),
    "attendance": ("present", "late", "absent", "on_leave"),
}
_GENERIC_STATUSES = ("active", "inactive")
_PRIORITIES = ("low", "medium", "high", "urgent")
_NOTES = (
    "replaced filter, pressure back to normal",
    "customer not on site, rescheduled",
    "waiting for parts",
    "leak at valve 3, isolated",
    "checked wiring, no fault found",
    "needs a second technician",
    "access road flooded",
    "photos attached",
    "meter replaced",
    "cleaned and tested",
    "safety barrier installed",
    "handover to night shift",
)
_PARTS = ("filter-a12", "valve-dn50", "gasket-kit", "fuse-16a", "belt-v38", "sensor-pt100")
_FIRST = (
    "maria", "james", "aisha", "wei", "olga", "carlos", "fatima", "john", "priya", "lukas",
    "amina", "diego", "sofia", "kenji", "nora", "omar", "elena", "tom", "zara", "piotr",
)  # fmt: skip
_LAST = (
    "garcia", "smith", "khan", "chen", "ivanova", "silva", "ali", "murphy", "patel", "weber",
    "okafor", "lopez", "rossi", "tanaka", "berg", "haddad", "novak", "brown", "ahmed", "kowalski",
)  # fmt: skip
_PLATFORMS = (("android", ("13", "14", "15")), ("ios", ("17.5", "18.1")), ("windows", ("11",)))
_APP_VERSIONS = ("3.12.0", "3.12.4", "3.13.1", "3.14.0")
_NETWORKS = ("wifi", "cellular", "cellular", "wifi", "offline")
_CONTENDED = {"status", "assigned_to", "priority", "location", "check_in", "check_out"}

DEFAULT_START_US = 1_767_600_000_000_000
"""2026-01-05T08:00:00Z: where the simulated clock starts (a Monday morning)."""

_MINUTE_US = 60_000_000


def device_time(us: int) -> str:
    """A time as device apps write it: RFC 3339 UTC to the millisecond."""
    return rfc3339(us, 3)


def random_seed() -> int:
    return random.SystemRandom().randrange(2**31)


@dataclass(frozen=True)
class GeneratorOptions:
    """What to generate. Shares are per payload; all defaults are realistic ones."""

    devices: int = 10
    entities: int = 1000
    hot_share: float = 0.05
    """Share of the entities that are hot..."""
    hot_weight: float = 0.8
    """...and the share of edits that go to them."""
    batch_share: float = 0.2
    max_batch: int = 20
    conflict_share: float = 0.1
    """Share of steps that are a deliberately concurrent pair of edits."""
    malformed_share: float = 0.01
    malformed_batches: bool = True
    """Whether a malformed payload may be a batch with one bad operation in it."""
    duplicate_share: float = 0.0
    """Share of good payloads that the device sends again a little later."""
    seed: int = 0
    entity_types: tuple[str, ...] = DEFAULT_ENTITY_TYPES
    device_prefix: str = "sim-"
    start_us: int = DEFAULT_START_US
    """Start of the simulated clock (used when no live clock is given)."""
    payloads_per_s: float = 5.0
    """Mean pace of the simulated clock, all devices together."""
    max_ops: int | None = None
    """Stop after exactly this many operations (a malformed payload counts as one)."""
    base_version_share: float = 0.7
    device_meta_share: float = 0.5
    scenario: Literal["default", "causal"] = "default"
    """Which stream `fieldgate simulate` sends: this module's, or the causal scenario's
    (loadgen/causal.py: conflicts from causes a model can learn; of these options it
    takes devices, entities, seed, max_ops, the clock's, max_batch, device_prefix and
    entity_types)."""

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError("devices must be at least 1")
        if self.entities < 1:
            raise ValueError("entities must be at least 1")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if not self.entity_types:
            raise ValueError("entity_types must not be empty")
        for name in (
            "hot_share",
            "hot_weight",
            "batch_share",
            "conflict_share",
            "malformed_share",
            "duplicate_share",
            "base_version_share",
            "device_meta_share",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {value}")
        if self.max_ops is not None and self.max_ops < 0:
            raise ValueError("max_ops must not be negative")


@dataclass(frozen=True, slots=True)
class Expected:
    """One result the gateway must answer: `op_id` is None for a payload it cannot read."""

    op_id: str | None
    status: Status
    code: str | None = None


@dataclass(frozen=True, slots=True)
class Payload:
    """One message a device publishes, with what the gateway must answer for it."""

    device_id: str
    body: bytes
    kind: Kind
    expected: tuple[Expected, ...]
    ops: tuple[dict[str, Any], ...] = ()
    """The valid operations in it, as sent (for bulk loading and training data)."""
    concurrent_with: str | None = None
    """For the second edit of a deliberate concurrent pair: the first one's op_id."""

    @property
    def n_ops(self) -> int:
        return len(self.expected)

    def topic(self, root: str) -> str:
        return f"{root}/devices/{self.device_id}/sync"

    def count(self, status: Status) -> int:
        return sum(1 for result in self.expected if result.status == status)


@dataclass
class _Device:
    device_id: str
    users: list[str]
    platform: str
    os_version: str
    app_version: str
    session_id: str
    network: str = "wifi"


@dataclass
class _Entity:
    entity_type: str
    slot: int
    generation: int = 0
    exists: bool = False
    version: int = 0
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def entity_id(self) -> str:
        base = f"{_ID_PREFIX.get(self.entity_type, self.entity_type)}-{self.slot:06d}"
        return f"{base}.{self.generation}" if self.generation else base


class Generator:
    """The stream of payloads for one seed; iterate it, or call `next_payloads()`."""

    def __init__(self, options: GeneratorOptions, clock: Callable[[], int] | None = None) -> None:
        self.options = options
        self._live_clock = clock
        self._rng = random.Random(options.seed)
        # The simulated clock draws from its own stream, so a live clock changes
        # the times in the payloads and nothing else.
        self._clock_rng = random.Random(options.seed ^ 0x5EED_C10C)
        self._sim_us = options.start_us
        self._ops_made = 0
        self._resend: deque[tuple[int, Payload]] = deque()
        self._step = 0
        rng = self._rng
        users = self._user_pool(max(8, options.devices + options.devices // 4))
        self.users = users
        self.devices: list[_Device] = []
        for index in range(options.devices):
            platform, versions = rng.choice(_PLATFORMS)
            owners = [users[index % len(users)]]
            if rng.random() < 0.2:  # a shared tablet
                owners.append(rng.choice(users))
            self.devices.append(
                _Device(
                    device_id=f"{options.device_prefix}{index + 1}",
                    users=owners,
                    platform=platform,
                    os_version=rng.choice(versions),
                    app_version=rng.choice(_APP_VERSIONS),
                    session_id=self._uuid(),
                )
            )
        types = list(options.entity_types)
        weights = [_TYPE_WEIGHTS.get(t, 0.1) for t in types]
        self.entities = [
            _Entity(rng.choices(types, weights)[0], slot) for slot in range(options.entities)
        ]
        self.hot = max(1, round(options.entities * options.hot_share))
        self.sites = [f"site-{n:02d}" for n in range(1, 13)]

    def __iter__(self) -> Iterator[Payload]:
        while True:
            batch = self.next_payloads()
            if not batch:
                return
            yield from batch

    @property
    def ops_made(self) -> int:
        return self._ops_made

    # -- helpers -------------------------------------------------------------

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _user_pool(self, n: int) -> list[str]:
        names = [f"{first}.{last}" for first in _FIRST for last in _LAST]
        self._rng.shuffle(names)
        pool = names[:n]
        serial = 2
        while len(pool) < n:
            pool.extend(f"{name}{serial}" for name in names[: n - len(pool)])
            serial += 1
        return pool

    def _now(self) -> int:
        if self._live_clock is not None:
            return self._live_clock()
        return self._sim_us

    def _tick(self) -> None:
        gap_s = self._clock_rng.expovariate(self.options.payloads_per_s)
        self._sim_us += int(gap_s * 1_000_000)

    def _remaining(self) -> int | None:
        limit = self.options.max_ops
        return None if limit is None else limit - self._ops_made

    def _pick_entity(self, existing: bool = False) -> _Entity:
        rng = self._rng
        n = len(self.entities)
        for _ in range(8):
            if self.hot >= n or rng.random() < self.options.hot_weight:
                entity = self.entities[rng.randrange(self.hot)]
            else:
                entity = self.entities[rng.randrange(self.hot, n)]
            if entity.exists or not existing:
                return entity
        return entity

    def _value(self, entity: _Entity, name: str, now_us: int) -> Any:
        rng = self._rng
        kind = entity.entity_type
        if name == "status":
            return rng.choice(_STATUSES.get(kind, _GENERIC_STATUSES))
        if name == "assigned_to":
            return rng.choice(self.users)
        if name == "priority":
            return rng.randint(1, 4) if kind == "task" else rng.choice(_PRIORITIES)
        if name == "due_at":
            day = (now_us // DAY_US + rng.randint(1, 14)) * DAY_US
            return device_time(day + 17 * 3600 * 1_000_000)
        if name == "notes":
            return rng.choice(_NOTES)
        if name == "location":
            site = rng.choice(self.sites)
            if kind == "asset":
                lat = round(48.1 + rng.random() * 0.2, 5)
                lon = round(11.5 + rng.random() * 0.2, 5)
                return {"site": site, "lat": lat, "lon": lon}
            return site
        if name == "parts_used":
            return sorted(rng.sample(_PARTS, rng.randint(1, 3)))
        if name == "meter_reading":
            previous = entity.values.get("meter_reading")
            base = previous if isinstance(previous, float) else 1000.0
            return round(base + rng.random() * 50, 1)
        if name in ("check_in", "check_out", "last_inspected_at"):
            return device_time(now_us - rng.randint(0, 90) * _MINUTE_US)
        return rng.choice(_NOTES)

    def _new_value(self, entity: _Entity, name: str, now_us: int, avoid: Any = None) -> Any:
        old = entity.values.get(name)
        value = self._value(entity, name, now_us)
        for _ in range(4):
            if value not in (old, avoid):
                break
            value = self._value(entity, name, now_us)
        return value

    def _fields(self, entity: _Entity) -> Mapping[str, float]:
        return _FIELDS.get(entity.entity_type, _GENERIC_FIELDS)

    def _op(
        self,
        device: _Device,
        entity: _Entity,
        operation: str,
        changes: dict[str, dict[str, Any]],
        edited_at_us: int,
        base_version: int | None,
    ) -> dict[str, Any]:
        rng = self._rng
        op: dict[str, Any] = {
            "op_id": self._uuid(),
            "user_id": rng.choice(device.users),
            "entity_type": entity.entity_type,
            "entity_id": entity.entity_id,
            "operation": operation,
            "changes": changes,
            "edited_at": device_time(edited_at_us),
            "session_id": device.session_id,
        }
        if base_version is not None:
            op["base_version"] = base_version
        if rng.random() < self.options.device_meta_share:
            op["device"] = {
                "platform": device.platform,
                "os_version": device.os_version,
                "app_version": device.app_version,
                "network": device.network,
            }
        return op

    def _edit(self, device: _Device, entity: _Entity, edited_at_us: int) -> dict[str, Any]:
        """The next edit of `entity` by `device`; the entity's state follows it."""
        rng = self._rng
        with_base = rng.random() < self.options.base_version_share
        if not entity.exists:
            fields = list(self._fields(entity))
            chosen = fields[: rng.randint(min(2, len(fields)), len(fields))]
            new = {name: self._value(entity, name, edited_at_us) for name in chosen}
            changes = {name: {"old": None, "new": value} for name, value in new.items()}
            op = self._op(device, entity, "create", changes, edited_at_us, None)
            entity.exists, entity.values, entity.version = True, new, entity.version + 1
            return op
        if rng.random() < 0.02:
            op = self._op(
                device,
                entity,
                "delete",
                {},
                edited_at_us,
                entity.version if with_base else None,
            )
            # The slot comes back later as a new entity (a new id).
            entity.exists, entity.values, entity.version = False, {}, 0
            entity.generation += 1
            return op
        weights = self._fields(entity)
        names = list(weights)
        k = 1 if rng.random() < 0.7 else rng.randint(2, min(3, len(names)))
        chosen = []
        while len(chosen) < k:
            name = rng.choices(names, [weights[n] for n in names])[0]
            if name not in chosen:
                chosen.append(name)
        changes = {}
        for name in chosen:
            value = self._new_value(entity, name, edited_at_us)
            changes[name] = {"old": entity.values.get(name), "new": value}
            entity.values[name] = value
        op = self._op(
            device, entity, "update", changes, edited_at_us, entity.version if with_base else None
        )
        entity.version += 1
        return op

    def _maybe_change_network(self, device: _Device) -> None:
        rng = self._rng
        if rng.random() < 0.05:
            device.network = rng.choice(_NETWORKS)
        if rng.random() < 0.01:
            device.session_id = self._uuid()

    # -- payload kinds -------------------------------------------------------

    def next_payloads(self) -> list[Payload]:
        """The next step of the stream: one payload, or a concurrent pair; [] at the end."""
        remaining = self._remaining()
        if remaining is not None and remaining <= 0:
            return []
        self._step += 1
        self._tick()
        rng = self._rng
        opts = self.options
        if self._resend and self._resend[0][0] <= self._step:
            _, original = self._resend.popleft()
            if remaining is None or original.n_ops <= remaining:
                return [self._account(self._as_resend(original))]
        device = rng.choice(self.devices)
        self._maybe_change_network(device)
        roll = rng.random()
        if roll < opts.malformed_share:
            is_batch = rng.random() < opts.batch_share and opts.max_batch > 1
            is_batch = is_batch and opts.malformed_batches
            out = [self._malformed_batch(device) if is_batch else self._malformed(device)]
        elif roll < opts.malformed_share + opts.conflict_share and opts.devices > 1:
            out = self._concurrent(device)
        elif rng.random() < opts.batch_share and opts.max_batch > 1:
            out = [self._batch(device)]
        else:
            out = [self._single(device)]
        out = self._trim(out)
        for payload in out:
            self._account(payload)
            if (
                payload.kind != "malformed"
                and opts.duplicate_share
                and rng.random() < opts.duplicate_share
            ):
                self._resend.append((self._step + rng.randint(1, 20), payload))
        return out

    def _trim(self, out: list[Payload]) -> list[Payload]:
        remaining = self._remaining()
        if remaining is None:
            return out
        kept: list[Payload] = []
        for payload in out:
            if payload.n_ops <= remaining:
                kept.append(payload)
                remaining -= payload.n_ops
            elif remaining > 0 and payload.kind == "batch":
                kept.append(self._cut_batch(payload, remaining))
                remaining = 0
        return kept

    def _account(self, payload: Payload) -> Payload:
        self._ops_made += payload.n_ops
        return payload

    def _single(self, device: _Device) -> Payload:
        op = self._edit(device, self._pick_entity(), self._now())
        return Payload(
            device.device_id,
            msgspec.json.encode(op),
            "single",
            (Expected(op["op_id"], "stored"),),
            (op,),
        )

    def _batch_ops(self, device: _Device) -> list[dict[str, Any]]:
        """An offline device's backlog: edits over the last minutes, oldest first."""
        rng = self._rng
        size = rng.randint(2, self.options.max_batch)
        now = self._now()
        offsets = sorted((rng.randint(0, 240_000_000) for _ in range(size)), reverse=True)
        return [self._edit(device, self._pick_entity(), now - offset) for offset in offsets]

    def _batch(self, device: _Device) -> Payload:
        ops = self._batch_ops(device)
        batch_id = f"b-{self._uuid()[:13]}"
        body = msgspec.json.encode({"batch_id": batch_id, "ops": ops})
        expected = tuple(Expected(op["op_id"], "stored") for op in ops)
        return Payload(device.device_id, body, "batch", expected, tuple(ops))

    def _cut_batch(self, payload: Payload, keep: int) -> Payload:
        """The first `keep` operations of a batch (to land exactly on `max_ops`)."""
        decoded = msgspec.json.decode(payload.body)
        decoded["ops"] = decoded["ops"][:keep]
        kept_ids = {op["op_id"] for op in decoded["ops"] if isinstance(op, dict)}
        expected = tuple(e for e in payload.expected if e.op_id in kept_ids)
        ops = tuple(op for op in payload.ops if op["op_id"] in kept_ids)
        return Payload(payload.device_id, msgspec.json.encode(decoded), payload.kind, expected, ops)

    def _as_resend(self, original: Payload) -> Payload:
        expected = tuple(Expected(e.op_id, "duplicate") for e in original.expected)
        return Payload(original.device_id, original.body, "duplicate", expected, ())

    def _concurrent(self, first_device: _Device) -> list[Payload]:
        """Two devices edit the same field of the same entity, seconds apart."""
        rng = self._rng
        others = [d for d in self.devices if d is not first_device]
        second_device = rng.choice(others)
        entity = self._pick_entity(existing=True)
        now = self._now()
        if not entity.exists:  # nothing exists yet: an ordinary edit
            return [self._single(first_device)]
        contended = [n for n in self._fields(entity) if n in _CONTENDED] or list(
            self._fields(entity)
        )
        name = rng.choice(contended)
        old = entity.values.get(name)
        new_a = self._new_value(entity, name, now)
        new_b = self._new_value(entity, name, now, avoid=new_a)
        base = entity.version if rng.random() < self.options.base_version_share else None
        first_at = now - rng.randint(500_000, 5_000_000)
        op_a = self._op(
            first_device,
            entity,
            "update",
            {name: {"old": old, "new": new_a}},
            first_at,
            base,
        )
        op_b = self._op(
            second_device,
            entity,
            "update",
            {name: {"old": old, "new": new_b}},
            now,
            base,
        )
        entity.values[name] = new_b
        entity.version += 2
        return [
            Payload(
                first_device.device_id,
                msgspec.json.encode(op_a),
                "concurrent",
                (Expected(op_a["op_id"], "stored"),),
                (op_a,),
            ),
            Payload(
                second_device.device_id,
                msgspec.json.encode(op_b),
                "concurrent",
                (Expected(op_b["op_id"], "stored"),),
                (op_b,),
                concurrent_with=op_a["op_id"],
            ),
        ]

    def _corrupt(self, op: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """An operation made wrong the way buggy clients make it wrong."""
        rng = self._rng
        bad = dict(op)
        choice = rng.randrange(6)
        if choice == 0:
            bad["entity_type"] = rng.choice(("vehicle", "invoice", "Task", "work-order"))
            return bad, "unknown_entity_type"
        if choice == 1:
            bad["changes"] = "status=done"
            return bad, "schema"
        if choice == 2:
            bad["edited_at"] = (self._now() // 1_000_000) if rng.random() < 0.5 else "yesterday"
            return bad, "schema"
        if choice == 3:
            bad["edited_at"] = bad["edited_at"].removesuffix("Z").split(".")[0]
            return bad, "schema"
        if choice == 4:
            bad.pop("user_id")
            return bad, "schema"
        bad["base_version"] = str(rng.randint(1, 40))
        return bad, "schema"

    def _malformed(self, device: _Device) -> Payload:
        rng = self._rng
        entity = self._pick_entity()
        fields = self._fields(entity)
        name = next(iter(fields))
        # A throwaway op built on a copy of the state: the entity does not change.
        shadow = _Entity(entity.entity_type, entity.slot, entity.generation, True)
        shadow.values = dict(entity.values)
        shadow.version = entity.version
        op = self._op(
            device,
            shadow,
            "update",
            {name: {"old": shadow.values.get(name), "new": self._value(shadow, name, 0)}},
            self._now(),
            None,
        )
        style = rng.randrange(4)
        if style == 0:  # cut off mid-way: not JSON at all
            body = msgspec.json.encode(op)
            body = body[: rng.randint(10, max(11, len(body) - 5))]
            return Payload(
                device.device_id, body, "malformed", (Expected(None, "rejected", "malformed"),)
            )
        if style == 1:  # JSON, but not an object
            body = msgspec.json.encode([op["op_id"], op["entity_id"]])
            return Payload(
                device.device_id, body, "malformed", (Expected(None, "rejected", "malformed"),)
            )
        bad, code = self._corrupt(op)
        return Payload(
            device.device_id,
            msgspec.json.encode(bad),
            "malformed",
            (Expected(op["op_id"], "rejected", code),),
        )

    def _malformed_batch(self, device: _Device) -> Payload:
        """A batch in which one operation is bad: it alone is rejected."""
        rng = self._rng
        ops = self._batch_ops(device)
        victim = rng.randrange(len(ops))
        bad, code = self._corrupt(ops[victim])
        sent = [*ops[:victim], bad, *ops[victim + 1 :]]
        # The bad one was applied to the entity's state by _edit; the state is a
        # guess of the device's anyway, and a rejected edit is one it must redo.
        body = msgspec.json.encode({"batch_id": f"b-{self._uuid()[:13]}", "ops": sent})
        expected = tuple(
            Expected(op["op_id"], "rejected", code)
            if i == victim
            else Expected(op["op_id"], "stored")
            for i, op in enumerate(ops)
        )
        good = tuple(op for i, op in enumerate(ops) if i != victim)
        return Payload(device.device_id, body, "malformed", expected, good)


def generate(
    options: GeneratorOptions, clock: Callable[[], int] | None = None
) -> Iterator[Payload]:
    """The payloads for `options`, deterministic from `options.seed`.

    `clock` (microseconds since the epoch) gives live edit times; without it the
    times come from a simulated clock that starts at `options.start_us`. Ends
    after `options.max_ops` operations, or never.
    """
    return iter(Generator(options, clock))


def expected_totals(payloads: Sequence[Payload]) -> dict[str, int]:
    totals = {"stored": 0, "duplicate": 0, "rejected": 0}
    for payload in payloads:
        for result in payload.expected:
            totals[result.status] += 1
    return totals
