"""alerts: the records, the escalation schedule, the history lock, the wellness cooldown

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", RowId, primary_key=True, autoincrement=True),
        sa.Column("alert_id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("occurred_at", sa.BigInteger, nullable=False),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.Column("stored_at", sa.BigInteger, nullable=False),
        sa.Column("mood", sa.Integer, nullable=True),
        sa.Column("stress", sa.Integer, nullable=True),
        sa.Column("energy", sa.Integer, nullable=True),
        sa.Column("flags", sa.Text, nullable=False),
        sa.Column("site_id", sa.String(128), nullable=True),
        sa.Column("note", sa.Text, nullable=True),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("classification", sa.String(16), nullable=False),
        sa.Column("reasons", sa.Text, nullable=False),
        sa.Column("notification_id", sa.String(64), nullable=True),
        sa.Column("escalation", sa.Integer, nullable=True),
        sa.Column("next_escalation_at", sa.BigInteger, nullable=True),
        sa.Column("acknowledged_at", sa.BigInteger, nullable=True),
        sa.Column("acknowledged_by", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_alerts"),
        sa.UniqueConstraint("alert_id", name="uq_alerts_alert_id"),
    )
    op.create_index(
        "ix_alerts_user_id_kind_occurred_at", "alerts", ["user_id", "kind", "occurred_at"]
    )
    op.create_index("ix_alerts_next_escalation_at", "alerts", ["next_escalation_at"])
    op.create_index(
        "ix_alerts_classification_acknowledged_at", "alerts", ["classification", "acknowledged_at"]
    )
    op.create_table(
        "alert_users",
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_alert_users"),
    )
    op.create_table(
        "wellness_cooldowns",
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("last_sent_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("user_id", "reason", name="pk_wellness_cooldowns"),
    )
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("origin_at", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("origin_at")
    op.drop_table("wellness_cooldowns")
    op.drop_table("alert_users")
    op.drop_index("ix_alerts_classification_acknowledged_at", "alerts")
    op.drop_index("ix_alerts_next_escalation_at", "alerts")
    op.drop_index("ix_alerts_user_id_kind_occurred_at", "alerts")
    op.drop_table("alerts")
