"""config/mosquitto.acl.example on a real Mosquitto with passwords, no anonymous access.

The gateway connects as `fieldgate` (topic root `fieldgate`, which the ACL file
names); a device's username is its device id; `operator` runs admin commands.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support import (
    ROOT,
    Client,
    Daemon,
    Mosquitto,
    fieldgate,
    require,
    results_of,
    sync_op,
    wait_for,
)

PASSWORDS = {
    "fieldgate": "gw-Pass-1",
    "operator": "op-Pass-2",
    "dev1": "dev1-Pass-3",
    "dev2": "dev2-Pass-4",
}
NOT_AUTHORIZED = 0x87


class Device(Client):
    """A test client that logs in and records the reason code of every PUBACK."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pubacks: dict[int, int] = {}
        self._acked = threading.Lock()

        def on_publish(_c: Any, _u: Any, mid: int, reason: Any, _props: Any) -> None:
            with self._acked:
                self.pubacks[mid] = int(reason.value)

        self.paho.on_publish = on_publish

    def puback(self, info: mqtt.MQTTMessageInfo) -> int:
        """The PUBACK reason code of a QoS 1 publish (0 success, 0x87 not authorized)."""

        def code() -> int | None:
            with self._acked:
                return self.pubacks.get(info.mid)

        wait_for(lambda: code() is not None)
        return int(code() or 0)


def login(port: int, user: str) -> Device:
    device = Device(
        port,
        client_id=f"{user}-{uuid.uuid4().hex[:6]}",
        username=user,
        password=PASSWORDS[user],
    )
    device.connect()
    return device


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    require("mosquitto_passwd")
    passwd_tool = shutil.which("mosquitto_passwd")
    assert passwd_tool is not None
    # Started as root, Mosquitto may drop to the `mosquitto` user before it reads the
    # password and ACL files, so they live where that user can read them, not in
    # this test's private directory.
    shared = Path(tempfile.mkdtemp(prefix="fieldgate-acl-"))
    shared.chmod(0o755)
    try:
        passwd = shared / "passwd"
        for n, (user, password) in enumerate(PASSWORDS.items()):
            create = ["-c"] if n == 0 else []
            subprocess.run(
                [passwd_tool, "-b", *create, str(passwd), user, password],
                check=True,
                capture_output=True,
            )
        passwd.chmod(0o644)
        acl = shared / "fieldgate.acl"
        shutil.copyfile(ROOT / "config" / "mosquitto.acl.example", acl)
        acl.chmod(0o644)
        mosq = Mosquitto(
            tmp_path / "acl-broker",
            extra=f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n",
        ).start()
        try:
            yield mosq
        finally:
            mosq.stop()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.fixture
def gateway(acl_broker: Mosquitto, make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon(
        acl_broker.port,
        MQTT__USERNAME="fieldgate",
        MQTT__PASSWORD=PASSWORDS["fieldgate"],
        MQTT__TOPIC_ROOT="fieldgate",
    )


def stored_devices(daemon: Daemon) -> list[tuple[str, str]]:
    with sqlite3.connect(daemon.db_url.split("///", 1)[1]) as conn:
        rows = conn.execute("SELECT device_id, op_id FROM sync_log ORDER BY op_id").fetchall()
    return [(str(d), str(o)) for d, o in rows]


def test_anonymous_clients_are_refused(acl_broker: Mosquitto) -> None:
    anonymous = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    refused: list[int] = []
    anonymous.on_connect = lambda _c, _u, _f, reason, _p: refused.append(int(reason.value))
    anonymous.connect("127.0.0.1", acl_broker.port)
    anonymous.loop_start()
    try:
        wait_for(lambda: refused)
    finally:
        anonymous.loop_stop()
    assert refused[0] in (0x86, 0x87)  # bad user name or password / not authorized


def test_devices_write_and_read_only_their_own_topics(
    acl_broker: Mosquitto, gateway: Daemon
) -> None:
    assert gateway.root == "fieldgate"
    dev1 = login(acl_broker.port, "dev1")
    dev2 = login(acl_broker.port, "dev2")
    try:
        dev1.subscribe("fieldgate/devices/dev1/sync/ack", "fieldgate/devices/dev2/sync/ack")
        dev2.subscribe("fieldgate/devices/dev2/sync/ack")

        # its own topic: stored and acked
        info = dev1.publish("fieldgate/devices/dev1/sync", sync_op("a-1"))
        assert dev1.puback(info) == 0
        assert wait_for(lambda: results_of(dev1.on("fieldgate/devices/dev1/sync/ack"))) == [
            {"op_id": "a-1", "status": "stored", "version": 1}
        ]

        # another device's topic: the broker refuses it, the gateway never sees it
        info = dev1.publish("fieldgate/devices/dev2/sync", sync_op("forged", entity_id="t9"))
        assert dev1.puback(info) == NOT_AUTHORIZED

        # dev2's own ops are acked to dev2, and dev1 reads none of those acks
        info = dev2.publish("fieldgate/devices/dev2/sync", sync_op("b-1", entity_id="t2"))
        assert dev2.puback(info) == 0
        assert wait_for(lambda: results_of(dev2.on("fieldgate/devices/dev2/sync/ack"))) == [
            {"op_id": "b-1", "status": "stored", "version": 1}
        ]
        # a fence: dev1's next ack comes after anything the broker would have sent it before
        dev1.publish("fieldgate/devices/dev1/sync", sync_op("a-2", entity_id="t3"))
        wait_for(lambda: len(results_of(dev1.on("fieldgate/devices/dev1/sync/ack"))) == 2)
        assert [m.topic for m in dev1.all] == ["fieldgate/devices/dev1/sync/ack"] * 2
        assert stored_devices(gateway) == [("dev1", "a-1"), ("dev1", "a-2"), ("dev2", "b-1")]
    finally:
        dev1.close()
        dev2.close()


def test_admin_only_for_operators(
    acl_broker: Mosquitto, gateway: Daemon, healthy: dict[str, Any]
) -> None:
    dev1 = login(acl_broker.port, "dev1")
    operator = login(acl_broker.port, "operator")
    try:
        # a device may not send admin requests, even with a reply topic it can read
        dev1.subscribe(
            "fieldgate/devices/dev1/hints",
            "fieldgate/admin/response/#",
            "fieldgate/status",
            "fieldgate/health",
        )
        info = dev1.publish(
            "fieldgate/admin/request/log_level",
            {"transaction": "sneaky", "level": "error"},
            response_topic="fieldgate/devices/dev1/hints",
            correlation=b"c1",
        )
        assert dev1.puback(info) == NOT_AUTHORIZED

        operator.subscribe("fieldgate/admin/response/#")
        info = operator.publish("fieldgate/admin/request/health", {"transaction": "op-1"})
        assert operator.puback(info) == 0
        (answer,) = operator.expect(1)
        assert answer.topic == "fieldgate/admin/response/health"
        assert answer.json() == {
            "transaction": "op-1",
            "status": "ok",
            "data": healthy,
        }
        # a fence for dev1: an answer of its own, after the refused request; before
        # it, no admin answer and no retained status or health reached the device
        dev1.subscribe("fieldgate/devices/dev1/sync/ack")
        dev1.publish("fieldgate/devices/dev1/sync", sync_op("a-1"))
        wait_for(lambda: results_of(dev1.on("fieldgate/devices/dev1/sync/ack")))
        assert [m.topic for m in dev1.all] == ["fieldgate/devices/dev1/sync/ack"]
        # the device's request never reached the gateway: no answer, nothing logged
        admin_lines = [
            (line.get("event"), line.get("command"))
            for line in gateway.log_lines()
            if str(line.get("event", "")).startswith("admin")
        ]
        assert admin_lines == [("admin command done", "health")]
        assert "sneaky" not in gateway.log()
        # ...and an operator reads status and health, a device does not
        operator.subscribe("fieldgate/status")
        (status,) = operator.expect(1)
        assert status.json()["state"] == "online"
    finally:
        dev1.close()
        operator.close()


def test_the_cli_as_operator(acl_broker: Mosquitto, gateway: Daemon, tmp_path: Path) -> None:
    config = tmp_path / "operator.toml"
    config.write_text(
        f'[mqtt]\nport = {acl_broker.port}\ntopic_root = "fieldgate"\n'
        f'username = "operator"\npassword = "{PASSWORDS["operator"]}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDGATE_")}
    result = fieldgate("admin", "stats", "--json-output", "-c", str(config), env=env)
    assert result.returncode == 0, result
    assert json.loads(result.stdout)["data"]["messages"] == {
        "alert": 0,
        "crisis_ack": 0,
        "sync": 0,
        "admin": 1,
    }
