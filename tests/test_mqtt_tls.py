"""TLS and credentials to the broker (issue 15, item 3): a Mosquitto of each test's own
with a TLS listener, and certificates made here with `openssl` (a CA, a server
certificate for 127.0.0.1 and localhost, a client certificate, an expired server
certificate, and a second CA that signed nothing the broker knows).

The daemon and the CLI connect over TLS with a CA, a client certificate and a
password; a wrong CA, an expired certificate, a refused client certificate and a
wrong password each give one log line per attempt that says what is wrong, and the
daemon keeps retrying with its backoff.
"""

from __future__ import annotations

import itertools
import json
import os
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.config import ConfigError, MqttConfig, load
from gateway.mqtt.client import TlsFileError, describe, make_client
from tests.support import (
    SPINE_ONLY,
    Client,
    Daemon,
    Mosquitto,
    NotifySocket,
    ack_topic,
    db_rows,
    fieldgate,
    free_port,
    require,
    sync_op,
    wait_for,
    wait_port,
)

USER = "fieldgate"
PASSWORD = "gw-Tls-Pass-7"
NOT_OUR_CA = "(the broker's certificate is not signed by the CA in mqtt.tls_ca)"
EXPIRED = (
    "TLS: certificate verify failed: certificate has expired (a certificate of the"
    " broker's chain is out of its dates, or the clock here is wrong)"
)
NOT_AUTHORIZED = "broker refused the connection: Not authorized (CONNACK reason code 135)"
"""Mosquitto answers a wrong password with 0x87 Not authorized (not 0x86)."""


# -- certificates ------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    expired_cert: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    """A client certificate signed by the other CA: the broker does not know it."""
    stranger_key: Path


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def _key(directory: Path, name: str) -> None:
    _openssl(
        directory,
        *("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"),
        *("-out", f"{name}.key"),
    )


def _ca(directory: Path, name: str) -> None:
    _key(directory, name)
    _openssl(
        directory,
        *("req", "-x509", "-new", "-key", f"{name}.key", "-out", f"{name}.pem"),
        *("-days", "2", "-subj", f"/CN=fieldgate test {name}"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )


def _signed(directory: Path, name: str, ca: str, serial: int, extensions: str) -> None:
    """`name.pem` for a new key `name.key`, signed by `ca`, valid from now for 2 days."""
    _key(directory, name)
    _openssl(
        directory,
        *("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr"),
    )
    _openssl(
        directory,
        *("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key"),
        *("-set_serial", str(serial), "-days", "2", "-extfile", extensions),
        *("-out", f"{name}.pem"),
    )


CA_CONFIG = """\
[ca]
default_ca = test
[test]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = any
[any]
commonName = supplied
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require("openssl")
    directory = tmp_path_factory.mktemp("pki")
    directory.chmod(0o755)  # a broker that drops to its own user still reads it
    (directory / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    _signed(directory, "server", "ca", 2, "server.ext")
    _signed(directory, "client", "ca", 3, "client.ext")
    _signed(directory, "stranger", "other-ca", 4, "client.ext")
    # The same server key in a certificate that expired in 2020: `openssl x509` (3.0)
    # takes no start date, `openssl ca` does.
    (directory / "ca.cnf").write_text(CA_CONFIG)
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("05\n")
    _openssl(
        directory,
        *("ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key"),
        *("-in", "server.csr", "-out", "expired.pem", "-notext", "-extfile", "server.ext"),
        *("-startdate", "20200101000000Z", "-enddate", "20200102000000Z"),
    )
    for path in directory.iterdir():
        path.chmod(0o644)
    return Pki(
        ca=directory / "ca.pem",
        other_ca=directory / "other-ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        expired_cert=directory / "expired.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        stranger_cert=directory / "stranger.pem",
        stranger_key=directory / "stranger.key",
    )


# -- a broker with a TLS listener --------------------------------------------------


@dataclass
class TlsBroker:
    mosquitto: Mosquitto
    port: int
    """The TLS listener's (the helper's plain listener is `mosquitto.port`)."""


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., TlsBroker]]:
    """`tls_broker(certfile=..., client_certificate=False, password=False)`: a started
    Mosquitto whose second listener speaks TLS with `certfile` (the server key is the
    same for the good and the expired certificate); `client_certificate`: it requires
    one signed by the CA; `password`: no anonymous access, `USER`/`PASSWORD` only."""
    started: list[Mosquitto] = []

    def start(
        certfile: Path | None = None, client_certificate: bool = False, password: bool = False
    ) -> TlsBroker:
        port = free_port()
        lines = [
            f"listener {port} 127.0.0.1",
            f"cafile {pki.ca}",
            f"certfile {certfile or pki.server_cert}",
            f"keyfile {pki.server_key}",
            f"require_certificate {'true' if client_certificate else 'false'}",
        ]
        if password:
            require("mosquitto_passwd")
            passwd = tmp_path / "passwd"
            subprocess.run(
                ["mosquitto_passwd", "-c", "-b", str(passwd), USER, PASSWORD],
                check=True,
                capture_output=True,
            )
            passwd.chmod(0o644)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        require("mosquitto")
        mosquitto = Mosquitto(tmp_path / f"broker{len(started)}", extra="\n".join(lines))
        started.append(mosquitto.start())
        wait_port(port)
        return TlsBroker(mosquitto, port)

    yield start
    for mosquitto in started:
        mosquitto.stop()


def tls_env(
    pki: Pki, *, ca: Path | None = None, client: bool = True, **more: str
) -> dict[str, str]:
    """The daemon's TLS settings as environment overrides."""
    env = {"MQTT__TLS_CA": str(ca or pki.ca), **SPINE_ONLY, **more}
    if client:
        env.update(MQTT__TLS_CERT=str(pki.client_cert), MQTT__TLS_KEY=str(pki.client_key))
    return env


def tls_device(port: int, pki: Pki) -> Client:
    """A device of the tests, over TLS with the client certificate and the password."""
    client = Client(port, username=USER, password=PASSWORD)
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(pki.client_cert, pki.client_key)
    client.paho.tls_set_context(context)
    return client.connect()


def failures(daemon: Daemon, lane: str = "sync") -> list[dict[str, Any]]:
    """One lane's failed attempts (each lane's session tries on its own, alike)."""
    return [
        line
        for line in daemon.log_lines()
        if line.get("event") == "mqtt connection failed" and line.get("lane") == lane
    ]


def wait_failures(daemon: Daemon, count: int) -> list[dict[str, Any]]:
    """The daemon's first `count` `mqtt connection failed` lines, once it logged them."""
    return list(wait_for(lambda: len(found := failures(daemon)) >= count and found)[:count])


def at(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["timestamp"]).timestamp()


# -- the daemon over TLS -------------------------------------------------------------


def test_the_daemon_stores_an_operation_over_tls_with_a_client_certificate_and_a_password(
    tls_broker: Callable[..., TlsBroker], pki: Pki, make_daemon: Callable[..., Daemon]
) -> None:
    broker = tls_broker(client_certificate=True, password=True)
    daemon = make_daemon(broker.port, **tls_env(pki, MQTT__USERNAME=USER, MQTT__PASSWORD=PASSWORD))
    device = tls_device(broker.port, pki).subscribe(ack_topic(daemon.root, "tablet-7"))
    try:
        device.publish(f"{daemon.root}/devices/tablet-7/sync", sync_op("tls-1", entity_id="wo-9"))
        (ack,) = device.expect(1)
    finally:
        device.close()
    assert ack.json() == {
        "batch_id": None,
        "results": [{"op_id": "tls-1", "status": "stored", "version": 1}],
    }
    assert db_rows(
        daemon.db_url,
        "SELECT op_id, device_id, entity_type, entity_id, version FROM sync_log",
    ) == [("tls-1", "tablet-7", "task", "wo-9", 1)]
    assert failures(daemon) == failures(daemon, "priority") == []
    assert daemon.terminate() == 0
    assert PASSWORD not in daemon.log()


def test_the_cli_asks_the_daemon_over_tls(
    tls_broker: Callable[..., TlsBroker], pki: Pki, make_daemon: Callable[..., Daemon]
) -> None:
    """`fieldgate admin health` and `fieldgate simulate` with the daemon's config (here
    its environment): the same CA, client certificate and password."""
    broker = tls_broker(client_certificate=True, password=True)
    daemon = make_daemon(broker.port, **tls_env(pki, MQTT__USERNAME=USER, MQTT__PASSWORD=PASSWORD))
    env = {**os.environ, **daemon.env}
    env.pop("NOTIFY_SOCKET", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return fieldgate(*args, "--config", str(daemon.config_path), env=env)

    health = cli("admin", "health", "--json-output")
    assert health.returncode == 0, health.stderr
    answer = json.loads(health.stdout)
    assert answer["status"] == "ok"
    assert answer["data"]["checks"]["mqtt"]["ok"] is True

    simulate = cli("simulate", "--devices", "1", "--count", "3", "--rate", "100", "--json")
    assert simulate.returncode == 0, simulate.stderr
    summary = json.loads(simulate.stdout)
    assert summary["sent"]["ops"] == 3, summary
    assert summary["unanswered"] == 0, summary
    assert PASSWORD not in health.stderr + simulate.stderr


def test_a_wrong_ca_is_one_line_per_attempt_retried_with_backoff_until_fixed(
    tls_broker: Callable[..., TlsBroker],
    pki: Pki,
    make_daemon: Callable[..., Daemon],
    notify: NotifySocket,
) -> None:
    """The daemon trusts another CA: each attempt is one `mqtt connection failed` line
    that says so, the delays grow (full jitter within a doubling cap), the daemon
    lives on and does not tell systemd it is ready (as with a broker that is down);
    restarted with the right CA, it connects and says READY=1."""
    broker = tls_broker()
    daemon = make_daemon(
        broker.port,
        start=False,
        **tls_env(
            pki,
            ca=pki.other_ca,
            client=False,
            MQTT__RECONNECT_MIN_S="0.2",
            MQTT__RECONNECT_MAX_S="0.8",
        ),
    )
    daemon.start(wait_ready=False, extra_env={"NOTIFY_SOCKET": str(notify.path)})
    lines = wait_failures(daemon, 5)
    assert daemon.proc is not None and daemon.proc.poll() is None
    for line in lines:
        assert line["reason"].startswith("TLS: certificate verify failed: ")
        assert line["reason"].endswith(NOT_OUR_CA)
        assert (line["level"], line["host"], line["port"]) == ("warning", "127.0.0.1", broker.port)
    delays = [line["retry_in_s"] for line in lines]
    caps = [0.2, 0.4, 0.8, 0.8, 0.8]
    assert delays[0] == 0.2
    assert max(delays[1:]) > 0.2, delays
    assert all(0.2 <= delay <= cap for delay, cap in zip(delays, caps, strict=True)), delays
    for earlier, later in itertools.pairwise(lines):
        assert at(later) - at(earlier) >= earlier["retry_in_s"] - 0.01
    # Nothing else per attempt: no line of paho's, no second warning.
    assert all(line.startswith("{") for line in daemon.log().splitlines())
    assert not any(
        line.get("level") in ("warning", "error") and line.get("event") != "mqtt connection failed"
        for line in daemon.log_lines()
    )
    assert "READY=1" not in "\n".join(notify.messages())

    assert daemon.terminate() == 0
    lines_before_restart = failures(daemon)
    daemon.env["FIELDGATE_MQTT__TLS_CA"] = str(pki.ca)
    # (Not `wait_ready`: it counts one "ready" per start, and the first start had none.)
    daemon.start(wait_ready=False, extra_env={"NOTIFY_SOCKET": str(notify.path)})
    wait_for(lambda: notify.ready_at is not None, timeout=30)
    connected = [line for line in daemon.log_lines() if line.get("event") == "mqtt connected"]
    assert sorted(line["lane"] for line in connected) == ["priority", "sync"]
    assert len(failures(daemon)) == len(lines_before_restart)


def test_an_expired_server_certificate_is_said_so(
    tls_broker: Callable[..., TlsBroker], pki: Pki, make_daemon: Callable[..., Daemon]
) -> None:
    broker = tls_broker(certfile=pki.expired_cert)
    daemon = make_daemon(
        broker.port, start=False, **tls_env(pki, client=False, MQTT__RECONNECT_MIN_S="0.2")
    )
    daemon.start(wait_ready=False)
    lines = wait_failures(daemon, 2)
    assert [line["reason"] for line in lines] == [EXPIRED, EXPIRED]
    assert daemon.terminate() == 0


def test_a_wrong_password_gives_the_connack_reason_and_never_the_password(
    tls_broker: Callable[..., TlsBroker], pki: Pki, make_daemon: Callable[..., Daemon]
) -> None:
    broker = tls_broker(client_certificate=True, password=True)
    wrong = "not-the-Pass-9"
    daemon = make_daemon(
        broker.port,
        start=False,
        **tls_env(pki, MQTT__USERNAME=USER, MQTT__PASSWORD=wrong, MQTT__RECONNECT_MIN_S="0.2"),
    )
    daemon.start(wait_ready=False)
    lines = wait_failures(daemon, 2)
    assert [line["reason"] for line in lines] == [NOT_AUTHORIZED, NOT_AUTHORIZED]
    assert daemon.terminate() == 0
    assert wrong not in daemon.log()
    assert PASSWORD not in daemon.log()


# -- each failure in words, straight from the client the daemon and the CLI use --------


def _config(broker: TlsBroker, pki: Pki, **changes: Any) -> MqttConfig:
    settings: dict[str, Any] = {
        "port": broker.port,
        "tls_ca": pki.ca,
        "tls_cert": pki.client_cert,
        "tls_key": pki.client_key,
        "username": USER,
        "password": PASSWORD,
    }
    settings.update(changes)
    return MqttConfig(**settings)


async def _connect(config: MqttConfig) -> str:
    """`connected`, or why not, in the words of the log line."""
    try:
        async with make_client(config, identifier="tls-probe"):
            return "connected"
    except (aiomqtt.MqttError, TlsFileError) as exc:
        return describe(exc)


async def test_each_refusal_in_words_at_once(
    tls_broker: Callable[..., TlsBroker], pki: Pki
) -> None:
    """A client certificate missing or from an unknown CA is refused by the broker
    after the handshake (TLS 1.3): said at once, not after the 10 s CONNACK timeout.

    Those two refusals come as an alert after the client has sent its CONNECT. The
    broker closes at once; when the CONNECT is still unread there, its kernel resets
    the connection, and the alert on its way to the client can be lost with it (seen
    once in a loaded CI run: "the broker closed the connection before its CONNACK",
    also at once). So each of them is tried up to three times, and must be said in
    words on one of them."""
    broker = tls_broker(client_certificate=True, password=True)
    expired = tls_broker(certfile=pki.expired_cert)
    after_handshake = {
        "TLS: the broker requires a client certificate (mqtt.tls_cert, mqtt.tls_key):"
        " tlsv13 alert certificate required",
        "TLS: the broker refused the client certificate (mqtt.tls_cert): tlsv1 alert unknown ca",
    }
    cases = {
        "connected": _config(broker, pki),
        "connected with localhost": _config(broker, pki, host="localhost"),
        "TLS: the broker requires a client certificate (mqtt.tls_cert, mqtt.tls_key):"
        " tlsv13 alert certificate required": _config(broker, pki, tls_cert=None, tls_key=None),
        "TLS: the broker refused the client certificate (mqtt.tls_cert):"
        " tlsv1 alert unknown ca": _config(
            broker, pki, tls_cert=pki.stranger_cert, tls_key=pki.stranger_key
        ),
        EXPIRED: _config(expired, pki),
        NOT_AUTHORIZED: _config(broker, pki, password="wrong"),
        f"mqtt.tls_key: {pki.stranger_key}: not the key of the certificate in mqtt.tls_cert": (
            _config(broker, pki, tls_key=pki.stranger_key)
        ),
        f"mqtt.tls_ca: cannot read {pki.ca}.missing: No such file or directory": _config(
            broker, pki, tls_ca=Path(f"{pki.ca}.missing")
        ),
        f"mqtt.tls_cert: {pki.client_key}: no PEM certificate in it": _config(
            broker, pki, tls_cert=pki.client_key
        ),
    }
    for expected, config in cases.items():
        said = await _connect(config)
        for _ in range(2):
            if said == expected or expected not in after_handshake:
                break
            assert said == "the broker closed the connection before its CONNACK", config
            said = await _connect(config)
        assert said == expected.removesuffix(" with localhost"), config
        assert PASSWORD not in said


def test_an_encrypted_key_is_refused_without_a_prompt(pki: Pki, tmp_path: Path) -> None:
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        [
            *("openssl", "pkey", "-in", str(pki.client_key), "-aes256"),
            *("-passout", "pass:secret", "-out", str(encrypted)),
        ],
        check=True,
        capture_output=True,
    )
    config = MqttConfig(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=encrypted)
    with pytest.raises(TlsFileError) as refused:
        make_client(config, identifier="never")
    assert str(refused.value) == (
        f"mqtt.tls_key: {encrypted}: the key is encrypted; fieldgate needs it unencrypted"
        " (readable by its user only)"
    )


def test_the_daemon_does_not_start_with_a_tls_file_it_cannot_read(
    pki: Pki, make_daemon: Callable[..., Daemon]
) -> None:
    """A config error (exit 2, which systemd does not restart), one line naming the key."""
    daemon = make_daemon(1, start=False, MQTT__TLS_CA=f"{pki.ca}.missing")
    daemon.start(wait_ready=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(30) == 2
    assert daemon.log().strip().splitlines()[-1] == (
        f"fieldgate: config {daemon.config_path}: mqtt.tls_ca: cannot read"
        f" {pki.ca}.missing: No such file or directory"
    )


# -- the config ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('tls_ca = "/ca.pem"\ntls_cert = "/c.pem"', "mqtt.tls_key: needed with mqtt.tls_cert"),
        ('tls_ca = "/ca.pem"\ntls_key = "/c.key"', "mqtt.tls_cert: needed with mqtt.tls_key"),
        (
            'tls_cert = "/c.pem"\ntls_key = "/c.key"',
            "mqtt.tls_ca: needed with a client certificate: the CA file that verifies the broker",
        ),
    ],
)
def test_a_client_certificate_comes_with_its_key_and_a_ca(
    tmp_path: Path, text: str, line: str
) -> None:
    path = tmp_path / "fieldgate.toml"
    path.write_text(f"[mqtt]\n{text}\n")
    with pytest.raises(ConfigError) as refused:
        load(path)
    assert str(refused.value).startswith(f"config {path}: {line}")
    assert "\n" not in str(refused.value)


def test_the_tls_files_are_shown_by_config_get_as_paths(tmp_path: Path) -> None:
    from gateway.config import redacted

    path = tmp_path / "fieldgate.toml"
    path.write_text('[mqtt]\ntls_ca = "/ca.pem"\ntls_cert = "/c.pem"\ntls_key = "/c.key"\n')
    shown = redacted(load(path))["mqtt"]
    assert (shown["tls_ca"], shown["tls_cert"], shown["tls_key"]) == (
        "/ca.pem",
        "/c.pem",
        "/c.key",
    )
