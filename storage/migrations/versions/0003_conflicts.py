"""conflicts, the counters that feed the model, each entity's latest edit time

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

INDEXES = {
    "ix_conflicts_status_id": ["status", "id"],
    "ix_conflicts_entity_type_entity_id_id": ["entity_type", "entity_id", "id"],
    "ix_conflicts_detected_at": ["detected_at"],
}


def upgrade() -> None:
    # Null for entities stored before: "unknown", so detection queries for them.
    op.add_column("entities", sa.Column("max_edited_at", sa.BigInteger, nullable=True))
    op.add_column("entities", sa.Column("prev_max_edited_at", sa.BigInteger, nullable=True))
    op.create_table(
        "conflicts",
        sa.Column("id", RowId, primary_key=True, autoincrement=True),
        sa.Column("conflict_id", sa.String(36), nullable=False),
        sa.Column("entity_type", sa.String(64), nullable=False),
        sa.Column("entity_id", sa.String(128), nullable=False),
        sa.Column("op_a", sa.String(64), nullable=False),
        sa.Column("op_b", sa.String(64), nullable=False),
        sa.Column("device_a", sa.String(64), nullable=False),
        sa.Column("device_b", sa.String(64), nullable=False),
        sa.Column("user_a", sa.String(64), nullable=False),
        sa.Column("user_b", sa.String(64), nullable=False),
        sa.Column("fields", sa.Text, nullable=False),
        sa.Column("field_values", sa.Text, nullable=False),
        sa.Column("severity", sa.String(8), nullable=False),
        sa.Column("strategy", sa.String(24), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("winner_op_id", sa.String(64), nullable=True),
        sa.Column("detected_at", sa.BigInteger, nullable=False),
        sa.Column("resolved_at", sa.BigInteger, nullable=True),
        sa.Column("resolved_by", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_conflicts"),
        sa.UniqueConstraint("conflict_id", name="uq_conflicts_conflict_id"),
        sa.UniqueConstraint("op_a", "op_b", name="uq_conflicts_op_a_op_b"),
    )
    for name, columns in INDEXES.items():
        op.create_index(name, "conflicts", columns)
    op.create_table(
        "user_counters",
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("ops", sa.BigInteger, nullable=False),
        sa.Column("conflicts", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_user_counters"),
    )
    op.create_table(
        "device_counters",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("ops", sa.BigInteger, nullable=False),
        sa.Column("last_sync_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("device_id", name="pk_device_counters"),
    )


def downgrade() -> None:
    op.drop_table("device_counters")
    op.drop_table("user_counters")
    for name in INDEXES:
        op.drop_index(name, "conflicts")
    op.drop_table("conflicts")
    with op.batch_alter_table("entities") as batch:
        batch.drop_column("prev_max_edited_at")
        batch.drop_column("max_edited_at")
