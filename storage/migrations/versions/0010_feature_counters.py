"""feature counters: what the online scorer reads instead of the log

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06

Conflict prediction scores each operation as it is stored, from counters the ingest
keeps in the same transaction (ml/dataset.py defines the features): the latest
receipt per device, operations and conflict members per entity type and field, per
entity and hour, and the users per entity and minute. The upgrade fills them from
the log already stored, so that a model activated on an old database sees the same
history training does.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("device_counters", sa.Column("last_received_at", sa.BigInteger, nullable=True))
    op.create_table(
        "field_counters",
        sa.Column("entity_type", sa.String(64), nullable=False),
        sa.Column("field", sa.String(128), nullable=False),
        sa.Column("ops", sa.BigInteger, nullable=False),
        sa.Column("conflicts", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("entity_type", "field", name="pk_field_counters"),
    )
    op.create_table(
        "entity_hours",
        sa.Column("entity_type", sa.String(64), nullable=False),
        sa.Column("entity_id", sa.String(128), nullable=False),
        sa.Column("hour", sa.BigInteger, nullable=False),
        sa.Column("ops", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("entity_type", "entity_id", "hour", name="pk_entity_hours"),
    )
    op.create_table(
        "entity_editors",
        sa.Column("entity_type", sa.String(64), nullable=False),
        sa.Column("entity_id", sa.String(128), nullable=False),
        sa.Column("slot", sa.BigInteger, nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint(
            "entity_type", "entity_id", "slot", "user_id", name="pk_entity_editors"
        ),
    )
    _backfill()


def _backfill() -> None:
    """The counters of the log as stored: hours (3,600,000,000 µs) and minutes
    (60,000,000 µs) of `edited_at` as storage/feature_counters.py cuts them (times are
    after 1970: integer division is the floor the ingest uses)."""
    bind = op.get_bind()
    postgres = bind.dialect.name == "postgresql"
    bind.execute(
        sa.text(
            "UPDATE device_counters SET last_received_at = latest.received FROM"
            " (SELECT device_id, max(received_at) AS received FROM sync_log GROUP BY device_id)"
            " AS latest WHERE latest.device_id = device_counters.device_id"
        )
    )
    bind.execute(
        sa.text(
            "INSERT INTO entity_hours (entity_type, entity_id, hour, ops)"
            " SELECT entity_type, entity_id, edited_at / 3600000000, count(*) FROM sync_log"
            " GROUP BY entity_type, entity_id, edited_at / 3600000000"
        )
    )
    bind.execute(
        sa.text(
            "INSERT INTO entity_editors (entity_type, entity_id, slot, user_id)"
            " SELECT DISTINCT entity_type, entity_id, edited_at / 60000000, user_id"
            " FROM sync_log"
        )
    )
    # A key with a NUL is counted with U+FFFD in its place (feature_counters.counted_field),
    # replaced in the JSON text as its escape: jsonb refuses `\u0000`, a text column of
    # PostgreSQL the character, and SQLite's json_each cuts a key at it.
    changes = "replace(s.changes, '\\u0000', '\\ufffd')"
    keys = (
        f"CROSS JOIN LATERAL jsonb_object_keys({changes}::jsonb) AS f(key)"
        if postgres
        else f"JOIN json_each({changes}) AS f"
    )
    statement = (
        "INSERT INTO field_counters (entity_type, field, ops, conflicts)"
        " SELECT s.entity_type, f.key, count(*), count(m.op_id) FROM sync_log s KEYS"
        " LEFT JOIN conflict_members m ON m.op_id = s.op_id GROUP BY s.entity_type, f.key"
    )
    # One of two constant clauses: nothing of the data is in the statement.
    bind.execute(sa.text(statement.replace("KEYS", keys)))


def downgrade() -> None:
    op.drop_table("entity_editors")
    op.drop_table("entity_hours")
    op.drop_table("field_counters")
    op.drop_column("device_counters", "last_received_at")
