"""The configuration: one TOML file, every key overridable from the environment.

`FIELDGATE_<SECTION>__<KEY>` beats the file, so a systemd drop-in or a CI job can
change one value without editing the file the operator owns. A bad value fails at
start with one line that names the key (see `ConfigError`), never a traceback.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from gateway import spawn
from handlers import webhooks

DEFAULT_CONFIG_PATH = Path("config/fieldgate.toml")
ENV_PREFIX = spawn.ENV_PREFIX
"""Settings in the environment: FIELDGATE_SECTION__KEY (the engine's start drops them)."""

DEFAULT_CRITICAL_FIELDS: dict[str, list[str]] = {
    "work_order": ["status", "assigned_to", "priority"],
    "task": ["status", "assigned_to", "due_at"],
    "asset": ["status", "location"],
    "attendance": ["check_in", "check_out", "status"],
}


class ConfigError(Exception):
    """A configuration that cannot run; the message is one line naming the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttConfig(Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    topic_root: Annotated[str, Field(pattern=r"^[^#+$/][^#+]*[^#+/]$|^[^#+$/]$")] = "fieldgate"
    client_id: Annotated[str, Field(min_length=1, max_length=64)] = "fieldgate-1"
    username: str | None = None
    password: SecretStr | None = None
    tls_ca: Path | None = None
    """CA file: connect with TLS and verify the broker's certificate (and name) with it."""
    tls_cert: Path | None = None
    """Client certificate (PEM), with `tls_key`: for a broker that asks for one."""
    tls_key: Path | None = None
    """The client certificate's private key (PEM, unencrypted)."""
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    session_expiry_s: Annotated[int, Field(ge=60)] = 7 * 86400
    receive_maximum: Annotated[int, Field(ge=1, le=65535)] = 10000
    max_outgoing_inflight: Annotated[int, Field(ge=1, le=65535)] = 1000
    shared_group: str | None = None
    reconnect_min_s: Annotated[float, Field(gt=0)] = 0.5
    reconnect_max_s: Annotated[float, Field(gt=0)] = 30.0

    @model_validator(mode="after")
    def _client_certificate(self) -> MqttConfig:
        """A client certificate and its key go together, and only with TLS (`tls_ca`)."""
        if (self.tls_cert is None) != (self.tls_key is None):
            missing, given = (
                ("tls_key", "tls_cert") if self.tls_key is None else ("tls_cert", "tls_key")
            )
            raise PydanticCustomError(
                "client_certificate",
                "needed with mqtt.{given}: a client certificate and its key go together",
                {"given": given, "at": f".{missing}"},
            )
        if self.tls_cert is not None and self.tls_ca is None:
            raise PydanticCustomError(
                "client_certificate",
                "needed with a client certificate: the CA file that verifies the broker",
                {"at": ".tls_ca"},
            )
        return self


class DatabaseConfig(Section):
    url: str = "sqlite+aiosqlite:///var/fieldgate.db"
    auto_upgrade: bool = True
    echo: bool = False
    pool_size: Annotated[int, Field(ge=1)] = 5


class RedisConfig(Section):
    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")


class AdminConfig(Section):
    token: SecretStr | None = None


class LimitsConfig(Section):
    max_payload_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024
    max_ops_per_batch: Annotated[int, Field(ge=1, le=10_000)] = 500
    max_clock_skew_s: Annotated[float, Field(ge=0)] = 300.0
    max_device_meta_bytes: Annotated[int, Field(ge=0)] = 4096
    device_rate: Annotated[float, Field(ge=0)] = 0.0
    device_burst: Annotated[int, Field(ge=1)] = 1000


class WriterConfig(Section):
    """Group commit: a batch closes at `max_messages` or `max_wait_ms`, whichever first."""

    max_messages: Annotated[int, Field(ge=1, le=20_000)] = 4000
    """Only a backlog fills a batch (at a steady rate the batch is what came during the
    last commit). There, what a batch costs per entity it touches (the version upsert,
    the conflict summaries, one message per conflict) is shared by more of its ops: a
    100,000-message drain measured 9,106 msg/s at 4,000 against 6,574 at 1,000 with
    detection, 21,142 against 16,018 without (docs/benchmarks.md)."""
    max_wait_ms: Annotated[float, Field(ge=0, le=1000)] = 5.0
    max_in_process: Annotated[int, Field(ge=100)] = 20_000


class EngineConfig(Section):
    """The engine process, which the daemon starts and owns (docs/architecture.md)."""

    max_channel_bytes: Annotated[int, Field(ge=1 << 20)] = 64 << 20
    """Payloads handed to the engine and not yet committed, at most (with
    `writer.max_in_process` messages): beyond, the MQTT side stops reading."""
    restart_max_s: Annotated[float, Field(gt=0, le=20)] = 10.0
    """The longest pause before restarting an engine that died: with the engine's
    start-up and its stop's grace (5 s), below systemd's WatchdogSec (30 s), which
    restarts the whole daemon if the engine stays down."""


class SyncConfig(Section):
    entity_types: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=lambda: list(DEFAULT_CRITICAL_FIELDS)
    )


AlertKind = Literal["journal", "panic", "checkin"]


def _default_crisis_kinds() -> list[AlertKind]:
    return ["panic"]


DEFAULT_CRISIS_FLAGS = ["self_harm_risk", "suicidal_ideation", "violence", "injury"]


class SuggestionsConfig(Section):
    """The short text a wellness notification carries, per reason (`[alerts.suggestions]`)."""

    sustained_low_mood: Annotated[str, Field(min_length=1, max_length=500)] = (
        "Several low days in a row: consider talking to your supervisor or the support line."
    )
    low_mood: Annotated[str, Field(min_length=1, max_length=500)] = (
        "Take a short break, get some water, and check in with a colleague."
    )
    high_stress: Annotated[str, Field(min_length=1, max_length=500)] = (
        "Pause for a few slow breaths; ask for help with what can wait."
    )


class AlertsConfig(Section):
    """Classification rules (PROTOCOL.md, Alerts; these are its defaults) and the paths out."""

    crisis_kinds: list[AlertKind] = Field(default_factory=_default_crisis_kinds)
    crisis_flags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=lambda: list(DEFAULT_CRISIS_FLAGS)
    )
    crisis_mood_max: Annotated[int, Field(ge=0, le=10)] = 2
    crisis_stress_min: Annotated[int, Field(ge=1, le=6)] = 5
    wellness_mood_max: Annotated[int, Field(ge=0, le=10)] = 4
    wellness_stress_min: Annotated[int, Field(ge=1, le=6)] = 4
    sustained_low_mood_entries: Annotated[int, Field(ge=1, le=1000)] = 3
    sustained_low_mood_days: Annotated[float, Field(gt=0)] = 7.0
    escalate_after_s: Annotated[float, Field(gt=0)] = 300.0
    max_escalations: Annotated[int, Field(ge=0, le=1000)] = 3
    escalation_poll_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    wellness_cooldown_s: Annotated[float, Field(ge=0)] = 86400.0
    max_note_bytes: Annotated[int, Field(ge=0)] = 8192
    suggestions: SuggestionsConfig = SuggestionsConfig()


class ConflictTypeConfig(Section):
    """Per entity type: how its conflicts resolve, and which fields make one `high`."""

    strategy: Literal["last_writer_wins", "first_writer_wins", "manual"] = "last_writer_wins"
    critical_fields: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = None
    """None: the type's default in DEFAULT_CRITICAL_FIELDS (none for other types)."""


class ConflictsConfig(Section):
    enabled: bool = True
    detect: Literal["after_ack", "in_commit"] = "after_ack"
    """When operations are judged: after their ack, from the committed log, whenever
    the engine has no batch to commit (acks and a backlog's drain never wait for
    detection); or in the transaction that stores them (a device's ack waits for it,
    and the conflict-derived counters that scoring reads are never behind)."""
    max_delay_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    """After the ack: the longest that stored operations wait behind a backlog before
    detection takes turns with its batches (one pass between two batches)."""
    pass_interval_ms: Annotated[float, Field(ge=0, le=60_000)] = 200.0
    """After the ack: the least time between two passes. A steady stream of small
    batches is then judged in fewer, larger passes (fewer transactions, and one message
    per conflict and topic a pass); conflicts are found this much later at most."""
    pass_max_ops: Annotated[int, Field(ge=1, le=1_000_000)] = 5000
    """After the ack: the most operations one pass (one transaction) judges. Larger
    passes send fewer messages (one per conflict and topic a commit) and cost less an
    operation; a batch that arrives during a pass waits for it."""
    pass_budget_ms: Annotated[float, Field(ge=0, le=60_000)] = 3.0
    """After the ack, while devices are sending: about how long one pass may take (as
    many operations as passes judge in that time, 50 at least), since their batches
    wait for it; 0: every pass takes up to `pass_max_ops`."""
    window_s: Annotated[float, Field(ge=0, le=30 * 86400)] = 300.0
    manual_at_or_above: Literal["low", "medium", "high", "critical"] = "critical"
    types: dict[str, ConflictTypeConfig] = Field(default_factory=dict)
    cache_max_ops: Annotated[int, Field(ge=0)] | None = None
    """Gone with conflicts v2 (summaries in the database replace the in-memory window);
    still read, so that a config file that sets it starts, with a warning."""


class OutboxConfig(Section):
    retention_s: Annotated[float, Field(gt=0)] = 7 * 86400.0
    """Rows already published are deleted this long after, a few at a time."""


class QuarantineConfig(Section):
    retention_s: Annotated[float, Field(gt=0)] = 30 * 86400.0
    """Refused payloads are deleted this long after they came, a few at a time: the
    raw copy to recover a device's data from is kept a month by default."""
    max_rows: Annotated[int, Field(ge=1000)] = 1_000_000
    """At most this many are kept: past it the oldest go before their retention, so a
    device that floods bad or rate-limited payloads cannot fill the disk."""


class DlqConfig(Section):
    """The webhook dead-letter queue in Redis (PROTOCOL.md names the TTL
    `webhooks.dlq_ttl_s`; `webhooks` is the list of endpoints, so it lives here:
    docs/decisions/0011-webhook-delivery.md)."""

    ttl_s: Annotated[int, Field(ge=60)] = 14 * 86400
    """How long Redis keeps an entry."""
    replay_concurrency: Annotated[int, Field(ge=1, le=256)] = 8
    """Entries `dlq/replay` re-delivers at once."""


class MlConfig(Section):
    """Conflict prediction (docs/ml.md)."""

    models_dir: Path = Path("var/models")
    """Where trained models are saved (skops files and their holdout scores)."""
    min_rows: Annotated[int, Field(ge=100)] = 1000
    """Operations with a closed window a training run needs, at least."""
    first_sync_hours: Annotated[float, Field(gt=0)] = 168.0
    """`hours_since_last_sync` of a device's first operation, and the cap of all."""
    algorithm: Literal["random_forest", "logistic_regression"] = "random_forest"
    """What `ml/train` fits when the request names none (and the scheduled runs)."""
    retrain_interval_s: Annotated[float, Field(ge=0)] = 0.0
    """Train on this schedule (0: never); a scheduled model is activated only when it
    beats the active one on the same holdout."""
    hint_threshold: Annotated[float, Field(ge=0, le=1)] = 0.7
    """A stored operation scored at or above this gets a hint to its device."""


class HealthConfig(Section):
    interval_s: Annotated[float, Field(gt=0)] = 60.0
    wedged_after_s: Annotated[float, Field(gt=0)] = 30.0
    """A transaction attempt (or an idle writer loop) silent this long stops the watchdog."""


class MetricsConfig(Section):
    listen: str = ""


def _http_url(url: str) -> str:
    """http or https with a host; the URL is not quoted back (it may hold a token)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:
        raise ValueError("not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    try:
        # What the HTTP client does to a host name before it connects: an empty or
        # too long label (`a..b`) would fail every delivery, retried for ever.
        parts.hostname.encode("idna")
    except UnicodeError:
        raise ValueError("the host is not a valid name (an empty or too long label)") from None
    return url


def _signing_secret(secret: SecretStr) -> SecretStr:
    webhooks.secret_key(secret.get_secret_value())
    return secret


def _events(events: list[str]) -> list[str]:
    if webhooks.ALL_EVENTS in events and len(events) > 1:
        raise ValueError(f'"{webhooks.ALL_EVENTS}" means every event and stands alone')
    return events


def _default_retry_schedule() -> list[float]:
    return [0.0, 5.0, 30.0, 120.0, 600.0, 1800.0]


class WebhookConfig(Section):
    """One endpoint (`[[webhooks]]`): where events go, which, and how it is treated
    when it fails (docs/webhooks.md)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    url: Annotated[str, AfterValidator(_http_url)]
    events: Annotated[list[webhooks.Subscription], Field(min_length=1), AfterValidator(_events)]
    secret: Annotated[SecretStr, AfterValidator(_signing_secret)]
    """`whsec_` then the base64 of the key (Standard Webhooks)."""
    timeout_s: Annotated[float, Field(gt=0)] = 15.0
    retry_schedule_s: Annotated[list[Annotated[float, Field(ge=0)]], Field(min_length=1)] = Field(
        default_factory=_default_retry_schedule
    )
    """The wait before each attempt, the first included: its length is the attempts."""
    max_in_flight: Annotated[int, Field(ge=1)] = 8
    enabled: bool = True
    breaker_failures: Annotated[int, Field(ge=1)] = 5
    """Failed attempts in a row that pause the endpoint."""
    breaker_pause_s: Annotated[float, Field(gt=0, le=webhooks.MAX_PAUSE_S)] = 60.0
    """The first pause; each failed probe doubles it, up to 30 minutes."""


def _unique_names(endpoints: list[WebhookConfig]) -> list[WebhookConfig]:
    seen: dict[str, int] = {}
    for index, endpoint in enumerate(endpoints):
        if endpoint.name in seen:
            raise PydanticCustomError(
                "duplicate_name",
                "webhooks[{first}] has the same name, {name}",
                {"name": endpoint.name, "first": seen[endpoint.name], "at": f"[{index}].name"},
            )
        seen[endpoint.name] = index
    return endpoints


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(BaseSettings):
    """The whole configuration. Sections mirror the TOML tables."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    instance: Annotated[str, Field(min_length=1, max_length=64)] = "fieldgate-1"
    mqtt: MqttConfig = MqttConfig()
    database: DatabaseConfig = DatabaseConfig()
    redis: RedisConfig = RedisConfig()
    admin: AdminConfig = AdminConfig()
    limits: LimitsConfig = LimitsConfig()
    writer: WriterConfig = WriterConfig()
    engine: EngineConfig = EngineConfig()
    sync: SyncConfig = SyncConfig()
    alerts: AlertsConfig = AlertsConfig()
    conflicts: ConflictsConfig = ConflictsConfig()
    outbox: OutboxConfig = OutboxConfig()
    quarantine: QuarantineConfig = QuarantineConfig()
    dlq: DlqConfig = DlqConfig()
    ml: MlConfig = MlConfig()
    health: HealthConfig = HealthConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    webhooks: Annotated[list[WebhookConfig], AfterValidator(_unique_names)] = Field(
        default_factory=list
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file, which arrives as init kwargs.
        return (env_settings, init_settings)


def _describe(error: Any) -> str:
    """`webhooks[1].secret: <why>`: the key's path (an item of a list by its index from
    0), and pydantic's message without the input. A validator of a whole list names the
    item it refuses in its error's `at` (`[2].name`); its own messages lose pydantic's
    "Value error, " prefix."""
    loc = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"])
    loc = loc.removeprefix(".") + error.get("ctx", {}).get("at", "")
    msg = str(error["msg"])
    if error["type"] == "extra_forbidden":
        msg = "unknown key"
    elif error["type"] == "value_error":
        msg = str(error["ctx"]["error"])
    return f"{loc}: {msg}"


def load(path: Path | None = None) -> Settings:
    """Read the file (if it exists) and apply the environment on top.

    A missing file is only an error when it was named explicitly: the defaults
    are a working embedded setup, and a container may configure by environment alone.
    """
    explicit = path is not None
    path = path or DEFAULT_CONFIG_PATH
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"config {path}: cannot read: {exc.strerror}") from None
    elif explicit:
        raise ConfigError(f"config {path}: no such file")
    try:
        return Settings(**data)
    except SettingsError as exc:
        # A list or table from the environment that is not JSON: the message names the
        # field, never the value.
        raise ConfigError(f"config {path}: the environment: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"config {path}: {_describe(first)}{more}") from None


def hide_url_password(url: Any) -> Any:
    """`scheme://user:***@host/db?key=***`: a URL is worth showing, its password is not,
    nor the values of its query (a webhook URL may carry a token there)."""
    if isinstance(url, SecretStr):
        url = url.get_secret_value()
    if not isinstance(url, str):
        return url
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        url = urlunsplit(parts._replace(netloc=netloc))
    if parts.query:
        keys = [pair.partition("=")[0] for pair in parts.query.split("&")]
        url = url.partition("?")[0] + "?" + "&".join(f"{key}=***" for key in keys)
    return url


def redacted(settings: Settings) -> dict[str, Any]:
    """The running config as JSON-able data, every secret replaced by `***`."""
    redacted: dict[str, Any] = _redact(settings.model_dump(mode="python"))
    return redacted


def _redact(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "***"
    if isinstance(value, dict):
        return {k: hide_url_password(v) if k == "url" else _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def portable(settings: Settings) -> dict[str, Any]:
    """The settings as plain data, secrets included, for the engine process: private
    to the two processes of one daemon (gateway/channel.py), never logged or answered."""
    plain: dict[str, Any] = _reveal(settings.model_dump(mode="python"))
    return plain


def _reveal(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _reveal(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_reveal(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
