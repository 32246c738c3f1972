"""The webhook dead-letter queue in Redis, in PROTOCOL.md's layout.

An entry is the JSON string at `webhook:dlq:<entry_id>`, kept for a TTL; the
sorted set `webhook:dlq:index` orders them by `failed_at` (epoch milliseconds)
and is written in the same MULTI as the entry. Other tools may write entries
with the key pattern alone: `reindex` adopts them (SCAN with MATCH and COUNT,
never KEYS). An entry that expired leaves its member behind in the index: it is
dropped when a page meets it.

Pages are keyset pages on the index, newest first: a cursor names the last
(score, member) seen, so an entry that arrives while an operator pages (newer
than the cursor) never shifts what comes next, and nothing is skipped or
repeated. The seed system SCANned every key and sorted in memory; nothing here
reads more than a page's worth of the index, plus the entries a filter skips.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

import msgspec
from redis.asyncio import Redis
from redis.exceptions import WatchError

KEY_PREFIX = "webhook:dlq:"
INDEX = "webhook:dlq:index"
SCAN_COUNT = 500
"""Keys a SCAN step looks at (Redis' hint): small enough to never block Redis long."""


class DlqEntry(msgspec.Struct, kw_only=True):
    """A delivery that will not be retried any more (PROTOCOL.md)."""

    id: str
    webhook: str
    url: str
    event_type: str
    payload: Any
    """The JSON body that was sent, as an object."""
    attempts: int
    first_attempt_at: str
    failed_at: str
    last_status: int | None = None
    last_error: str | None = None
    webhook_id: str | None = None
    """The `webhook-id` its attempts carried, which a replay carries again (receivers
    deduplicate by it). Beyond PROTOCOL.md's fields; absent from other producers'
    entries, whose replays get a new one."""


class Page(msgspec.Struct):
    items: list[DlqEntry]
    next_cursor: str | None


class Replayable(msgspec.Struct, kw_only=True):
    """What a replay needs of an entry, with the payload as the bytes stored: a replay
    signs and sends exactly what Redis holds, never a re-encoding of it (which could
    order keys or write numbers otherwise than the first attempts did)."""

    id: str
    webhook: str
    event_type: str
    payload: msgspec.Raw
    webhook_id: str | None = None


class BadCursor(ValueError):
    """A cursor this module did not make."""


class NotAnEntry(ValueError):
    """The key holds something that is not an entry of this layout."""


_decode_entry = msgspec.json.Decoder(DlqEntry).decode
_decode_replayable = msgspec.json.Decoder(Replayable).decode
_decode_fields = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_encode = msgspec.json.Encoder().encode


def key(entry_id: str) -> str:
    return KEY_PREFIX + entry_id


def score(entry: DlqEntry) -> int:
    """`failed_at` in epoch milliseconds: the index's order."""
    return int(datetime.fromisoformat(entry.failed_at).timestamp() * 1000)


async def put(redis: Redis, entry: DlqEntry, ttl_s: int) -> None:
    """The entry and its index member, in one MULTI."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(key(entry.id), _encode(entry), ex=ttl_s)
        pipe.zadd(INDEX, {entry.id: score(entry)})
        await pipe.execute()


async def get(redis: Redis, entry_id: str) -> DlqEntry | None:
    raw = await redis.get(key(entry_id))
    return None if raw is None else _decode_entry(raw)


async def get_many(redis: Redis, ids: Sequence[str]) -> list[DlqEntry | None]:
    """The entries of `ids`, in their order; None where there is none (or it is not an
    entry of this layout)."""
    if not ids:
        return []
    return [_entry_or_none(raw) for raw in await redis.mget([key(entry_id) for entry_id in ids])]


async def get_replayable(redis: Redis, entry_id: str) -> Replayable | None:
    """The entry as a replay sends it; None if there is none. Raises NotAnEntry for a
    key that holds something else."""
    raw = await redis.get(key(entry_id))
    if raw is None:
        return None
    try:
        return _decode_replayable(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        raise NotAnEntry(f"{entry_id} is not a dead-letter entry of this layout") from None


async def update_after_replay(
    redis: Redis, entry_id: str, status: int | None, error: str | None, webhook_id: str
) -> bool:
    """Count a failed replay in the entry: `attempts` + 1, the attempt's `last_status`
    and `last_error`, and the `webhook-id` it carried (so that the next replay carries
    it again). False if the entry is gone.

    The rest is kept as stored, byte for byte (the payload, `failed_at`, fields other
    producers added), and so are the index score and the TTL: a replay does not make
    an entry newer, nor keep it longer. Read, change and write under WATCH, so that
    two replays of one entry at once both count; SET XX so that an entry purged or
    expired meanwhile is not written back (without its TTL, for ever).
    """
    name = key(entry_id)
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(name)
                raw = await pipe.get(name)
                if raw is None:
                    return False
                fields = _decode_fields(raw)
                attempts = msgspec.json.decode(fields.get("attempts", msgspec.Raw(b"0")), type=int)
                fields["attempts"] = msgspec.Raw(_encode(attempts + 1))
                fields["last_status"] = msgspec.Raw(_encode(status))
                fields["last_error"] = msgspec.Raw(_encode(error))
                if bytes(fields.get("webhook_id", b"null")) == b"null":
                    fields["webhook_id"] = msgspec.Raw(_encode(webhook_id))
                pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
                pipe.set(name, _encode(fields), xx=True, keepttl=True)
                (written,) = await pipe.execute()
                return bool(written)
            except WatchError:
                continue
            except (msgspec.ValidationError, msgspec.DecodeError):
                raise NotAnEntry(f"{entry_id} is not a dead-letter entry of this layout") from None


async def collect(
    redis: Redis,
    *,
    since_ms: int | None = None,
    webhook: str | None = None,
    event_type: str | None = None,
) -> list[str]:
    """The ids of the entries that failed at or after `since_ms` (all of them if None)
    and match the filters, newest first, as the index holds them now: an entry that
    arrives while this runs is not chased (the walk goes down from where it started).
    Index members whose entry expired are dropped on the way, as a page drops them."""
    ids: list[str] = []
    last: tuple[int, str] | None = None
    filtered = webhook is not None or event_type is not None
    while True:
        batch = await _members_after(redis, last, SCAN_COUNT)
        if since_ms is not None:
            batch = [item for item in batch if item[0] >= since_ms]
        if not batch:
            return ids
        last = batch[-1]
        members = [member for _score, member in batch]
        names = [key(member) for member in members]
        if filtered:
            raws: list[bytes | str | None] = await redis.mget(names)
        else:  # no need to carry the payloads over: whether each one is there
            async with redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.exists(name)
                raws = [b"" if there else None for there in await pipe.execute()]
        expired = [member for member, raw in zip(members, raws, strict=True) if raw is None]
        if expired:
            await redis.zrem(INDEX, *expired)
        for member, raw in zip(members, raws, strict=True):
            if raw is None:
                continue
            if filtered:
                entry = _entry_or_none(raw)
                if entry is None or not _matches(entry, webhook, event_type):
                    continue
            ids.append(member)


def _entry_or_none(raw: bytes | str | None) -> DlqEntry | None:
    """The entry `raw` holds; None if there is none, or if another tool indexed
    something that is not an entry of this layout (one such key must not break every
    page)."""
    if raw is None:
        return None
    try:
        return _decode_entry(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


def _matches(entry: DlqEntry, webhook: str | None, event_type: str | None) -> bool:
    return (webhook is None or entry.webhook == webhook) and (
        event_type is None or entry.event_type == event_type
    )


async def delete(redis: Redis, ids: Sequence[str]) -> int:
    """Remove entries and their index members; how many entries there were."""
    if not ids:
        return 0
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(*(key(entry_id) for entry_id in ids))
        pipe.zrem(INDEX, *ids)
        removed, _members = await pipe.execute()
    return int(removed)


async def purge_older_than(redis: Redis, before_ms: int) -> int:
    """Remove every entry that failed before `before_ms`, a page of the index at a time."""
    removed = 0
    while True:
        ids = cast(
            list[bytes],
            await redis.zrangebyscore(INDEX, "-inf", f"({before_ms}", start=0, num=SCAN_COUNT),
        )
        if not ids:
            return removed
        removed += await delete(redis, [_text(member) for member in ids])


async def size(redis: Redis) -> int:
    return int(await redis.zcard(INDEX))


async def page(
    redis: Redis,
    limit: int,
    cursor: str | None = None,
    *,
    webhook: str | None = None,
    event_type: str | None = None,
) -> Page:
    """Up to `limit` entries, newest first, after `cursor`; filtered by endpoint or event
    type. Index members whose entry expired are dropped on the way."""
    after = _read_cursor(cursor) if cursor is not None else None
    items: list[DlqEntry] = []
    last: tuple[int, str] | None = after
    while len(items) < limit:
        batch = await _members_after(redis, last, limit - len(items))
        if not batch:
            return Page(items, None)
        last = batch[-1]
        raws = await redis.mget([key(member) for _score, member in batch])
        expired = [member for (_s, member), raw in zip(batch, raws, strict=True) if raw is None]
        if expired:
            await redis.zrem(INDEX, *expired)
        for raw in raws:
            entry = _entry_or_none(raw)
            if entry is None or not _matches(entry, webhook, event_type):
                continue
            items.append(entry)
    assert last is not None
    more = await _members_after(redis, last, 1)
    return Page(items, _make_cursor(last) if more else None)


async def _members_after(
    redis: Redis, after: tuple[int, str] | None, count: int
) -> list[tuple[int, str]]:
    """The next `count` index members after `after`, in (score, member) descending order
    (ZREVRANGEBYSCORE's order: equal scores by member, reversed). The query starts at
    the cursor's score, inclusive: the members of that score not below the cursor come
    first, and are passed over."""
    high = "+inf" if after is None else str(after[0])
    found: list[tuple[int, str]] = []
    offset = 0
    while len(found) < count:
        rows = cast(
            list[tuple[bytes, float]],
            await redis.zrevrangebyscore(
                INDEX, high, "-inf", start=offset, num=count - len(found), withscores=True
            ),
        )
        if not rows:
            return found
        offset += len(rows)
        for member, member_score in rows:
            item = (int(member_score), _text(member))
            if after is None or item < after:
                found.append(item)
    return found


async def reindex(redis: Redis) -> int:
    """Adopt entries that other producers wrote with the key pattern alone: SCAN for
    them, a step of SCAN_COUNT at a time, and add to the index what it lacks. How many."""
    adopted = 0
    async for raw_key in redis.scan_iter(match=KEY_PREFIX + "*", count=SCAN_COUNT):
        name = _text(raw_key)
        if name == INDEX:
            continue
        entry_id = name[len(KEY_PREFIX) :]
        if await redis.zscore(INDEX, entry_id) is not None:
            continue
        raw = await redis.get(name)
        if raw is None:
            continue
        try:
            entry = _decode_entry(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue  # not an entry of this layout: left alone
        if await redis.zadd(INDEX, {entry_id: score(entry)}, nx=True):
            adopted += 1
    return adopted


def _make_cursor(last: tuple[int, str]) -> str:
    return base64.urlsafe_b64encode(_encode(list(last))).decode().rstrip("=")


def _read_cursor(cursor: str) -> tuple[int, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        at, member = msgspec.json.decode(base64.urlsafe_b64decode(padded), type=tuple[int, str])
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise BadCursor("not a cursor of dlq/list") from None
    return at, member


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
