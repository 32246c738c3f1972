"""model registry: the hash of each model's served form

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06

The engine scores with a model's arrays (ml/serving.py, `<id>.serving.npz` beside
the skops file) instead of importing scikit-learn to read the skops file: ~1.4 s of
CPU at every start with a model active. The registry records that file's sha256 as
it does the skops file's. Models registered before stay NULL: the engine serves
them by reading their skops file, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("ml_models", sa.Column("serving_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ml_models") as batch:
        batch.drop_column("serving_sha256")
