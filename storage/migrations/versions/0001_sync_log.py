"""sync log, entity versions, quarantine

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "sync_log",
        sa.Column("id", RowId, primary_key=True, autoincrement=True),
        sa.Column("op_id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("entity_type", sa.String(64), nullable=False),
        sa.Column("entity_id", sa.String(128), nullable=False),
        sa.Column("operation", sa.String(8), nullable=False),
        sa.Column("changes", sa.Text, nullable=False),
        sa.Column("edited_at", sa.BigInteger, nullable=False),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.Column("stored_at", sa.BigInteger, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("base_version", sa.BigInteger, nullable=True),
        sa.Column("session_id", sa.String(128), nullable=True),
        sa.Column("batch_id", sa.String(64), nullable=True),
        sa.Column("device_meta", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sync_log"),
        sa.UniqueConstraint("op_id", name="uq_sync_log_op_id"),
        sa.UniqueConstraint(
            "entity_type", "entity_id", "version", name="uq_sync_log_entity_type_entity_id_version"
        ),
    )
    op.create_index(
        "ix_sync_log_entity_type_entity_id_edited_at",
        "sync_log",
        ["entity_type", "entity_id", "edited_at"],
    )
    op.create_table(
        "entities",
        sa.Column("entity_type", sa.String(64), nullable=False),
        sa.Column("entity_id", sa.String(128), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("entity_type", "entity_id", name="pk_entities"),
    )
    op.create_table(
        "quarantine",
        sa.Column("id", RowId, primary_key=True, autoincrement=True),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.Column("topic", sa.String(512), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("path", sa.String(256), nullable=True),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("payload_bytes", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_quarantine"),
    )


def downgrade() -> None:
    op.drop_table("quarantine")
    op.drop_table("entities")
    op.drop_index("ix_sync_log_entity_type_entity_id_edited_at", "sync_log")
    op.drop_table("sync_log")
