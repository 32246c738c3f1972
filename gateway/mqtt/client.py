"""aiomqtt clients as fieldgate makes them: the daemon's session and the CLI's.

Also what a failed connection means, in an operator's words (`describe`): a TLS
verification that failed and why, a client certificate the broker refused, the
CONNACK reason of a refused CONNECT. Never a password or a key's contents.
"""

from __future__ import annotations

import logging
import re
import ssl
from pathlib import Path
from typing import Any

import aiomqtt
from aiomqtt.client import MQTT_LOGGER
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import ConfigError, MqttConfig

CONNECT_TIMEOUT_S = 10.0


class TlsFileError(ConfigError):
    """A CA, certificate or key file of `[mqtt]` that cannot be used; one line naming
    the key and the path (never the file's contents)."""


def tls_context(config: MqttConfig) -> ssl.SSLContext | None:
    """The TLS context of `config`: None without `tls_ca`; otherwise the broker is
    verified against that CA (hostname included), and `tls_cert`/`tls_key` are the
    client certificate. The files are read at each call: a renewed certificate is
    used from the next connection on. Raises TlsFileError."""
    if config.tls_ca is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(_readable("tls_ca", config.tls_ca)))
    except ssl.SSLError as exc:
        raise TlsFileError(f"mqtt.tls_ca: {config.tls_ca}: {_ssl_text(exc)}") from None
    if config.tls_cert is not None and config.tls_key is not None:
        _load_client_certificate(context, config.tls_cert, config.tls_key)
    return context


def _readable(key: str, path: Path) -> Path:
    try:
        with path.open("rb"):
            return path
    except OSError as exc:
        raise TlsFileError(f"mqtt.{key}: cannot read {path}: {exc.strerror}") from None


def _load_client_certificate(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    cert_pem = _read("tls_cert", cert)
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise TlsFileError(f"mqtt.tls_cert: {cert}: no PEM certificate in it")
    key_pem = _read("tls_key", key)
    if b"PRIVATE KEY-----" not in key_pem:
        raise TlsFileError(f"mqtt.tls_key: {key}: no PEM private key in it")
    del cert_pem, key_pem

    def encrypted() -> str:
        raise TlsFileError(
            f"mqtt.tls_key: {key}: the key is encrypted; fieldgate needs it unencrypted"
            " (readable by its user only)"
        )

    try:
        context.load_cert_chain(cert, key, password=encrypted)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsFileError(
                f"mqtt.tls_key: {key}: not the key of the certificate in mqtt.tls_cert"
            ) from None
        raise TlsFileError(f"mqtt.tls_cert: {cert}: {_ssl_text(exc)}") from None


def _read(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsFileError(f"mqtt.{key}: cannot read {path}: {exc.strerror}") from None


def make_client(config: MqttConfig, *, identifier: str, **options: Any) -> aiomqtt.Client:
    """An MQTT v5 client for the configured broker: address, credentials and TLS from
    `config`; `options` (clean_start, properties, will...) as aiomqtt takes them.
    Raises TlsFileError when the TLS files cannot be used."""
    client = aiomqtt.Client(
        config.host,
        config.port,
        username=config.username,
        password=config.password.get_secret_value() if config.password else None,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        keepalive=config.keepalive_s,
        tls_context=tls_context(config),
        timeout=CONNECT_TIMEOUT_S,
        **options,
    )
    _fail_before_connack(client)
    return client


# -- a connection that ends before its CONNACK ----------------------------------------


class _Reported(logging.Filter):
    """Drops paho's "failed to receive on socket" line for an error that ended a
    connection before its CONNACK: the failure's own log line says it, in words."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not any(getattr(arg, "fieldgate_reported", False) for arg in args)


MQTT_LOGGER.addFilter(_Reported())


def _fail_before_connack(client: aiomqtt.Client) -> None:
    """End the wait for the CONNACK as soon as the connection is gone.

    Under TLS 1.3 the broker checks the client certificate after the client's half
    of the handshake: a refused (or missing) certificate arrives as an alert on the
    first read, paho closes the socket, and aiomqtt, which ignores a disconnect
    before the CONNACK, would wait out its timeout and say only "Operation timed
    out". Here the read's error is kept and the connect fails with it at once.
    """
    inner = client._client
    errors: list[OSError] = []
    receive = inner._sock_recv

    def sock_recv(bufsize: int) -> bytes:
        if client._connected.done():
            # Connected (or failed): paho's own method again, off the hot path.
            del inner._sock_recv
            return receive(bufsize)
        try:
            return receive(bufsize)
        except BlockingIOError:
            raise
        except OSError as exc:
            exc.fieldgate_reported = True  # type: ignore[attr-defined]
            errors.append(exc)
            raise

    on_disconnect = inner.on_disconnect

    def disconnected(*args: Any) -> None:
        connecting = client._connected
        if not connecting.done():
            reason = (
                describe(errors[-1])
                if errors
                else "the broker closed the connection before its CONNACK"
            )
            connecting.set_exception(aiomqtt.MqttError(reason))
        if on_disconnect is not None:
            on_disconnect(*args)

    inner._sock_recv = sock_recv  # type: ignore[method-assign]
    inner.on_disconnect = disconnected


# -- what went wrong, in words -----------------------------------------------------

_NOT_OUR_CA = "the broker's certificate is not signed by the CA in mqtt.tls_ca"
_DATES = "a certificate of the broker's chain is out of its dates, or the clock here is wrong"
_NAME = "mqtt.host must be a name or address that the broker's certificate holds"
_VERIFY_HINTS = {
    2: _NOT_OUR_CA,  # unable to get issuer certificate
    18: _NOT_OUR_CA,  # self-signed certificate
    19: _NOT_OUR_CA,  # self-signed certificate in certificate chain
    20: _NOT_OUR_CA,  # unable to get local issuer certificate
    21: _NOT_OUR_CA,  # unable to verify the first certificate
    9: _DATES,  # certificate is not yet valid
    10: _DATES,  # certificate has expired
    62: _NAME,  # hostname mismatch
    64: _NAME,  # IP address mismatch
}
"""What an operator checks, by OpenSSL verify code."""
_CLIENT_CERTIFICATE_ALERTS = (
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_UNKNOWN",
    "CERTIFICATE_REVOKED",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
)
_SSL_TEXT = re.compile(r"^\[[^\]]*\]\s*(?P<text>.*?)\s*(\(_ssl\.c:\d+\))?$")


def describe(exc: BaseException) -> str:
    """Why a connection failed, for the log line and `health`: a TLS failure as
    `TLS: ...`, a refused CONNECT as `broker refused the connection: <reason>`
    (the CONNACK reason code's name and value), anything else as the error says."""
    if isinstance(exc, MqttConnectError):
        code = exc.rc
        if isinstance(code, ReasonCode):
            return f"broker refused the connection: {code} (CONNACK reason code {code.value})"
        return f"broker refused the connection: {exc}"
    if isinstance(exc, TlsFileError):
        return str(exc)
    # aiomqtt raises MqttError(str(error)) from None: the error is its context.
    error = exc.__context__ if type(exc) is aiomqtt.MqttError else exc
    if isinstance(error, ssl.SSLError):
        return _tls(error)
    return str(exc) or type(exc).__name__


def _tls(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        text = f"TLS: certificate verify failed: {exc.verify_message}"
        hint = _VERIFY_HINTS.get(exc.verify_code)
        return f"{text} ({hint})" if hint else text
    reason = exc.reason or ""
    text = _ssl_text(exc)
    if "CERTIFICATE_REQUIRED" in reason:
        return (
            f"TLS: the broker requires a client certificate (mqtt.tls_cert, mqtt.tls_key): {text}"
        )
    if "ALERT" in reason and any(alert in reason for alert in _CLIENT_CERTIFICATE_ALERTS):
        return f"TLS: the broker refused the client certificate (mqtt.tls_cert): {text}"
    if reason == "WRONG_VERSION_NUMBER":
        return f"TLS: {text} (is mqtt.port the broker's TLS listener?)"
    return f"TLS: {text}"


def _ssl_text(exc: ssl.SSLError) -> str:
    """`tlsv13 alert certificate required` of `[SSL: ...] tlsv13 alert ... (_ssl.c:2580)`."""
    message = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    match = _SSL_TEXT.match(message)
    return (match.group("text") if match else message) or exc.reason or type(exc).__name__
