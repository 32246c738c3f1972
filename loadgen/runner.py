"""The load runner: publishes generated payloads as field devices would, counts answers.

`run_simulation(...)` (the `fieldgate simulate` command) publishes a stream of
`loadgen.generator` payloads from N paho clients, one per device (client id
`sim-<n>`), at a rate or as fast as possible, bounded in count and in time,
QoS 1 with a cap on unacknowledged publishes per client, and counts the
gateway's answers by `op_id` at the receiving end. It refuses a broker that is
not on this machine unless told otherwise: a load test aimed at production by
mistake is a bad day.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

from handlers.times import now_us
from loadgen.causal import CausalGenerator
from loadgen.generator import Generator, GeneratorOptions, Payload


@dataclass(frozen=True)
class Broker:
    """Where to publish: the broker and the gateway's topic root."""

    host: str = "127.0.0.1"
    port: int = 1883
    topic_root: str = "fieldgate"
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    """TLS to the broker (the CLI makes it from `[mqtt]`: CA, client certificate)."""
    keepalive_s: int = 30


class RemoteHostRefused(Exception):
    """The broker is not on this machine and `--allow-remote` was not given."""


def check_loopback(host: str, port: int, allow_remote: bool = False) -> list[str]:
    """The addresses `host` resolves to; refuse unless every one is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise RemoteHostRefused(f"cannot resolve {host!r}: {exc.strerror}") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    if allow_remote:
        return addresses
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        if not (ip.is_loopback or (mapped is not None and mapped.is_loopback)):
            raise RemoteHostRefused(
                f"{host!r} resolves to {address}, not a loopback address; "
                "pass --allow-remote to load a broker on another machine"
            )
    return addresses


@dataclass(frozen=True)
class RunOptions:
    rate: float = 100.0
    """Operations a second, all devices together; 0 = as fast as possible."""
    count: int = 10_000
    duration_s: float = 60.0
    inflight: int = 100
    """Unacknowledged QoS 1 publishes per client before it waits for PUBACKs."""
    ack_wait_s: float = 10.0
    """After sending, how long to wait for the gateway's last answers."""
    connect_timeout_s: float = 10.0
    allow_remote: bool = False
    progress: bool = True


class Tally:
    """What was sent and what came back, counted by op_id; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.payloads = 0
        self.ops = 0
        self.publish_failed = 0
        self.pubacks = 0
        self.ack_messages = 0
        self.bad_acks = 0
        self.expected = {"stored": 0, "duplicate": 0, "rejected": 0}
        self.by_status: dict[str, set[str]] = {
            "stored": set(),
            "duplicate": set(),
            "rejected": set(),
        }
        self.rejected_without_id = 0
        self.codes: dict[str, int] = {}

    def sent(self, payload: Payload) -> None:
        with self.lock:
            self.payloads += 1
            self.ops += payload.n_ops
            for result in payload.expected:
                self.expected[result.status] += 1

    def answer(self, body: bytes) -> None:
        try:
            data = json.loads(body)
            results = data["results"]
        except (ValueError, KeyError, TypeError):
            with self.lock:
                self.bad_acks += 1
            return
        with self.lock:
            self.ack_messages += 1
            for result in results if isinstance(results, list) else []:
                if not isinstance(result, dict):
                    continue
                status = result.get("status")
                op_id = result.get("op_id")
                if status not in self.by_status:
                    continue
                if status == "rejected":
                    error = result.get("error") or {}
                    code = str(error.get("code")) if isinstance(error, dict) else "?"
                    self.codes[code] = self.codes.get(code, 0) + 1
                    if not isinstance(op_id, str):
                        self.rejected_without_id += 1
                        continue
                if isinstance(op_id, str):
                    self.by_status[status].add(op_id)

    def answered(self) -> dict[str, int]:
        with self.lock:
            return {
                "stored": len(self.by_status["stored"]),
                "duplicate": len(self.by_status["duplicate"]),
                "rejected": len(self.by_status["rejected"]) + self.rejected_without_id,
            }

    def complete(self) -> bool:
        answered = self.answered()
        with self.lock:
            return all(answered[k] >= v for k, v in self.expected.items())


class _SimClient:
    """One device's MQTT client: publishes its payloads, receives its acks."""

    def __init__(
        self,
        index: int,
        device_id: str,
        broker: Broker,
        tally: Tally,
        inflight: int,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.device_id = device_id
        self.tally = tally
        self.ack_topic = f"{broker.topic_root}/devices/{device_id}/sync/ack"
        self.slots = threading.Semaphore(inflight)
        self.subscribed = threading.Event()
        self.mqtt = mqtt
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"sim-{index}", protocol=mqtt.MQTTv5
        )
        if broker.username:
            client.username_pw_set(broker.username, broker.password)
        if broker.tls is not None:
            client.tls_set_context(broker.tls)
        client.max_inflight_messages_set(inflight)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self.client = client

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.ack_topic, qos=1)

    def _on_subscribe(self, *_args: Any) -> None:
        self.subscribed.set()

    def _on_publish(self, *_args: Any) -> None:
        self.slots.release()
        with self.tally.lock:
            self.tally.pubacks += 1

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        self.tally.answer(bytes(message.payload))

    def start(self, host: str, port: int, keepalive: int) -> None:
        self.client.connect_async(host, port, keepalive=keepalive, clean_start=True)
        self.client.loop_start()

    def publish(self, topic: str, body: bytes, deadline: float) -> bool:
        """Publish at QoS 1 once a slot is free; False at the deadline or on refusal."""
        while not self.slots.acquire(timeout=0.1):
            if time.monotonic() >= deadline:
                return False
        info = self.client.publish(topic, body, qos=1)
        if info.rc != self.mqtt.MQTT_ERR_SUCCESS:
            self.slots.release()
            return False
        return True

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_simulation(
    broker: Broker,
    gen_options: GeneratorOptions,
    run: RunOptions,
    err: IO[str] | None = None,
) -> dict[str, Any]:
    """Publish the generated stream to the configured broker and count the answers.

    Stops sending at `run.count` operations or `run.duration_s`, whichever comes
    first, then waits up to `run.ack_wait_s` for the last answers. Returns the
    summary (see `format_summary`). Raises `RemoteHostRefused` for a broker that
    is not on loopback unless `run.allow_remote`, `ConnectionError` when the
    clients cannot all connect.
    """
    err = err or sys.stderr
    cfg = broker
    check_loopback(cfg.host, cfg.port, run.allow_remote)
    root = cfg.topic_root
    options = dataclasses.replace(
        gen_options, max_ops=min(run.count, gen_options.max_ops or run.count)
    )
    generator: Generator | CausalGenerator = (
        CausalGenerator(options, clock=now_us)
        if options.scenario == "causal"
        else Generator(options, clock=now_us)
    )
    tally = Tally()
    device_ids = [device.device_id for device in generator.devices]
    clients = {
        device_id: _SimClient(index + 1, device_id, broker, tally, run.inflight)
        for index, device_id in enumerate(device_ids)
    }
    stop_progress = threading.Event()
    started = time.monotonic()
    try:
        for client in clients.values():
            client.start(cfg.host, cfg.port, cfg.keepalive_s)
        connect_deadline = time.monotonic() + run.connect_timeout_s
        for client in clients.values():
            if not client.subscribed.wait(max(0.0, connect_deadline - time.monotonic())):
                raise ConnectionError(
                    f"device {client.device_id} could not connect to {cfg.host}:{cfg.port} "
                    f"and subscribe within {run.connect_timeout_s} s"
                )
        started = time.monotonic()
        deadline = started + run.duration_s
        progress = threading.Thread(
            target=_progress,
            args=(tally, started, stop_progress, err),
            name="sim-progress",
            daemon=True,
        )
        if run.progress:
            progress.start()
        stopped_by = _send(generator, clients, tally, root, run, started, deadline)
        sent_s = time.monotonic() - started
        ack_deadline = time.monotonic() + run.ack_wait_s
        while not tally.complete() and time.monotonic() < ack_deadline:
            time.sleep(0.02)
        answered_s = time.monotonic() - started
    finally:
        stop_progress.set()
        for client in clients.values():
            client.stop()
    answered = tally.answered()
    with tally.lock:
        expected = dict(tally.expected)
        summary: dict[str, Any] = {
            "broker": f"{cfg.host}:{cfg.port}",
            "topic_root": root,
            "seed": options.seed,
            "devices": options.devices,
            "stopped_by": stopped_by,
            "send_s": round(sent_s, 3),
            "elapsed_s": round(answered_s, 3),
            "sent": {
                "payloads": tally.payloads,
                "ops": tally.ops,
                "publish_failed": tally.publish_failed,
            },
            "pubacks": tally.pubacks,
            "expected": expected,
            "acked": answered,
            "ack_messages": tally.ack_messages,
            "rejected_codes": dict(sorted(tally.codes.items())),
            "unanswered": sum(max(0, expected[k] - answered[k]) for k in expected),
            "rate_ops_s": round(tally.ops / sent_s, 1) if sent_s > 0 else 0.0,
        }
    return summary


def _send(
    generator: Generator | CausalGenerator,
    clients: dict[str, _SimClient],
    tally: Tally,
    root: str,
    run: RunOptions,
    started: float,
    deadline: float,
) -> str:
    sent_ops = 0
    for payload in generator:
        now = time.monotonic()
        if now >= deadline:
            return "duration"
        if run.rate > 0:
            due = started + sent_ops / run.rate
            if due > now:
                time.sleep(min(due, deadline) - now)
                if time.monotonic() >= deadline:
                    return "duration"
        if clients[payload.device_id].publish(payload.topic(root), payload.body, deadline):
            tally.sent(payload)
            sent_ops += payload.n_ops
        else:
            with tally.lock:
                tally.publish_failed += 1
            if time.monotonic() >= deadline:
                return "duration"
    # Wait for the broker to take what is still in flight, within the time bound.
    while time.monotonic() < deadline:
        with tally.lock:
            if tally.pubacks >= tally.payloads:
                break
        time.sleep(0.01)
    return "count"


def _progress(tally: Tally, started: float, stop: threading.Event, err: IO[str]) -> None:
    last_ops, last_t = 0, started
    while not stop.wait(1.0):
        now = time.monotonic()
        answered = tally.answered()
        with tally.lock:
            ops, pubacks, payloads = tally.ops, tally.pubacks, tally.payloads
        rate = (ops - last_ops) / (now - last_t) if now > last_t else 0.0
        last_ops, last_t = ops, now
        err.write(
            f"simulate {now - started:6.1f}s  sent {ops} ops ({payloads} msgs, "
            f"{payloads - pubacks} in flight)  stored {answered['stored']}  "
            f"duplicate {answered['duplicate']}  rejected {answered['rejected']}  "
            f"{rate:,.0f} ops/s\n"
        )
        err.flush()


def format_summary(summary: dict[str, Any]) -> str:
    exp, got = summary["expected"], summary["acked"]
    lines = [
        f"broker {summary['broker']}, root {summary['topic_root']}, "
        f"{summary['devices']} devices, seed {summary['seed']}",
        f"sent     {summary['sent']['ops']} ops in {summary['sent']['payloads']} messages "
        f"in {summary['send_s']} s ({summary['rate_ops_s']:,} ops/s; stopped by "
        f"{summary['stopped_by']}), {summary['pubacks']} PUBACKs",
        f"answered stored {got['stored']}/{exp['stored']}  "
        f"duplicate {got['duplicate']}/{exp['duplicate']}  "
        f"rejected {got['rejected']}/{exp['rejected']}  "
        f"({summary['ack_messages']} ack messages)",
    ]
    if summary["rejected_codes"]:
        codes = ", ".join(f"{k} {v}" for k, v in summary["rejected_codes"].items())
        lines.append(f"rejected by code: {codes}")
    lines.append(f"unanswered {summary['unanswered']}")
    return "\n".join(lines)


def cli_simulate(
    broker: Broker,
    gen_options: GeneratorOptions,
    run: RunOptions,
    as_json: bool = False,
) -> int:
    """The `fieldgate simulate` command; returns its exit code.

    0: every operation sent was answered; 1: some were not; 2: refused or
    cannot connect.
    """
    try:
        summary = run_simulation(broker, gen_options, run)
    except (RemoteHostRefused, ConnectionError) as exc:
        sys.stderr.write(f"fieldgate simulate: {exc}\n")
        return 2
    sys.stdout.write((json.dumps(summary, indent=2) if as_json else format_summary(summary)) + "\n")
    return 0 if summary["unanswered"] == 0 else 1
