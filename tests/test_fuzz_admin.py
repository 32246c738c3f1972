"""Fuzzing the admin side: requests (`handlers.admin.parse`), every command's arguments
as the daemon's command table declares them (`convert_args`, dlq/* and webhooks/*
among them), the cursors commands read, and the resolution a `conflicts/resolve`
submits (`decode_resolution`).

Arguments are generated from each command's own Struct (msgspec's type info), so a
command added to a table is fuzzed without a line here. A valid request is taken
with its transaction and arguments as sent; a near-valid one gets a typed error
(`malformed`, `too_large`, `unauthorized`, `invalid_args` with the path of the
argument at fault); nothing may raise.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st
from msgspec import inspect

from gateway.admin.alerts import AlertCommands
from gateway.admin.args import CommandError, below, encode_cursor, us
from gateway.admin.conflicts import ConflictCommands
from gateway.admin.dlq import DlqCommands, epoch_ms
from gateway.admin.ml import MlCommands
from gateway.admin.quarantine import QuarantineCommands
from gateway.admin.server import Command
from gateway.admin.sync import SyncCommands
from gateway.admin.system import SystemCommands
from gateway.admin.webhooks import WebhookCommands
from handlers.admin import AdminRequest, convert_args, parse
from handlers.conflicts import decode_resolution
from handlers.errors import Code, Error
from storage import dlq
from tests.support.fuzz import (
    BAD_TOKENS,
    JSON_VALUES,
    LONE_SURROGATES,
    MAX_US,
    MIN_US,
    NOT_UTF8,
    Obj,
    Time,
    dumps,
    fuzz_settings,
    ids,
    nested,
    not_times,
    of_other_type,
    plain,
    stretch,
    texts,
    times,
    with_nul,
)

MAX_BYTES = 64 * 1024
TOKEN = "s3cret-token"


def command_table() -> list[Command]:
    """The daemon's command table (gateway/daemon.py), each area's rows as its class
    gives them: the rows name bound methods and argument types, no dependency."""
    areas: list[type[Any]] = [
        SystemCommands,
        QuarantineCommands,
        SyncCommands,
        AlertCommands,
        ConflictCommands,
        DlqCommands,
        WebhookCommands,
        MlCommands,
    ]
    return [row for area in areas for row in area.commands(object.__new__(area))]


COMMANDS = command_table()


# -- requests -----------------------------------------------------------------------------

RESERVED = frozenset({"transaction", "token"})


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, str | None, Any]:
    """(payload, configured token, expected (request, transaction, error code)); a key
    may come twice, and the last one counts (`plain` reads it so, apart from msgspec)."""
    configured = draw(st.none() | st.just(TOKEN))
    keys = texts(1, 10).filter(lambda key: key not in RESERVED)
    pairs: list[tuple[str, Any]] = list(
        draw(st.dictionaries(keys, JSON_VALUES, max_size=4)).items()
    )
    if draw(st.booleans()):
        pairs.append(("transaction", draw(JSON_VALUES)))
    if draw(st.booleans()):
        pairs.append(("token", draw(st.just(TOKEN) | of_other_type())))
    if len(pairs) > 0 and draw(st.booleans()):
        key, _ = draw(st.sampled_from(pairs))
        pairs.insert(draw(st.integers(0, len(pairs))), (key, draw(JSON_VALUES | st.just(TOKEN))))
    body = Obj(tuple(pairs))
    arguments = plain(body)
    transaction = arguments.pop("transaction", None)
    given_token = arguments.pop("token", None)
    payload = dumps(body, draw(st.booleans()))
    if configured is not None and given_token != TOKEN:
        return payload, configured, (None, transaction, Code.UNAUTHORIZED)
    return payload, configured, (AdminRequest("x/y", transaction, arguments), transaction, None)


@st.composite
def broken_requests(draw: st.DrawFn) -> tuple[bytes, Code, str | None]:
    """Bytes that are no request: (payload, code, message if it is fixed)."""
    body = dumps(Obj.of(draw(st.dictionaries(texts(1, 6), JSON_VALUES, max_size=3))))
    choice = draw(
        st.sampled_from(["cut", "not_object", "not_utf8", "token", "surrogate", "deep", "large"])
    )
    if choice == "cut":
        return body[: draw(st.integers(1, len(body) - 1))], Code.MALFORMED, None
    if choice == "not_object":
        return draw(st.sampled_from([b"[]", b"[{}]", b"null", b"5", b'"x"'])), Code.MALFORMED, None
    if choice == "not_utf8":
        bad = draw(st.sampled_from(NOT_UTF8))
        return body[:-1] + b',"k":"' + bad + b'"}', Code.MALFORMED, None
    if choice == "token":
        token = draw(st.sampled_from(BAD_TOKENS))
        return b'{"transaction": ' + token + b"}", Code.MALFORMED, None
    if choice == "surrogate":
        token = draw(st.sampled_from(LONE_SURROGATES))
        return b'{"a": ' + token + b"}", Code.MALFORMED, None
    if choice == "deep":
        depth = draw(st.integers(5_000, 32_000))
        payload = b'{"transaction": ' + nested(depth).text + b"}"
        return payload, Code.MALFORMED, "the request is nested too deeply"
    size = MAX_BYTES + draw(st.integers(1, 100))
    return b'{"a": "' + b"x" * size + b'"}', Code.TOO_LARGE, f"request is over {MAX_BYTES} bytes"


@fuzz_settings(250)
@given(requests())
def test_a_request_is_its_transaction_and_arguments(given_request: Any) -> None:
    payload, configured, expected = given_request
    assert parse("x/y", payload, configured, MAX_BYTES) == (
        expected[0],
        expected[1],
        None if expected[2] is None else Error(expected[2], "a valid admin token is required"),
    )


@fuzz_settings(200)
@given(broken_requests() | st.binary(max_size=100).map(lambda b: (b, None, None)))
@example((b'{"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", Code.MALFORMED, None))
def test_a_broken_request_is_malformed_or_too_large(given_payload: Any) -> None:
    payload, code, message = given_payload
    request, transaction, error = parse("x/y", payload, None, MAX_BYTES)
    if code is None:  # any bytes: a request, or a typed error
        assert (request is None) != (error is None)
        return
    assert (request, transaction) == (None, None)
    assert error is not None
    assert (error.code, error.path) == (code, None)
    if message is not None:
        assert error.message == message


# -- arguments, from each command's own types ------------------------------------------------


def valid_value(info: inspect.Type) -> st.SearchStrategy[tuple[Any, Any]]:
    """(value as JSON gives it, value as the command must get it) of a type."""
    if isinstance(info, inspect.UnionType):
        return st.one_of([valid_value(member) for member in info.types])
    if isinstance(info, inspect.NoneType):
        return st.just((None, None))
    if isinstance(info, inspect.BoolType):
        return st.booleans().map(lambda b: (b, b))
    if isinstance(info, inspect.LiteralType):
        return st.sampled_from(info.values).map(lambda v: (v, v))
    if isinstance(info, inspect.IntType):
        low = info.ge if info.ge is not None else -(2**63)
        high = info.le if info.le is not None else 2**63 - 1
        return st.integers(low, high).map(lambda n: (n, n))
    if isinstance(info, inspect.StrType):
        low = info.min_length or 0
        high = info.max_length if info.max_length is not None else 200
        text = texts(low, min(high, 12), nul=False) | st.builds(
            stretch, texts(1, 3, nul=False), st.just(high)
        )
        return text.filter(lambda t: low <= len(t) <= high).map(lambda t: (t, t))
    if isinstance(info, inspect.DateTimeType):
        return times(MIN_US + 86_400_000_000, MAX_US - 86_400_000_000).map(lambda t: (t.text, t))
    if isinstance(info, inspect.ListType):
        low = info.min_length or 0
        size = st.integers(low, max(low, 4))
        return size.flatmap(
            lambda n: st.lists(valid_value(info.item_type), min_size=n, max_size=n)
        ).map(lambda pairs: ([p[0] for p in pairs], [p[1] for p in pairs]))
    if isinstance(info, inspect.DictType):
        entries = st.dictionaries(texts(max_size=8), valid_value(info.value_type), max_size=3)
        return entries.map(
            lambda d: ({k: v[0] for k, v in d.items()}, {k: v[1] for k, v in d.items()})
        )
    raise AssertionError(f"no strategy for {info}: add one")


def same(got: Any, expected: Any) -> bool:
    """A converted value against what it must be (a time by its instant)."""
    if isinstance(expected, Time):
        return isinstance(got, datetime) and us(got) == expected.us
    if isinstance(expected, list):
        return (
            isinstance(got, list)
            and len(got) == len(expected)
            and all(same(g, e) for g, e in zip(got, expected, strict=True))
        )
    if isinstance(expected, dict):
        return (
            isinstance(got, dict)
            and got.keys() == expected.keys()
            and all(same(got[k], expected[k]) for k in expected)
        )
    return type(got) is type(expected) and got == expected


def fields_of(command: Command) -> tuple[inspect.Field, ...]:
    info = inspect.type_info(command.args)
    assert isinstance(info, inspect.StructType)
    assert info.forbid_unknown_fields, f"{command.name}: a typo would pass unseen"
    return info.fields


@st.composite
def valid_args(draw: st.DrawFn, command: Command) -> tuple[dict[str, Any], dict[str, Any]]:
    sent: dict[str, Any] = {}
    expected: dict[str, Any] = {}
    for field in fields_of(command):
        if field.required or draw(st.booleans()):
            sent[field.name], expected[field.name] = draw(valid_value(field.type))
    return sent, expected


def after_conversion(command: Command, args: Any) -> None:
    """What the command does with its converted arguments before it reaches the
    database or Redis: only typed refusals."""
    cursor = getattr(args, "cursor", None)
    if cursor is not None:
        try:
            if command.name.startswith("dlq/"):
                dlq._read_cursor(cursor)
            else:
                found = below(cursor)
                assert found is not None and 0 <= found < 10**18
        except CommandError as exc:
            assert (exc.error.code, exc.error.path) == (Code.INVALID_ARGS, "cursor")
        except dlq.BadCursor:
            pass
    for name in ("since", "older_than"):
        moment = getattr(args, name, None)
        if moment is not None:
            assert us(moment) is not None
            epoch_ms(moment)


def numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def names(path: str | None, name: str) -> bool:
    """Whether an error's path points at argument `name` (or inside it)."""
    return path is not None and (path == name or path.startswith((f"{name}.", f"{name}[")))


@st.composite
def command_args(draw: st.DrawFn) -> tuple[Command, dict[str, Any], Any]:
    """A command, arguments for it (valid, or with one fault), and what must come of
    them: the expected fields, or the path of the `invalid_args` error."""
    command = draw(st.sampled_from(COMMANDS))
    sent, expected = draw(valid_args(command))
    fields = {field.name: field for field in fields_of(command)}
    fault = draw(st.sampled_from(["none", "unknown", "wrong_type", "nul", "drop", "bad_time"]))
    if fault == "unknown":
        key = draw(texts(1, 10).filter(lambda k: k not in fields))
        sent[key] = draw(JSON_VALUES)
        return command, sent, ("error", key)
    if fault == "wrong_type" and fields:
        name = draw(st.sampled_from(sorted(fields)))
        sent[name] = draw(of_other_type() | st.just([[[]]]))
        return command, sent, ("error or any", name)
    if fault == "nul":
        strings = [name for name, value in sent.items() if isinstance(value, str)]
        if strings:
            name = draw(st.sampled_from(strings))
            sent[name] = draw(with_nul(st.just(sent[name])))
            return command, sent, ("error", name)
    if fault == "drop":
        required = [name for name, field in fields.items() if field.required]
        if required:
            name = draw(st.sampled_from(required))
            del sent[name]
            return command, sent, ("error", name)
    if fault == "bad_time":
        timed = [name for name in fields if name in ("since", "older_than")]
        if timed:
            name = draw(st.sampled_from(timed))
            # A number is a Unix time to msgspec's lenient conversion (docs/testing.md).
            sent[name] = draw(not_times().filter(lambda text: text and not numeric(text)))
            return command, sent, ("error", name)
    return command, sent, ("ok", expected)


@fuzz_settings(400)
@given(command_args())
@example((next(c for c in COMMANDS if c.name == "alerts/list"), {"cursor": "é"}, ("ok", None)))
@example(  # an unknown key with a backtick was named by its part before it, or not at all
    (next(c for c in COMMANDS if c.name == "dlq/get"), {"ids": ["a"], "`x`": 1}, ("error", "`x`"))
)
def test_every_command_s_arguments_convert_or_name_the_one_at_fault(given_args: Any) -> None:
    command, sent, (kind, detail) = given_args
    converted = convert_args(sent, command.args)
    if kind == "ok":
        assert not isinstance(converted, Error), converted
        if detail is not None:
            for name, value in detail.items():
                assert same(getattr(converted, name), value), (name, value)
        after_conversion(command, converted)
        return
    if isinstance(converted, Error):
        assert converted.code is Code.INVALID_ARGS
        assert names(converted.path, detail), converted
        return
    assert kind == "error or any", (command.name, sent, converted)
    assert isinstance(converted, command.args)
    after_conversion(command, converted)


def test_the_table_is_the_daemon_s() -> None:
    """Every command of PROTOCOL.md's admin table, dlq/* and webhooks/list among them."""
    names = {command.name for command in COMMANDS}
    assert {"dlq/list", "dlq/get", "dlq/purge", "dlq/replay", "dlq/reindex"} <= names
    assert {"webhooks/list", "conflicts/resolve", "alerts/ack", "log_level"} <= names
    assert len(names) == len(COMMANDS)


# -- cursors ---------------------------------------------------------------------------


def b64(text: bytes) -> str:
    return base64.urlsafe_b64encode(text).decode().rstrip("=")


CURSORS = (
    texts(max_size=30)
    | st.builds(lambda tail: b64(b"id:" + tail.encode()), texts(max_size=30))
    | st.builds(lambda n: b64(f"id:{n}".encode()), st.integers(-(10**30), 10**30))
    | st.builds(lambda d: b64(b"id:" + d.encode()), st.text("0123456789²٣१", max_size=25))
    | st.builds(lambda d: b64(b"id:" + b"9" * d), st.integers(4_000, 6_000))
    | st.binary(max_size=30).map(b64)
)


@fuzz_settings(300)
@given(CURSORS)
@example("é")  # not ASCII: base64 raises ValueError, not binascii.Error
@example(b64("id:²".encode()))  # a digit to isdigit(), not to int()
@example(b64(b"id:" + b"9" * 5000))  # past int()'s 4300 digits
@example(b64(b"id:" + b"9" * 19))  # past BIGINT, which SQLite refuses as a parameter
def test_a_cursor_is_a_row_id_or_invalid_args(cursor: str) -> None:
    try:
        found = below(cursor)
    except CommandError as exc:
        assert exc.error == Error(Code.INVALID_ARGS, "not a cursor of this gateway", "cursor")
        return
    assert found is not None and 0 <= found < 10**18


@fuzz_settings(100)
@given(st.integers(0, 10**18 - 1))
def test_a_cursor_of_this_gateway_is_read_back(last_id: int) -> None:
    assert below(encode_cursor(last_id)) == last_id


@fuzz_settings(150)
@given(CURSORS)
def test_a_dlq_cursor_is_read_or_refused(cursor: str) -> None:
    try:
        at, member = dlq._read_cursor(cursor)
    except dlq.BadCursor:
        return
    assert isinstance(at, int) and isinstance(member, str)


# -- resolutions -------------------------------------------------------------------------


@st.composite
def resolutions(draw: st.DrawFn) -> tuple[bytes, Any]:
    """A resolution as `conflicts/resolve` submits it, or one fault in it."""
    fields: dict[str, Any] = {"conflict_id": draw(ids(64)), "by": draw(ids(128))}
    if draw(st.booleans()):
        fields["winner_op_id"] = draw(ids(64))
    if "winner_op_id" not in fields or draw(st.booleans()):
        fields["winners"] = draw(
            st.dictionaries(texts(max_size=8), ids(64), min_size=1, max_size=3)
        )
    expected: Any = ("ok", fields)
    fault = draw(st.sampled_from(["none", "wrong_type", "unknown", "drop", "neither", "deep"]))
    if fault == "wrong_type":
        name = draw(st.sampled_from(sorted(fields)))
        allowed = {"conflict_id": ("str",), "by": ("str",), "winner_op_id": ("str", "null")}
        fields[name] = draw(of_other_type(*allowed.get(name, ("object", "null"))))
        expected = ("error", name)
    elif fault == "unknown":
        key = draw(
            texts(1, 8).filter(lambda k: k not in ("conflict_id", "by", "winner_op_id", "winners"))
        )
        fields[key] = draw(JSON_VALUES | st.just(nested(40_000)))
        expected = ("error", key)
    elif fault == "drop":
        name = draw(st.sampled_from(["conflict_id", "by"]))
        del fields[name]
        expected = ("error", name)
    elif fault == "neither":
        fields.pop("winner_op_id", None)
        fields["winners"] = draw(st.sampled_from([{}, None]))
        expected = ("error", "winner_op_id")
    elif fault == "deep":
        fields["winners"] = {"f": nested(40_000)}
        expected = ("error", "winners")
    return dumps(Obj.of(fields), draw(st.booleans())), expected


@fuzz_settings(200)
@given(resolutions())
def test_a_resolution_is_recorded_as_given_or_refused_with_its_path(given_resolution: Any) -> None:
    payload, (kind, detail) = given_resolution
    decoded = decode_resolution(payload)
    if kind == "ok":
        assert decoded.error is None, decoded.error
        assert decoded.record is not None
        assert (
            decoded.record.conflict_id,
            decoded.record.by,
            decoded.record.winner_op_id,
            decoded.record.winners,
        ) == (
            detail["conflict_id"],
            detail["by"],
            detail.get("winner_op_id"),
            detail.get("winners") or {},
        )
        return
    assert decoded.record is None and decoded.error is not None
    assert decoded.error.code is Code.INVALID_ARGS
    assert names(decoded.error.path, detail), decoded.error
