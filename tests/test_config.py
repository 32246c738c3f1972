"""The configuration (gateway/config.py): the file, the environment over it, the one
line that names a bad key, and what `config/get` may show.

Pure: no daemon, a TOML file in the test's directory and the test's environment.
"""

from __future__ import annotations

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


# -- what may be shown -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://gw:s3cret@db:5432/fg", "postgresql+psycopg://gw:***@db:5432/fg"),
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("postgresql+psycopg://gw@db/fg", "postgresql+psycopg://gw@db/fg"),
        ("sqlite+aiosqlite:///var/fieldgate.db", "sqlite+aiosqlite:///var/fieldgate.db"),
        (SecretStr("redis://u:pw@h/1"), "redis://u:***@h/1"),
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
        '[conflicts.types.task]\nstrategy = "manual"\ncritical_fields = ["status"]\n',
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
    }
    assert shown == expected
    for secret in ("mqtt-pw", "adm-tok", "db-pw", "redis-pw"):
        assert secret not in repr(shown)


def test_a_section_in_the_file_keeps_the_defaults_it_does_not_name(tmp_path: Path) -> None:
    """Its defaults are made when the file is read (default factories), not only once."""
    settings = load(write(tmp_path, "[alerts]\nmax_note_bytes = 1\n"))
    assert settings.alerts.model_dump() == {**CONFIG_DEFAULTS["alerts"], "max_note_bytes": 1}
