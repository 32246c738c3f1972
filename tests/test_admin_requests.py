"""Admin requests on `handlers.admin` itself: the envelope, the token, typed arguments.

The protocol end to end is tests/test_admin.py; these pin each rule on bytes alone.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import pytest

from handlers.admin import AdminRequest, convert_args, parse
from handlers.errors import NUL_MESSAGE, Code, Error
from handlers.fields import Str64

LIMIT = 1024


def error(code: Code, message: str, path: str | None = None) -> Error:
    return Error(code, message, path)


def test_a_request_is_its_command_transaction_and_arguments() -> None:
    payload = b'{"transaction": {"n": 1}, "token": "t0k", "limit": 5, "cursor": null}'
    assert parse("quarantine/list", payload, "t0k", LIMIT) == (
        AdminRequest("quarantine/list", {"n": 1}, {"limit": 5, "cursor": None}),
        {"n": 1},
        None,
    )


def test_an_empty_payload_is_a_request_without_arguments() -> None:
    for payload in (b"", b"  \n"):
        assert parse("health", payload, None, LIMIT) == (
            AdminRequest("health", None, {}),
            None,
            None,
        )


def test_no_token_configured_takes_any_or_none() -> None:
    assert parse("health", b'{"token": "x"}', None, LIMIT) == (
        AdminRequest("health", None, {}),
        None,
        None,
    )


@pytest.mark.parametrize(
    "given", [None, "", "s3cre", "s3cret ", "S3CRET", 12345, ["s3cret"]], ids=repr
)
def test_a_wrong_or_missing_token_is_unauthorized(given: Any) -> None:
    body: dict[str, Any] = {"transaction": "tx-1"}
    if given is not None:
        body["token"] = given
    payload = msgspec.json.encode(body)
    assert parse("health", payload, "s3cret", LIMIT) == (
        None,
        "tx-1",
        error(Code.UNAUTHORIZED, "a valid admin token is required"),
    )


def test_the_right_token_passes_and_never_reaches_the_arguments() -> None:
    request, _, problem = parse("stats", b'{"token": "s3cret", "a": 1}', "s3cret", LIMIT)
    assert (request, problem) == (AdminRequest("stats", None, {"a": 1}), None)


def test_over_the_size_limit_is_too_large_before_it_is_read() -> None:
    payload = b'{"transaction": "t"}'.ljust(LIMIT + 1)
    assert parse("health", payload, None, LIMIT) == (
        None,
        None,
        error(Code.TOO_LARGE, f"request is over {LIMIT} bytes"),
    )
    at_limit = b'{"transaction": "t"}'.ljust(LIMIT)
    assert parse("health", at_limit, None, LIMIT)[2] is None


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{nope", "JSON is malformed: object keys must be strings (byte 1)"),
        (b"[1]", "Expected `object`, got `array`"),
        (b"\xff", "JSON is malformed: invalid character (byte 0)"),
    ],
)
def test_not_an_object_is_malformed(payload: bytes, message: str) -> None:
    assert parse("health", payload, None, LIMIT) == (None, None, error(Code.MALFORMED, message))


def test_a_request_nested_deeper_than_the_decoder_recurses_is_malformed() -> None:
    """Within the 64 KiB of a request: RecursionError escaped from the session's message
    callback and failed the critical mqtt part (found by fuzzing)."""
    payload = b'{"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    assert parse("health", payload, None, 64 * 1024) == (
        None,
        None,
        error(Code.MALFORMED, "the request is nested too deeply"),
    )


class Args(msgspec.Struct, forbid_unknown_fields=True):
    name: Str64
    level: Literal["low", "high"] = "low"
    tags: list[str] = msgspec.field(default_factory=list)
    limit: int = 10


def test_arguments_become_the_typed_struct() -> None:
    assert convert_args({"name": "n", "level": "high", "limit": "7"}, Args) == Args(
        "n", "high", [], 7
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({}, error(Code.INVALID_ARGS, "Object missing required field `name`", "name")),
        (
            {"name": "n", "nmae": 1},
            error(Code.INVALID_ARGS, "Object contains unknown field `nmae`", "nmae"),
        ),
        (
            {"name": "n", "level": "mid"},
            error(Code.INVALID_ARGS, "Invalid enum value 'mid'", "level"),
        ),
        ({"name": ""}, error(Code.INVALID_ARGS, "Expected `str` of length >= 1", "name")),
        ({"name": "n\x00"}, error(Code.INVALID_ARGS, NUL_MESSAGE, "name")),
        ({"name": "n", "tags": ["a", "b\x00"]}, error(Code.INVALID_ARGS, NUL_MESSAGE, "tags[1]")),
        (
            {"name": "n", "deep": {"x": [{"y": "\x00"}]}},
            error(Code.INVALID_ARGS, NUL_MESSAGE, "deep.x[0].y"),
        ),
        # A key is never stored: a NUL in one is just an unknown field.
        (
            {"name": "n", "n\x00": 1},
            error(Code.INVALID_ARGS, "Object contains unknown field `n\x00`", "n\x00"),
        ),
        # The whole name, backticks and newlines in it (it was cut at the first one).
        (
            {"name": "n", "a`b\n`": 1},
            error(Code.INVALID_ARGS, "Object contains unknown field `a`b\n``", "a`b\n`"),
        ),
    ],
    ids=[
        "missing",
        "unknown",
        "enum",
        "short",
        "nul",
        "nul-in-list",
        "nul-deep",
        "nul-in-a-key",
        "backtick-in-a-key",
    ],
)
def test_bad_arguments_are_invalid_args_with_a_path(args: dict[str, Any], expected: Error) -> None:
    assert convert_args(args, Args) == expected


def test_the_first_nul_in_document_order_is_named() -> None:
    args = {"name": "a\x00", "tags": ["\x00"]}
    assert convert_args(args, Args) == error(Code.INVALID_ARGS, NUL_MESSAGE, "name")
    args = {"tags": ["ok", "\x00", "\x00"], "name": "b\x00"}
    assert convert_args(args, Args) == error(Code.INVALID_ARGS, NUL_MESSAGE, "tags[1]")
