"""Fuzzing the decoders: JSON written by hand, valid values, times, example counts.

The payloads are written here, not by `json.dumps`, so that they can hold what a
buggy or hostile device sends and no encoder would write: a key twice, `NaN`,
`1e400`, bytes that are not UTF-8, a lone surrogate, a nesting 50,000 deep.
Expected values (an RFC 3339 time in microseconds) are computed apart from the
gateway's code (docs/testing.md, "Fuzzing the decoders").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES_ENV = "FIELDGATE_FUZZ_EXAMPLES"
"""Opt-in: each fuzz property runs this many examples, from a new random seed."""


def fuzz_settings(default: int) -> settings:
    """`default` examples of a fixed sequence in the default suite (derandomized: the
    suite never fails on an example it did not try before); with FIELDGATE_FUZZ_EXAMPLES
    set, that many examples from a new seed, the failures kept in `.hypothesis/`."""
    given = os.environ.get(EXAMPLES_ENV, "").strip()
    health = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
    if given:
        return settings(
            max_examples=int(given), deadline=None, suppress_health_check=health, print_blob=True
        )
    return settings(
        max_examples=default,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=health,
    )


# -- JSON written by hand ---------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """JSON text written as it is: `NaN`, `1e400`, `"\\ud800"`, `[[[...]]]`, a string
    with bytes that are not UTF-8."""

    text: bytes


@dataclass(frozen=True)
class Obj:
    """A JSON object as its pairs in order: a key may come twice."""

    pairs: tuple[tuple[str, Any], ...]

    @staticmethod
    def of(fields: dict[str, Any]) -> Obj:
        return Obj(tuple(fields.items()))

    def get(self, key: str, default: Any = None) -> Any:
        """The last value of `key`, as a decoder that keeps the last one reads it."""
        found = default
        for name, value in self.pairs:
            if name == key:
                found = value
        return found

    def set(self, key: str, value: Any) -> Obj:
        """`key` (every occurrence) replaced by one, where it was, else at the end."""
        if key not in self:
            return Obj((*self.pairs, (key, value)))
        out: list[tuple[str, Any]] = []
        for name, old in self.pairs:
            if name != key:
                out.append((name, old))
            elif all(n != key for n, _ in out):
                out.append((name, value))
        return Obj(tuple(out))

    def drop(self, key: str) -> Obj:
        return Obj(tuple((name, value) for name, value in self.pairs if name != key))

    def keys(self) -> list[str]:
        return [name for name, _ in self.pairs]

    def __contains__(self, key: object) -> bool:
        return any(name == key for name, _ in self.pairs)


def dumps(value: Any, ascii_only: bool = True) -> bytes:
    """JSON bytes of `value` (dicts, lists, `Obj`, `Token`, scalars). `ascii_only` writes
    every non-ASCII character as an escape, else as UTF-8 (a lone surrogate then as the
    bytes CESU-8 would give it: not UTF-8)."""
    if isinstance(value, Token):
        return value.text
    if isinstance(value, Obj):
        items = [dumps(k, ascii_only) + b":" + dumps(v, ascii_only) for k, v in value.pairs]
        return b"{" + b",".join(items) + b"}"
    if isinstance(value, dict):
        return dumps(Obj.of(value), ascii_only)
    if isinstance(value, list | tuple):
        return b"[" + b",".join(dumps(item, ascii_only) for item in value) + b"]"
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=False)
    return text.encode("utf-8", "surrogatepass")


def plain(value: Any) -> Any:
    """What a decoder that keeps the last of duplicate keys reads from `value`."""
    if isinstance(value, Obj):
        out: dict[str, Any] = {}
        for name, item in value.pairs:
            out.pop(name, None)
            out[name] = plain(item)
        return out
    if isinstance(value, dict):
        return {name: plain(item) for name, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


# -- values -------------------------------------------------------------------------------

ANY_CHAR = st.characters(codec="utf-8")
"""Any character a valid payload can carry (no lone surrogate), NUL included."""
NO_NUL = st.characters(codec="utf-8", exclude_characters="\x00")


def texts(min_size: int = 0, max_size: int = 16, nul: bool = True) -> st.SearchStrategy[str]:
    return st.text(ANY_CHAR if nul else NO_NUL, min_size=min_size, max_size=max_size)


def ids(max_size: int) -> st.SearchStrategy[str]:
    """An id of 1 to `max_size` characters as a device may make it: mostly short ASCII,
    or any character but NUL and a lone surrogate (a NUL in an id is refused), or as
    long as it may be."""
    return (
        st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.:", min_size=1, max_size=12)
        | texts(1, 8, nul=False)
        | st.builds(stretch, texts(1, 4, nul=False), st.sampled_from([max_size - 1, max_size]))
    )


def stretch(text: str, size: int) -> str:
    """`text` repeated to `size` characters: a long string for the cost of a short one
    (hypothesis draws each character)."""
    return (text * size)[:size]


SCALARS: st.SearchStrategy[Any] = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts()
)
JSON_VALUES: st.SearchStrategy[Any] = (
    SCALARS
    | st.lists(SCALARS, max_size=3)
    | st.dictionaries(texts(max_size=6), SCALARS | st.lists(SCALARS, max_size=2), max_size=3)
)
"""A JSON value two deep at most (deeper is `nested`), finite numbers of any size, NULs
in strings and keys. Not `st.recursive`: it cost a third of the time of a test."""


def json_type(value: Any) -> str:
    """The JSON type of a Python value: null, bool, int, float, str, list, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    return "object"


BY_TYPE: dict[str, st.SearchStrategy[Any]] = {
    "null": st.none(),
    "bool": st.booleans(),
    "int": st.integers(-(2**70), 2**70),
    "float": st.floats(allow_nan=False, allow_infinity=False),
    "str": texts(),
    "list": st.lists(SCALARS, max_size=3),
    "object": st.dictionaries(texts(max_size=6), SCALARS, max_size=3),
}


def of_other_type(*allowed: str) -> st.SearchStrategy[Any]:
    """A JSON value whose type is none of `allowed` (`json_type` names)."""
    return st.one_of([strategy for name, strategy in BY_TYPE.items() if name not in allowed])


BAD_TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"nan", b"01", b"1.", b".5", b"+1", b"0x10"]
"""Numbers JSON does not have: the whole payload is malformed."""
OUT_OF_RANGE_NUMBERS = [b"1e400", b"-1e400"]
"""Numbers of JSON that no double holds: refused where they are (msgspec)."""
LONE_SURROGATES = [b'"\\ud800"', b'"x\\udbff"', b'"\\udc00y"', b'"\\ud800\\u0041"', b'"\\ud83d"']
"""Escapes of half a UTF-16 pair: not a character; the whole payload is malformed."""
NOT_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\x80", b"\xf4\x90\x80\x80", b"\x80"]
"""Bytes that are not UTF-8 (a cut sequence, an encoded surrogate, overlong NUL, past
U+10FFFF, a lone continuation byte)."""


def not_utf8_string() -> st.SearchStrategy[Token]:
    """A JSON string holding bytes that are not UTF-8, anywhere in it."""
    return st.builds(
        lambda before, bad, after: Token(b'"' + before.encode() + bad + after.encode() + b'"'),
        st.text("abc", max_size=3),
        st.sampled_from(NOT_UTF8),
        st.text("xyz", max_size=3),
    )


def nested(depth: int, leaf: bytes = b"") -> Token:
    return Token(b"[" * depth + leaf + b"]" * depth)


def with_nul(base: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """`base` with a NUL put somewhere in it."""
    return st.builds(
        lambda text, at: text[: at % (len(text) + 1)] + "\x00" + text[at % (len(text) + 1) :],
        base,
        st.integers(0, 64),
    )


# -- times ------------------------------------------------------------------------------

MICROSECOND = timedelta(microseconds=1)
YEAR_1 = datetime(1, 1, 1)
MIN_US = -62_135_596_800_000_000
"""0001-01-01T00:00:00Z in microseconds since the epoch."""
MAX_US = 253_402_300_799_999_999
"""9999-12-31T23:59:59.999999Z."""
DAY_US = 86_400_000_000
LAST_OFFSET_MIN = 23 * 60 + 59


@dataclass(frozen=True)
class Time:
    """An RFC 3339 text and the instant it names, in microseconds since the epoch."""

    text: str
    us: int


def write_time(instant_us: int, offset_min: int, digits: int, extra: str, zone: str) -> str:
    """`instant_us` as the local time at `offset_min`, with `digits` fractional digits
    (then `extra` ones), the offset written `zone` (`Z`, `z`, `+00:00`...) when 0."""
    local = YEAR_1 + MICROSECOND * (instant_us - MIN_US + offset_min * 60_000_000)
    text = (
        f"{local.year:04d}-{local.month:02d}-{local.day:02d}T"
        f"{local.hour:02d}:{local.minute:02d}:{local.second:02d}"
    )
    if digits or extra:
        text += "." + f"{local.microsecond:06d}"[:digits] + extra
    if offset_min == 0:
        return text + zone
    sign = "+" if offset_min > 0 else "-"
    hours, minutes = divmod(abs(offset_min), 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


@st.composite
def times(draw: st.DrawFn, low_us: int, high_us: int) -> Time:
    """A valid RFC 3339 time between `low_us` and `high_us` (an offset may move its local
    time by up to a day: keep a day inside 0001..9999), written with 0, 3, 6 or 9
    fractional digits; digits past the microsecond round it half up, as msgspec does."""
    digits = draw(st.sampled_from([0, 3, 6, 9]))
    step = 10 ** (6 - min(digits, 6))
    instant = draw(st.integers(low_us // step, high_us // step)) * step
    extra = ""
    if digits == 9:
        extra = draw(st.text("0123456789", min_size=3, max_size=3))
        if instant + 1 > high_us:
            extra = "0" + extra[1:]
    offset = draw(st.integers(-LAST_OFFSET_MIN, LAST_OFFSET_MIN) | st.just(0))
    zone = draw(st.sampled_from(["Z", "z", "+00:00", "-00:00"]))
    text = write_time(instant, offset, min(digits, 6), extra, zone)
    if draw(st.booleans()):
        text = text.replace("T", draw(st.sampled_from(["t", " "])), 1)
    rounded = instant + (1 if extra and extra[0] >= "5" else 0)
    return Time(text, rounded)


@st.composite
def times_out_of_range(draw: st.DrawFn) -> Time:
    """A time whose local date is in 0001..9999 but whose instant (UTC) is not: year 1
    with an offset east of UTC, 9999-12-31 with one west of it."""
    offset = draw(st.integers(1, LAST_OFFSET_MIN))
    before = draw(st.integers(1, offset * 60_000_000))
    if draw(st.booleans()):
        instant = MIN_US - before
        return Time(write_time(instant, offset, 6, "", "Z"), instant)
    instant = MAX_US + before
    return Time(write_time(instant, -offset, 6, "", "Z"), instant)


def not_times() -> st.SearchStrategy[str]:
    """Strings that are not RFC 3339 times with an offset."""
    return st.sampled_from(
        [
            "",
            "2026-11-29T12:00:00",  # no offset
            "2026-11-29",
            "12:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-29T24:00:00Z",
            "2026-11-29T12:00:60Z",
            "2026-11-29T12:00Z",
            "0000-01-01T00:00:00Z",
            "10000-01-01T00:00:00Z",
            "2026-11-29T12:00:00+24:00",
            "2026-11-29T12:00:00.Z",
            "+2026-11-29T12:00:00Z",
            "yesterday",
            "1795953600",
        ]
    ) | texts(max_size=30)
