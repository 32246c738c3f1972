"""The tables. Times are integer microseconds since the epoch (UTC).

Integers keep time arithmetic exact and identical on SQLite and PostgreSQL (the
conflict window is compared to the microsecond), and cost nothing to bind on the
hot path. JSON columns hold compact text written by msgspec for the same reason.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only autoincrements an INTEGER PRIMARY KEY (the rowid).
RowId = BigInteger().with_variant(Integer(), "sqlite")

sync_log = Table(
    "sync_log",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("op_id", String(64), nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("user_id", String(64), nullable=False),
    Column("entity_type", String(64), nullable=False),
    Column("entity_id", String(128), nullable=False),
    Column("operation", String(8), nullable=False),
    Column("changes", Text, nullable=False),
    Column("edited_at", BigInteger, nullable=False),
    Column("received_at", BigInteger, nullable=False),
    Column("stored_at", BigInteger, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("base_version", BigInteger, nullable=True),
    Column("session_id", String(128), nullable=True),
    Column("batch_id", String(64), nullable=True),
    Column("device_meta", Text, nullable=True),
    UniqueConstraint("op_id"),
    UniqueConstraint("entity_type", "entity_id", "version"),
    Index(None, "entity_type", "entity_id", "edited_at"),
)

entities = Table(
    "entities",
    metadata,
    Column("entity_type", String(64), primary_key=True),
    Column("entity_id", String(128), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("max_edited_at", BigInteger, nullable=True),
    Column("prev_max_edited_at", BigInteger, nullable=True),
)
"""`max_edited_at`: the greatest `edited_at` of the entity's ops (null for entities
older than the column); `prev_max_edited_at`: its value before the last upsert,
how that upsert hands the previous value back (RETURNING shows new values only)."""

quarantine = Table(
    "quarantine",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("received_at", BigInteger, nullable=False),
    Column("topic", String(512), nullable=False),
    Column("device_id", String(64), nullable=True),
    Column("kind", String(16), nullable=False),
    Column("code", String(32), nullable=False),
    Column("message", Text, nullable=False),
    Column("path", String(256), nullable=True),
    Column("payload", LargeBinary, nullable=False),
    Column("payload_bytes", Integer, nullable=False),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("channel", String(16), nullable=False),
    Column("topic", String(512), nullable=True),
    Column("event_type", String(64), nullable=True),
    Column("payload", LargeBinary, nullable=False),
    Column("qos", Integer, nullable=False),
    Column("retain", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("claimed_until", BigInteger, nullable=True),
    Column("sent_at", BigInteger, nullable=True),
    Column("origin_at", BigInteger, nullable=True),
    Index(None, "channel", "sent_at", "id"),
)

alerts = Table(
    "alerts",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("alert_id", String(64), nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("user_id", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("occurred_at", BigInteger, nullable=False),
    Column("received_at", BigInteger, nullable=False),
    Column("stored_at", BigInteger, nullable=False),
    Column("mood", Integer, nullable=True),
    Column("stress", Integer, nullable=True),
    Column("energy", Integer, nullable=True),
    Column("flags", Text, nullable=False),
    Column("site_id", String(128), nullable=True),
    # The person's own words: stored (it is the record), never published, logged or listed.
    Column("note", Text, nullable=True),
    Column("payload", LargeBinary, nullable=False),
    Column("classification", String(16), nullable=False),
    Column("reasons", Text, nullable=False),
    Column("notification_id", String(64), nullable=True),
    # Crisis alerts only: the durable escalation schedule.
    Column("escalation", Integer, nullable=True),
    Column("next_escalation_at", BigInteger, nullable=True),
    Column("acknowledged_at", BigInteger, nullable=True),
    Column("acknowledged_by", String(128), nullable=True),
    UniqueConstraint("alert_id"),
    Index(None, "user_id", "kind", "occurred_at"),
    Index(None, "next_escalation_at"),
    Index(None, "classification", "acknowledged_at"),
)

alert_users = Table(
    "alert_users",
    metadata,
    # One row per user who sent a low-mood journal entry: its upsert is the lock
    # that serializes the history rule per user across connections and instances.
    Column("user_id", String(64), primary_key=True),
    Column("updated_at", BigInteger, nullable=False),
)

wellness_cooldowns = Table(
    "wellness_cooldowns",
    metadata,
    Column("user_id", String(64), primary_key=True),
    Column("reason", String(32), primary_key=True),
    Column("last_sent_at", BigInteger, nullable=False),
)
conflicts = Table(
    "conflicts",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("conflict_id", String(36), nullable=False),
    Column("entity_type", String(64), nullable=False),
    Column("entity_id", String(128), nullable=False),
    Column("op_a", String(64), nullable=False),
    Column("op_b", String(64), nullable=False),
    Column("device_a", String(64), nullable=False),
    Column("device_b", String(64), nullable=False),
    Column("user_a", String(64), nullable=False),
    Column("user_b", String(64), nullable=False),
    Column("fields", Text, nullable=False),
    Column("field_values", Text, nullable=False),
    Column("severity", String(8), nullable=False),
    Column("strategy", String(24), nullable=False),
    Column("status", String(16), nullable=False),
    Column("winner_op_id", String(64), nullable=True),
    Column("detected_at", BigInteger, nullable=False),
    Column("resolved_at", BigInteger, nullable=True),
    Column("resolved_by", String(128), nullable=True),
    UniqueConstraint("conflict_id"),
    UniqueConstraint("op_a", "op_b"),
    Index(None, "status", "id"),
    Index(None, "entity_type", "entity_id", "id"),
    Index(None, "detected_at"),
)
"""One row per conflicting pair, `op_a < op_b`; `id` orders newest first."""

user_counters = Table(
    "user_counters",
    metadata,
    Column("user_id", String(64), primary_key=True),
    Column("ops", BigInteger, nullable=False),
    Column("conflicts", BigInteger, nullable=False),
)
"""Per user: operations stored and conflicts taken part in (atomic increments)."""

device_counters = Table(
    "device_counters",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("ops", BigInteger, nullable=False),
    Column("last_sync_at", BigInteger, nullable=False),
)
"""Per device: operations stored and the last commit that stored one.

Per entity, the edit count is `entities.version` (one per stored operation)."""
