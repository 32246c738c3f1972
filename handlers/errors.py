"""The typed errors of PROTOCOL.md, as values: a rejection is data, not an exception."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

import msgspec

from handlers.records import QuarantineRecord

_NAMED_FIELD = re.compile(r"(?:missing required|contains unknown) field `(.+)`\Z", re.DOTALL)
"""The whole name, to the last backtick: an unknown key may hold backticks and newlines."""


class Code(StrEnum):
    MALFORMED = "malformed"
    SCHEMA = "schema"
    UNKNOWN_ENTITY_TYPE = "unknown_entity_type"
    DEVICE_MISMATCH = "device_mismatch"
    TOO_LARGE = "too_large"
    TOO_MANY_OPS = "too_many_ops"
    EDITED_AT_IN_FUTURE = "edited_at_in_future"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    UNKNOWN_COMMAND = "unknown_command"
    INVALID_ARGS = "invalid_args"
    UNAVAILABLE = "unavailable"


class Error(msgspec.Struct, frozen=True, omit_defaults=True):
    """`{"code", "message", "path"}`; `path` only where it points somewhere."""

    code: Code
    message: str
    path: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.path is not None:
            out["path"] = self.path
        return out


NUL_ESCAPE = b"\\u0000"
"""How a NUL reaches a decoded string, the only way: JSON refuses a raw NUL byte. A
payload without it needs no further look (one scan of the bytes)."""
NUL_MESSAGE = "a NUL character (\\u0000) cannot be stored"


def nul_field(decoded: object, names: tuple[str, ...]) -> str | None:
    """The first of the string fields `names` of `decoded` that holds a NUL.

    PostgreSQL text cannot hold one: stored as a column, it would fail the commit of
    the whole batch. Strings stored inside JSON keep the escape and are no problem.
    """
    for name in names:
        value = getattr(decoded, name)
        if isinstance(value, str) and "\x00" in value:
            return name
    return None


def join_path(prefix: str | None, path: str | None) -> str | None:
    """`ops[3]` + `changes.status` -> `ops[3].changes.status`."""
    if not prefix:
        return path
    if not path:
        return prefix
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


def from_msgspec(exc: msgspec.ValidationError | msgspec.DecodeError, prefix: str | None) -> Error:
    """Turn msgspec's `Expected ... - at `$.ops[3].x`` into a typed error with a path.

    msgspec reports the JSON path at the end of its message; the protocol's paths
    drop the leading `$.`.
    """
    text = str(exc)
    path: str | None = None
    if " - at `$" in text:
        text, _, raw_path = text.rpartition(" - at `$")
        raw_path = raw_path.rstrip("`").lstrip(".")
        path = raw_path or None
    if isinstance(exc, msgspec.ValidationError):
        named = _NAMED_FIELD.search(text)
        if named:
            path = join_path(path, named.group(1))
        return Error(Code.SCHEMA, text, join_path(prefix, path))
    return Error(Code.MALFORMED, f"not valid JSON: {text}", prefix)


def refused_message(what: str, error_name: str) -> str:
    """Why a record the database refused alone is rejected: the class of the database's
    error, never its message (that may quote the row, an alert's note)."""
    return f"the database refused this {what} ({error_name})"


MAX_TOPIC_CHARS = 512
"""The quarantine keeps this much of a topic (MQTT allows 65535 bytes)."""


def quarantine_record(
    *,
    topic: str,
    device_id: str | None,
    kind: str,
    error: Error,
    payload: bytes,
    received_at_us: int,
    max_payload_bytes: int | None = None,
) -> QuarantineRecord:
    """The quarantine row of a rejected payload: its raw bytes cut at the size limit
    (`payload_bytes` says how many there were; no limit keeps them whole), its topic
    and device id cut to their columns, and the error that rejected it."""
    return QuarantineRecord(
        received_at_us=received_at_us,
        topic=topic[:MAX_TOPIC_CHARS],
        device_id=None if device_id is None else device_id[:64],
        kind=kind,
        code=error.code.value,
        message=error.message,
        path=error.path,
        payload=payload if max_payload_bytes is None else payload[:max_payload_bytes],
        payload_bytes=len(payload),
    )
