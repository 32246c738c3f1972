"""Admin requests: `{"transaction", "token", ...arguments}` to a typed request or an error.

The token is compared in constant time and never leaves this module: the
request that the rest of the gateway sees carries only whether it was valid.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from handlers.errors import NUL_MESSAGE, Code, Error, from_msgspec

Progress = Callable[[int, int], None]
"""(done, total) of a long command: the server reports it, the CLI shows it."""

T = TypeVar("T")


class AdminRequest(msgspec.Struct, frozen=True):
    command: str
    transaction: Any
    args: dict[str, Any]


_decode = msgspec.json.Decoder(dict[str, Any]).decode


def parse(
    command: str, payload: bytes, token: str | None, max_bytes: int
) -> tuple[AdminRequest | None, Any, Error | None]:
    """(request, transaction, error): exactly one of request and error is set."""
    if len(payload) > max_bytes:
        return None, None, Error(Code.TOO_LARGE, f"request is over {max_bytes} bytes")
    try:
        body = _decode(payload) if payload.strip() else {}
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        error = from_msgspec(exc, None)
        return None, None, Error(Code.MALFORMED, error.message.replace("not valid JSON: ", ""))
    except RecursionError:
        # 64 KiB of `[` nest deeper than msgspec recurses: raised, it escaped from the
        # session's message callback and failed the critical mqtt part.
        return None, None, Error(Code.MALFORMED, "the request is nested too deeply")
    transaction = body.pop("transaction", None)
    given = body.pop("token", None)
    if token is not None and not (
        isinstance(given, str) and hmac.compare_digest(given.encode(), token.encode())
    ):
        return None, transaction, Error(Code.UNAUTHORIZED, "a valid admin token is required")
    return AdminRequest(command, transaction, body), transaction, None


def convert_args(args: dict[str, Any], kind: type[T]) -> T | Error:
    """Arguments into the command's typed Struct; unknown keys are refused (typos).

    A NUL in a string is refused here: PostgreSQL cannot take it as a parameter,
    and the command would fail as `unavailable` instead of saying which argument.
    """
    path = _nul_path(args, "")
    if path is not None:
        return Error(Code.INVALID_ARGS, NUL_MESSAGE, path)
    try:
        return msgspec.convert(args, kind, strict=False)
    except msgspec.ValidationError as exc:
        error = from_msgspec(exc, None)
        return Error(Code.INVALID_ARGS, error.message, error.path)


def _nul_path(value: Any, path: str) -> str | None:
    """The path of the first string in `value` that holds a NUL, else None.

    Depth first without recursion: arguments nest as deep as their JSON does."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        here, item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return here
        elif isinstance(item, dict):
            stack.extend(
                (f"{here}.{key}" if here else str(key), sub) for key, sub in reversed(item.items())
            )
        elif isinstance(item, list):
            pairs = list(enumerate(item))
            stack.extend((f"{here}[{index}]", sub) for index, sub in reversed(pairs))
    return None
