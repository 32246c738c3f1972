"""Sync operations: bytes from `<root>/devices/<id>/sync` to records and rejections.

Decoding is msgspec into typed Structs: it validates as it parses, reports the JSON
path of every error, and is the cheapest step of the hot path. A batch is decoded
as an envelope of raw operations first, so one bad operation rejects itself alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgspec
from msgspec import UNSET, Raw, UnsetType

from handlers.errors import (
    NUL_ESCAPE,
    NUL_MESSAGE,
    Code,
    Error,
    from_msgspec,
    nul_field,
    quarantine_record,
    refused_message,
)
from handlers.fields import AwareTime, DeviceId, Str64, Str128, Version
from handlers.records import OpRecord, QuarantineRecord
from handlers.times import OUT_OF_RANGE, in_range, now_us, to_us


class Op(msgspec.Struct):
    op_id: Str64
    user_id: Str64
    entity_type: Str64
    entity_id: Str128
    operation: Literal["create", "update", "delete"]
    edited_at: AwareTime
    changes: dict[str, Any] | UnsetType = UNSET
    device_id: DeviceId | UnsetType = UNSET
    base_version: Version | None = None
    session_id: Str128 | None = None
    device: Raw = Raw(b"")
    """Kept raw: stored as sent, and its size is known without encoding it again."""


class Envelope(msgspec.Struct):
    ops: list[Raw] | UnsetType = UNSET
    batch_id: Str64 | None = None


class OpIdOnly(msgspec.Struct):
    op_id: Any = None


class Rejected(msgspec.Struct, frozen=True):
    op_id: str | None
    error: Error


class Limits(msgspec.Struct, frozen=True):
    max_payload_bytes: int
    max_ops: int
    max_clock_skew_us: int
    max_device_meta_bytes: int
    entity_types: frozenset[str]


class Decoded(msgspec.Struct):
    """One payload, decoded: what to store, what was refused, what to quarantine."""

    batch_id: str | None
    items: list[OpRecord | Rejected]
    quarantine: list[QuarantineRecord]

    @property
    def records(self) -> list[OpRecord]:
        return [item for item in self.items if isinstance(item, OpRecord)]

    def rejections(self) -> list[tuple[str | None, Error]]:
        return [(item.op_id, item.error) for item in self.items if isinstance(item, Rejected)]

    def refuse(self, record: object, error_name: str) -> tuple[str | None, Error]:
        """The database refused `record` (one of this payload's) alone: reject it in place."""
        index = next(i for i, item in enumerate(self.items) if item is record)
        op_id = self.items[index].op_id
        path = item_path(self.batch_id, len(self.items), index)
        error = Error(Code.SCHEMA, refused_message("operation", error_name), path)
        self.items[index] = Rejected(op_id, error)
        return op_id, error


_DEVICE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
PLAIN_FIELDS = ("op_id", "user_id", "entity_id", "session_id")
"""The strings of an op stored as text columns; `changes` and `device` are stored as
JSON, where a NUL stays the escape `\\u0000`, which every database holds."""
MAX_FIELD_CHARS = 128
_op_decoder = msgspec.json.Decoder(Op)
_envelope_decoder = msgspec.json.Decoder(Envelope)
_op_id_decoder = msgspec.json.Decoder(OpIdOnly)
_encoder = msgspec.json.Encoder()

RateCheck = Callable[[str, int], int]
"""`(device_id, n_ops) -> how many of them may pass now`."""


def _unlimited(_device_id: str, n: int) -> int:
    return n


class _Payload:
    """One payload being decoded: where it came from, and what it has become so far."""

    def __init__(
        self, limits: Limits, topic: str, device_id: str, payload: bytes, received_at_us: int
    ) -> None:
        self.limits = limits
        self.topic = topic
        self.device_id = device_id
        self.payload = payload
        self.received_at_us = received_at_us
        self.now_us = now_us()
        self.has_nul = NUL_ESCAPE in payload
        self.batch_id: str | None = None
        self.items: list[OpRecord | Rejected] = []
        self.raws: list[bytes | Raw] = []
        self.quarantine: list[QuarantineRecord] = []

    def reject(self, op_id: str | None, error: Error, raw: bytes | Raw) -> None:
        self.items.append(Rejected(op_id, error))
        self.raws.append(raw)
        self.quarantine.append(
            quarantine_record(
                topic=self.topic,
                device_id=self.device_id,
                kind="sync",
                error=error,
                payload=bytes(raw),
                received_at_us=self.received_at_us,
                max_payload_bytes=self.limits.max_payload_bytes,
            )
        )

    def reject_whole(self, error: Error) -> Decoded:
        self.reject(None, error, self.payload)
        return self.done()

    def accept(self, record: OpRecord, raw: bytes | Raw) -> None:
        self.items.append(record)
        self.raws.append(raw)

    def done(self) -> Decoded:
        return Decoded(self.batch_id, self.items, self.quarantine)


class SyncHandler:
    """Turns one sync payload into a `Decoded`; pure apart from the clock."""

    def __init__(self, limits: Limits, rate_check: RateCheck = _unlimited) -> None:
        self.limits = limits
        self.rate_check = rate_check

    def decode(self, topic: str, device_id: str, payload: bytes, received_at_us: int) -> Decoded:
        ctx = _Payload(self.limits, topic, device_id, payload, received_at_us)
        if not _DEVICE_ID.fullmatch(device_id):
            return ctx.reject_whole(
                Error(Code.SCHEMA, "the device id in the topic is not [A-Za-z0-9_.-]{1,64}")
            )
        size = len(payload)
        if size > self.limits.max_payload_bytes:
            return ctx.reject_whole(
                Error(
                    Code.TOO_LARGE,
                    f"payload is {size} bytes, over the limit of {self.limits.max_payload_bytes}",
                )
            )
        if not _is_utf8(payload):
            return ctx.reject_whole(Error(Code.MALFORMED, "the payload is not UTF-8"))
        try:
            if b'"ops"' in payload:
                envelope = _envelope_decoder.decode(payload)
                if not isinstance(envelope.ops, UnsetType):
                    if ctx.has_nul and nul_field(envelope, ("batch_id",)):
                        return ctx.reject_whole(Error(Code.SCHEMA, NUL_MESSAGE, "batch_id"))
                    ctx.batch_id = envelope.batch_id
                    return self._batch(ctx, envelope.ops)
            op = _op_decoder.decode(payload)
        except RecursionError:
            return ctx.reject_whole(Error(Code.MALFORMED, "the JSON is nested too deeply"))
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            error = _whole_payload_error(exc)
            if error.code is Code.SCHEMA and error.path != "ops":
                ctx.reject(_lenient_op_id(payload), error, payload)
                return ctx.done()
            return ctx.reject_whole(error)
        self._check(ctx, op, payload, "")
        return self._limit_rate(ctx)

    def _batch(self, ctx: _Payload, ops: Sequence[Raw]) -> Decoded:
        if len(ops) > self.limits.max_ops:
            return ctx.reject_whole(
                Error(
                    Code.TOO_MANY_OPS,
                    f"batch has {len(ops)} operations, over the limit of {self.limits.max_ops}",
                    "ops",
                )
            )
        if not ops:
            return ctx.reject_whole(
                Error(Code.SCHEMA, f"a batch holds 1 to {self.limits.max_ops} operations", "ops")
            )
        for index, raw in enumerate(ops):
            prefix = f"ops[{index}]"
            try:
                op = _op_decoder.decode(raw)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                ctx.reject(_lenient_op_id(raw), from_msgspec(exc, prefix), raw)
            except RecursionError:
                error = Error(Code.SCHEMA, "the JSON is nested too deeply", prefix)
                ctx.reject(_lenient_op_id(raw), error, raw)
            else:
                self._check(ctx, op, raw, prefix)
        return self._limit_rate(ctx)

    def _limit_rate(self, ctx: _Payload) -> Decoded:
        """Refuse the operations past the device's rate, last ones first."""
        accepted = [i for i, item in enumerate(ctx.items) if isinstance(item, OpRecord)]
        if not accepted:
            return ctx.done()
        allowed = self.rate_check(ctx.device_id, len(accepted))
        if allowed >= len(accepted):
            return ctx.done()
        limited = _Payload(self.limits, ctx.topic, ctx.device_id, ctx.payload, ctx.received_at_us)
        limited.batch_id = ctx.batch_id
        surplus = set(accepted[allowed:])
        for index, (item, raw) in enumerate(zip(ctx.items, ctx.raws, strict=True)):
            if index in surplus:
                path = item_path(ctx.batch_id, len(ctx.items), index)
                limited.reject(item.op_id, _rate_error(path), raw)
            elif isinstance(item, OpRecord):
                limited.accept(item, raw)
            else:
                limited.items.append(item)
                limited.raws.append(raw)
        limited.quarantine[:0] = ctx.quarantine
        return limited.done()

    def _check(self, ctx: _Payload, op: Op, raw: bytes | Raw, prefix: str) -> None:
        def reject(code: Code, message: str, name: str) -> None:
            ctx.reject(op.op_id, Error(code, message, f"{prefix}.{name}" if prefix else name), raw)

        if not isinstance(op.device_id, UnsetType) and op.device_id != ctx.device_id:
            return reject(
                Code.DEVICE_MISMATCH,
                f"device_id {op.device_id!r} is not the topic's {ctx.device_id!r}",
                "device_id",
            )
        if ctx.has_nul:
            name = nul_field(op, PLAIN_FIELDS)
            if name is not None:
                return reject(Code.SCHEMA, NUL_MESSAGE, name)
        if op.entity_type not in self.limits.entity_types:
            return reject(
                Code.UNKNOWN_ENTITY_TYPE, f"unknown entity type {op.entity_type!r}", "entity_type"
            )
        if isinstance(op.changes, UnsetType) and op.operation != "delete":
            return reject(Code.SCHEMA, f"changes is required for {op.operation}", "changes")
        plain: dict[str, dict[str, Any]] = {}
        for name, change in ({} if isinstance(op.changes, UnsetType) else op.changes).items():
            problem = _change_problem(op.operation, name, change)
            if problem is not None:
                return reject(Code.SCHEMA, *problem)
            plain[name] = {"old": change.get("old"), "new": change["new"]}
        if op.operation == "update" and not plain:
            return reject(Code.SCHEMA, "an update changes at least one field", "changes")
        edited_at_us = to_us(op.edited_at)
        if not in_range(edited_at_us):
            return reject(Code.SCHEMA, OUT_OF_RANGE, "edited_at")
        if edited_at_us > ctx.now_us + self.limits.max_clock_skew_us:
            return reject(
                Code.EDITED_AT_IN_FUTURE,
                f"edited_at is more than {self.limits.max_clock_skew_us // 1_000_000} s "
                "ahead of the gateway's clock",
                "edited_at",
            )
        device_meta: str | None = None
        meta = bytes(op.device).strip()
        if meta and meta != b"null":
            if not meta.startswith(b"{"):
                return reject(Code.SCHEMA, "Expected `object`", "device")
            if len(meta) > self.limits.max_device_meta_bytes:
                return reject(
                    Code.SCHEMA,
                    f"device metadata is over {self.limits.max_device_meta_bytes} bytes",
                    "device",
                )
            device_meta = meta.decode()
        ctx.accept(
            OpRecord(
                op_id=op.op_id,
                device_id=ctx.device_id,
                user_id=op.user_id,
                entity_type=op.entity_type,
                entity_id=op.entity_id,
                operation=op.operation,
                changes=plain,
                changes_json=_encoder.encode(plain).decode(),
                edited_at_us=edited_at_us,
                received_at_us=ctx.received_at_us,
                base_version=op.base_version,
                session_id=op.session_id,
                device_meta=device_meta,
                batch_id=ctx.batch_id,
            ),
            raw,
        )
        return None


def item_path(batch_id: str | None, items: int, index: int) -> str | None:
    """The path of one op's error: `ops[i]` in a batch, none for a payload of one op."""
    return f"ops[{index}]" if batch_id is not None or items > 1 else None


def _is_utf8(payload: bytes) -> bool:
    """msgspec checks the strings it decodes, but not the bytes it keeps raw (`device`)."""
    if payload.isascii():
        return True
    try:
        payload.decode()
    except UnicodeDecodeError:
        return False
    return True


def _change_problem(operation: str, name: str, change: Any) -> tuple[str, str] | None:
    """(message, path) of what is wrong with one entry of `changes`, if anything."""
    where = f"changes.{name}"
    if not 0 < len(name) <= MAX_FIELD_CHARS:
        return f"a field name is 1 to {MAX_FIELD_CHARS} characters", "changes"
    if not isinstance(change, dict):
        return f"Expected `object`, got `{type(change).__name__}`", where
    if "new" not in change:
        return "Object missing required field `new`", f"{where}.new"
    unknown = sorted(set(change) - {"old", "new"})
    if unknown:
        return f"Object contains unknown field `{unknown[0]}`", f"{where}.{unknown[0]}"
    if operation == "create" and change.get("old") is not None:
        return "a create has no old value", f"{where}.old"
    return None


def _whole_payload_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> Error:
    error = from_msgspec(exc, None)
    if error.code is Code.SCHEMA and error.path is None and "Expected `object`" in error.message:
        return Error(Code.MALFORMED, "the payload is not a JSON object")
    if error.code is Code.SCHEMA and error.path == "ops":
        return Error(Code.SCHEMA, "ops must be a list of operations", "ops")
    return error


def _lenient_op_id(raw: bytes | Raw) -> str | None:
    """The op_id of an operation that failed validation, if it has a usable one."""
    try:
        op_id = _op_id_decoder.decode(raw).op_id
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    return op_id if isinstance(op_id, str) and 0 < len(op_id) <= 64 else None


def _rate_error(path: str | None = None) -> Error:
    return Error(Code.RATE_LIMITED, "the device is over its operation rate; retry later", path)
