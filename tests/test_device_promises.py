"""What docs/devices.md tells device developers, each promise tried (issue 15, item 10).

- A PUBACK comes from the broker, not from the gateway: it says nothing of storage
  (here: PUBACKed while the gateway is stopped, stored only once it runs).
- Only the sync ack means stored, and a device with a persistent session
  (`clean_start=false`, a `SessionExpiryInterval`) gets the acks published while it
  was away (here: the ack published while the device is disconnected reaches it
  when it comes back).
- A v5 `ResponseTopic` gets the answer of a payload whose `op_id` could not be read:
  tests/test_ingest.py::test_v5_response_topic_gets_rejections_too.
- An ack has two shapes, `batch_id` for one payload, `batch_ids` for several
  committed together: tests/test_ingest.py (one ack per device per commit).
"""

from __future__ import annotations

from collections.abc import Callable

from tests.support import (
    Client,
    Daemon,
    Mosquitto,
    PersistentClient,
    db_rows,
    stored,
    sync_op,
    wait_for,
)
from tests.support.sync import ack_topic, sync_topic


def stored_op_ids(daemon: Daemon) -> list[str]:
    return [row[0] for row in db_rows(daemon.db_url, "select op_id from sync_log order by id")]


def test_a_puback_comes_from_the_broker_and_only_the_ack_means_stored(
    own_broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    daemon = make_daemon(own_broker.port)
    daemon.stop()
    device = Client(own_broker.port).connect()
    try:
        device.subscribe(ack_topic(daemon.root, "tab-1"))
        info = device.publish(sync_topic(daemon.root, "tab-1"), sync_op("while-stopped"))
        assert info.is_published()  # PUBACKed, with no gateway running
        assert stored_op_ids(daemon) == []
        daemon.start()
        (ack,) = device.expect(1)
        assert ack.json() == {"batch_id": None, "results": [stored("while-stopped", 1)]}
        assert stored_op_ids(daemon) == ["while-stopped"]
    finally:
        device.close()


def test_a_persistent_device_gets_the_ack_published_while_it_was_away(
    own_broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    daemon = make_daemon(own_broker.port)
    topic = ack_topic(daemon.root, "tab-2")
    watcher = Client(own_broker.port).connect().subscribe(topic)
    device = PersistentClient(own_broker.port, client_id="tab-2-app").connect()
    device.subscribe(topic)
    daemon.stop()
    device.publish(sync_topic(daemon.root, "tab-2"), sync_op("sent-then-away"))
    device.paho.disconnect()
    device.close()
    try:
        daemon.start()
        # The ack is out (the watcher has it) while the device is away...
        wait_for(lambda: watcher.on(topic))
        assert stored_op_ids(daemon) == ["sent-then-away"]
        # ...and the broker kept it for the device's session.
        back = PersistentClient(own_broker.port, client_id="tab-2-app").connect()
        try:
            (ack,) = back.expect(1)
            assert (ack.topic, ack.json()) == (
                topic,
                {"batch_id": None, "results": [stored("sent-then-away", 1)]},
            )
        finally:
            back.close()
    finally:
        watcher.close()
