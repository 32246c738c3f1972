"""The configuration (gateway/config.py): the file, the environment over it, the one
line that names a bad key, and what `config/get` may show.

Pure: no daemon, a TOML file in the test's directory and the test's environment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from gateway import config
from gateway.config import ConfigError, Settings, hide_url_password, load, redacted
from tests.support import CONFIG_DEFAULTS


@pytest.fixture(autouse=True)
def no_fieldgate_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the shell that runs the suite sets, these tests start from none of it."""
    import os

    for name in list(os.environ):
        if name.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fieldgate.toml"
    path.write_text(text)
    return path


def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load(path)
    return str(caught.value)


# -- where the settings come from --------------------------------------------------


def test_the_file_sets_what_it_names_and_the_rest_is_default(tmp_path: Path) -> None:
    path = write(tmp_path, 'instance = "gw-2"\n[mqtt]\nport = 18830\n[log]\nlevel = "debug"\n')
    settings = load(path)
    assert (settings.instance, settings.mqtt.port, settings.log.level) == ("gw-2", 18830, "debug")
    assert settings.mqtt.host == "127.0.0.1"
    assert settings.model_dump(exclude={"instance", "mqtt", "log"}) == Settings().model_dump(
        exclude={"instance", "mqtt", "log"}
    )


def test_the_environment_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[log]\nlevel = "debug"\n[mqtt]\nport = 18830\n')
    monkeypatch.setenv("FIELDGATE_LOG__LEVEL", "error")
    monkeypatch.setenv("FIELDGATE_INSTANCE", "from-env")
    settings = load(path)
    assert (settings.log.level, settings.instance, settings.mqtt.port) == (
        "error",
        "from-env",
        18830,
    )


def test_a_missing_default_file_means_every_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no config/fieldgate.toml here
    assert load() == Settings()
    assert load().model_dump() == CONFIG_DEFAULTS


def test_the_default_file_is_read_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "fieldgate.toml").write_text('instance = "from-default-file"\n')
    assert load().instance == "from-default-file"


def test_a_missing_file_named_explicitly_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert refused(path) == f"config {path}: no such file"


def test_a_file_that_is_not_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt\nport = 1\n")
    assert refused(path) == (
        f"config {path}: not valid TOML: Expected ']' at the end of a table declaration"
        " (at line 1, column 6)"
    )


def test_a_file_that_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "a-directory.toml"
    path.mkdir()
    assert refused(path) == f"config {path}: cannot read: Is a directory"


# -- one line that names the key ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("[mqtt]\nprot = 1883\n", "mqtt.prot: unknown key"),
        ("colour = 1\n", "colour: unknown key"),
        ("[mqtt]\nport = 0\n", "mqtt.port: Input should be greater than or equal to 1"),
        (
            '[mqtt]\nport = "many"\n',
            "mqtt.port: Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            "[mqtt]\nport = 0\nkeepalive_s = 1\n",
            "mqtt.port: Input should be greater than or equal to 1 (and 1 more)",
        ),
        (
            "[mqtt]\nport = 0\nkeepalive_s = 1\nreceive_maximum = 0\n",
            "mqtt.port: Input should be greater than or equal to 1 (and 2 more)",
        ),
        (
            '[conflicts.types.task]\nstrategy = "coin_toss"\n',
            "conflicts.types.task.strategy: Input should be 'last_writer_wins',"
            " 'first_writer_wins' or 'manual'",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(tmp_path: Path, text: str, line: str) -> None:
    path = write(tmp_path, text)
    assert refused(path) == f"config {path}: {line}"


# key, a value at each edge it accepts, a value past each edge
BOUNDS: list[tuple[str, str, list[Any], list[Any]]] = [
    ("mqtt", "port", [1, 65535], [0, 65536]),
    ("mqtt", "keepalive_s", [5, 3600], [4, 3601]),
    ("mqtt", "session_expiry_s", [60], [59]),
    ("mqtt", "receive_maximum", [1, 65535], [0, 65536]),
    ("mqtt", "max_outgoing_inflight", [1, 65535], [0, 65536]),
    ("mqtt", "client_id", ["c", "c" * 64], ["", "c" * 65]),
    ("mqtt", "topic_root", ["a", "fg/site-1", "a b"], ["", "/fg", "fg/", "$SYS", "a+b", "a#"]),
    ("mqtt", "reconnect_min_s", [0.01], [0]),
    ("mqtt", "reconnect_max_s", [0.01], [0]),
    ("database", "pool_size", [1], [0]),
    ("limits", "max_payload_bytes", [1024], [1023]),
    ("limits", "max_ops_per_batch", [1, 10_000], [0, 10_001]),
    ("limits", "max_clock_skew_s", [0], [-1]),
    ("limits", "max_device_meta_bytes", [0], [-1]),
    ("limits", "device_rate", [0], [-0.5]),
    ("limits", "device_burst", [1], [0]),
    ("writer", "max_messages", [1, 20_000], [0, 20_001]),
    ("writer", "max_wait_ms", [0, 1000], [-1, 1001]),
    ("writer", "max_in_process", [100], [99]),
    ("alerts", "crisis_mood_max", [0, 10], [-1, 11]),
    ("alerts", "crisis_stress_min", [1, 6], [0, 7]),
    ("alerts", "wellness_mood_max", [0, 10], [-1, 11]),
    ("alerts", "wellness_stress_min", [1, 6], [0, 7]),
    ("alerts", "sustained_low_mood_entries", [1, 1000], [0, 1001]),
    ("alerts", "sustained_low_mood_days", [0.5], [0]),
    ("alerts", "escalate_after_s", [0.1], [0]),
    ("alerts", "max_escalations", [0, 1000], [-1, 1001]),
    ("alerts", "escalation_poll_s", [0.1, 60], [0, 61]),
    ("alerts", "wellness_cooldown_s", [0], [-1]),
    ("alerts", "max_note_bytes", [0], [-1]),
    ("alerts", "crisis_kinds", [["journal", "checkin"]], [["alarm"]]),
    ("alerts", "crisis_flags", [["f" * 64]], [[""], ["f" * 65]]),
    ("conflicts", "window_s", [0, 30 * 86400], [-1, 30 * 86400 + 1]),
    ("conflicts", "manual_at_or_above", ["low", "high"], ["urgent"]),
    ("conflicts", "cache_max_ops", [0], [-1]),
    ("health", "interval_s", [0.1], [0]),
    ("health", "wedged_after_s", [0.1], [0]),
    ("sync", "entity_types", [["t" * 64]], [[""], ["t" * 65]]),
    ("log", "level", ["debug", "error"], ["trace"]),
    ("log", "format", ["auto", "json", "console"], ["xml"]),
]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


@pytest.mark.parametrize(
    ("section", "key", "good", "bad"), BOUNDS, ids=[f"{s}.{k}" for s, k, _, _ in BOUNDS]
)
def test_every_bound(
    tmp_path: Path, section: str, key: str, good: list[Any], bad: list[Any]
) -> None:
    for value in good:
        settings = load(write(tmp_path, f"[{section}]\n{key} = {toml_value(value)}\n"))
        assert getattr(getattr(settings, section), key) == value
    for value in bad:
        path = write(tmp_path, f"[{section}]\n{key} = {toml_value(value)}\n")
        assert refused(path).startswith(f"config {path}: {section}.{key}"), value


@pytest.mark.parametrize("value", ["", "i" * 65])
def test_the_instance_name_is_1_to_64(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f'instance = "{value}"\n')
    assert refused(path).startswith(f"config {path}: instance: String should have")


def test_sections_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.mqtt.port = 1


# -- webhook endpoints ([[webhooks]]) --------------------------------------------------------

KEY_B64 = "c2VjcmV0LWtleS1mb3ItdGVzdHM="
"""The base64 of the key: no error and no answer may show it, even in part."""
ENDPOINT = (
    '[[webhooks]]\nname = "ops"\nurl = "https://hooks.example/in"\n'
    f'events = ["alert.crisis"]\nsecret = "whsec_{KEY_B64}"\n'
)
ENDPOINT_DEFAULTS: dict[str, Any] = {
    "name": "ops",
    "url": "https://hooks.example/in",
    "events": ["alert.crisis"],
    "secret": SecretStr(f"whsec_{KEY_B64}"),
    "timeout_s": 15.0,
    "retry_schedule_s": [0.0, 5.0, 30.0, 120.0, 600.0, 1800.0],
    "max_in_flight": 8,
    "enabled": True,
    "breaker_failures": 5,
    "breaker_pause_s": 60.0,
}


def endpoint(**keys: Any) -> str:
    """ENDPOINT with `keys` set (a key set to None is left out)."""
    lines = ENDPOINT.splitlines(keepends=True)
    for key, value in keys.items():
        lines = [line for line in lines if not line.startswith(f"{key} =")]
        if value is not None:
            lines.append(f"{key} = {toml_value(value)}\n")
    return "".join(lines)


def test_an_endpoint_has_these_defaults(tmp_path: Path) -> None:
    """Checked against: a changed default (docs/configuration.md states these), and
    the secret read as anything but a SecretStr (its repr would show it)."""
    settings = load(write(tmp_path, ENDPOINT))
    assert settings.model_dump()["webhooks"] == [ENDPOINT_DEFAULTS]
    assert KEY_B64 not in repr(settings)


def test_the_edges_an_endpoint_accepts(tmp_path: Path) -> None:
    """Checked against: a bound one step too tight (a name of 64, `.`, `_` and `-` in
    a name, http as well as https, a schedule of one attempt, `*` alone)."""
    text = endpoint(
        name="a.b_c-" + "x" * 58,
        url="http://127.0.0.1:8080/hook?x=1",
        events=["*"],
        secret="whsec_YQ",
        timeout_s=0.001,
        retry_schedule_s=[0],
        max_in_flight=1,
        enabled=False,
        breaker_failures=1,
        breaker_pause_s=1800,
    )
    (hook,) = load(write(tmp_path, text)).webhooks
    assert hook.model_dump() == {
        "name": "a.b_c-" + "x" * 58,
        "url": "http://127.0.0.1:8080/hook?x=1",
        "events": ["*"],
        "secret": SecretStr("whsec_YQ"),
        "timeout_s": 0.001,
        "retry_schedule_s": [0.0],
        "max_in_flight": 1,
        "enabled": False,
        "breaker_failures": 1,
        "breaker_pause_s": 1800.0,
    }


BAD_ENDPOINTS: list[tuple[str, str, str]] = [
    # (id, the file, its one line after `config <path>: `)
    (
        "url-scheme",
        endpoint(url="ftp://hooks.example/in"),
        "webhooks[0].url: must be an http:// or https:// URL with a host",
    ),
    (
        "url-no-host",
        endpoint(url="https:///in"),
        "webhooks[0].url: must be an http:// or https:// URL with a host",
    ),
    ("url-port", endpoint(url="https://hooks.example:99999/"), "webhooks[0].url: not a valid URL"),
    (
        "url-empty-label",
        endpoint(url="https://hooks..example/in"),
        "webhooks[0].url: the host is not a valid name (an empty or too long label)",
    ),
    (
        "url-long-label",
        endpoint(url=f"https://{'h' * 64}.example/in"),
        "webhooks[0].url: the host is not a valid name (an empty or too long label)",
    ),
    ("secret-empty", endpoint(secret=""), "webhooks[0].secret: the secret is empty"),
    (
        "secret-no-prefix",
        endpoint(secret=KEY_B64),
        "webhooks[0].secret: the secret must be whsec_ then the base64 of the key",
    ),
    (
        "secret-not-base64",
        endpoint(secret=f"whsec_{KEY_B64[:8]}*{KEY_B64[9:]}"),
        "webhooks[0].secret: the part after whsec_ is not valid base64",
    ),
    (
        "secret-truncated",
        endpoint(secret=f"whsec_{KEY_B64[:-4]}c"),
        "webhooks[0].secret: the part after whsec_ is not valid base64",
    ),
    (
        "secret-no-key",
        endpoint(secret="whsec_"),
        "webhooks[0].secret: the key after whsec_ is empty",
    ),
    ("secret-missing", endpoint(secret=None), "webhooks[0].secret: Field required"),
    (
        "event-unknown",
        endpoint(events=["alert.crisis", "alert.panic"]),
        "webhooks[0].events[1]: Input should be 'conflict.detected', 'conflict.updated',"
        " 'conflict.resolved', 'alert.crisis', 'alert.crisis.escalated', 'alert.wellness',"
        " 'model.trained' or '*'",
    ),
    (
        "event-all-and-more",
        endpoint(events=["*", "alert.crisis"]),
        'webhooks[0].events: "*" means every event and stands alone',
    ),
    (
        "events-empty",
        endpoint(events=[]),
        "webhooks[0].events: List should have at least 1 item after validation, not 0",
    ),
    (
        "name-characters",
        endpoint(name="ops team"),
        "webhooks[0].name: String should match pattern '^[A-Za-z0-9_.-]{1,64}$'",
    ),
    (
        "name-long",
        endpoint(name="n" * 65),
        "webhooks[0].name: String should match pattern '^[A-Za-z0-9_.-]{1,64}$'",
    ),
    (
        "name-duplicate",
        ENDPOINT + endpoint(name="other") + endpoint(url="https://elsewhere.example/"),
        "webhooks[2].name: webhooks[0] has the same name, ops",
    ),
    (
        "schedule-empty",
        endpoint(retry_schedule_s=[]),
        "webhooks[0].retry_schedule_s: List should have at least 1 item after validation, not 0",
    ),
    (
        "schedule-negative",
        endpoint(retry_schedule_s=[0, 5, -1]),
        "webhooks[0].retry_schedule_s[2]: Input should be greater than or equal to 0",
    ),
    ("timeout", endpoint(timeout_s=0), "webhooks[0].timeout_s: Input should be greater than 0"),
    (
        "in-flight",
        endpoint(max_in_flight=0),
        "webhooks[0].max_in_flight: Input should be greater than or equal to 1",
    ),
    (
        "breaker-failures",
        endpoint(breaker_failures=0),
        "webhooks[0].breaker_failures: Input should be greater than or equal to 1",
    ),
    (
        "breaker-pause-zero",
        endpoint(breaker_pause_s=0),
        "webhooks[0].breaker_pause_s: Input should be greater than 0",
    ),
    (
        "breaker-pause-long",
        endpoint(breaker_pause_s=1801),
        "webhooks[0].breaker_pause_s: Input should be less than or equal to 1800",
    ),
    ("unknown-key", endpoint(secrte="x"), "webhooks[0].secrte: unknown key"),
    ("not-a-list", '[webhooks]\nname = "ops"\n', "webhooks: Input should be a valid list"),
]


@pytest.mark.parametrize(
    ("text", "line"),
    [(t, line) for _, t, line in BAD_ENDPOINTS],
    ids=[i for i, _, _ in BAD_ENDPOINTS],
)
def test_a_bad_endpoint_is_one_line_naming_the_key(tmp_path: Path, text: str, line: str) -> None:
    """Checked against: a bad endpoint accepted (an ftp URL, a secret that cannot sign,
    an event no one sends, two endpoints of one name), pydantic's "Value error, "
    prefix or a location written `webhooks.0.secret`, and the secret's text in the
    message (it goes to logs and to the `config/reload` answer)."""
    path = write(tmp_path, text)
    message = refused(path)
    assert message == f"config {path}: {line}"
    for part in (KEY_B64, KEY_B64[:8], KEY_B64[-8:]):
        assert part not in message


def test_the_environment_replaces_the_list_as_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`FIELDGATE_WEBHOOKS` is the whole list, as JSON, and replaces the file's; one
    endpoint's key cannot be set alone (docs/configuration.md says so).

    Checked against: the environment's list merged into the file's, an indexed
    variable silently ignored, and a value that is not JSON ending in a traceback or
    quoting the value."""
    path = write(tmp_path, ENDPOINT)
    given = [{"name": "env", "url": "http://h/", "events": ["*"], "secret": "whsec_YQ"}]
    monkeypatch.setenv("FIELDGATE_WEBHOOKS", json.dumps(given))
    assert [(w.name, w.url) for w in load(path).webhooks] == [("env", "http://h/")]
    monkeypatch.setenv("FIELDGATE_WEBHOOKS", "[]")
    assert load(path).webhooks == []
    monkeypatch.setenv("FIELDGATE_WEBHOOKS", f'[{{"secret": "whsec_{KEY_B64}"')
    assert refused(path) == (
        f'config {path}: the environment: error parsing value for field "webhooks"'
        ' from source "EnvSettingsSource"'
    )
    monkeypatch.delenv("FIELDGATE_WEBHOOKS")
    monkeypatch.setenv("FIELDGATE_WEBHOOKS__0__URL", "http://other/")
    assert refused(path) == f"config {path}: webhooks: Input should be a valid list"


# -- what may be shown -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://gw:s3cret@db:5432/fg", "postgresql+psycopg://gw:***@db:5432/fg"),
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("postgresql+psycopg://gw@db/fg", "postgresql+psycopg://gw@db/fg"),
        ("sqlite+aiosqlite:///var/fieldgate.db", "sqlite+aiosqlite:///var/fieldgate.db"),
        (SecretStr("redis://u:pw@h/1"), "redis://u:***@h/1"),
        ("https://h/hook?token=abc&v=2", "https://h/hook?token=***&v=***"),
        (
            "postgresql+psycopg://gw:pw@db/fg?sslmode=require",
            "postgresql+psycopg://gw:***@db/fg?sslmode=***",
        ),
        (None, None),
        (5, 5),
    ],
)
def test_a_url_is_shown_without_its_password(url: Any, shown: Any) -> None:
    assert hide_url_password(url) == shown


def test_redacted_shows_every_setting_and_no_secret(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[mqtt]\nusername = "gw"\npassword = "mqtt-pw"\ntls_ca = "/etc/ca.pem"\n'
        '[admin]\ntoken = "adm-tok"\n'
        '[database]\nurl = "postgresql+psycopg://gw:db-pw@db/fg"\n'
        '[redis]\nurl = "redis://:redis-pw@127.0.0.1:6379/0"\n'
        '[conflicts.types.task]\nstrategy = "manual"\ncritical_fields = ["status"]\n'
        + endpoint(url="https://gw:hook-pw@hooks.example/in"),
    )
    shown = redacted(load(path))
    expected = {
        **CONFIG_DEFAULTS,
        "mqtt": {
            **CONFIG_DEFAULTS["mqtt"],
            "username": "gw",
            "password": "***",
            "tls_ca": "/etc/ca.pem",
        },
        "admin": {"token": "***"},
        "database": {**CONFIG_DEFAULTS["database"], "url": "postgresql+psycopg://gw:***@db/fg"},
        "redis": {"url": "redis://:***@127.0.0.1:6379/0"},
        "conflicts": {
            **CONFIG_DEFAULTS["conflicts"],
            "types": {"task": {"strategy": "manual", "critical_fields": ["status"]}},
        },
        "ml": {**CONFIG_DEFAULTS["ml"], "models_dir": "var/models"},
        "webhooks": [
            {
                **ENDPOINT_DEFAULTS,
                "url": "https://gw:***@hooks.example/in",
                "secret": "***",
            }
        ],
    }
    assert shown == expected
    for secret in ("mqtt-pw", "adm-tok", "db-pw", "redis-pw", "hook-pw", KEY_B64):
        assert secret not in repr(shown)


def test_a_section_in_the_file_keeps_the_defaults_it_does_not_name(tmp_path: Path) -> None:
    """Its defaults are made when the file is read (default factories), not only once."""
    settings = load(write(tmp_path, "[alerts]\nmax_note_bytes = 1\n"))
    assert settings.alerts.model_dump() == {**CONFIG_DEFAULTS["alerts"], "max_note_bytes": 1}
