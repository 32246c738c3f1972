"""outbox.also_to: one row per message body, fanned out to its topics when published

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

A conflict's message went to the operators' topic and to each device concerned
as one row per topic, the same body of up to 50 members in each: measured on
the drain benchmark, 23,511 rows of 195 MB for 3,480 distinct bodies per 30,000
operations. A row now names its other topics here (a JSON array), and the
publisher sends its payload to each.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("also_to", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("also_to")
