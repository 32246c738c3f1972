"""entities.prev_max_edited_at: the latest edit before the batch that stores more

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Conflict detection reads an entity's stored operations only when they can matter:
an entity whose latest stored edit is older than the window of every new one has
nothing to collide with, and its summaries start empty (decision 9). The version
upsert keeps the previous value here and hands it back under the entity's lock.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("entities") as batch:
        batch.add_column(sa.Column("prev_max_edited_at", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("entities") as batch:
        batch.drop_column("prev_max_edited_at")
