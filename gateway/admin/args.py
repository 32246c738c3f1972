"""The toolkit of admin commands: argument types, errors, cursors and pages.

Every `*/list` answers `{"items", "next_cursor"}`, newest first, by a keyset
cursor (the last row's id, wrapped so that clients treat it as opaque): stable
while rows arrive, and never an offset.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from gateway.seam import Reply
from handlers.errors import Code, Error
from handlers.times import to_us

Limit = Annotated[int, Meta(ge=1, le=1000)]
MAX_ID_DIGITS = 18
"""A cursor's id has at most this many digits: below BIGINT's 2^63 - 1 (19 digits), as
every row id of this gateway is, and within what SQLite takes as a parameter."""


class NoArgs(msgspec.Struct, forbid_unknown_fields=True):
    pass


class CommandError(Exception):
    """Raised by a command to answer with a typed error (e.g. `invalid_args`)."""

    def __init__(self, code: Code, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.error = Error(code, message, path)


def invalid(message: str, path: str | None = None) -> CommandError:
    return CommandError(Code.INVALID_ARGS, message, path)


def us(moment: datetime | None) -> int | None:
    """An aware time argument as microseconds since the epoch (the database's times)."""
    return None if moment is None else to_us(moment)


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


def below(cursor: str | None) -> int | None:
    """The id to continue below; None for the first page. A forged cursor is
    `invalid_args` at `cursor`."""
    if cursor is None:
        return None
    try:
        # A cursor that is not ASCII is a ValueError (binascii.Error is one too).
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except ValueError:
        raise invalid("not a cursor of this gateway", "cursor") from None
    kind, _, value = text.partition(":")
    # ASCII digits only (`²` is a digit that int() refuses), and a row id (BIGINT).
    if kind != "id" or not (value.isascii() and value.isdigit()) or len(value) > MAX_ID_DIGITS:
        raise invalid("not a cursor of this gateway", "cursor")
    return int(value)


def page(
    rows: Sequence[Mapping[str, Any]],
    limit: int,
    item: Callable[[Mapping[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """`rows` fetched with `limit + 1` as an answer: the first `limit` as items, and a
    cursor below the last of them if there was one more."""
    shown = rows[:limit]
    more = len(rows) > limit
    return {
        "items": [item(row) for row in shown],
        "next_cursor": encode_cursor(shown[-1]["id"]) if more else None,
    }


Writes = Callable[[str, bytes], Awaitable[Reply]]
"""`writes(kind, payload)`: submit a write to the engine, as a message of `kind`
(gateway/ingest/kinds.py), and wait for its reply once committed."""


def answer_of(reply: Reply) -> dict[str, Any]:
    """A submitted write's reply as the command's answer: its data, or its error raised."""
    if reply.error is not None:
        error = reply.error
        raise CommandError(Code(error["code"]), error["message"], error.get("path"))
    return reply.data or {}
