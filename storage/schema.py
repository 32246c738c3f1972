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
    text,
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
    Column("delete_max_edited_at", BigInteger, nullable=True),
    Column("summary_from", BigInteger, nullable=True),
    Column("detected_version", BigInteger, nullable=False, server_default="0"),
)
"""`max_edited_at`: the greatest `edited_at` of the entity's ops (null for entities
older than the column); `delete_max_edited_at`: the greatest `edited_at` of its
deletes; `summary_from`: the conflict windows (`conflict_windows`) hold every edit
of the entity made at or after it (`SUMMARY_ALL`: all of them), null when they do
not exist; `detected_version`: conflict detection has judged its operations up to
this version (storage/detection.py), and the partial index below finds the entities
it has not caught up with."""

Index(
    "ix_entities_undetected",
    entities.c.entity_type,
    entities.c.entity_id,
    sqlite_where=entities.c.version > entities.c.detected_version,
    postgresql_where=entities.c.version > entities.c.detected_version,
)

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
    Column("also_to", Text, nullable=True),
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

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("event_id", String(40), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("due_at", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("claimed_until", BigInteger, nullable=True),
    Column("first_attempt_at", BigInteger, nullable=True),
    Column("last_status", Integer, nullable=True),
    Column("last_error", String(300), nullable=True),
    Column("dead_at", BigInteger, nullable=True),
    Column("dlq_id", String(40), nullable=True),
    Column("url", Text, nullable=True),
    Column("outbox_id", BigInteger, nullable=False),
    Index(None, "endpoint", "dead_at", "due_at"),
    Index(None, "dead_at"),
    Index(None, "outbox_id"),
)
"""One row per event and endpoint until it is delivered (the row goes) or dead (the
row waits, `dead_at` set, until the dead-letter queue in Redis holds it). The event's
type, time and payload are its outbox row's (`outbox_id`), which the outbox's cleanup
keeps while a delivery names it: a body is stored once, whatever the endpoints."""

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
    Column("status", String(16), nullable=False),
    Column("severity", String(8), nullable=False),
    Column("strategy", String(24), nullable=False),
    Column("fields", Text, nullable=False),
    Column("winners", Text, nullable=False),
    Column("member_count", BigInteger, nullable=False),
    Column("device_ids", Text, nullable=False),
    Column("user_ids", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("detected_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("resolved_at", BigInteger, nullable=True),
    Column("resolved_by", String(128), nullable=True),
    Column("merged_into", String(36), nullable=True),
    Column("note", Text, nullable=True),
    UniqueConstraint("conflict_id"),
    Index(None, "status", "id"),
    Index(None, "severity", "id"),
    Index(None, "entity_type", "entity_id", "id"),
    Index(None, "detected_at"),
    Index(None, "merged_into"),
)
"""One row per conflict (a group of colliding operations, PROTOCOL.md v2); `id` orders
them as detected. `state` is the group's summary (`handlers.conflicts.Group`: fields,
severity, devices, users, per field the first and last edit); `merged_into` names the
conflict that absorbed this one (always the root: merges repoint earlier absorptions)."""

conflict_members = Table(
    "conflict_members",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("op_id", String(64), nullable=False),
    Column("conflict_id", String(36), nullable=False),
    Column("entity_type", String(64), nullable=False),
    Column("entity_id", String(128), nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("user_id", String(64), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("joined_at", BigInteger, nullable=False),
    UniqueConstraint("op_id"),
    Index(None, "conflict_id", "version"),
    Index(None, "device_id", "conflict_id"),
    Index(None, "user_id"),
)
"""Operation -> the conflict it joined (its root is that row's `merged_into`, if set)."""

conflict_windows = Table(
    "conflict_windows",
    metadata,
    Column("entity_type", String(64), primary_key=True),
    Column("entity_id", String(128), primary_key=True),
    Column("body", LargeBinary, nullable=False),
)
"""Per entity, the summary of its recent edits that detection reads instead of the
edits themselves: its field windows and latest versions, as JSON
(`storage.conflict_summaries`; field names are a device's words, and stay inside
it)."""

conflict_totals = Table(
    "conflict_totals",
    metadata,
    Column("key", String(32), primary_key=True),
    Column("n", BigInteger, nullable=False),
)
"""Current counts kept by atomic increments: `severity:<level>` (conflicts not merged)
and `members` (operations in a conflict)."""

op_counts = Table(
    "op_counts",
    metadata,
    Column("hour", BigInteger, primary_key=True),
    Column("entity_type", String(64), primary_key=True),
    Column("ops", BigInteger, nullable=False),
)
"""Operations stored, per hour of `received_at` and entity type: the denominators of
`conflicts/stats` without a scan of the log."""

SUMMARY_ALL = -(2**62)
"""`entities.summary_from` of an entity whose windows hold every edit it ever had."""

user_counters = Table(
    "user_counters",
    metadata,
    Column("user_id", String(64), primary_key=True),
    Column("ops", BigInteger, nullable=False),
    Column("conflicts", BigInteger, nullable=False),
)
"""Per user: operations stored, and of them those in a conflict (atomic increments)."""

device_counters = Table(
    "device_counters",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("ops", BigInteger, nullable=False),
    Column("last_sync_at", BigInteger, nullable=False),
    Column("last_received_at", BigInteger, nullable=True),
)
"""Per device: operations stored, the last commit that stored one, and the latest
`received_at` among them (conflict prediction's `hours_since_last_sync`).

Per entity, the edit count is `entities.version` (one per stored operation)."""

field_counters = Table(
    "field_counters",
    metadata,
    Column("entity_type", String(64), primary_key=True),
    Column("field", String(128), primary_key=True),
    Column("ops", BigInteger, nullable=False),
    Column("conflicts", BigInteger, nullable=False),
)
"""Per entity type and field: operations stored that change it, and of them those in a
conflict (`field_overlap_score`, ml/dataset.py)."""

entity_hours = Table(
    "entity_hours",
    metadata,
    Column("entity_type", String(64), primary_key=True),
    Column("entity_id", String(128), primary_key=True),
    Column("hour", BigInteger, primary_key=True),
    Column("ops", BigInteger, nullable=False),
)
"""Per entity and clock hour of `edited_at` (µs // 1 h): operations stored
(`entity_edit_frequency`)."""

entity_editors = Table(
    "entity_editors",
    metadata,
    Column("entity_type", String(64), primary_key=True),
    Column("entity_id", String(128), primary_key=True),
    Column("slot", BigInteger, primary_key=True),
    Column("user_id", String(64), primary_key=True),
)
"""Per entity and minute of `edited_at` (µs // 1 min): the users who stored an
operation edited in it (`concurrent_editors`)."""

ml_models = Table(
    "ml_models",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("algorithm", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("seed", BigInteger, nullable=False),
    Column("data_since", BigInteger, nullable=True),
    Column("data_until", BigInteger, nullable=True),
    Column("holdout_from", BigInteger, nullable=True),
    Column("train_rows", Integer, nullable=True),
    Column("holdout_rows", Integer, nullable=True),
    Column("train_positives", Integer, nullable=True),
    Column("holdout_positives", Integer, nullable=True),
    Column("metrics", Text, nullable=True),
    Column("baseline_metrics", Text, nullable=True),
    Column("failure_reason", Text, nullable=True),
    Column("file_path", Text, nullable=True),
    Column("sha256", String(64), nullable=True),
    Column("serving_sha256", String(64), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("finished_at", BigInteger, nullable=True),
    Column("activated_at", BigInteger, nullable=True),
    Index(None, "created_at"),
    Index(
        None,
        "status",
        unique=True,
        sqlite_where=text("status = 'active'"),
        postgresql_where=text("status = 'active'"),
    ),
)
"""The model registry (storage/ml_models.py): one row per training run. `status` is
`training`, `ready`, `failed` or `active` (at most one row: the partial unique
index). Times in µs; `data_since`/`data_until` are the first and last `stored_at`
of the rows it learned from, `holdout_from` the first of the time-ordered holdout;
`metrics` and `baseline_metrics` are JSON (ml/train.py); `file_path` is the skops
file, absolute, and `sha256` its bytes' hash; `serving_sha256` the hash of the
arrays the engine scores with, beside it (ml/serving.py; NULL for a model
registered before migration 0012, which the engine serves through scikit-learn)."""
