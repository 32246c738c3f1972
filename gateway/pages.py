"""Cursor pagination for every `*/list`: newest first, stable under inserts.

The cursor is the last row's id, wrapped so that clients treat it as opaque.
"""

from __future__ import annotations

import base64
import binascii


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The id to continue below; None for the first page. Raises ValueError if forged."""
    if cursor is None:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("not a cursor of this gateway") from None
    kind, _, value = text.partition(":")
    if kind != "id" or not value.isdigit():
        raise ValueError("not a cursor of this gateway")
    return int(value)
