"""The client side of the admin protocol, for `fieldgate admin` and `fieldgate status`.

A real MQTT client of the daemon: it sends the request with a v5 response topic
and correlation data of its own, so concurrent CLIs never read each other's
answers, and it needs nothing but the broker and the same config file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Callable
from typing import Any

import aiomqtt
import msgspec
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import MqttConfig, Settings
from gateway.mqtt.client import make_client
from handlers.admin import Progress


class AdminTimeout(Exception):
    """No answer in time: the daemon is down, or not subscribed to this root."""


def _client(config: MqttConfig) -> aiomqtt.Client:
    return make_client(config, identifier=f"fieldgate-cli-{os.getpid()}-{secrets.token_hex(3)}")


async def request(
    settings: Settings,
    command: str,
    args: dict[str, Any],
    *,
    timeout_s: float = 10.0,
    on_accepted: Callable[[], None] | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Send one admin request and return the final answer (`status` ok or error).

    A long command first answers `accepted`; then the wait restarts for its
    result, with no limit while progress keeps arriving.
    """
    root = settings.mqtt.topic_root
    correlation = secrets.token_bytes(12)
    transaction = correlation.hex()
    reply_topic = f"{root}/admin/response/cli/{transaction}"
    progress_topic = f"{root}/admin/progress/{command}"
    body = {**args, "transaction": transaction}
    if settings.admin.token is not None:
        body["token"] = settings.admin.token.get_secret_value()
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = reply_topic
    props.CorrelationData = correlation
    async with _client(settings.mqtt) as client:
        await client.subscribe(reply_topic, qos=1)
        await client.subscribe(progress_topic, qos=0)
        await client.publish(
            f"{root}/admin/request/{command}",
            msgspec.json.encode(body),
            qos=1,
            properties=props,
        )
        while True:
            answer = await _next(client, reply_topic, transaction, timeout_s, on_progress)
            if answer.get("status") == "accepted":
                if on_accepted is not None:
                    on_accepted()
                continue
            return answer


async def _next(
    client: aiomqtt.Client,
    reply_topic: str,
    transaction: str,
    timeout_s: float,
    on_progress: Progress | None,
) -> dict[str, Any]:
    while True:
        try:
            async with asyncio.timeout(timeout_s):
                message = await anext(aiter(client.messages))
        except TimeoutError:
            raise AdminTimeout(f"no answer within {timeout_s:g} s") from None
        try:
            data = msgspec.json.decode(bytes(message.payload))
        except msgspec.DecodeError:
            continue
        if not isinstance(data, dict) or data.get("transaction") != transaction:
            continue
        if message.topic.matches(reply_topic):
            return data
        if on_progress is not None and "done" in data:
            on_progress(int(data["done"]), int(data.get("total") or 0))


async def retained(settings: Settings, wait_s: float = 3.0) -> dict[str, Any]:
    """The retained `<root>/status` and `<root>/health`, whatever arrives in `wait_s`."""
    root = settings.mqtt.topic_root
    found: dict[str, Any] = {}
    async with _client(settings.mqtt) as client:
        await client.subscribe([(f"{root}/status", 1), (f"{root}/health", 1)])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                async for message in client.messages:
                    name = str(message.topic).rsplit("/", 1)[-1]
                    with contextlib.suppress(msgspec.DecodeError):
                        found[name] = msgspec.json.decode(bytes(message.payload))
                    if len(found) == 2:
                        break
    return found
