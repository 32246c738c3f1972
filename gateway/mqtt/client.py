"""aiomqtt clients as fieldgate makes them: the daemon's session and the CLI's."""

from __future__ import annotations

import ssl
from typing import Any

import aiomqtt

from gateway.config import MqttConfig


def make_client(config: MqttConfig, *, identifier: str, **options: Any) -> aiomqtt.Client:
    """An MQTT v5 client for the configured broker: address, credentials and TLS from
    `config`; `options` (clean_start, properties, will...) as aiomqtt takes them."""
    tls = None
    if config.tls_ca is not None:
        tls = aiomqtt.TLSParameters(ca_certs=str(config.tls_ca), cert_reqs=ssl.CERT_REQUIRED)
    return aiomqtt.Client(
        config.host,
        config.port,
        username=config.username,
        password=config.password.get_secret_value() if config.password else None,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        keepalive=config.keepalive_s,
        tls_params=tls,
        timeout=10,
        **options,
    )
