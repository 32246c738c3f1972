"""webhook_deliveries: one row per event and endpoint, retried until delivered or dead

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06

The outbox holds one webhook row per event, written with its cause; the sender
fans it out here, one row per subscribed endpoint, in one transaction, and each
row carries its own retry schedule, lease and last error. A dead row waits here
(the spool) until the dead-letter queue in Redis holds it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", RowId, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(40), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("due_at", sa.BigInteger, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("claimed_until", sa.BigInteger, nullable=True),
        sa.Column("first_attempt_at", sa.BigInteger, nullable=True),
        sa.Column("last_status", sa.Integer, nullable=True),
        sa.Column("last_error", sa.String(300), nullable=True),
        sa.Column("dead_at", sa.BigInteger, nullable=True),
        sa.Column("dlq_id", sa.String(40), nullable=True),
        sa.Column("url", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_deliveries"),
    )
    op.create_index(
        "ix_webhook_deliveries_endpoint_dead_at_due_at",
        "webhook_deliveries",
        ["endpoint", "dead_at", "due_at"],
    )
    op.create_index("ix_webhook_deliveries_dead_at", "webhook_deliveries", ["dead_at"])


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
