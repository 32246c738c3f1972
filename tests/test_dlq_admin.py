"""The `dlq/*` admin commands (gateway/admin/dlq.py) against real services: a Redis of
the test's own, a receiver on a loopback port that verifies every signature with the
Standard Webhooks reference library, and the test broker for the `mqtt` target.

The commands' handlers are called as the admin server calls them (arguments through
`convert_args`, then `handler(args, progress)`), without the daemon around them.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

import aiomqtt
import msgspec
import pytest
import structlog
from aiohttp import web
from redis.asyncio import Redis
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from gateway.admin.args import CommandError
from gateway.admin.dlq import DlqCommands
from gateway.admin.server import Command
from gateway.config import MqttConfig, Settings
from gateway.mqtt.session import MqttSession
from gateway.outbound.webhook_http import Poster
from handlers import webhooks
from handlers.admin import convert_args
from handlers.errors import Error
from storage import dlq
from tests.support import Mosquitto, RedisServer, free_port
from tests.test_dlq import T0

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TOKEN = "tok-4f1c9e"
"""In the endpoints' URLs' queries: never in an answer nor a log line."""


@dataclass
class Receiver:
    """An HTTP endpoint on loopback: `/ok` verifies the signature and answers 204,
    `/gone` answers 410; it keeps what it received, and the most requests it held at
    once."""

    port: int = 0
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    refused: int = 0
    in_flight: int = 0
    most_in_flight: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}?token={TOKEN}"

    async def ok(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            body = await request.read()
            headers = dict(request.headers)
            try:
                Webhook(SECRET).verify(body, headers)
            except WebhookVerificationError:
                self.refused += 1
                return web.Response(status=400)
            await asyncio.sleep(0.002)  # long enough for the replay's workers to overlap
            self.received.append((headers, body))
            return web.Response(status=204)
        finally:
            self.in_flight -= 1

    async def gone(self, _request: web.Request) -> web.Response:
        return web.Response(status=410)

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return await self.ok(request)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/ok", found.ok)
    app.router.add_post("/gone", found.gone)
    app.router.add_post("/slow", found.slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    found.port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", found.port)
    await site.start()
    yield found
    await runner.cleanup()


@pytest.fixture
async def redis(own_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_redis.url)
    yield client
    await client.aclose()


@pytest.fixture
def root() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def session(broker: Mosquitto, root: str) -> AsyncIterator[MqttSession]:
    """The gateway's own MQTT session, connected to the test broker."""
    config = MqttConfig(port=broker.port, topic_root=root, client_id=f"{root}-gw")
    mqtt = MqttSession(config)
    mqtt.subscriptions = [f"{root}/nothing"]  # the daemon's session always has some
    running = asyncio.create_task(mqtt.run())
    await asyncio.wait_for(mqtt.connected.wait(), 10)
    yield mqtt
    await mqtt.stop()
    await asyncio.wait_for(running, 10)


def settings_for(receiver: Receiver, concurrency: int = 8) -> Settings:
    refused_port = free_port()  # nothing listens there
    return Settings.model_validate(
        {
            "webhooks": [
                {"name": "ops", "url": receiver.url("/ok"), "events": ["*"], "secret": SECRET},
                {"name": "erp", "url": receiver.url("/gone"), "events": ["*"], "secret": SECRET},
                {"name": "lag", "url": receiver.url("/slow"), "events": ["*"], "secret": SECRET},
                {
                    "name": "off",
                    "url": f"http://127.0.0.1:{refused_port}/x?token={TOKEN}",
                    "events": ["*"],
                    "secret": SECRET,
                    "timeout_s": 2,
                },
            ],
            "dlq": {"replay_concurrency": concurrency},
        }
    )


@pytest.fixture
async def poster() -> AsyncIterator[Poster]:
    async with Poster() as made:
        yield made


@pytest.fixture
def commands(
    redis: Redis, poster: Poster, receiver: Receiver, session: MqttSession, root: str
) -> dict[str, Command]:
    settings = settings_for(receiver)
    made = DlqCommands(redis, poster, lambda: settings, session, root)
    return {command.name: command for command in made.commands()}


async def call(
    command: Command, args: dict[str, Any], progress: list[tuple[int, int]] | None = None
) -> dict[str, Any]:
    """As the admin server runs a command: its arguments converted, then its handler;
    an error raised as the CommandError it is."""
    converted = convert_args(args, command.args)
    if isinstance(converted, Error):
        raise CommandError(converted.code, converted.message, converted.path)
    seen = progress if progress is not None else []
    return await command.handler(converted, lambda done, total: seen.append((done, total)))


async def refused(command: Command, args: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(CommandError) as caught:
        await call(command, args)
    return caught.value.error.as_dict()


def body(n: int, event: str = "alert.crisis") -> bytes:
    """The body a delivery sent: the event's payload in `{"type", "timestamp", "data"}`."""
    data = b'{"alert_id": "al-%d", "reasons": ["panic"], "score": 1.50}' % n
    return webhooks.body(event, 1_795_953_600_000_000 + n, data)


def entry(
    n: int,
    webhook: str = "ops",
    event: str = "alert.crisis",
    webhook_id: str | None = None,
    at_ms: int | None = None,
) -> dlq.DlqEntry:
    failed = T0 + timedelta(milliseconds=n if at_ms is None else at_ms)
    return dlq.DlqEntry(
        id=f"dlq_{n:05d}",
        webhook=webhook,
        url=f"https://{webhook}.example/hook?token={TOKEN}",
        event_type=event,
        payload=msgspec.Raw(body(n, event)),
        attempts=6,
        first_attempt_at="2026-12-06T03:17:00Z",
        failed_at=failed.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        last_status=503,
        last_error="HTTP 503",
        webhook_id=webhook_id,
    )


async def put(redis: Redis, *entries: dlq.DlqEntry) -> None:
    for start in range(0, len(entries), 50):
        await asyncio.gather(*(dlq.put(redis, e, 3600) for e in entries[start : start + 50]))


async def stored(redis: Redis, entry_id: str) -> dict[str, Any] | None:
    raw = await redis.get(f"webhook:dlq:{entry_id}")
    return None if raw is None else msgspec.json.decode(raw)


async def indexed(redis: Redis) -> list[str]:
    members = cast(list[bytes], await redis.zrange("webhook:dlq:index", 0, -1))
    return [m.decode() for m in members]


# -- replay over HTTP ----------------------------------------------------------------------


async def test_a_replay_delivers_signed_with_the_same_webhook_id_and_removes_the_entry(
    commands: dict[str, Command], redis: Redis, receiver: Receiver
) -> None:
    """The receiver verifies the signature with the reference library; the body is the
    stored payload byte for byte; the `webhook-id` is the one the first attempts
    carried (receivers deduplicate by it), or a new `msg_` id for an entry without one.

    Checked against: the payload re-encoded (`1.50` would come as `1.5`), a new
    webhook-id for every replay, the entry or its index member left behind."""
    await put(redis, entry(1, webhook_id="msg_first_attempts"), entry(2))
    progress: list[tuple[int, int]] = []
    answer = await call(commands["dlq/replay"], {"ids": ["dlq_00001", "dlq_00002"]}, progress)
    assert answer == {"total": 2, "replayed": 2, "failed": 0, "failures": []}
    assert progress == [(1, 2), (2, 2)]
    assert receiver.refused == 0
    got = {headers["webhook-id"]: sent for headers, sent in receiver.received}
    assert got.pop("msg_first_attempts") == body(1)
    ((new_id, sent),) = got.items()
    assert re.fullmatch(r"msg_[0-9a-f]{32}", new_id)
    assert sent == body(2)
    assert b'"score": 1.50' in sent
    assert await redis.exists("webhook:dlq:dlq_00001", "webhook:dlq:dlq_00002") == 0
    assert await indexed(redis) == []


async def test_a_failed_replay_keeps_the_entry_with_one_more_attempt_and_its_error(
    commands: dict[str, Command], redis: Redis
) -> None:
    """A final answer (410) and a refused connection: each entry stays, `attempts` + 1,
    the new `last_status` and `last_error`, the `webhook-id` the replay carried kept for
    the next one; `failed_at`, the index score and the TTL as they were. An entry whose
    endpoint is no longer configured stays untouched. No answer and no log line holds
    the URLs' token or the secret.

    Checked against: a failure that removes the entry, one that keeps the old error, an
    unconfigured endpoint that raises instead of failing one entry."""
    await put(
        redis,
        entry(1, webhook="erp", webhook_id="msg_1"),
        entry(2, webhook="off"),
        entry(3, webhook="gone"),
    )
    before = {i: await stored(redis, f"dlq_0000{i}") for i in (1, 2, 3)}
    with structlog.testing.capture_logs() as logs:
        answer = await call(
            commands["dlq/replay"], {"ids": ["dlq_00001", "dlq_00002", "dlq_00003"]}
        )
    assert answer["total"] == 3
    assert answer["replayed"] == 0
    assert answer["failed"] == 3
    errors = {f["id"]: f["error"] for f in answer["failures"]}
    assert errors["dlq_00001"] == "HTTP 410"
    assert errors["dlq_00002"].startswith("cannot connect: ")
    assert errors["dlq_00003"] == "endpoint gone is not configured"
    assert TOKEN not in json.dumps(answer) + json.dumps(logs, default=str)
    assert SECRET.removeprefix("whsec_") not in json.dumps(answer) + json.dumps(logs, default=str)

    first = await stored(redis, "dlq_00001")
    assert before[1] is not None
    assert first == {**before[1], "attempts": 7, "last_status": 410, "last_error": "HTTP 410"}
    second = await stored(redis, "dlq_00002")
    assert second is not None and before[2] is not None
    assert second["attempts"] == 7
    assert second["last_status"] is None
    assert second["last_error"] == errors["dlq_00002"]
    assert re.fullmatch(r"msg_[0-9a-f]{32}", second["webhook_id"])
    assert second["failed_at"] == before[2]["failed_at"]
    assert await stored(redis, "dlq_00003") == before[3]
    assert await indexed(redis) == ["dlq_00001", "dlq_00002", "dlq_00003"]
    assert await redis.zscore("webhook:dlq:index", "dlq_00002") == dlq.score(entry(2))
    assert 3500 < await redis.ttl("webhook:dlq:dlq_00001") <= 3600


async def test_a_replay_of_1000_entries_reports_progress_in_order_and_sums_up(
    redis: Redis, poster: Poster, receiver: Receiver, session: MqttSession, root: str
) -> None:
    """`all`: 1,000 entries, 25 of them for an endpoint that is gone. Progress is 1..1000
    of 1000, in order (the heartbeat, which repeats the last report after 5 s without
    one, has nothing to say here); the summary counts all, names the first 20 failures; every other
    entry arrived once, signed; at most `replay_concurrency` were in flight at once, and
    that many were.

    Checked against: progress reported per worker (out of order), a total counted as
    entries finish, failures listed without bound, an unbounded replay."""
    await put(redis, *(entry(n, webhook="gone" if n % 40 == 0 else "ops") for n in range(1000)))
    settings = settings_for(receiver, concurrency=8)
    made = DlqCommands(redis, poster, lambda: settings, session, root)
    replay = next(c for c in made.commands() if c.name == "dlq/replay")
    assert replay.long and replay.writes
    progress: list[tuple[int, int]] = []
    answer = await call(replay, {"all": True}, progress)
    assert progress == [(done, 1000) for done in range(1, 1001)]
    assert answer["total"] == 1000
    assert answer["replayed"] == 975
    assert answer["failed"] == 25
    assert len(answer["failures"]) == 20
    assert {f["error"] for f in answer["failures"]} == {"endpoint gone is not configured"}
    assert {f["id"] for f in answer["failures"]} < {f"dlq_{n:05d}" for n in range(0, 1000, 40)}
    assert receiver.refused == 0
    assert sorted(sent for _headers, sent in receiver.received) == sorted(
        body(n) for n in range(1000) if n % 40
    )
    assert receiver.most_in_flight == 8
    assert sorted(await indexed(redis)) == [f"dlq_{n:05d}" for n in range(0, 1000, 40)]


async def test_a_slow_replay_repeats_its_progress_so_that_a_client_keeps_waiting(
    redis: Redis, poster: Poster, receiver: Receiver, session: MqttSession, root: str
) -> None:
    """No entry finishes for a while (an endpoint slower than the heartbeat): the last
    progress is reported again, `(0, 1)` before the first finishes.

    Checked against: no report until the first entry finishes (the CLI gives up after
    10 s, an attempt may take 15)."""
    await put(redis, entry(1, webhook="lag"))
    settings = settings_for(receiver)
    made = DlqCommands(redis, poster, lambda: settings, session, root)
    made.heartbeat_s = 0.3
    replay = next(c for c in made.commands() if c.name == "dlq/replay")
    progress: list[tuple[int, int]] = []
    answer = await call(replay, {"ids": ["dlq_00001"]}, progress)
    assert answer["replayed"] == 1
    assert progress[-1] == (1, 1)
    assert set(progress[:-1]) == {(0, 1)}
    assert 2 <= len(progress[:-1]) <= 4


async def test_a_replay_since_a_time_with_filters_takes_only_what_matches(
    commands: dict[str, Command], redis: Redis, receiver: Receiver
) -> None:
    """`since` takes the entries that failed at or after it; `webhook` and `event_type`
    narrow it.

    Checked against: `since` exclusive, the filters ignored."""
    await put(
        redis,
        *(entry(n, event="alert.crisis" if n % 2 else "conflict.detected") for n in range(10)),
        entry(10, webhook="erp"),
    )
    since = (T0 + timedelta(milliseconds=4)).isoformat()
    answer = await call(
        commands["dlq/replay"], {"since": since, "webhook": "ops", "event_type": "alert.crisis"}
    )
    assert answer == {"total": 3, "replayed": 3, "failed": 0, "failures": []}
    assert sorted(sent for _h, sent in receiver.received) == sorted(body(n) for n in (5, 7, 9))
    assert len(await indexed(redis)) == 8


# -- replay over MQTT ----------------------------------------------------------------------


async def test_a_replay_to_mqtt_publishes_the_payload_on_the_replay_topic_and_removes_it(
    commands: dict[str, Command],
    redis: Redis,
    broker: Mosquitto,
    root: str,
    poster: Poster,
    receiver: Receiver,
) -> None:
    """The payload as stored arrives on `<root>/webhooks/replay/<event_type>`, whatever
    its endpoint (one that is gone too); the entry is gone. With no broker to confirm,
    the entry stays as it was.

    Checked against: the entry removed before the PUBACK, an unconfirmed publish counted
    replayed."""
    await put(redis, entry(1, event="conflict.detected"), entry(2, webhook="gone"), entry(3))
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=f"{root}-sub") as sub:
        await sub.subscribe(f"{root}/webhooks/replay/#", qos=1)
        answer = await call(
            commands["dlq/replay"], {"ids": ["dlq_00001", "dlq_00002"], "target": "mqtt"}
        )
        assert answer == {"total": 2, "replayed": 2, "failed": 0, "failures": []}
        got: dict[str, bytes] = {}
        async with asyncio.timeout(10):
            async for message in sub.messages:
                assert isinstance(message.payload, bytes)
                got[str(message.topic)] = message.payload
                if len(got) == 2:
                    break
    assert got == {
        f"{root}/webhooks/replay/conflict.detected": body(1, "conflict.detected"),
        f"{root}/webhooks/replay/alert.crisis": body(2),
    }
    assert await indexed(redis) == ["dlq_00003"]

    settings = settings_for(receiver)
    offline = MqttSession(MqttConfig(port=broker.port, topic_root=root, client_id=f"{root}-x"))
    unconfirmed = DlqCommands(redis, poster, lambda: settings, offline, root).commands()
    before = await stored(redis, "dlq_00003")
    replay = next(c for c in unconfirmed if c.name == "dlq/replay")
    answer = await call(replay, {"all": True, "target": "mqtt"})
    assert answer == {
        "total": 1,
        "replayed": 0,
        "failed": 1,
        "failures": [{"id": "dlq_00003", "error": "the broker did not confirm the publish"}],
    }
    assert await stored(redis, "dlq_00003") == before


# -- list, get, purge, reindex -------------------------------------------------------------


async def test_list_pages_newest_first_with_filters(
    commands: dict[str, Command], redis: Redis
) -> None:
    """Checked against: the filters applied to a page after it is cut (short pages), the
    URL's query shown, a forged cursor answered as a crash."""
    await put(redis, *(entry(n, webhook="ops" if n % 3 else "erp") for n in range(250)))
    ids: list[str] = []
    sizes: list[int] = []
    cursor: str | None = None
    while True:
        args: dict[str, Any] = {"limit": "40", "webhook": "ops"}
        if cursor is not None:
            args["cursor"] = cursor
        page = await call(commands["dlq/list"], args)
        ids += [item["id"] for item in page["items"]]
        sizes.append(len(page["items"]))
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert ids == [f"dlq_{n:05d}" for n in reversed(range(250)) if n % 3]
    assert sizes == [40, 40, 40, 40, 6]
    first = (await call(commands["dlq/list"], {"limit": 1, "webhook": "ops"}))["items"][0]
    assert first == {
        **msgspec.json.decode(msgspec.json.encode(entry(248))),
        "url": "https://ops.example/hook",
        "payload": json.loads(body(248)),
    }
    assert await refused(commands["dlq/list"], {"cursor": "bm90IGEgY3Vyc29y"}) == {
        "code": "invalid_args",
        "message": "not a cursor of dlq/list",
        "path": "cursor",
    }


async def test_get_gives_the_entries_and_names_the_missing(
    commands: dict[str, Command], redis: Redis
) -> None:
    await put(redis, entry(1), entry(2))
    answer = await call(commands["dlq/get"], {"ids": ["dlq_00002", "nope", "dlq_00001"]})
    assert [item["id"] for item in answer["items"]] == ["dlq_00002", "dlq_00001"]
    assert answer["items"][0]["payload"] == json.loads(body(2))
    assert answer["items"][0]["url"] == "https://ops.example/hook"
    assert answer["missing"] == ["nope"]


async def test_purge_by_ids_and_by_age(commands: dict[str, Command], redis: Redis) -> None:
    """`older_than` removes what failed strictly before it.

    Checked against: the bound inclusive, the index members left behind."""
    await put(redis, *(entry(n) for n in range(10)))
    purge = commands["dlq/purge"]
    assert purge.writes
    assert await call(purge, {"ids": ["dlq_00008", "dlq_00009", "nope"]}) == {"purged": 2}
    older_than = (T0 + timedelta(milliseconds=3)).isoformat()
    assert await call(purge, {"older_than": older_than}) == {"purged": 3}
    assert await indexed(redis) == [f"dlq_{n:05d}" for n in range(3, 8)]
    assert await redis.exists(*(f"webhook:dlq:dlq_{n:05d}" for n in (0, 1, 2, 8, 9))) == 0


async def test_reindex_adopts_foreign_entries(commands: dict[str, Command], redis: Redis) -> None:
    foreign = entry(5)
    await redis.set("webhook:dlq:dlq_00005", msgspec.json.encode(foreign))
    assert await call(commands["dlq/reindex"], {}) == {"adopted": 1}
    assert await indexed(redis) == ["dlq_00005"]


# -- arguments and outages -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "path"),
    [
        ("dlq/list", {"limit": 0}, "limit"),
        ("dlq/list", {"limit": 1001}, "limit"),
        ("dlq/list", {"colour": "red"}, "colour"),
        ("dlq/get", {}, "ids"),
        ("dlq/get", {"ids": []}, "ids"),
        ("dlq/purge", {}, "ids"),
        ("dlq/purge", {"ids": ["a"], "older_than": "2026-12-01T00:00:00Z"}, "older_than"),
        ("dlq/purge", {"older_than": "2026-12-01T00:00:00"}, "older_than"),
        ("dlq/replay", {}, "ids"),
        ("dlq/replay", {"all": False}, "ids"),
        ("dlq/replay", {"all": True, "since": "2026-12-01T00:00:00Z"}, "since"),
        ("dlq/replay", {"ids": ["a"], "all": True}, "all"),
        ("dlq/replay", {"ids": ["a"], "webhook": "ops"}, "webhook"),
        ("dlq/replay", {"ids": ["a"], "event_type": "alert.crisis"}, "event_type"),
        ("dlq/replay", {"all": True, "target": "ftp"}, "target"),
        ("dlq/replay", {"since": "yesterday"}, "since"),
    ],
)
async def test_bad_arguments_are_invalid_args_with_their_path(
    commands: dict[str, Command], command: str, args: dict[str, Any], path: str
) -> None:
    error = await refused(commands[command], args)
    assert error["code"] == "invalid_args", error
    assert error["path"] == path, error


async def test_redis_away_is_unavailable(
    commands: dict[str, Command], own_redis: RedisServer
) -> None:
    own_redis.stop()
    for name, args in [("dlq/list", {}), ("dlq/replay", {"all": True}), ("dlq/reindex", {})]:
        assert await refused(commands[name], args) == {
            "code": "unavailable",
            "message": "Redis is unavailable; retry later",
        }
