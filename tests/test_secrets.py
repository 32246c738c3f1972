"""Secrets appear nowhere (issue 15, item 7): one whole session, then every line it made.

One daemon with every kind of secret set: a broker password a test-owned Mosquitto
really checks (`password_file`), an admin token, a PostgreSQL URL with a password
(trust auth takes any), a Redis URL with the password a Redis of the test's own
requires (`requirepass`), two webhook endpoints with `whsec_` secrets (one URL with a
token in its query, the other with a password in its user info, answering 400 so that
every delivery dies into the dead-letter queue), a metrics listener, a systemd socket.

The session: sync operations (stored, batched, in conflict, malformed, rejected, too
large), alerts (journal, wellness, two crises: one acknowledged by MQTT, one by
`alerts/ack`; escalations), then every admin command of the daemon's command table
(found by scanning gateway/admin/, so a new command is covered without a line here)
with good arguments and with every error it can be refused with (no token, a wrong
token, an unknown argument, each argument of the wrong type, not JSON), an unknown
command, a long command name, a request too large, a retained request; a
`config/reload` of a file with a bad secret; the CLI (`fieldgate admin` and `fieldgate
status`, token and password from the environment or from a config file, with
`--json-output`, on a terminal, with a wrong token, a wrong broker password, a bad
config); starts refused for bad configs while every secret is set; the stop.

Then every line: the daemon's log (both processes, at debug), every message on
`<root>/#` and on a response topic outside it (but the requests the test sent, which
carry the token), the webhook requests the receivers got, every CLI's stdout and
stderr, the refused starts' output, the metrics exposition, what systemd was told,
every row of every table of the database, every key in the daemon's Redis. None
holds a secret, nor its URL-encoded, base64 or (for a signing key) raw or hex form.

`tests/test_admin.py::test_config_get_hides_every_secret` (the exact `config/get`
answer) and `tests/test_webhook_delivery.py::test_secrets_appear_nowhere` (a small
webhook-only session) are narrower; they stay, as the short checks of their areas.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import msgspec
import psycopg
import pytest
import redis

import gateway.admin
from gateway import config
from gateway.admin.server import Command
from tests.support import (
    ROOT,
    Admin,
    Client,
    Daemon,
    Mosquitto,
    NotifySocket,
    RedisServer,
    alert,
    free_port,
    in_a_terminal,
    plain_url,
    require,
    sync_op,
    wait_for,
)
from tests.support.webhooks import Receiver, Reply, endpoint

# -- the secrets --------------------------------------------------------------------------
# Distinctive (a grep cannot miss them nor match anything else), none a JSON escape.

BROKER_PASSWORD = "Mq-Pw-4hT8zeta"
ADMIN_TOKEN = "Adm-Tok-Q7v2m9Rk"
DB_PASSWORD = "Pg-Pw/7c@Lx+q"
"""Needs URL-encoding: the URL carries it encoded, the driver decodes it."""
REDIS_PASSWORD = "Rd-Pw+3k/Yw=n"
KEY_OK = b"Whk-Key-Ok-9pLm2Qx"
KEY_DEAD = b"Whk-Key-Dead-Tz41"
KEY_LATER = b"Whk-Key-Later-Fo8"
QUERY_TOKEN = "Qry-Tok-R5n1Jc"
URL_PASSWORD = "Url-Pw-H2d6Vb"


def whsec(key: bytes) -> str:
    return "whsec_" + base64.b64encode(key).decode()


SECRETS: dict[str, str] = {
    "broker password": BROKER_PASSWORD,
    "admin token": ADMIN_TOKEN,
    "database password": DB_PASSWORD,
    "redis password": REDIS_PASSWORD,
    "webhook secret ok": whsec(KEY_OK),
    "webhook secret dead": whsec(KEY_DEAD),
    "webhook secret later": whsec(KEY_LATER),
    "webhook key ok": KEY_OK.decode(),
    "webhook key dead": KEY_DEAD.decode(),
    "webhook key later": KEY_LATER.decode(),
    "url query token": QUERY_TOKEN,
    "url password": URL_PASSWORD,
    # What error paths are given, and must not echo either.
    "wrong admin token": "Wrong-Tok-Xc83Lp",
    "wrong broker password": "Wrong-Mq-Pw-Jn5s",
    "bad webhook secret": "whsec_Bad!Sec-Kq3v",
    "bad url token": "Bad-Url-Tok-Ha7e",
    "bad url password": "Bad-Url-Pw-Ue2r",
    "env secret": "Env-Sec-Wb9Tq4",
}


def forms(secret: str) -> dict[str, str]:
    """The ways `secret` could be written down: as it is, URL-encoded, base64 (standard
    and URL-safe, with or without padding), and a `whsec_` secret's base64 key and the
    key's hex. (Base64 is found where the secret starts an encoded run: what a leak of
    the value alone would write.)"""
    raw = secret.encode()
    out = {
        "plain": secret,
        "url-encoded": quote(secret, safe=""),
        "form-encoded": quote_plus(secret),
        "base64": base64.b64encode(raw).decode().rstrip("="),
        "base64url": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "hex": raw.hex(),
    }
    if secret.startswith("whsec_"):
        encoded = secret.removeprefix("whsec_")
        out["whsec key base64"] = encoded.rstrip("=")
        with contextlib.suppress(binascii.Error):  # a bad secret has no key
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
            out["whsec key hex"] = key.hex()
    return out


def leaks(texts: list[tuple[str, str]]) -> list[str]:
    """Every (where, secret, form) found, with a little context."""
    found = []
    for where, text in texts:
        for name, secret in SECRETS.items():
            seen: set[str] = set()
            for form, written in forms(secret).items():
                if written in seen:
                    continue
                seen.add(written)
                at = text.find(written)
                if at >= 0:
                    context = text[max(0, at - 80) : at + len(written) + 40]
                    found.append(f"{where}: {name} ({form}): ...{context}...")
    return found


def test_the_sweep_finds_each_form() -> None:
    """The grep itself: every secret is found as it is and in each form, and nothing in
    a text that only mentions what the secrets are."""
    for name, secret in SECRETS.items():
        for form, written in forms(secret).items():
            assert leaks([("t", f"x {written} y")]), (name, form)
    assert leaks([("t", "redis://:***@127.0.0.1/0 password=*** token=***")]) == []


# -- the command table ---------------------------------------------------------------------


def areas() -> list[type[Any]]:
    """Each class of a module of gateway/admin/ that gives command rows (`commands()`)."""
    found: list[type[Any]] = []
    for module_info in pkgutil.iter_modules(gateway.admin.__path__):
        module = importlib.import_module(f"gateway.admin.{module_info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and callable(getattr(cls, "commands", None)):
                found.append(cls)
    return found


def command_table() -> dict[str, Command]:
    """Every command of every area, as its class gives the rows (bound methods and
    argument types: nothing is called, no dependency is needed)."""
    table: dict[str, Command] = {}
    for area in areas():
        for row in area.commands(object.__new__(area)):
            assert row.name not in table, row.name
            table[row.name] = row
    return table


def test_the_table_is_the_daemons() -> None:
    """The areas the scan finds are those the daemon mounts (gateway/daemon.py)."""
    mounted = set(re.findall(r"\*(\w+Commands)\(", (ROOT / "gateway/daemon.py").read_text()))
    assert {area.__name__ for area in areas()} == mounted
    assert {"health", "config/get", "dlq/list", "dlq/get", "stats"} <= set(command_table())


def required(args_type: type[Any]) -> list[str]:
    info = msgspec.inspect.type_info(args_type)
    assert isinstance(info, msgspec.inspect.StructType)
    return [field.name for field in info.fields if field.required]


def fields(args_type: type[Any]) -> list[str]:
    info = msgspec.inspect.type_info(args_type)
    assert isinstance(info, msgspec.inspect.StructType)
    return [field.name for field in info.fields]


# -- the services --------------------------------------------------------------------------

GATEWAY_USER = "gateway"
TEST_USER = "tester"
TEST_PASSWORD = "tester-pw"
"""The test's own clients log in as this user: its password is no secret of the daemon's."""


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto that refuses anonymous clients and checks passwords from a file."""
    require("mosquitto")
    require("mosquitto_passwd")
    passwd = tmp_path / "passwd"
    for user, password in ((GATEWAY_USER, BROKER_PASSWORD), (TEST_USER, TEST_PASSWORD)):
        create = ["-c"] if not passwd.exists() else []
        subprocess.run(
            ["mosquitto_passwd", "-b", *create, str(passwd), user, password],
            check=True,
            capture_output=True,
        )
    passwd.chmod(0o644)
    mosq = Mosquitto(
        tmp_path / "mosquitto", extra=f"allow_anonymous false\npassword_file {passwd}\n"
    ).start()
    yield mosq
    mosq.stop()


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[RedisServer]:
    require("redis-server")
    server = RedisServer(tmp_path / "redis", password=REDIS_PASSWORD).start()
    yield server
    server.stop()


def client_of(broker: Mosquitto) -> Client:
    return Client(broker.port, username=TEST_USER, password=TEST_PASSWORD).connect()


# -- reading everything back ---------------------------------------------------------------


def database_texts(url: str) -> list[tuple[str, str]]:
    """Every row of every table, as text (bytes decoded, and as their repr)."""
    out = []
    with psycopg.connect(plain_url(url)) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
            ).fetchall()
        ]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"').fetchall():
                cells = [
                    bytes(cell).decode(errors="replace") + repr(bytes(cell))
                    if isinstance(cell, bytes | memoryview)
                    else str(cell)
                    for cell in row
                ]
                out.append((f"table {table}", " | ".join(cells)))
    return out


def redis_texts(server: RedisServer) -> list[tuple[str, str]]:
    """Every key of the daemon's Redis, with what it holds."""
    client = redis.Redis.from_url(server.url)
    out = []
    try:
        for key in client.scan_iter(count=1000):
            kind: Any = client.type(key)
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            value: Any
            if kind == "string":
                value = client.get(key)
            elif kind == "zset":
                value = client.zrange(key, 0, -1, withscores=True)
            elif kind == "hash":
                value = client.hgetall(key)
            elif kind == "list":
                value = client.lrange(key, 0, -1)
            elif kind == "set":
                value = client.smembers(key)
            elif kind == "stream":
                value = client.xrange(key)
            else:
                value = kind
            text = value.decode(errors="replace") if isinstance(value, bytes) else repr(value)
            out.append((f"redis {key.decode(errors='replace')}", f"{key!r} {text}"))
    finally:
        client.close()
    return out


def cli_env(daemon: Daemon, **overrides: str) -> dict[str, str]:
    env = {**os.environ, **daemon.env, **{f"FIELDGATE_{k}": v for k, v in overrides.items()}}
    env.pop("NOTIFY_SOCKET", None)
    return env


def run_all(commands: list[tuple[list[str], dict[str, str]]]) -> list[tuple[int, str, str]]:
    """`python -m gateway ...` for each (args, env), all at once; (code, stdout, stderr)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, env in commands
    ]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        out.append((proc.returncode, stdout, stderr))
    return out


# -- the session ---------------------------------------------------------------------------


def test_no_secret_anywhere_after_a_whole_session(
    pg_url: str,
    password_broker: Mosquitto,
    password_redis: RedisServer,
    make_daemon: Callable[..., Daemon],
    notify: NotifySocket,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (pg_url first: its database must outlive the daemon, which stops before it is dropped)
    broker = password_broker
    db_url = pg_url.replace("postgres@", f"postgres:{quote(DB_PASSWORD, safe='')}@", 1)
    assert quote(DB_PASSWORD, safe="") in db_url
    metrics_port = free_port()
    tag = uuid.uuid4().hex[:8]
    replies = f"replies-{tag}"
    texts: list[tuple[str, str]] = []

    with (
        Receiver(lambda _n: Reply(200), secret=whsec(KEY_OK)) as ok_hook,
        Receiver(lambda _n: Reply(400), secret=whsec(KEY_DEAD)) as dead_hook,
        Receiver(lambda _n: Reply(503), secret=whsec(KEY_LATER)) as later_hook,
    ):
        hooks = (
            endpoint(
                "ok",
                f"http://127.0.0.1:{ok_hook.port}/hook?token={QUERY_TOKEN}&v=1",
                secret=whsec(KEY_OK),
            )
            + endpoint(
                "dead",
                f"http://hookuser:{URL_PASSWORD}@127.0.0.1:{dead_hook.port}/hook",
                secret=whsec(KEY_DEAD),
                retry_schedule_s=[0],
                breaker_failures=1000,
            )
            + endpoint(
                # fails, and waits an hour to retry: its rows are still in the table at the end
                "later",
                f"http://127.0.0.1:{later_hook.port}/hook?key={QUERY_TOKEN}",
                secret=whsec(KEY_LATER),
                retry_schedule_s=[0, 3600],
                breaker_failures=1000,
            )
        )
        daemon = make_daemon(
            broker.port,
            db_url,
            hooks,
            start=False,
            MQTT__USERNAME=GATEWAY_USER,
            MQTT__PASSWORD=BROKER_PASSWORD,
            ADMIN__TOKEN=ADMIN_TOKEN,
            REDIS__URL=password_redis.url,
            METRICS__LISTEN=f"127.0.0.1:{metrics_port}",
            LOG__LEVEL="debug",
            HEALTH__INTERVAL_S="1",
            ALERTS__ESCALATE_AFTER_S="1",
            CONFLICTS__MANUAL_AT_OR_ABOVE="low",
            ML__MODELS_DIR=str(tmp_path / "models"),
        )
        assert REDIS_PASSWORD not in password_redis.url  # it is there URL-encoded
        daemon.start(extra_env={"NOTIFY_SOCKET": str(notify.path)})
        root = daemon.root

        everything = client_of(broker).subscribe(f"{root}/#", f"{replies}/#")
        client = client_of(broker)
        admin = Admin(client, root, token=ADMIN_TOKEN)
        v5_admin = Admin(client_of(broker), root, token=ADMIN_TOKEN, reply_to=f"{replies}/a")

        traffic(client, root)
        wait_for(lambda: dead_letters(password_redis) >= 3, timeout=20)
        ok_hook.wait(3)
        later_hook.wait(3)
        ids = session_ids(admin)
        answered = sweep_commands(admin, v5_admin, client, root, ids)
        reload_a_bad_file(admin, daemon)

        cli_outputs = cli_session(daemon, broker, tmp_path, ids)
        for index, (code, stdout, stderr) in enumerate(cli_outputs):
            texts += [(f"cli {index} ({code}) stdout", stdout), (f"cli {index} stderr", stderr)]

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert "fieldgate_" in metrics
        texts.append(("metrics", metrics))

        answered()
        everything.fence()
        assert daemon.terminate() == 0
        hook_bodies = [
            (f"webhook {name} request", request.body.decode(errors="replace"))
            for name, hook in (("ok", ok_hook), ("dead", dead_hook), ("later", later_hook))
            for request in hook.requests
        ]
    assert all(r.verified for r in ok_hook.requests + dead_hook.requests + later_hook.requests)
    texts += hook_bodies

    refused = refused_starts(daemon, tmp_path, monkeypatch)
    texts += [(f"refused start {i}", out) for i, out in enumerate(refused)]

    log = daemon.log()
    assert '"process": "engine"' in log, "the engine process's lines are in the log"
    texts += [("daemon log", line) for line in log.splitlines()]
    sent_requests = f"{root}/admin/request/"
    messages = [m for m in everything.all if not m.topic.startswith(sent_requests)]
    texts += [(f"mqtt {m.topic}", m.payload.decode(errors="replace")) for m in messages]
    texts += [("systemd", "\n".join(notify.messages()))]
    texts += database_texts(db_url)
    texts += redis_texts(password_redis)
    everything.close()
    client.close()
    v5_admin.client.close()

    saw(texts, messages, log)
    found = leaks(texts)
    assert found == [], "\n".join(found)
    # the inputs the test sent did carry the token: the sweep left out the right topics
    assert any(ADMIN_TOKEN.encode() in m.payload for m in everything.all)


def saw(texts: list[tuple[str, str]], messages: list[Any], log: str) -> None:
    """The sweep read what it claims: each kind of line, with what the session made."""
    wheres = " ".join(where for where, _ in texts)
    for kind in (
        "table quarantine",
        "table outbox",
        "table alerts",
        "table sync_log",
        "table webhook_deliveries",
    ):
        assert kind in wheres, kind
    assert "redis webhook:dlq:index" in wheres
    topics = {m.topic.split("/", 1)[1] for m in messages if "/" in m.topic}
    for suffix in ("alerts/crisis", "status", "health", "admin/response/config/get"):
        assert suffix in topics, (suffix, sorted(topics))
    assert any(t.startswith("replies-") for t in {m.topic for m in messages})
    for event in (
        "admin request refused",
        "admin command done",
        "reload refused",
        "config reloaded",
        "crisis escalated",
        "webhook delivery dead",
        "dlq replayed",
        "training run ended",
        "stopped",
    ):
        assert f'"event": "{event}"' in log, event


def dead_letters(server: RedisServer) -> int:
    client = redis.Redis.from_url(server.url)
    try:
        return int(client.zcard("webhook:dlq:index"))
    finally:
        client.close()


def traffic(client: Client, root: str) -> None:
    """Sync operations of every outcome, and alerts of every kind (two crises)."""
    client.subscribe(f"{root}/devices/+/sync/ack", f"{root}/devices/+/alerts/ack")

    def sync(device: str, payload: Any) -> None:
        client.publish(f"{root}/devices/{device}/sync", payload)

    sync("d1", sync_op("s-ok-1", entity_id="t-1"))
    sync("d1", {"batch_id": "b-1", "ops": [sync_op("s-b-1", entity_id="t-2"), {"op_id": 5}]})
    # a conflict: two devices set one field of one entity from the same old value
    sync("d1", sync_op("s-c-1", entity_id="t-c", changes={"status": {"old": "a", "new": "b"}}))
    sync("d2", sync_op("s-c-2", entity_id="t-c", changes={"status": {"old": "a", "new": "c"}}))
    sync("d1", b"{not json")
    sync("d1", b"\xff\xfe not utf-8")
    sync("d1", sync_op("s-rej-1", entity_type="spaceship"))
    sync("d1", sync_op("s-rej-2", edited_at="2999-01-01T00:00:00Z"))
    sync("d1", sync_op("s-rej-3", device_id="someone-else"))
    sync("d1", b"[" * 300_000)
    alerts = f"{root}/devices/d1/alerts"
    client.publish(alerts, alert("a-journal", mood=8, note="a note of a person"))
    client.publish(alerts, alert("a-wellness", mood=3, stress=4, note="tired"))
    client.publish(alerts, alert("a-crisis-1", kind="panic", note="help"))
    client.publish(alerts, alert("a-crisis-2", kind="panic"))
    client.publish(alerts, alert("a-crisis-3", kind="panic", note="never acknowledged"))
    client.publish(alerts, b'{"alert_id": 1}')
    wait_for(lambda: len(client.on(f"{root}/devices/d1/alerts/ack")) >= 5)
    client.publish(f"{root}/alerts/crisis/ack", {"alert_id": "a-crisis-1", "by": "dana"})
    client.publish(f"{root}/alerts/crisis/ack", b"{}")


def session_ids(admin: Admin) -> dict[str, Any]:
    """The ids good arguments name: a conflict and its ops, dead letters."""
    conflicts = wait_for(lambda: admin.data("conflicts/list")["items"])
    letters = admin.data("dlq/list")["items"]
    assert letters
    return {
        "conflict_id": conflicts[0]["conflict_id"],
        "winner_op_id": "s-c-2",
        "dlq_ids": [entry["id"] for entry in letters],
    }


def good_args(name: str, command: Command, ids: dict[str, Any]) -> dict[str, Any]:
    """Arguments each command takes: by command where it needs more than its required
    fields, else each required field from its name. A new command with a required
    field not named here fails, to be given one."""
    by_command: dict[str, dict[str, Any]] = {
        "conflicts/resolve": {
            "conflict_id": ids["conflict_id"],
            "by": "dana",
            "winner_op_id": ids["winner_op_id"],
        },
        "dlq/replay": {"all": True},
        "dlq/purge": {"older_than": "2000-01-01T00:00:00Z"},
        "ml/train": {"algorithm": "logistic_regression"},
    }
    by_field: dict[str, Any] = {
        "level": "debug",
        "entity_type": "task",
        "entity_id": "t-c",
        "alert_id": "a-crisis-2",
        "by": "eli",
        "conflict_id": ids["conflict_id"],
        "ids": ids["dlq_ids"],
        "model_id": "m_none",
    }
    if name in by_command:
        return by_command[name]
    missing = [f for f in required(command.args) if f not in by_field]
    assert not missing, f"{name}: give good arguments for {missing}"
    return {f: by_field[f] for f in required(command.args)}


WRONG = {"a": [1, {"b": None}]}
"""No argument of any command has this type."""


EXTRA = [("dlq/replay", {"all": True, "target": "mqtt"})]
"""Good arguments besides each command's first: a replay published on MQTT."""
SLOW = frozenset({"ml/train"})
"""Commands whose answers are awaited at the end of the session (a training run)."""


def sweep_commands(
    admin: Admin, v5_admin: Admin, client: Client, root: str, ids: dict[str, Any]
) -> Callable[[], None]:
    """Every command with good arguments, and refused every way it can be; returns what
    waits for the answers of SLOW commands."""
    table = command_table()
    sent: list[tuple[Admin, str, Any, str | None]] = []
    for name, command in table.items():
        good = good_args(name, command, ids)
        asks: list[tuple[dict[str, Any], str | None, str | None]] = [
            (good, ADMIN_TOKEN, None),
            (good, None, "unauthorized"),
            (good, "", "unauthorized"),
            (good, SECRETS["wrong admin token"], "unauthorized"),
            ({**good, "nonsense": 1}, ADMIN_TOKEN, "invalid_args"),
        ]
        asks += [({**good, f: WRONG}, ADMIN_TOKEN, "invalid_args") for f in fields(command.args)]
        for args, token, code in asks:
            to = v5_admin if len(sent) % 2 else admin
            if token is None:  # no token at all
                body = {"transaction": f"tx-{uuid.uuid4().hex[:12]}", **args}
                client.publish(f"{root}/admin/request/{name}", body)
                tx = body["transaction"]
                to = admin
            else:
                tx = to.send(name, args, token=token)
            sent.append((to, name, tx, code))
    for name, args in EXTRA:
        sent.append((admin, name, admin.send(name, args), None))
    for name in ("no/such", "long/" + "x" * 3000):
        sent.append((admin, name, admin.send(name, {}), "unknown_command"))
    # refused before a transaction is read: answered with none
    big = json.dumps({"transaction": "big", "token": ADMIN_TOKEN, "pad": "p" * 70_000})
    refusals = {"stats": [big.encode()], "info": [b"{not json", b"[1, 2]", b'{"token": 5}']}
    for name, payloads in refusals.items():
        for payload in payloads:
            client.publish(f"{root}/admin/request/{name}", payload)
    client.publish(
        f"{root}/admin/request/health", {"transaction": "r", "token": ADMIN_TOKEN}, retain=True
    )
    client.publish(f"{root}/admin/request/health", b"", retain=True)  # clear it
    answered: dict[str, list[str]] = {}

    def check(asked: list[tuple[Admin, str, Any, str | None]]) -> None:
        for to, name, tx, code in asked:
            try:
                answer = to.answer(name, tx, timeout=120 if name in SLOW else 20)
            except TimeoutError:
                raise AssertionError(f"no answer to {name[:60]} ({code})") from None
            if code is None:
                assert answer["status"] in ("ok", "error"), (name, answer)
                answered.setdefault(answer["status"], []).append(name)
            else:
                assert answer["status"] == "error", (name, code, answer)
                assert answer["error"]["code"] == code, (name, answer)

    check([ask for ask in sent if ask[1] not in SLOW])

    def refused(name: str) -> list[str]:
        on = client.on(f"{root}/admin/response/{name}")
        return [m.json()["error"]["code"] for m in on if m.json()["transaction"] is None]

    expected = ["malformed", "malformed", "unauthorized"]  # a token that is no string
    assert wait_for(lambda: len(refused("info")) == 3 and refused("info")) == expected
    assert wait_for(lambda: refused("stats")) == ["too_large"]

    def finish() -> None:
        check([ask for ask in sent if ask[1] in SLOW])
        assert len(answered.get("ok", [])) >= len(table) - 4, answered

    return finish


def reload_a_bad_file(admin: Admin, daemon: Daemon) -> None:
    """`config/reload` of a file with a bad secret is refused, naming the key only."""
    good = daemon.config_path.read_text()
    bad = good + endpoint("third", "http://127.0.0.1:9/h", secret=SECRETS["bad webhook secret"])
    daemon.config_path.write_text(bad)
    error = admin.error("config/reload")
    assert error["code"] == "invalid_args"
    assert "webhooks[3].secret" in error["message"], error
    daemon.config_path.write_text(good)
    assert admin.data("config/reload")["reloaded"] is True


def cli_session(
    daemon: Daemon, broker: Mosquitto, tmp_path: Path, ids: dict[str, Any]
) -> list[tuple[int, str, str]]:
    """`fieldgate admin` and `fieldgate status`: credentials from the environment (the
    daemon's), or from a config file; right, wrong, and a config that does not load."""
    config = ["--config", str(daemon.config_path)]
    cli_toml = tmp_path / "cli.toml"
    cli_toml.write_text(
        f'[mqtt]\nport = {broker.port}\ntopic_root = "{daemon.root}"\n'
        f'username = "{GATEWAY_USER}"\npassword = "{BROKER_PASSWORD}"\n'
        f'[admin]\ntoken = "{ADMIN_TOKEN}"\n'
    )
    bad_toml = tmp_path / "cli-bad.toml"
    bad_toml.write_text(
        cli_toml.read_text() + endpoint("x", "http://h/x", secret=SECRETS["bad webhook secret"])
    )
    env = cli_env(daemon)
    file_env = {k: v for k, v in env.items() if not k.startswith("FIELDGATE_")}
    runs: list[tuple[list[str], dict[str, str], int]] = [
        (["admin", "config/get", "--json-output", *config], env, 0),
        (["admin", "dlq/get", "--json", json.dumps({"ids": ids["dlq_ids"]}), *config], env, 0),
        (["admin", "dlq/replay", "--arg", "all=true", *config], env, 0),
        (["admin", "webhooks/list", "--config", str(cli_toml)], file_env, 0),
        (["status", "--json-output", *config], env, 0),
        (
            ["admin", "stats", "--json-output", *config],
            cli_env(daemon, ADMIN__TOKEN=SECRETS["wrong admin token"]),
            1,
        ),
        (
            ["admin", "health", "--timeout", "3", *config],
            cli_env(daemon, MQTT__PASSWORD=SECRETS["wrong broker password"]),
            3,
        ),
        (["admin", "health", "--config", str(bad_toml)], file_env, 2),
    ]
    results = run_all([(args, run_env) for args, run_env, _ in runs])
    for (args, _, code), (got, stdout, stderr) in zip(runs, results, strict=True):
        assert got == code, (args, got, stdout, stderr)
        if code == 0:
            assert stdout.strip(), args
        if code in (2, 3):
            assert len(stderr.strip().splitlines()) == 1, (args, stderr)
    assert '"unauthorized"' in results[5][1]
    assert "Not authorized" in results[6][2]
    assert "webhooks[0].secret" in results[7][2]
    # on a terminal: the tables a person reads, credentials from the file
    if shutil.which("script"):
        for command in ("config/get", "dlq/list"):
            code, lines = in_a_terminal(["admin", command, "--config", str(cli_toml)], 200)
            assert code == 0, lines
            results.append((code, "\n".join(lines), ""))
    return results


BAD_WEBHOOKS = {
    "a bad webhook secret": ("webhooks[0].secret", {"secret": SECRETS["bad webhook secret"]}),
    "a URL that is not http": (
        "webhooks[0].url",
        {"url": f"ftp://u:{SECRETS['bad url password']}@h/x?token={SECRETS['bad url token']}"},
    ),
    "a URL with a bad port": (
        "webhooks[0].url",
        {"url": f"http://u:{SECRETS['bad url password']}@h:99999/x?t={SECRETS['bad url token']}"},
    ),
    "an unknown key": ("webhooks[0].token", {"token": SECRETS["env secret"]}),
}
BAD_ENV = f'[{{"secret": "{SECRETS["env secret"]}"'
"""FIELDGATE_WEBHOOKS that is not JSON, and holds a secret."""


def refused_starts(daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Bad configs, every secret set: `fieldgate run` exits 2 with one line naming the
    key and nothing on stdout (a bad secret in the file, a bad list in the environment);
    the other bad configs' lines are what `config.load` raises, which `run` prints
    after `fieldgate: `, read here without a process each."""
    base = {"name": "ops", "url": "https://h/x", "events": ["*"], "secret": whsec(KEY_OK)}
    paths: dict[str, Path] = {}
    for index, (key, change) in enumerate(BAD_WEBHOOKS.values()):
        paths[key] = path = tmp_path / f"bad{index}.toml"
        table = {**base, **change}
        path.write_text(
            "[[webhooks]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
        )
    toml_bad = tmp_path / "bad-toml.toml"
    toml_bad.write_text(f'[admin]\ntoken = "{ADMIN_TOKEN}" and more\n')
    paths["not valid TOML"] = toml_bad
    runs = [
        (["run", "--config", str(paths["webhooks[0].secret"])], cli_env(daemon)),
        (["run", "--config", str(daemon.config_path)], cli_env(daemon, WEBHOOKS=BAD_ENV)),
    ]
    out = []
    for (args, _), key, (code, stdout, stderr) in zip(
        runs, ["webhooks[0].secret", "webhooks"], run_all(runs), strict=True
    ):
        assert code == 2, (args, code, stdout, stderr)
        assert stdout == "", (args, stdout)
        (line,) = stderr.strip().splitlines()
        assert line.startswith("fieldgate: config "), line
        assert key in line, (key, line)
        out.append(stdout + stderr)
    with monkeypatch.context() as env:
        for name, value in daemon.env.items():
            env.setenv(name, value)
        for key, path in paths.items():
            with pytest.raises(config.ConfigError) as refused:
                config.load(path)
            (line,) = str(refused.value).splitlines()
            assert key in line, (key, line)
            out.append(line)
    return out
