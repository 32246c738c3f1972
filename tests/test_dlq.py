"""The dead-letter queue's Redis layout and pages (storage/dlq.py), on a real Redis.

Each test has a `redis-server` of its own (the key names are PROTOCOL.md's, fixed:
tests sharing one Redis would see each other's entries).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from redis.asyncio import Redis

from storage import dlq
from tests.support import RedisServer

T0 = datetime(2026, 12, 6, 4, 0, tzinfo=UTC)


def entry(
    n: int, *, at_ms: int | None = None, webhook: str = "ops", event: str = "alert.crisis"
) -> dlq.DlqEntry:
    failed = T0 + timedelta(milliseconds=n if at_ms is None else at_ms)
    return dlq.DlqEntry(
        id=f"e{n:05d}",
        webhook=webhook,
        url="https://ops.example/hook",
        event_type=event,
        payload={"type": event, "n": n},
        attempts=6,
        first_attempt_at=T0.isoformat().replace("+00:00", "Z"),
        failed_at=failed.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        last_status=503,
        last_error="HTTP 503",
    )


@pytest.fixture
async def redis(own_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_redis.url)
    yield client
    await client.aclose()


async def put_all(redis: Redis, entries: list[dlq.DlqEntry], ttl_s: int = 3600) -> None:
    for start in range(0, len(entries), 50):  # within the client's connection pool
        await asyncio.gather(*(dlq.put(redis, e, ttl_s) for e in entries[start : start + 50]))


async def all_pages(redis: Redis, limit: int, **filters: str) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        found = await dlq.page(redis, limit, cursor, **filters)
        pages.append([e.id for e in found.items])
        if found.next_cursor is None:
            return pages
        cursor = found.next_cursor


async def test_an_entry_and_its_index_member_are_written_together(redis: Redis) -> None:
    """PROTOCOL.md's layout, byte for byte where it is fixed: the key, the JSON fields,
    the TTL, the index score in epoch milliseconds.

    Checked against: the score in seconds (pages misordered within a second), and an
    entry written without its TTL (kept forever)."""
    one = entry(7)
    one.webhook_id = "msg_0007"
    await dlq.put(redis, one, ttl_s=1209600)
    raw = await redis.get("webhook:dlq:e00007")
    assert isinstance(raw, bytes)
    assert msgspec.json.decode(raw) == {
        "id": "e00007",
        "webhook": "ops",
        "url": "https://ops.example/hook",
        "event_type": "alert.crisis",
        "payload": {"type": "alert.crisis", "n": 7},
        "attempts": 6,
        "first_attempt_at": "2026-12-06T04:00:00Z",
        "failed_at": "2026-12-06T04:00:00.007Z",
        "last_status": 503,
        "last_error": "HTTP 503",
        "webhook_id": "msg_0007",
    }
    assert 1209500 < await redis.ttl("webhook:dlq:e00007") <= 1209600
    assert await redis.zrange("webhook:dlq:index", 0, -1, withscores=True) == [
        (b"e00007", float(int(T0.timestamp() * 1000) + 7))
    ]
    assert await dlq.get(redis, "e00007") == one
    assert await dlq.get(redis, "nope") is None


async def test_pages_are_newest_first_and_stable_while_entries_arrive(redis: Redis) -> None:
    """2,500 entries, pages of 100: every one exactly once, newest first, although a
    newer entry arrives after each page.

    Checked against: offset paging (the arrivals shift every later page: entries
    repeated), and a cursor on the score alone (entries of equal score lost)."""
    await put_all(redis, [entry(n) for n in range(2500)])
    seen: list[str] = []
    cursor = None
    arrivals = 0
    while True:
        found = await dlq.page(redis, 100, cursor)
        seen += [e.id for e in found.items]
        await dlq.put(redis, entry(10_000 + arrivals), 3600)
        arrivals += 1
        if found.next_cursor is None:
            break
        cursor = found.next_cursor
    assert seen == [f"e{n:05d}" for n in reversed(range(2500))]
    assert arrivals == 25
    assert await dlq.size(redis) == 2525


async def test_entries_of_the_same_millisecond_are_neither_lost_nor_repeated(
    redis: Redis,
) -> None:
    """Checked against: a cursor that keeps the score and not the member."""
    await put_all(redis, [entry(n, at_ms=5 if n < 7 else n) for n in range(12)])
    pages = await all_pages(redis, 3)
    flat = [i for p in pages for i in p]
    assert flat == ["e00011", "e00010", "e00009", "e00008", "e00007"] + [
        f"e{n:05d}" for n in reversed(range(7))
    ]
    assert [len(p) for p in pages] == [3, 3, 3, 3]


async def test_filters_and_expired_entries(redis: Redis) -> None:
    """A filter pages over what matches; an entry whose key expired is dropped from the
    index when a page meets it.

    Checked against: a filtered page that stops at the first non-matching entry
    (short pages, a null cursor before the end), and expired members kept forever."""
    entries = [
        entry(
            n,
            webhook="ops" if n % 2 else "erp",
            event="conflict.detected" if n % 3 else "alert.crisis",
        )
        for n in range(30)
    ]
    await put_all(redis, entries)
    await redis.delete("webhook:dlq:e00029", "webhook:dlq:e00027")  # as if expired
    ops = await all_pages(redis, 4, webhook="ops")
    assert [i for p in ops for i in p] == [f"e{n:05d}" for n in reversed(range(1, 27, 2))]
    assert all(len(p) == 4 for p in ops[:-1])
    assert await redis.zscore("webhook:dlq:index", "e00029") is None
    assert await dlq.size(redis) == 28
    crisis_erp = await all_pages(redis, 100, webhook="erp", event_type="alert.crisis")
    assert crisis_erp == [["e00024", "e00018", "e00012", "e00006", "e00000"]]


async def test_foreign_entries_are_adopted_by_reindex(redis: Redis) -> None:
    """Another producer wrote entries with the key pattern alone: `reindex` finds them
    with SCAN and indexes them by `failed_at`; what is not an entry is left alone.

    Checked against: reindex with KEYS (not checked here: the code reads SCAN), adopting
    twice, and a key that is not JSON failing the whole reindex."""
    await dlq.put(redis, entry(1), 3600)
    foreign = entry(2)
    await redis.set("webhook:dlq:e00002", msgspec.json.encode(foreign))
    await redis.set("webhook:dlq:garbage", b"not json")
    assert await all_pages(redis, 10) == [["e00001"]]
    assert await dlq.reindex(redis) == 1
    assert await dlq.reindex(redis) == 0
    assert await all_pages(redis, 10) == [["e00002", "e00001"]]
    assert await redis.get("webhook:dlq:garbage") == b"not json"


async def test_purge_by_ids_and_by_age(redis: Redis) -> None:
    await put_all(redis, [entry(n) for n in range(10)])
    assert await dlq.delete(redis, ["e00003", "e00004", "missing"]) == 2
    cutoff = int(T0.timestamp() * 1000) + 5
    assert await dlq.purge_older_than(redis, cutoff) == 3  # e0, e1, e2 (3 and 4 gone)
    assert await all_pages(redis, 100) == [[f"e{n:05d}" for n in (9, 8, 7, 6, 5)]]
    assert await redis.exists("webhook:dlq:e00000") == 0


async def test_a_cursor_that_is_not_ours_is_refused(redis: Redis) -> None:
    with pytest.raises(dlq.BadCursor):
        await dlq.page(redis, 10, "bm90IGEgY3Vyc29y")


async def test_a_failed_replay_counts_an_attempt_and_keeps_the_rest_as_stored(
    redis: Redis,
) -> None:
    """`attempts` + 1, the new status and error, the `webhook-id` the replay carried;
    the payload's bytes, `failed_at`, another producer's own fields, the index score
    and the TTL as they were.

    Checked against: a rewrite through DlqEntry (the foreign field dropped, the payload
    re-encoded), a SET without KEEPTTL (the entry kept for ever), and an entry purged
    meanwhile written back."""
    stored = (
        b'{"id":"f1","webhook":"ops","url":"https://ops.example/hook",'
        b'"event_type":"alert.crisis","payload":{"b": 1.50, "a": [1, 2]},"attempts":6,'
        b'"first_attempt_at":"2026-12-06T04:00:00Z","failed_at":"2026-12-06T04:00:00.005Z",'
        b'"last_status":503,"last_error":"HTTP 503","producer":"etl"}'
    )
    await redis.set("webhook:dlq:f1", stored, ex=3600)
    assert await dlq.reindex(redis) == 1
    replayable = await dlq.get_replayable(redis, "f1")
    assert replayable is not None
    assert bytes(replayable.payload) == b'{"b": 1.50, "a": [1, 2]}'
    assert replayable.webhook_id is None

    assert await dlq.update_after_replay(redis, "f1", None, "cannot connect", "msg_new")
    assert await dlq.update_after_replay(redis, "f1", 404, "HTTP 404", "msg_other")
    raw = await redis.get("webhook:dlq:f1")
    assert isinstance(raw, bytes)
    assert b'"payload":{"b": 1.50, "a": [1, 2]}' in raw
    assert msgspec.json.decode(raw) == {
        **msgspec.json.decode(stored),
        "attempts": 8,
        "last_status": 404,
        "last_error": "HTTP 404",
        "webhook_id": "msg_new",
    }
    assert 3500 < await redis.ttl("webhook:dlq:f1") <= 3600
    assert await redis.zscore("webhook:dlq:index", "f1") == int(T0.timestamp() * 1000) + 5

    await dlq.delete(redis, ["f1"])
    assert not await dlq.update_after_replay(redis, "f1", 500, "HTTP 500", "msg_new")
    assert await redis.exists("webhook:dlq:f1") == 0


async def test_two_replays_failing_at_once_both_count(redis: Redis) -> None:
    """Checked against: read, change and write without WATCH (one count lost)."""
    await dlq.put(redis, entry(1), 3600)
    await asyncio.gather(
        *(dlq.update_after_replay(redis, "e00001", 500, "HTTP 500", "m") for _ in range(20))
    )
    found = await dlq.get(redis, "e00001")
    assert found is not None
    assert found.attempts == 26


async def test_what_is_not_an_entry_is_said_so(redis: Redis) -> None:
    """Another tool indexed a key that holds no entry: replay says so, get and pages
    pass it over.

    Checked against: one such key failing every page of the list."""
    await redis.set("webhook:dlq:junk", b"[1, 2]")
    await redis.zadd("webhook:dlq:index", {"junk": int(T0.timestamp() * 1000) + 9})
    with pytest.raises(dlq.NotAnEntry):
        await dlq.get_replayable(redis, "junk")
    assert await dlq.get_replayable(redis, "nothing") is None
    await dlq.put(redis, entry(3), 3600)
    assert await dlq.get_many(redis, ["e00003", "junk", "nothing"]) == [entry(3), None, None]
    assert await all_pages(redis, 1) == [["e00003"]]
    assert await dlq.collect(redis, webhook="ops") == ["e00003"]


async def test_collect_chooses_by_time_and_filters_newest_first(redis: Redis) -> None:
    """What `dlq/replay` with `all` or `since` replays: every entry at or after `since`
    that matches, across more than one step of the walk; expired members dropped.

    Checked against: `since` exclusive (the entry of that very millisecond left out), a
    walk that stops after its first step, expired members kept in the index."""
    entries = [
        entry(n, webhook="ops" if n % 2 else "erp", event="alert.crisis" if n % 3 else "x.y")
        for n in range(1200)
    ]
    await put_all(redis, entries)
    await redis.delete("webhook:dlq:e01199", "webhook:dlq:e00001")  # as if expired
    everything = await dlq.collect(redis)
    assert everything == [e.id for e in reversed(entries) if e.id not in ("e01199", "e00001")]
    assert await redis.zscore("webhook:dlq:index", "e01199") is None
    t0_ms = int(T0.timestamp() * 1000)
    assert await dlq.collect(redis, since_ms=t0_ms + 1190) == [
        f"e{n:05d}" for n in range(1198, 1189, -1)
    ]
    ops_crisis = await dlq.collect(redis, webhook="ops", event_type="alert.crisis")
    assert ops_crisis == [f"e{n:05d}" for n in range(1197, 2, -1) if n % 2 and n % 3]
    assert await dlq.collect(redis, since_ms=t0_ms + 5000) == []
