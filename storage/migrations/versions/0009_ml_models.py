"""ml_models: the model registry, one row per training run

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

A row is written when a training starts (`training`) so that a run in progress is
visible, and ends `ready` (its file saved, its sha256 recorded) or `failed` (with
the reason). One model at most is `active`: a partial unique index holds that
across connections and instances, where two activations at once could otherwise
both commit.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ml_models",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("algorithm", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("seed", sa.BigInteger, nullable=False),
        sa.Column("data_since", sa.BigInteger, nullable=True),
        sa.Column("data_until", sa.BigInteger, nullable=True),
        sa.Column("holdout_from", sa.BigInteger, nullable=True),
        sa.Column("train_rows", sa.Integer, nullable=True),
        sa.Column("holdout_rows", sa.Integer, nullable=True),
        sa.Column("train_positives", sa.Integer, nullable=True),
        sa.Column("holdout_positives", sa.Integer, nullable=True),
        sa.Column("metrics", sa.Text, nullable=True),
        sa.Column("baseline_metrics", sa.Text, nullable=True),
        sa.Column("failure_reason", sa.Text, nullable=True),
        sa.Column("file_path", sa.Text, nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("finished_at", sa.BigInteger, nullable=True),
        sa.Column("activated_at", sa.BigInteger, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_ml_models"),
    )
    op.create_index("ix_ml_models_created_at", "ml_models", ["created_at"])
    op.create_index(
        "ix_ml_models_status",
        "ml_models",
        ["status"],
        unique=True,
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    )


def downgrade() -> None:
    op.drop_table("ml_models")
