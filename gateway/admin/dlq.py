"""`dlq/list`, `dlq/get`, `dlq/purge`, `dlq/replay`, `dlq/reindex`: the webhook
dead-letter queue in Redis (storage/dlq.py), for an operator.

A replay goes around the sender's queue, breaker and retry schedule: it is an
operator's decision to try now, once, so it posts at once through the poster the
sender uses (the same signing, the same judgement of the answer). The endpoint's
settings are the current ones: an operator who fixed a URL or rotated a secret
replays to what is configured now, not to what failed.

Answers and logs never carry a secret: the endpoint's signing secret is only
read here to sign, and an entry's `url` is shown without its query and user
info, which may hold a token.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
import structlog
from msgspec import Meta
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.admin.args import CommandError, Limit, invalid
from gateway.admin.server import Command
from gateway.config import Settings, WebhookConfig
from gateway.mqtt.session import MqttSession
from gateway.outbound.webhook_http import Posting
from gateway.seam import Outbound
from handlers import webhooks
from handlers.admin import Progress
from handlers.errors import Code
from handlers.fields import AwareTime, Str64, Str128
from handlers.times import to_us
from handlers.webhooks import secret_key
from storage import dlq

log = structlog.get_logger("fieldgate.admin.dlq")

Ids = Annotated[list[Str128], Meta(min_length=1, max_length=1000)]
HEARTBEAT_S = 5.0
"""A replay repeats its progress when none was reported for this long: the CLI waits
10 s for each message of a long command, and one attempt may take an endpoint's
whole `timeout_s` (15 s by default)."""
FAILURES_SHOWN = 20
"""The replay's answer names this many failures; the counts cover them all."""
TOPIC_UNSAFE = frozenset("+#/\x00")
"""What an event type may not hold to be one level of the replay topic."""


class ListArgs(msgspec.Struct, forbid_unknown_fields=True):
    limit: Limit = 100
    cursor: str | None = None
    webhook: Str64 | None = None
    event_type: Str64 | None = None


class GetArgs(msgspec.Struct, forbid_unknown_fields=True):
    ids: Ids


class PurgeArgs(msgspec.Struct, forbid_unknown_fields=True):
    ids: Ids | None = None
    older_than: AwareTime | None = None


class ReplayArgs(msgspec.Struct, forbid_unknown_fields=True):
    ids: Ids | None = None
    all: bool = False
    since: AwareTime | None = None
    webhook: Str64 | None = None
    event_type: Str64 | None = None
    target: Literal["http", "mqtt"] = "http"


@dataclass
class _Tally:
    """A replay's counts as entries finish; `done` is what progress reports."""

    total: int
    done: int = 0
    replayed: int = 0
    failed: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    reported_at: float = 0.0
    """The event loop's time of the last progress report."""

    def report(self, progress: Progress) -> None:
        self.reported_at = asyncio.get_running_loop().time()
        progress(self.done, self.total)


class DlqCommands:
    """Reads and changes the dead-letter queue in Redis; a replay posts through
    the sender's poster or publishes on the gateway's own MQTT session."""

    def __init__(
        self,
        redis: Redis,
        poster: Posting,
        settings: Callable[[], Settings],
        session: MqttSession,
        root: str,
    ) -> None:
        self.redis = redis
        self.poster = poster
        self.settings = settings
        self.session = session
        self.root = root
        self.heartbeat_s = HEARTBEAT_S

    def commands(self) -> list[Command]:
        return [
            Command("dlq/list", self.list, ListArgs),
            Command("dlq/get", self.get, GetArgs),
            Command("dlq/purge", self.purge, PurgeArgs, writes=True),
            Command("dlq/replay", self.replay, ReplayArgs, long=True, writes=True),
            Command("dlq/reindex", self.reindex),
        ]

    async def list(self, args: ListArgs, _progress: Progress) -> dict[str, Any]:
        """Newest first (by `failed_at`), a keyset page of the index."""
        async with _redis_errors():
            try:
                found = await dlq.page(
                    self.redis,
                    args.limit,
                    args.cursor,
                    webhook=args.webhook,
                    event_type=args.event_type,
                )
            except dlq.BadCursor:
                raise invalid("not a cursor of dlq/list", "cursor") from None
        return {"items": [shown(entry) for entry in found.items], "next_cursor": found.next_cursor}

    async def get(self, args: GetArgs, _progress: Progress) -> dict[str, Any]:
        """The entries of `ids` that exist, in the order asked; the others as `missing`."""
        ids = _unique(args.ids)
        async with _redis_errors():
            entries = await dlq.get_many(self.redis, ids)
        return {
            "items": [shown(entry) for entry in entries if entry is not None],
            "missing": [i for i, entry in zip(ids, entries, strict=True) if entry is None],
        }

    async def purge(self, args: PurgeArgs, _progress: Progress) -> dict[str, Any]:
        """By `ids`, or every entry that failed before `older_than`."""
        _exactly_one(
            {"ids": args.ids is not None, "older_than": args.older_than is not None},
            "give ids or older_than",
        )
        async with _redis_errors():
            if args.ids is not None:
                purged = await dlq.delete(self.redis, _unique(args.ids))
            else:
                assert args.older_than is not None
                purged = await dlq.purge_older_than(self.redis, epoch_ms(args.older_than))
        log.info("dlq purged", purged=purged)
        return {"purged": purged}

    async def reindex(self, _args: Any, _progress: Progress) -> dict[str, Any]:
        """Adopt the entries other producers wrote with the key pattern alone."""
        async with _redis_errors():
            adopted = await dlq.reindex(self.redis)
        return {"adopted": adopted}

    async def replay(self, args: ReplayArgs, progress: Progress) -> dict[str, Any]:
        """Send each chosen entry again, a few at a time (`dlq.replay_concurrency`),
        oldest first: to its endpoint over HTTP (success removes it, failure counts an
        attempt in it), or on `<root>/webhooks/replay/<event_type>` (the broker's PUBACK
        removes it). The entries are chosen before the first is sent, so the total is
        known at once and entries that die during the replay are not chased."""
        _exactly_one(
            {"ids": args.ids is not None, "all": args.all, "since": args.since is not None},
            "give ids, all: true, or since",
        )
        if args.ids is not None:
            for name in ("webhook", "event_type"):
                if getattr(args, name) is not None:
                    raise invalid(f"{name} filters all or since, not ids", name)
        settings = self.settings()
        async with _redis_errors():
            if args.ids is not None:
                ids = _unique(args.ids)
            else:
                since_ms = None if args.since is None else epoch_ms(args.since)
                found = await dlq.collect(
                    self.redis, since_ms=since_ms, webhook=args.webhook, event_type=args.event_type
                )
                ids = found[::-1]
            tally = _Tally(len(ids), reported_at=asyncio.get_running_loop().time())
            endpoints = {endpoint.name: endpoint for endpoint in settings.webhooks}
            pending = iter(ids)
            workers = [
                asyncio.create_task(self._worker(pending, args.target, endpoints, tally, progress))
                for _ in range(min(settings.dlq.replay_concurrency, len(ids)))
            ]
            heartbeat = asyncio.create_task(self._heartbeat(tally, progress))
            try:
                await asyncio.gather(*workers)
            finally:  # one failed (Redis went away): the others stop too, before the answer
                for task in (*workers, heartbeat):
                    task.cancel()
                await asyncio.gather(*workers, heartbeat, return_exceptions=True)
        log.info(
            "dlq replayed",
            target=args.target,
            total=tally.total,
            replayed=tally.replayed,
            failed=tally.failed,
        )
        return {
            "total": tally.total,
            "replayed": tally.replayed,
            "failed": tally.failed,
            "failures": tally.failures,
        }

    async def _worker(
        self,
        pending: Iterator[str],
        target: Literal["http", "mqtt"],
        endpoints: dict[str, WebhookConfig],
        tally: _Tally,
        progress: Progress,
    ) -> None:
        """Replays entries from `pending` (shared by the workers) until none is left."""
        for entry_id in pending:
            if target == "http":
                error = await self._over_http(entry_id, endpoints)
            else:
                error = await self._over_mqtt(entry_id)
            tally.done += 1
            if error is None:
                tally.replayed += 1
            else:
                tally.failed += 1
                if len(tally.failures) < FAILURES_SHOWN:
                    tally.failures.append({"id": entry_id, "error": error})
                log.info("dlq replay failed", id=entry_id, target=target, error=error)
            tally.report(progress)

    async def _heartbeat(self, tally: _Tally, progress: Progress) -> None:
        """Reports the progress again when no entry finished for `heartbeat_s`, so that
        a client waiting for the next report does not give up on a slow endpoint."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, tally.reported_at + self.heartbeat_s - loop.time()))
            if loop.time() - tally.reported_at >= self.heartbeat_s:
                tally.report(progress)

    async def _over_http(self, entry_id: str, endpoints: dict[str, WebhookConfig]) -> str | None:
        """One entry to its endpoint: None if delivered (and removed), else why not."""
        try:
            entry = await dlq.get_replayable(self.redis, entry_id)
        except dlq.NotAnEntry as exc:
            return str(exc)
        if entry is None:
            return "no such entry (expired or removed)"
        endpoint = endpoints.get(entry.webhook)
        if endpoint is None:
            return f"endpoint {entry.webhook} is not configured"
        if not endpoint.enabled:
            return f"endpoint {entry.webhook} is disabled"
        msg_id = entry.webhook_id or f"msg_{uuid.uuid4().hex}"
        key = secret_key(endpoint.secret.get_secret_value())
        attempt = await self.poster.post(
            endpoint.url, key, msg_id, bytes(entry.payload), endpoint.timeout_s
        )
        if attempt.outcome == "success":
            await dlq.delete(self.redis, [entry_id])
            return None
        error = attempt.describe() or "failed"
        try:
            await dlq.update_after_replay(self.redis, entry_id, attempt.status, error, msg_id)
        except dlq.NotAnEntry as exc:
            return str(exc)
        return error

    async def _over_mqtt(self, entry_id: str) -> str | None:
        """One entry's payload on the replay topic: None if the broker took it (and the
        entry is removed), else why not. The entry is left as it was on a failure: no
        attempt was made at its endpoint."""
        try:
            entry = await dlq.get_replayable(self.redis, entry_id)
        except dlq.NotAnEntry as exc:
            return str(exc)
        if entry is None:
            return "no such entry (expired or removed)"
        if not entry.event_type or TOPIC_UNSAFE & set(entry.event_type):
            return f"event type {entry.event_type!r} cannot be a topic level"
        topic = f"{self.root}/webhooks/replay/{entry.event_type}"
        if not await self.session.publish_confirmed(Outbound(topic, bytes(entry.payload), qos=1)):
            return "the broker did not confirm the publish"
        await dlq.delete(self.redis, [entry_id])
        return None


def shown(entry: dlq.DlqEntry) -> dict[str, Any]:
    """An entry as an answer carries it: every field, the URL without what may be a
    credential."""
    item = msgspec.structs.asdict(entry)
    item["url"] = webhooks.public_url(entry.url)
    return item


def epoch_ms(moment: datetime) -> int:
    """A time argument on the index's scale (epoch milliseconds)."""
    return to_us(moment) // 1000


def _unique(ids: Sequence[str]) -> list[str]:
    """`ids` without repeats, in the order given: an entry is replayed or counted once."""
    return list(dict.fromkeys(ids))


def _exactly_one(given: dict[str, bool], message: str) -> None:
    """Invalid unless exactly one of `given` is there; the path names the first
    argument given beyond one, or the first that could be when none is."""
    names = [name for name, there in given.items() if there]
    if len(names) == 1:
        return
    path = names[1] if names else next(iter(given))
    raise invalid(f"{message}: exactly one of them", path)


@asynccontextmanager
async def _redis_errors() -> AsyncIterator[None]:
    """Redis unreachable is `unavailable`, as the database is for other commands."""
    try:
        yield
    except RedisError as exc:
        log.warning("dlq command failed", error=type(exc).__name__)
        raise CommandError(Code.UNAVAILABLE, "Redis is unavailable; retry later") from None
